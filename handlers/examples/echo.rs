//! The smallest handler: answers `echo {"text": "..."}` on `<uid>_echo`.
//! Run: BROKER_URL=mqtts://localhost:8883 BROKER_CA=certs/dev/ca.pem \
//!      HANDLER_KEY=... cargo run -p handlers --example echo
use sdk::{shutdown_on_signals, Command, HandlerError, Reply, SdkConfig, Worker};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Echo {
    text: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    Worker::new("echo") // instances named "echo" share the load
        .on("echo", |cmd: Command<Echo>| async move {
            if cmd.body.text.is_empty() {
                return Err(HandlerError::bad_request("text is empty")); // -> <uid>_echo
            }
            let from = cmd.user_id.as_str(); // verified by the broker, never from the payload
            let body = json!({"status": 200, "text": cmd.body.text, "from": from});
            Ok(Reply::json("echo", body)) // -> <uid>_echo
        })
        .run(SdkConfig::from_env()?, shutdown_on_signals())
        .await?;
    Ok(())
}
