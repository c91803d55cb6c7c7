//! Owns the contacts handler, both scenarios of the back-end description:
//! `request_contact {"contact_id"}` tells the target on
//! `<target>_contact_requested {"requester_id"}`; `accept_contact
//! {"requester_id"}` stores the contact both ways and tells the requester on
//! `<requester>_contact_approved {"contact_id"}`; `get_contact_list {}`
//! answers `<uid>_contact_list {"contacts": [...]}`.
//!
//! Error replies go to `<uid>_request_contact`, `<uid>_accept_contact` and
//! `<uid>_contact_list`.

use crate::Shared;
use protocol::UserId;
use sdk::{Command, HandlerError, Reply, Worker};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// The `request_contact` command.
#[derive(Debug, Deserialize)]
pub struct RequestContact {
    /// Who the sender wants as a contact.
    pub contact_id: String,
}

/// The `accept_contact` command.
#[derive(Debug, Deserialize)]
pub struct AcceptContact {
    /// Whose request the sender accepts.
    pub requester_id: String,
}

/// The `get_contact_list` command (no fields).
#[derive(Debug, Deserialize)]
pub struct GetContactList {}

/// The worker serving `request_contact`, `accept_contact` and `get_contact_list`.
pub fn worker(shared: Arc<Shared>) -> Worker {
    let (a, b, c) = (shared.clone(), shared.clone(), shared);
    Worker::new("contacts")
        .on("request_contact", move |cmd: Command<RequestContact>| {
            let shared = Arc::clone(&a);
            async move { request(&shared, cmd).await }
        })
        .on("accept_contact", move |cmd: Command<AcceptContact>| {
            let shared = Arc::clone(&b);
            async move { accept(&shared, cmd).await }
        })
        .on_with_errors_to(
            "get_contact_list",
            "contact_list",
            move |cmd: Command<GetContactList>| {
                let shared = Arc::clone(&c);
                async move { list(&shared, cmd).await }
            },
        )
}

fn parse_uid(field: &str, raw: &str) -> Result<UserId, HandlerError> {
    UserId::parse(raw).map_err(|e| HandlerError::bad_request(format!("{field}: {e}")))
}

/// Handles `request_contact`.
pub async fn request(shared: &Shared, cmd: Command<RequestContact>) -> Result<Reply, HandlerError> {
    let target = parse_uid("contact_id", &cmd.body.contact_id)?;
    if target == cmd.user_id {
        return Err(HandlerError::bad_request(
            "you cannot add yourself as a contact",
        ));
    }
    if shared
        .store
        .contacts(&cmd.user_id)
        .await?
        .iter()
        .any(|c| c == target.as_str())
    {
        return Err(HandlerError::conflict("already a contact"));
    }
    shared
        .store
        .add_contact_request(&cmd.user_id, &target)
        .await?;
    tracing::info!(requester = %cmd.user_id, target = %target, "contact requested");
    Ok(Reply::to_user(
        &target,
        "contact_requested",
        json!({"requester_id": cmd.user_id.as_str()}),
    ))
}

/// Handles `accept_contact`.
pub async fn accept(shared: &Shared, cmd: Command<AcceptContact>) -> Result<Reply, HandlerError> {
    let requester = parse_uid("requester_id", &cmd.body.requester_id)?;
    if !shared
        .store
        .accept_contact(&requester, &cmd.user_id)
        .await?
    {
        return Err(HandlerError::not_found(format!(
            "no pending contact request from {requester}"
        )));
    }
    tracing::info!(requester = %requester, target = %cmd.user_id, "contact approved");
    Ok(Reply::to_user(
        &requester,
        "contact_approved",
        json!({"contact_id": cmd.user_id.as_str()}),
    ))
}

/// Handles `get_contact_list`.
pub async fn list(shared: &Shared, cmd: Command<GetContactList>) -> Result<Reply, HandlerError> {
    let contacts = shared.store.contacts(&cmd.user_id).await?;
    Ok(Reply::json("contact_list", json!({"contacts": contacts})))
}
