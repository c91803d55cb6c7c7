//! `contacts-handler`: serves the `contacts` handler's command topics through the broker
//! until SIGINT/SIGTERM, then finishes in-flight commands. Configuration is the
//! environment (see `handlers/README.md`); a bad value stops it at start with
//! a message saying how to fix it (exit code 2).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    handlers::main_for(handlers::Kind::Contacts).await
}
