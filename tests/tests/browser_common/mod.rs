//! A real browser for end-to-end tests: Debian's `chromium`, headless,
//! driven over WebDriver by `chromedriver` on a free loopback port, with a
//! fresh profile; both killed when the [`Browser`] is dropped (their whole
//! process group, so no Chromium helper outlives the test).
//!
//! TLS: the browser trusts exactly one certificate it would otherwise refuse,
//! the test broker's, through `--ignore-certificate-errors-spki-list` with
//! the SHA-256 of that certificate's public key (Chromium honours the list
//! only with `--user-data-dir`, which every run gets fresh). Every other
//! certificate error stays an error.
#![allow(dead_code)]

use base64::Engine as _;
use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};
use sha2::Digest as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian puts them; `CHROMIUM` and `CHROMEDRIVER` override.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long chromedriver may take to answer `/status`, and Chromium to start.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// The browser's flags. Without the background-networking ones Chromium's
/// own connections (updates, sync, field trials) are refused by a closed
/// network and slow every start.
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1000,1400",
];

fn binary(variable: &str, default: &str) -> String {
    let path = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
    assert!(
        Path::new(&path).exists(),
        "{path} is missing: this test drives a real headless Chromium. Install it with \
         `apt-get install chromium chromium-driver` (.ci/run does), or set {variable} to its path"
    );
    path
}

/// The `--ignore-certificate-errors-spki-list` value for a PEM private key:
/// base64 of the SHA-256 of its SubjectPublicKeyInfo.
pub fn spki_hash_of_key(key_pem: &str) -> String {
    let key = rcgen::KeyPair::from_pem(key_pem).expect("the test certificate's key");
    let digest = sha2::Sha256::digest(key.public_key_der());
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// chromedriver and the Chromium it started.
pub struct Browser {
    pub client: Client,
    /// chromedriver's URL, for its `se/log` (not a WebDriver command).
    driver_url: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver leads its own process group, Chromium and its
        // helpers included: end the group, then reap the driver.
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium that trusts the
    /// certificate whose public key hashes to `trusted_spki`, if any.
    pub async fn start(trusted_spki: Option<&str>) -> Browser {
        use std::os::unix::process::CommandExt as _;
        let chromium = binary("CHROMIUM", CHROMIUM);
        let chromedriver = binary("CHROMEDRIVER", CHROMEDRIVER);
        let profile = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {chromedriver}: {e}"));
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = driver.try_wait() {
                panic!("chromedriver exited at start: {status}");
            }
            let ready = match http.get(format!("{base}/status")).send().await {
                Ok(response) => response
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            };
            if ready {
                break;
            }
            if started.elapsed() > START_DEADLINE {
                let _ = driver.kill();
                let _ = driver.wait();
                panic!("chromedriver did not answer on {base} within {START_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut args: Vec<String> = FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        if let Some(spki) = trusted_spki {
            args.push(format!("--ignore-certificate-errors-spki-list={spki}"));
        }
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let capabilities = match capabilities {
            Value::Object(map) => map,
            _ => unreachable!(),
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let session = tokio::time::timeout(
            START_DEADLINE,
            ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&base),
        )
        .await;
        let client = match session {
            Ok(Ok(client)) => client,
            failed => {
                let group = format!("-{}", driver.id());
                let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
                let _ = driver.wait();
                panic!("Chromium did not start a WebDriver session: {failed:?}");
            }
        };
        Browser {
            client,
            driver_url: base,
            driver,
            _profile: profile,
        }
    }

    /// Opens `url`, under a deadline.
    pub async fn open(&self, url: &str) {
        tokio::time::timeout(Duration::from_secs(20), self.client.goto(url))
            .await
            .expect("the page loads within 20 s")
            .expect("the page loads");
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn run(&self, script: &str, args: Vec<Value>) -> Value {
        tokio::time::timeout(Duration::from_secs(10), self.client.execute(script, args))
            .await
            .expect("the page answers a script within 10 s")
            .expect("the script runs")
    }

    /// The text of the element with id `id` ("" if it is missing).
    pub async fn text(&self, id: &str) -> String {
        let value = self
            .run(
                "const e = document.getElementById(arguments[0]); return e ? e.textContent : '';",
                vec![json!(id)],
            )
            .await;
        value.as_str().unwrap_or_default().to_owned()
    }

    /// Whether the element with id `id` is shown (exists, and neither it
    /// nor an ancestor is `hidden`).
    pub async fn shown(&self, id: &str) -> bool {
        self.run(
            "const e = document.getElementById(arguments[0]); return !!e && e.offsetParent !== null;",
            vec![json!(id)],
        )
        .await
        .as_bool()
        .unwrap_or(false)
    }

    /// An attribute of the element with id `id`.
    pub async fn attribute(&self, id: &str, name: &str) -> Option<String> {
        self.run(
            "const e = document.getElementById(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
            vec![json!(id), json!(name)],
        )
        .await
        .as_str()
        .map(str::to_owned)
    }

    /// Types `text` into the input with id `id`, as a person would.
    pub async fn type_into(&self, id: &str, text: &str) {
        let input = self
            .client
            .find(fantoccini::Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("#{id}: {e}"));
        input.clear().await.unwrap();
        input.send_keys(text).await.unwrap();
    }

    /// Clicks the element with id `id`.
    pub async fn click(&self, id: &str) {
        self.client
            .find(fantoccini::Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("#{id}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking #{id}: {e}"));
    }

    /// The page's error box, if shown.
    pub async fn page_error(&self) -> Option<String> {
        if self.shown("error").await {
            Some(self.text("error").await)
        } else {
            None
        }
    }

    /// Waits until `ready` says yes about the page, at most `within`; the
    /// failure names `what` and what the page's error box says.
    pub async fn wait_until<F, Fut>(&self, what: &str, within: Duration, mut ready: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + within;
        loop {
            if ready().await {
                return;
            }
            if Instant::now() > deadline {
                let error = self.page_error().await;
                let console = self.console().await;
                panic!(
                    "waited {within:?} for {what}; the page's error box: {error:?}; the page shows: {console:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the element with id `id` is shown.
    pub async fn wait_shown(&self, id: &str, within: Duration) {
        self.wait_until(&format!("#{id} to be shown"), within, || self.shown(id))
            .await;
    }

    /// Waits until the text of `id` satisfies `check`; returns it.
    pub async fn wait_text(
        &self,
        id: &str,
        within: Duration,
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let text = self.text(id).await;
            if check(&text) {
                return text;
            }
            if Instant::now() > deadline {
                let error = self.page_error().await;
                let console = self.console().await;
                panic!(
                    "waited {within:?} for #{id} to show {what}; it shows {text:?}; the page's error box: {error:?}; the page shows: {console:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the page shows, for failure messages.
    pub async fn console(&self) -> String {
        match tokio::time::timeout(
            Duration::from_secs(5),
            self.client.execute(
                "return document.body ? document.body.innerText : '';",
                vec![],
            ),
        )
        .await
        {
            Ok(Ok(value)) => value.as_str().unwrap_or_default().to_owned(),
            other => format!("(unavailable: {other:?})"),
        }
    }

    /// The browser console's messages since the last call (chromedriver's
    /// `se/log`): script errors, refused connections, CSP violations.
    pub async fn console_log(&self) -> Vec<Value> {
        let session = self.client.session_id().await.unwrap().expect("a session");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let answer: Value = http
            .post(format!("{}/session/{session}/se/log", self.driver_url))
            .json(&json!({ "type": "browser" }))
            .send()
            .await
            .expect("chromedriver answers se/log")
            .json()
            .await
            .expect("se/log answers JSON");
        answer["value"].as_array().cloned().unwrap_or_default()
    }

    /// Ends the WebDriver session (Chromium exits), under a deadline; the
    /// processes are killed on drop whatever happens here.
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.client.clone().close()).await;
    }
}

/// Reads the QR code in a `data:image/gif;base64,...` URL (what the page
/// renders) as a phone's camera app would: the text it carries.
pub fn read_qr(data_url: &str) -> String {
    let encoded = data_url
        .strip_prefix("data:image/gif;base64,")
        .unwrap_or_else(|| panic!("not a GIF data URL: {data_url:.40}"));
    let gif = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::RGBA);
    let mut decoder = options.read_info(gif.as_slice()).expect("a GIF");
    let frame = decoder
        .read_next_frame()
        .expect("a readable frame")
        .expect("a frame");
    let (width, height) = (usize::from(frame.width), usize::from(frame.height));
    let pixels = frame.buffer.to_vec();
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| {
        // RGBA: black modules on white; the red channel is enough.
        pixels[(y * width + x) * 4]
    });
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in the image");
    grids[0].decode().expect("the QR code decodes").1
}
