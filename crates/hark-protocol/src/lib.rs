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
        /// Visitors: the page this connection was opened on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        page: Option<PageView>,
        /// Agents: the visitor lists the console already holds, per site.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        presence: Vec<ListResume>,
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
    /// Visitors: the tab navigated (single-page apps) or its title changed.
    Page(PageView),
    /// Visitors: name and email, from a pre-chat form or the site's own login.
    Identify {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        email: Option<String>,
    },
    /// Typing state. A visitor may name no conversation (typing before the first message) and may
    /// carry a `preview` of the draft, which only agents see; an agent's `preview` is ignored.
    Typing {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
        typing: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        preview: Option<String>,
    },
    /// The client has shown the conversation up to `seq`.
    Read {
        conversation_id: String,
        seq: u64,
    },
    /// Agents: set availability.
    Status {
        status: SetStatus,
    },
    /// Agents: the person at the console did something (keys, mouse); resets auto-away.
    Active,
    Ping,
    Pong,
}

/// The `type` names a client may send, for telling an unknown type from a malformed frame.
const CLIENT_TYPES: &[&str] = &[
    "hello", "send", "history", "page", "identify", "typing", "read", "status", "active", "ping",
    "pong",
];

/// Longest page URL, title or referrer kept, in bytes (longer ones are cut).
pub const MAX_PAGE_FIELD_BYTES: usize = 2048;
/// Longest typing preview forwarded, in bytes.
pub const MAX_PREVIEW_BYTES: usize = MAX_TEXT_BYTES;

/// A page a visitor has open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageView {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
}

/// Where an agent's copy of one site's visitor list stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResume {
    pub site_id: String,
    pub epoch: String,
    pub version: u64,
}

/// What an agent may set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetStatus {
    Available,
    Away,
}

/// An agent's availability as others see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Available,
    Away,
    Offline,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPresence {
    pub agent_id: String,
    pub name: String,
    pub status: AgentStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatState {
    /// No open conversation.
    Browsing,
    /// An open conversation no agent has answered or taken.
    Waiting,
    /// An agent has answered or taken the conversation.
    Chatting,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatInfo {
    pub state: ChatState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    /// The agents in the chat (the assignee and those who wrote), for `chatting`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_ids: Vec<String>,
    /// Visitor messages no agent has read yet.
    pub unread: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
}

/// One online visitor in an agent's visitor list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitorPresence {
    pub visitor_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The page of the tab used last.
    pub page: PageView,
    /// Where the visit came from: the referrer of its first page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    /// Pages viewed during this visit.
    pub pages_viewed: u32,
    /// Tabs open now.
    pub tabs: u32,
    /// When this visit began (Unix ms); time on site is now minus this.
    pub online_since: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    pub chat: ChatInfo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListMode {
    /// Replace the whole list with the frames' entries.
    Snapshot,
    /// Apply the entries and removals to the list held.
    Changes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GoneReason {
    /// Every tab closed (after the navigation grace period).
    Left,
    /// The visitor's connections stopped answering heartbeats, or their node died.
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Party {
    Visitor,
    Agent,
}

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
// Frames are built, encoded and dropped at once; boxing the large variants would only add an
// allocation per frame.
#[allow(clippy::large_enum_variant)]
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
    /// Agents: one site's visitor list, whole or as changes since the version resumed from. Long
    /// lists come in several frames with the same version; `done` marks the last.
    VisitorList {
        site_id: String,
        epoch: String,
        version: u64,
        mode: ListMode,
        visitors: Vec<VisitorPresence>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gone: Vec<String>,
        agents: Vec<AgentPresence>,
        done: bool,
    },
    /// Agents: a visitor came online or changed.
    Visitor {
        site_id: String,
        version: u64,
        visitor: VisitorPresence,
    },
    /// Agents: a visitor went offline.
    VisitorGone {
        site_id: String,
        version: u64,
        visitor_id: String,
        reason: GoneReason,
    },
    /// Agents: an agent of the site changed availability.
    AgentStatus {
        site_id: String,
        version: u64,
        agent: AgentPresence,
    },
    /// Visitors: whether an agent of the site is available to chat.
    Availability {
        agents_available: bool,
    },
    /// Someone is typing (or stopped). Previews reach agents only.
    Typing {
        visitor_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
        from: Party,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_id: Option<String>,
        typing: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        preview: Option<String>,
    },
    /// A participant has read a conversation up to `seq`.
    Read {
        conversation_id: String,
        by: Party,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_id: Option<String>,
        seq: u64,
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
