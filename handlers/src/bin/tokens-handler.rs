//! `tokens-handler`: serves `store_token`, `list_tokens`, `revoke_token` and
//! `delete_account` through the broker until SIGINT/SIGTERM.
//! `tokens-handler rotate-master-key` instead re-seals every stored platform
//! token under `TOKENS_MASTER_KEY` (old ones opened with
//! `TOKENS_MASTER_KEY_PREVIOUS`) and exits. Configuration is the environment
//! (see `handlers/README.md`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => handlers::main_for(handlers::Kind::Tokens).await,
        (Some("rotate-master-key"), None) => handlers::rotate_master_key_main().await,
        _ => {
            eprintln!("usage: tokens-handler [rotate-master-key]");
            std::process::ExitCode::from(2)
        }
    }
}
