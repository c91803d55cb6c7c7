//! `tokens-handler`: serves `store_token`, `list_tokens`, `revoke_token` and
//! `delete_account` through the broker until SIGINT/SIGTERM.
//! `tokens-handler rotate-master-key` instead re-seals every stored platform
//! token under `TOKENS_MASTER_KEY` (old ones opened with
//! `TOKENS_MASTER_KEY_PREVIOUS`) and exits. Configuration: flags and the
//! environment (`tokens-handler --help`, `.env.example`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    handlers::main_for(handlers::Kind::Tokens).await
}
