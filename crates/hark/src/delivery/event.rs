//! Events fanned out to connections. Each carries its frame already encoded, once, so that a
//! message delivered to a thousand connections is serialised one time.

use std::sync::Arc;
use std::time::Instant;

use hark_protocol::{ConversationEvent, ServerFrame};

use crate::domain::{AgentId, Conversation, ConversationId, Seq, SiteId, VisitorId};

/// An encoded server frame, shared cheaply between every connection that sends it.
pub type Frame = axum::extract::ws::Utf8Bytes;

/// Who on this node should receive an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audience {
    pub site_id: SiteId,
    /// The visitor whose connections receive it (besides the site's agents).
    pub visitor_id: VisitorId,
}

/// Who wrote a message, as presence needs it (chat state, unread counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    Visitor,
    Agent(AgentId),
    System,
}

#[derive(Debug)]
pub struct MessageEvent {
    pub audience: Audience,
    pub conversation_id: ConversationId,
    pub seq: Seq,
    pub writer: Writer,
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
    /// Whether the conversation is open after the change, and who it is assigned to.
    pub open: bool,
    pub assignee: Option<AgentId>,
    pub frame: Frame,
}

/// Which connections of an audience receive a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targets {
    /// The site's agents and the visitor's connections.
    AgentsAndVisitor,
    /// The site's agents only (a visitor's typing preview is never echoed to visitors).
    Agents,
}

/// What a signal says, for the presence table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    Typing,
    /// A participant has read a conversation up to `seq`.
    Read {
        conversation_id: ConversationId,
        by_agent: bool,
        seq: Seq,
    },
}

/// An ephemeral or small event between participants: typing, read receipts. Travels on the bus
/// like messages, but nothing repairs a lost one (typing expires by itself; read marks are
/// stored and re-sent on resume).
#[derive(Debug)]
pub struct Signal {
    pub audience: Audience,
    pub targets: Targets,
    pub kind: SignalKind,
    pub frame: Frame,
}

/// Who on this node receives a presence frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceTargets {
    /// The site's agents (visitor list and agent status deltas).
    Agents,
    /// Every visitor connection of the site (agent availability).
    Visitors,
}

/// A change of this node's view of a site's presence. Made by the presence table and handed to
/// the hub directly: each node computes its own view, so these never travel on the bus.
#[derive(Debug)]
pub struct PresenceEvent {
    pub site_id: SiteId,
    pub targets: PresenceTargets,
    /// The site view's version after this change (0 for frames outside the versioned stream).
    pub version: u64,
    /// When the change happened, for the fan-out lag metric.
    pub at: Instant,
    pub frame: Frame,
}

/// Tells a conversation's audience that the store holds its messages up to `last_seq`, so that
/// a connection which delivered less fetches the rest from the store. Sent after the bus may have
/// lost events (a NATS outage, a dropped publish): then no later message may come to reveal the
/// gap to the sequencer.
#[derive(Debug)]
pub struct CatchUp {
    pub audience: Audience,
    pub conversation_id: ConversationId,
    pub last_seq: Seq,
    /// For a conversation that began while events may have been lost: its `opened` event, for
    /// the connections that never heard of it (they then receive every message from seq 1).
    /// `None` for older conversations: a connection that did not follow one keeps not following
    /// it, as with any conversation it never saw.
    pub opened: Option<Arc<ConversationChange>>,
}

#[derive(Debug, Clone)]
pub enum Event {
    Message(Arc<MessageEvent>),
    Conversation(Arc<ConversationChange>),
    Signal(Arc<Signal>),
    /// Node-local: never published on the bus.
    Presence(Arc<PresenceEvent>),
    /// Not a client frame: makes connections behind on a conversation fetch the rest.
    CatchUp(Arc<CatchUp>),
}

impl Event {
    /// The site the event belongs to.
    pub fn site_id(&self) -> SiteId {
        match self {
            Event::Message(m) => m.audience.site_id,
            Event::Conversation(c) => c.audience.site_id,
            Event::Signal(s) => s.audience.site_id,
            Event::Presence(p) => p.site_id,
            Event::CatchUp(c) => c.audience.site_id,
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
        open: conv.status == crate::domain::Status::Open,
        assignee: conv.assignee_id,
        frame: frame.into(),
    }))
}

/// The catch-up event for `conv` as the store has it, when events may have been lost since
/// `lost_since` (ms): a conversation created since then and still open carries its `opened` event.
pub fn catch_up_event(conv: &Conversation, lost_since: i64) -> Event {
    let audience = Audience {
        site_id: conv.site_id,
        visitor_id: conv.visitor_id,
    };
    let opened = (conv.created_at >= lost_since && conv.status == crate::domain::Status::Open)
        .then(|| {
            // The frame the lost live event carried: the conversation as it opened, empty, so
            // that clients start it at 0 and take the messages that follow from seq 1.
            let mut view = conv.view();
            view.last_seq = 0;
            let frame = ServerFrame::Conversation {
                event: ConversationEvent::Opened,
                conversation: view,
            }
            .encode();
            Arc::new(ConversationChange {
                audience,
                kind: ConversationEvent::Opened,
                conversation_id: conv.id,
                // Every conversation opens empty; its messages follow from seq 1.
                last_seq: 0,
                open: true,
                assignee: conv.assignee_id,
                frame: frame.into(),
            })
        });
    Event::CatchUp(Arc::new(CatchUp {
        audience,
        conversation_id: conv.id,
        last_seq: conv.last_seq,
        opened,
    }))
}
