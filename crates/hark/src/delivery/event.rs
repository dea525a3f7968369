//! Events fanned out to connections. Each carries its frame already encoded, once, so that a
//! message delivered to a thousand connections is serialised one time.

use std::sync::Arc;
use std::time::Instant;

use hark_protocol::{ConversationEvent, ServerFrame};

use crate::domain::{Conversation, ConversationId, Seq, SiteId, VisitorId};

/// An encoded server frame, shared cheaply between every connection that sends it.
pub type Frame = axum::extract::ws::Utf8Bytes;

/// Who on this node should receive an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audience {
    pub site_id: SiteId,
    /// The visitor whose connections receive it (besides the site's agents).
    pub visitor_id: VisitorId,
}

#[derive(Debug)]
pub struct MessageEvent {
    pub audience: Audience,
    pub conversation_id: ConversationId,
    pub seq: Seq,
    /// When the committing transaction returned, for the delivery-latency metric.
    pub committed_at: Instant,
    pub frame: Frame,
}

#[derive(Debug)]
pub struct ConversationChange {
    pub audience: Audience,
    pub kind: ConversationEvent,
    pub conversation_id: ConversationId,
    /// The conversation's last seq when the change happened.
    pub last_seq: Seq,
    pub frame: Frame,
}

#[derive(Debug, Clone)]
pub enum Event {
    Message(Arc<MessageEvent>),
    Conversation(Arc<ConversationChange>),
}

impl Event {
    pub fn audience(&self) -> Audience {
        match self {
            Event::Message(m) => m.audience,
            Event::Conversation(c) => c.audience,
        }
    }
}

/// The event that tells a conversation's audience it opened, closed, reopened or changed hands.
pub fn conversation_event(conv: &Conversation, kind: ConversationEvent) -> Event {
    let frame = ServerFrame::Conversation {
        event: kind,
        conversation: conv.view(),
    }
    .encode();
    Event::Conversation(Arc::new(ConversationChange {
        audience: Audience {
            site_id: conv.site_id,
            visitor_id: conv.visitor_id,
        },
        kind,
        conversation_id: conv.id,
        last_seq: conv.last_seq,
        frame: frame.into(),
    }))
}
