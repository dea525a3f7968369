//! Hark's realtime wire format: every frame a client and a server exchange over the WebSocket.
//!
//! This crate is the single owner of the JSON shapes described in `docs/protocol.md`. The server,
//! the load generator and the tests all speak through these types, so the document, the snapshot
//! tests below and the code cannot drift apart silently. Nothing here does I/O.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Largest WebSocket message a peer may send, in bytes.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Largest message text, in bytes of UTF-8 after trimming.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Largest page of a `history` request.
pub const MAX_HISTORY_LIMIT: u32 = 200;
/// Page size when a `history` request names none.
pub const DEFAULT_HISTORY_LIMIT: u32 = 50;

/// A conversation and the highest sequence number a client holds in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    pub conversation_id: String,
    pub seq: u64,
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Hello {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        #[serde(default)]
        resume: Vec<ResumePoint>,
    },
    Send {
        client_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
        text: String,
    },
    History {
        req_id: String,
        conversation_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before_seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Ping,
    Pong,
}

/// The `type` names a client may send, for telling an unknown type from a malformed frame.
const CLIENT_TYPES: &[&str] = &["hello", "send", "history", "ping", "pong"];

/// Why a client frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame is not a JSON object with a known shape: {0}")]
    BadFrame(String),
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
}

impl DecodeError {
    /// The stable error code the server answers with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::BadFrame(_) => ErrorCode::BadFrame,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
        }
    }
}

impl ClientFrame {
    /// Decodes one text frame. The error tells a malformed frame from a well-formed one of an
    /// unknown type, which a newer client may legitimately send.
    pub fn decode(text: &str) -> Result<ClientFrame, DecodeError> {
        match serde_json::from_str::<ClientFrame>(text) {
            Ok(frame) => Ok(frame),
            Err(err) => {
                #[derive(Deserialize)]
                struct TypeOnly {
                    #[serde(rename = "type")]
                    ty: String,
                }
                match serde_json::from_str::<TypeOnly>(text) {
                    Ok(t) if !CLIENT_TYPES.contains(&t.ty.as_str()) => {
                        Err(DecodeError::UnknownType(truncate(&t.ty, 64)))
                    }
                    _ => Err(DecodeError::BadFrame(truncate(&err.to_string(), 200))),
                }
            }
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary, for
/// quoting untrusted input in error messages.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Like [`truncate`], with `…` appended when something was cut.
pub fn abbreviate(s: &str, max: usize) -> String {
    let cut = truncate(s, max);
    if cut.len() < s.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Author {
    Visitor { id: String },
    Agent { id: String, name: String },
    System,
}

/// A stored message as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageBody {
    pub conversation_id: String,
    pub seq: u64,
    pub id: String,
    pub author: Author,
    pub text: String,
    pub created_at: i64,
    pub client_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationStatus {
    Open,
    Closed,
}

/// A conversation as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationView {
    pub id: String,
    pub site_id: String,
    pub visitor_id: String,
    pub status: ConversationStatus,
    pub assignee_id: Option<String>,
    pub last_seq: u64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationEvent {
    Opened,
    Closed,
    Reopened,
    Assigned,
}

/// Who the server recognised at `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SessionInfo {
    Visitor {
        visitor_id: String,
        site_id: String,
    },
    Agent {
        agent_id: String,
        name: String,
        role: String,
        site_ids: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Visitor,
    Agent,
}

/// Limits the server enforces on this connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_text_bytes: usize,
    pub sends_per_sec: u32,
    pub send_burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconnectReason {
    Draining,
    Overloaded,
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        role: Role,
        session: SessionInfo,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        conversations: Vec<ConversationView>,
        heartbeat_ms: u64,
        limits: Limits,
    },
    Ready,
    Ack {
        client_id: String,
        conversation_id: String,
        seq: u64,
        message_id: String,
        created_at: i64,
        duplicate: bool,
    },
    Message(MessageBody),
    History {
        req_id: String,
        conversation_id: String,
        messages: Vec<MessageBody>,
        has_more: bool,
    },
    Conversation {
        event: ConversationEvent,
        conversation: ConversationView,
    },
    Error(ErrorFrame),
    Reconnect {
        reason: ReconnectReason,
        after_ms: u64,
    },
    Ping,
    Pong,
}

impl ServerFrame {
    /// Serialises the frame. Serialising these types cannot fail (string keys, no maps with
    /// non-string keys), so the fallback is unreachable in practice but never panics.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"encoding failed"}"#.to_owned()
        })
    }
}

/// Stable error codes of `error` frames (and of the REST API, which shares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    UnknownType,
    HelloRequired,
    AlreadyHello,
    Unauthorized,
    TextEmpty,
    TextTooLong,
    InvalidClientId,
    NotFound,
    ConversationClosed,
    RateLimited,
    Overloaded,
    Unavailable,
    BadRequest,
    HistoryUnavailable,
    SeqAhead,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::AlreadyHello => "already_hello",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TextEmpty => "text_empty",
            ErrorCode::TextTooLong => "text_too_long",
            ErrorCode::InvalidClientId => "invalid_client_id",
            ErrorCode::NotFound => "not_found",
            ErrorCode::ConversationClosed => "conversation_closed",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::HistoryUnavailable => "history_unavailable",
            ErrorCode::SeqAhead => "seq_ahead",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An `error` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_from_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
}

impl ErrorFrame {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
        ErrorFrame {
            code,
            message: message.into(),
            client_id: None,
            req_id: None,
            conversation_id: None,
            retry_after_ms: None,
            available_from_seq: None,
            last_seq: None,
        }
    }
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }
    pub fn req_id(mut self, id: impl Into<String>) -> Self {
        self.req_id = Some(id.into());
        self
    }
    pub fn conversation_id(mut self, id: impl Into<String>) -> Self {
        self.conversation_id = Some(id.into());
        self
    }
    pub fn retry_after_ms(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}

/// WebSocket close codes and their reason texts (`docs/protocol.md`, "Close codes").
pub mod close {
    pub const NORMAL: (u16, &str) = (1000, "normal");
    pub const DRAINING: (u16, &str) = (1001, "draining");
    pub const FRAME_TOO_LARGE: (u16, &str) = (1009, "frame_too_large");
    pub const SLOW_CONSUMER: (u16, &str) = (4000, "slow_consumer");
    pub const HEARTBEAT_TIMEOUT: (u16, &str) = (4001, "heartbeat_timeout");
    pub const HELLO_TIMEOUT: (u16, &str) = (4002, "hello_timeout");
    pub const UNAUTHORIZED: (u16, &str) = (4003, "unauthorized");
    pub const PROTOCOL_VIOLATION: (u16, &str) = (4004, "protocol_violation");
    pub const FLOOD: (u16, &str) = (4008, "flood");
    pub const OVERLOADED: (u16, &str) = (4013, "overloaded");
}

/// Parses a client message id: it must be a UUID (any version), so it cannot be used to smuggle
/// large or odd strings into the store, and is stored in its canonical hyphenated form.
pub fn parse_client_id(raw: &str) -> Option<Uuid> {
    Uuid::parse_str(raw).ok()
}

#[cfg(test)]
mod tests;
