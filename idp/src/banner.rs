//! Owns the sign-up instructions the broker's default run prints: shell
//! commands (curl, then mosquitto_sub/pub with the issued token) that work
//! as printed. A test runs them.

use std::net::SocketAddr;

/// Lines telling a newcomer how to sign up by hand against the service at
/// `idp` and use the token on the broker's TLS `mqtt_port` with the CA file
/// `ca`. `development`: codes are in the log, not sent.
pub fn signup_lines(idp: SocketAddr, mqtt_port: u16, ca: &str, development: bool) -> Vec<String> {
    let url = format!("http://{idp}");
    let mut lines = vec![format!(
        "identity service (in-process): {url}  (JWKS {url}/.well-known/jwks.json)"
    )];
    if development {
        lines.push("  !!! DEVELOPMENT: SMS_PROVIDER_URL is unset: one-time codes are WRITTEN TO THIS LOG (stderr, `code=`), NOT SENT !!!".into());
    }
    lines.push("sign up by hand (bash; any E.164 number):".into());
    lines.push(format!(
        r#"  S=$(curl -s -X POST {url}/register -H 'Content-Type: application/json' -d '{{"msisdn":"+15551234567"}}' | sed -n 's/.*"session_token":"\([^"]*\)".*/\1/p')"#
    ));
    lines.push(format!(
        r#"  curl -s -X POST {url}/sms/verify -H "Authorization: Bearer $S""#
    ));
    lines.push(if development {
        "  CODE=123456   # the 6 digits after `code=` in this log".into()
    } else {
        "  CODE=123456   # the 6 digits of the SMS".into()
    });
    lines.push(format!(
        r#"  R=$(curl -s -X POST {url}/sms/verify_code -H "Authorization: Bearer $S" -H 'Content-Type: application/json' -d "{{\"code\":\"$CODE\"}}")"#
    ));
    lines.push(
        r#"  T=$(echo "$R" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p'); U=$(echo "$R" | sed -n 's/.*"user_id":"\([^"]*\)".*/\1/p')"#.into(),
    );
    lines.push(format!(
        r#"  mosquitto_sub -h localhost -p {mqtt_port} --cafile {ca} -V mqttv5 -u JWT -P "$T" -t "${{U}}_contact_list" -v &"#
    ));
    lines.push(format!(
        r#"  sleep 2; mosquitto_pub -h localhost -p {mqtt_port} --cafile {ca} -V mqttv5 -u JWT -P "$T" -t get_contact_list -m '{{}}'"#
    ));
    lines.push("# the subscriber prints: <uid>_contact_list {\"contacts\":[]}".into());
    lines
}

/// Lines telling a newcomer where the sign-up page is (`/app/` on the
/// service at `idp`) and which broker URL it will use, or which variable
/// gives it one.
pub fn page_lines(idp: SocketAddr, mqtt_url: Option<&str>) -> Vec<String> {
    let page = format!("http://{idp}/app/");
    match mqtt_url {
        Some(url) => vec![format!(
            "sign-up page (open in a browser): {page}  (MQTT.js over {url})"
        )],
        None => vec![
            format!("sign-up page (open in a browser): {page}"),
            "  it signs up but cannot reach MQTT: set BROKER_WS_LISTEN=127.0.0.1:8083 (or IDP_WEB_MQTT_URL=wss://<name>:<port>/mqtt)".into(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_the_addresses_and_the_development_warning() {
        let idp: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let lines = signup_lines(idp, 8883, "certs/dev/ca.pem", true).join("\n");
        assert!(lines.contains("http://127.0.0.1:8080/register"));
        assert!(lines.contains("-p 8883 --cafile certs/dev/ca.pem"));
        assert!(lines.contains("NOT SENT"));
        assert!(!signup_lines(idp, 8883, "ca.pem", false)
            .join("\n")
            .contains("NOT SENT"));
    }

    #[test]
    fn the_page_line_names_its_url_and_what_it_lacks() {
        let idp: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let with = page_lines(idp, Some("ws://127.0.0.1:8083/mqtt")).join("\n");
        assert!(with.contains("http://127.0.0.1:8080/app/"), "{with}");
        assert!(with.contains("ws://127.0.0.1:8083/mqtt"), "{with}");
        let without = page_lines(idp, None).join("\n");
        assert!(without.contains("http://127.0.0.1:8080/app/"), "{without}");
        assert!(without.contains("BROKER_WS_LISTEN"), "{without}");
    }
}
