//! REST endpoints that go with presence: a conversation's read marks (for a console opening it)
//! and proactive chat (an agent starts a chat with a visitor it sees browsing).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hark_protocol::{ConversationEvent, ConversationView, MessageBody};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::{append_as_agent, path_id, text_field, visible_conversation, ApiJson};
use super::error::{ApiError, ErrorBody};
use super::session::AuthedAgent;
use crate::delivery::event::conversation_event;
use crate::domain::{ClientMsgId, VisitorId};
use crate::server::App;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reader {
    Visitor,
    Agent,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadMark {
    pub reader: Reader,
    /// The agent, for an agent's mark.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// Read up to and including this seq.
    pub seq: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadMarks {
    pub marks: Vec<ReadMark>,
}

/// The read marks of a conversation: how far the visitor and each agent have read.
#[utoipa::path(
    get,
    path = "/api/conversations/{id}/read",
    tag = "conversations",
    security(("bearer" = []), ("cookie" = [])),
    params(("id" = String, Path, description = "Conversation id")),
    responses(
        (status = 200, description = "Every reader's mark", body = ReadMarks),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 404, description = "No such conversation, or of a site the agent cannot access (`not_found`)", body = ErrorBody),
    )
)]
pub async fn read_marks(
    State(app): State<App>,
    Path(id): Path<String>,
    me: AuthedAgent,
) -> Result<axum::Json<ReadMarks>, ApiError> {
    let conv = visible_conversation(&app, &me.agent, &id).await?;
    let marks = app
        .store
        .read_marks(conv.id)
        .await?
        .into_iter()
        .map(|(reader, seq)| {
            if reader == conv.visitor_id.0 {
                ReadMark {
                    reader: Reader::Visitor,
                    agent_id: None,
                    seq,
                }
            } else {
                ReadMark {
                    reader: Reader::Agent,
                    agent_id: Some(reader.to_string()),
                    seq,
                }
            }
        })
        .collect();
    Ok(axum::Json(ReadMarks { marks }))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StartChatRequest {
    /// The first message, from the calling agent (1 to 4096 bytes after trimming).
    #[serde(default)]
    pub text: Option<String>,
    /// A UUID for the first message, so that a retried request stores it once.
    #[serde(default)]
    pub client_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StartedChat {
    #[schema(value_type = super::openapi::wire::ConversationView)]
    pub conversation: ConversationView,
    #[schema(value_type = Option<super::openapi::wire::MessageBody>)]
    pub message: Option<MessageBody>,
}

/// Starts a chat with a visitor (proactive chat): opens the visitor's conversation, or takes the
/// one already open, assigns it to the caller and sends `text` as the caller's first message.
///
/// The visitor's tabs receive the `conversation` event and the message over their WebSocket.
#[utoipa::path(
    post,
    path = "/api/visitors/{id}/conversations",
    tag = "conversations",
    security(("bearer" = []), ("cookie" = [])),
    params(("id" = String, Path, description = "Visitor id")),
    request_body = StartChatRequest,
    responses(
        (status = 201, description = "A conversation was opened", body = StartedChat),
        (status = 200, description = "The visitor's open conversation, now assigned to the caller", body = StartedChat),
        (status = 400, description = "`text_empty`, `text_too_long`, `invalid_client_id` or `bad_request`", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Cookie without the CSRF header (`csrf_failed`)", body = ErrorBody),
        (status = 404, description = "No such visitor, or of a site the agent cannot access (`not_found`)", body = ErrorBody),
        (status = 409, description = "The conversation was closed while the message was sent (`conversation_closed`)", body = ErrorBody),
        (status = 503, description = "`overloaded` or `unavailable`: retry with the same `client_id`", body = ErrorBody),
    )
)]
pub async fn start_chat(
    State(app): State<App>,
    Path(id): Path<String>,
    me: AuthedAgent,
    ApiJson(req): ApiJson<StartChatRequest>,
) -> Result<Response, ApiError> {
    let visitor_id: VisitorId = path_id(&id, "visitor")?;
    let visitor = match app.store.visitor(visitor_id).await? {
        Some(v) if me.agent.can_access(v.site_id) => v,
        _ => return Err(ApiError::not_found("visitor")),
    };
    // Check the input before changing anything.
    let text = req.text.as_deref().map(text_field).transpose()?;
    let client_id = match req.client_id.as_deref() {
        None => ClientMsgId(uuid::Uuid::now_v7()),
        Some(raw) => ClientMsgId(hark_protocol::parse_client_id(raw.trim()).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                hark_protocol::ErrorCode::InvalidClientId.as_str(),
                "client_id must be a UUID",
            )
        })?),
    };
    let (conv, created) = app
        .store
        .open_conversation(visitor.site_id, visitor.id)
        .await?;
    if created {
        metrics::counter!("hark_conversations_opened_total").increment(1);
        app.bus
            .publish(conversation_event(&conv, ConversationEvent::Opened));
    }
    let conv = if conv.assignee_id != Some(me.agent.id) {
        let conv = app
            .store
            .assign(conv.id, Some(me.agent.id))
            .await?
            .ok_or_else(|| ApiError::not_found("conversation"))?;
        app.bus
            .publish(conversation_event(&conv, ConversationEvent::Assigned));
        conv
    } else {
        conv
    };
    let message = match text {
        None => None,
        Some(text) => Some(
            append_as_agent(&app, conv.id, &me.agent, text, client_id)
                .await?
                .0
                .body(),
        ),
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    // The conversation as it is after the message.
    let conversation = match app.store.conversation(conv.id).await? {
        Some(c) => c.view(),
        None => conv.view(),
    };
    Ok((
        status,
        axum::Json(StartedChat {
            conversation,
            message,
        }),
    )
        .into_response())
}
