//! Fuzz target `jwt`: arbitrary token strings, and real tokens built from
//! arbitrary headers and claims then structurally mutated, through the
//! broker's device-token verifier (`broker::auth::jwt::JwtVerifier`).
//! Asserts no panic, that every accepted token carries a valid HMAC signature
//! from the configured secret over exactly its header and payload (checked
//! independently with jsonwebtoken's primitives), and that well-formed,
//! correctly signed, current tokens are accepted (so the target is not
//! vacuous).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use broker::auth::jwt::{JwtSettings, JwtVerifier};
use fuzz::config;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::sync::OnceLock;

const SECRET: &[u8] = b"fuzz-secret-0123456789-0123456789";
const OTHER_SECRET: &[u8] = b"not-the-configured-secret-987654321";

fn verifier() -> &'static (tokio::runtime::Runtime, JwtVerifier) {
    static V: OnceLock<(tokio::runtime::Runtime, JwtVerifier)> = OnceLock::new();
    V.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let verifier = JwtVerifier::new(JwtSettings {
            hmac_secret: Some(protocol::Secret::from(std::str::from_utf8(SECRET).unwrap())),
            ..JwtSettings::default()
        })
        .expect("verifier");
        (runtime, verifier)
    })
}

fn now() -> u64 {
    protocol::claims::now_secs()
}

/// Runs the broker's verifier; `Ok(uid)` when it accepts.
fn verify(token: &str) -> Result<String, String> {
    let (runtime, verifier) = verifier();
    runtime
        .block_on(verifier.verify(token))
        .map(|v| v.uid.to_string())
        .map_err(|e| e.to_string())
}

/// Independent oracle: the token is three segments and the third is a valid
/// HMAC, under the configured secret and the header's HS* algorithm, of the
/// first two exactly as sent.
fn correctly_signed(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, s] = parts[..] else {
        return false;
    };
    let Ok(header) = jsonwebtoken::decode_header(token) else {
        return false;
    };
    if !matches!(
        header.alg,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    ) {
        return false;
    }
    jsonwebtoken::crypto::verify(
        s,
        format!("{h}.{p}").as_bytes(),
        &DecodingKey::from_secret(SECRET),
        header.alg,
    )
    .unwrap_or(false)
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// How the third segment is made.
#[derive(Debug, Clone)]
enum Signature {
    Right,
    WrongSecret,
    Empty,
    Random(Vec<u8>),
}

fn alg_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => Just(json!("HS256")),
        1 => Just(json!("HS384")),
        1 => Just(json!("HS512")),
        1 => Just(json!("RS256")),
        1 => Just(json!("ES256")),
        1 => Just(json!("EdDSA")),
        1 => Just(json!("none")),
        1 => Just(json!("hs256")),
        1 => Just(json!(null)),
        1 => Just(json!(256)),
        1 => "[A-Za-z0-9]{0,6}".prop_map(Value::from),
    ]
}

fn time_value() -> impl Strategy<Value = Option<Value>> {
    let now = now();
    prop_oneof![
        4 => Just(Some(json!(now + 3600))),
        1 => Just(Some(json!(now.saturating_sub(3600)))),
        1 => Just(Some(json!(0))),
        1 => Just(Some(json!(u64::MAX))),
        1 => Just(Some(json!(10_000_000_000_000_000_000u64))),
        1 => Just(Some(json!(i64::MAX))),
        1 => Just(Some(json!(-1))),
        1 => Just(Some(json!(1.5))),
        1 => Just(Some(json!(1e300))),
        1 => Just(Some(json!("soon"))),
        1 => Just(Some(json!(null))),
        1 => Just(None),
        1 => any::<u64>().prop_map(|n| Some(json!(n))),
    ]
}

fn subject() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        4 => "[a-z0-9.-]{1,12}".prop_map(|s| Some(Value::from(s))),
        1 => Just(Some(json!(""))),
        1 => Just(Some(json!("a".repeat(300)))),
        1 => ".{0,8}".prop_map(|s| Some(Value::from(s))),
        1 => Just(Some(json!(42))),
        1 => Just(Some(json!(null))),
        1 => Just(Some(json!(["a"]))),
        1 => Just(None),
    ]
}

/// Header, claims and signature of a token, plus whether its claims are
/// ones the broker must accept.
#[derive(Debug, Clone)]
struct Parts {
    header: Value,
    claims: Value,
    signature: Signature,
}

fn parts() -> impl Strategy<Value = Parts> {
    let header_extras = (
        option::of("[a-z0-9]{0,8}"),
        option::of(prop_oneof![
            Just(json!(["exp"])),
            Just(json!(["x-unknown"])),
            Just(json!([])),
            Just(json!("b64"))
        ]),
        option::of(prop_oneof![Just(json!("JWT")), Just(json!(7))]),
    );
    let signature = prop_oneof![
        6 => Just(Signature::Right),
        1 => Just(Signature::WrongSecret),
        1 => Just(Signature::Empty),
        1 => vec(any::<u8>(), 0..64).prop_map(Signature::Random),
    ];
    (
        alg_name(),
        header_extras,
        subject(),
        time_value(),
        option::of(time_value()),
        option::of(time_value()),
        option::of(".{0,6}"),
        signature,
    )
        .prop_map(
            |(alg, (kid, crit, typ), sub, exp, nbf, iat, extra, signature)| {
                let mut header = Map::new();
                header.insert("alg".into(), alg);
                if let Some(kid) = kid {
                    header.insert("kid".into(), kid.into());
                }
                if let Some(crit) = crit {
                    header.insert("crit".into(), crit);
                }
                if let Some(typ) = typ {
                    header.insert("typ".into(), typ);
                }
                let mut claims = Map::new();
                if let Some(sub) = sub {
                    claims.insert("sub".into(), sub);
                }
                if let Some(exp) = exp {
                    claims.insert("exp".into(), exp);
                }
                if let Some(Some(nbf)) = nbf {
                    claims.insert("nbf".into(), nbf);
                }
                if let Some(Some(iat)) = iat {
                    claims.insert("iat".into(), iat);
                }
                if let Some(extra) = extra {
                    claims.insert("extra".into(), extra.into());
                }
                Parts {
                    header: Value::Object(header),
                    claims: Value::Object(claims),
                    signature,
                }
            },
        )
}

/// The compact JWS of `parts`, signed as they say.
fn token(parts: &Parts) -> String {
    let head = format!(
        "{}.{}",
        b64(parts.header.to_string().as_bytes()),
        b64(parts.claims.to_string().as_bytes())
    );
    let alg = match parts.header.get("alg").and_then(Value::as_str) {
        Some("HS384") => Algorithm::HS384,
        Some("HS512") => Algorithm::HS512,
        _ => Algorithm::HS256,
    };
    let sign = |secret: &[u8]| {
        jsonwebtoken::crypto::sign(head.as_bytes(), &EncodingKey::from_secret(secret), alg)
            .expect("hmac signs")
    };
    let sig = match &parts.signature {
        Signature::Right => sign(SECRET),
        Signature::WrongSecret => sign(OTHER_SECRET),
        Signature::Empty => String::new(),
        Signature::Random(bytes) => b64(bytes),
    };
    format!("{head}.{sig}")
}

/// Whether the broker must accept `parts`: plain HS256 header, right
/// signature, a valid uid, an `exp` an hour away, no other time claims.
fn must_accept(parts: &Parts) -> bool {
    let plain_header = parts.header == json!({"alg": "HS256"})
        || parts.header == json!({"alg": "HS256", "typ": "JWT"});
    let Some(claims) = parts.claims.as_object() else {
        return false;
    };
    let uid_ok = claims
        .get("sub")
        .and_then(Value::as_str)
        .is_some_and(|s| protocol::uid::UserId::parse(s).is_ok());
    let exp_ok = claims
        .get("exp")
        .and_then(Value::as_u64)
        .is_some_and(|e| e > now() + 60 && e < now() + 7200);
    plain_header
        && matches!(parts.signature, Signature::Right)
        && uid_ok
        && exp_ok
        && !claims.contains_key("nbf")
        && !claims.contains_key("iat")
}

/// Structural changes to a compact token.
#[derive(Debug, Clone)]
enum Edit {
    FlipChar {
        at: usize,
        to: char,
    },
    Remove {
        at: usize,
    },
    Insert {
        at: usize,
        what: String,
    },
    Truncate {
        to: usize,
    },
    SwapSegments {
        a: usize,
        b: usize,
    },
    DuplicateSegment {
        which: usize,
    },
    DropSegment {
        which: usize,
    },
    /// Replaces the header with another (signature kept).
    ReplaceHeader(String),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let one = prop_oneof![
        (
            any::<usize>(),
            prop_oneof![
                Just('.'),
                Just('='),
                Just(' '),
                any::<char>(),
                proptest::char::range('A', 'z')
            ]
        )
            .prop_map(|(at, to)| Edit::FlipChar { at, to }),
        any::<usize>().prop_map(|at| Edit::Remove { at }),
        (
            any::<usize>(),
            prop_oneof![
                Just(".".to_string()),
                Just("..".to_string()),
                "[A-Za-z0-9_-]{1,6}",
                ".{1,3}"
            ]
        )
            .prop_map(|(at, what)| Edit::Insert { at, what }),
        any::<usize>().prop_map(|to| Edit::Truncate { to }),
        (0usize..3, 0usize..3).prop_map(|(a, b)| Edit::SwapSegments { a, b }),
        (0usize..3).prop_map(|which| Edit::DuplicateSegment { which }),
        (0usize..3).prop_map(|which| Edit::DropSegment { which }),
        prop_oneof![
            Just(r#"{"alg":"none"}"#.to_string()),
            Just(r#"{"alg":"HS512"}"#.to_string()),
            Just(r#"{"alg":"RS256"}"#.to_string()),
            Just(r#"{"alg":"HS256","crit":["x"]}"#.to_string()),
            ".{0,12}",
        ]
        .prop_map(|h| Edit::ReplaceHeader(b64(h.as_bytes()))),
    ];
    vec(one, 1..4)
}

fn char_index(s: &str, at: usize) -> usize {
    let n = s.chars().count();
    if n == 0 {
        return 0;
    }
    s.char_indices().nth(at % n).map_or(0, |(i, _)| i)
}

fn edit(token: &str, edits: &[Edit]) -> String {
    let mut t = token.to_string();
    for e in edits {
        match e {
            Edit::FlipChar { at, to } if !t.is_empty() => {
                let mut chars: Vec<char> = t.chars().collect();
                let n = chars.len();
                if let Some(c) = chars.get_mut(at % n) {
                    *c = *to;
                }
                t = chars.into_iter().collect();
            }
            Edit::Remove { at } if !t.is_empty() => {
                let i = char_index(&t, *at);
                t.remove(i);
            }
            Edit::Insert { at, what } => {
                let i = char_index(&t, *at);
                t.insert_str(i, what);
            }
            Edit::Truncate { to } => {
                let i = char_index(&t, *to);
                t.truncate(i);
            }
            Edit::SwapSegments { a, b } => {
                let mut segs: Vec<String> = t.split('.').map(str::to_string).collect();
                if *a < segs.len() && *b < segs.len() {
                    segs.swap(*a, *b);
                }
                t = segs.join(".");
            }
            Edit::DuplicateSegment { which } => {
                let mut segs: Vec<String> = t.split('.').map(str::to_string).collect();
                if let Some(s) = segs.get(*which).cloned() {
                    segs.insert(*which, s);
                }
                t = segs.join(".");
            }
            Edit::DropSegment { which } => {
                let mut segs: Vec<String> = t.split('.').map(str::to_string).collect();
                if *which < segs.len() {
                    segs.remove(*which);
                }
                t = segs.join(".");
            }
            Edit::ReplaceHeader(h) => {
                let mut segs: Vec<String> = t.split('.').map(str::to_string).collect();
                if let Some(first) = segs.first_mut() {
                    *first = h.clone();
                }
                t = segs.join(".");
            }
            _ => {}
        }
    }
    t
}

proptest! {
    #![proptest_config(config(10000))]

    /// Any string, including three base64url segments of random bytes.
    #[test]
    fn arbitrary_tokens_are_refused(
        raw in prop_oneof![
            ".{0,120}",
            "[A-Za-z0-9_.=-]{0,300}",
            (vec(any::<u8>(), 0..60), vec(any::<u8>(), 0..120), vec(any::<u8>(), 0..40))
                .prop_map(|(a, b, c)| format!("{}.{}.{}", b64(&a), b64(&b), b64(&c))),
        ]
    ) {
        let result = verify(&raw);
        prop_assert!(result.is_err() || correctly_signed(&raw), "accepted {raw:?}");
    }

    /// Tokens built from arbitrary headers and claims, signed right or
    /// wrong: accepted only when correctly signed, and always accepted when
    /// plainly valid.
    #[test]
    fn built_tokens(parts in parts()) {
        let t = token(&parts);
        let result = verify(&t);
        if result.is_ok() {
            prop_assert!(correctly_signed(&t), "accepted a badly signed token {t:?}");
        }
        if must_accept(&parts) {
            let sub = parts.claims.get("sub").and_then(Value::as_str).map(str::to_string);
            prop_assert_eq!(result.ok(), sub, "refused a valid token {}", t);
        }
    }

    /// Real, correctly signed tokens, structurally mutated.
    #[test]
    fn mutated_tokens(parts in parts(), edits in edits()) {
        let t = edit(&token(&parts), &edits);
        let result = verify(&t);
        prop_assert!(result.is_err() || correctly_signed(&t), "accepted a badly signed token {t:?}");
    }
}

/// Issue 9: a validly signed token whose `exp` is enormous must not break
/// anything at verification (the deadline arithmetic is the session's).
#[test]
fn enormous_exp_verifies_without_panic() {
    for exp in [u64::MAX, 10_000_000_000_000_000_000, i64::MAX as u64] {
        let parts = Parts {
            header: json!({"alg": "HS256"}),
            claims: json!({"sub": "68946", "exp": exp}),
            signature: Signature::Right,
        };
        let t = token(&parts);
        let result = verify(&t);
        assert!(
            result.is_err() || correctly_signed(&t),
            "exp {exp}: {result:?}"
        );
    }
}
