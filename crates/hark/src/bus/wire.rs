//! How events look on NATS: one line of JSON (the header: who sent it and the event's routing
//! fields), a newline, then the event's already-encoded client frame, byte for byte.
//!
//! JSON for the header because it is small beside the frame, readable with `nats sub`, and can
//! grow fields with `serde(default)`; the frame is not re-encoded, so the publishing node
//! serialises a message once and receivers hand the bytes to their connections as they came.
//! The header mirrors the event types with its own serde types, so that a field added to an
//! event fails to compile here until it travels too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hark_protocol::ConversationEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::delivery::event::{
    Audience, CatchUp, ConversationChange, Event, Frame, MessageEvent, Signal, SignalKind, Targets,
    Writer,
};
use crate::domain::{now_ms, AgentId, ConversationId, Seq, SiteId, VisitorId};

/// The header's format version; a receiver drops what it does not know.
const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("no header line")]
    NoHeader,
    #[error("bad header: {0}")]
    Header(String),
    #[error("unknown version {0}")]
    Version(u8),
    #[error("the frame is not UTF-8")]
    Frame,
}

#[derive(Serialize, Deserialize)]
struct Header {
    v: u8,
    /// The sending node's incarnation, so that a node can ignore its own events.
    node: Uuid,
    site: SiteId,
    visitor: VisitorId,
    #[serde(flatten)]
    body: Body,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Body {
    Message {
        conversation: ConversationId,
        seq: Seq,
        writer: WireWriter,
        /// Wall-clock commit time (ms): an `Instant` means nothing in another process.
        committed_ms: i64,
    },
    Conversation {
        conversation: ConversationId,
        #[serde(flatten)]
        change: Change,
    },
    Signal {
        targets: WireTargets,
        kind: WireSignal,
    },
    CatchUp {
        conversation: ConversationId,
        last_seq: Seq,
        /// The `opened` event; its frame is then the payload's frame.
        opened: Option<Change>,
    },
}

#[derive(Serialize, Deserialize)]
struct Change {
    kind: ConversationEvent,
    last_seq: Seq,
    open: bool,
    assignee: Option<AgentId>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireWriter {
    Visitor,
    Agent(AgentId),
    System,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireTargets {
    AgentsAndVisitor,
    Agents,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireSignal {
    Typing,
    Read {
        conversation: ConversationId,
        by_agent: bool,
        seq: Seq,
    },
}

/// The subject of a site's events.
pub fn subject(site: SiteId) -> String {
    format!("{}.{site}", super::nats::SUBJECT_PREFIX)
}

/// The payload for `event`, or `None` for events that stay on this node (presence views).
pub fn encode(event: &Event, node: Uuid) -> Option<Bytes> {
    let (audience, body, frame): (Audience, Body, Option<&Frame>) = match event {
        Event::Message(m) => {
            // Wall-clock time of the commit: now, less how long ago it was.
            let age = m.committed_at.elapsed().as_millis() as i64;
            let body = Body::Message {
                conversation: m.conversation_id,
                seq: m.seq,
                writer: match m.writer {
                    Writer::Visitor => WireWriter::Visitor,
                    Writer::Agent(a) => WireWriter::Agent(a),
                    Writer::System => WireWriter::System,
                },
                committed_ms: now_ms() - age,
            };
            (m.audience, body, Some(&m.frame))
        }
        Event::Conversation(c) => {
            let body = Body::Conversation {
                conversation: c.conversation_id,
                change: change(c),
            };
            (c.audience, body, Some(&c.frame))
        }
        Event::Signal(s) => {
            let body = Body::Signal {
                targets: match s.targets {
                    Targets::AgentsAndVisitor => WireTargets::AgentsAndVisitor,
                    Targets::Agents => WireTargets::Agents,
                },
                kind: match s.kind {
                    SignalKind::Typing => WireSignal::Typing,
                    SignalKind::Read {
                        conversation_id,
                        by_agent,
                        seq,
                    } => WireSignal::Read {
                        conversation: conversation_id,
                        by_agent,
                        seq,
                    },
                },
            };
            (s.audience, body, Some(&s.frame))
        }
        Event::CatchUp(c) => {
            let body = Body::CatchUp {
                conversation: c.conversation_id,
                last_seq: c.last_seq,
                opened: c.opened.as_deref().map(change),
            };
            (c.audience, body, c.opened.as_ref().map(|o| &o.frame))
        }
        // Each node computes its own presence view from what it observes.
        Event::Presence(_) => return None,
    };
    let header = Header {
        v: VERSION,
        node,
        site: audience.site_id,
        visitor: audience.visitor_id,
        body,
    };
    // Serialising plain structs of ids and numbers to memory cannot fail.
    let head = serde_json::to_vec(&header).ok()?;
    let frame = frame.map(|f| f.as_bytes()).unwrap_or_default();
    let mut out = BytesMut::with_capacity(head.len() + 1 + frame.len());
    out.put_slice(&head);
    out.put_u8(b'\n');
    out.put_slice(frame);
    Some(out.freeze())
}

fn change(c: &ConversationChange) -> Change {
    Change {
        kind: c.kind,
        last_seq: c.last_seq,
        open: c.open,
        assignee: c.assignee,
    }
}

/// The sending node and the event, from a payload made by [`encode`].
pub fn decode(payload: &Bytes) -> Result<(Uuid, Event), WireError> {
    let nl = payload
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(WireError::NoHeader)?;
    // Peek at the version alone first, so that a newer header gets a precise error.
    #[derive(Deserialize)]
    struct Version {
        v: u8,
    }
    let head = &payload[..nl];
    let v: Version = serde_json::from_slice(head).map_err(|e| WireError::Header(e.to_string()))?;
    if v.v != VERSION {
        return Err(WireError::Version(v.v));
    }
    let header: Header =
        serde_json::from_slice(head).map_err(|e| WireError::Header(e.to_string()))?;
    let frame = Frame::try_from(payload.slice(nl + 1..)).map_err(|_| WireError::Frame)?;
    let audience = Audience {
        site_id: header.site,
        visitor_id: header.visitor,
    };
    let opened = |conversation_id: ConversationId, c: Change, frame: Frame| ConversationChange {
        audience,
        kind: c.kind,
        conversation_id,
        last_seq: c.last_seq,
        open: c.open,
        assignee: c.assignee,
        frame,
    };
    let event = match header.body {
        Body::Message {
            conversation,
            seq,
            writer,
            committed_ms,
        } => {
            // Rebuilt from wall clocks, so the latency metric includes the bus hop (and any
            // clock skew between the nodes, which NTP keeps to milliseconds).
            let age = Duration::from_millis(now_ms().saturating_sub(committed_ms).max(0) as u64);
            let now = Instant::now();
            Event::Message(Arc::new(MessageEvent {
                audience,
                conversation_id: conversation,
                seq,
                writer: match writer {
                    WireWriter::Visitor => Writer::Visitor,
                    WireWriter::Agent(a) => Writer::Agent(a),
                    WireWriter::System => Writer::System,
                },
                committed_at: now.checked_sub(age).unwrap_or(now),
                frame,
            }))
        }
        Body::Conversation {
            conversation,
            change,
        } => Event::Conversation(Arc::new(opened(conversation, change, frame))),
        Body::Signal { targets, kind } => Event::Signal(Arc::new(Signal {
            audience,
            targets: match targets {
                WireTargets::AgentsAndVisitor => Targets::AgentsAndVisitor,
                WireTargets::Agents => Targets::Agents,
            },
            kind: match kind {
                WireSignal::Typing => SignalKind::Typing,
                WireSignal::Read {
                    conversation,
                    by_agent,
                    seq,
                } => SignalKind::Read {
                    conversation_id: conversation,
                    by_agent,
                    seq,
                },
            },
            frame,
        })),
        Body::CatchUp {
            conversation,
            last_seq,
            opened: change,
        } => Event::CatchUp(Arc::new(CatchUp {
            audience,
            conversation_id: conversation,
            last_seq,
            opened: change.map(|c| Arc::new(opened(conversation, c, frame))),
        })),
    };
    Ok((header.node, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audience() -> Audience {
        Audience {
            site_id: SiteId::new(),
            visitor_id: VisitorId::new(),
        }
    }

    fn round_trip(event: &Event) -> Event {
        let node = Uuid::new_v4();
        let bytes = encode(event, node).expect("travels");
        let (from, back) = decode(&bytes).expect("decodes");
        assert_eq!(from, node);
        assert_eq!(back.site_id(), event.site_id());
        back
    }

    #[test]
    fn a_message_keeps_its_routing_its_frame_and_roughly_its_age() {
        let frame = r#"{"type":"message","text":"hi\nthere"}"#;
        let m = MessageEvent {
            audience: audience(),
            conversation_id: ConversationId::new(),
            seq: 42,
            writer: Writer::Agent(AgentId::new()),
            committed_at: Instant::now() - Duration::from_millis(250),
            frame: frame.into(),
        };
        let Event::Message(back) = round_trip(&Event::Message(Arc::new(m.clone_for_test()))) else {
            panic!("not a message");
        };
        assert_eq!(back.audience, m.audience);
        assert_eq!(back.conversation_id, m.conversation_id);
        assert_eq!(back.seq, 42);
        assert_eq!(back.writer, m.writer);
        assert_eq!(back.frame.as_str(), frame);
        let age = back.committed_at.elapsed();
        assert!(
            age >= Duration::from_millis(240) && age < Duration::from_secs(5),
            "{age:?}"
        );
    }

    impl MessageEvent {
        fn clone_for_test(&self) -> MessageEvent {
            MessageEvent {
                audience: self.audience,
                conversation_id: self.conversation_id,
                seq: self.seq,
                writer: self.writer,
                committed_at: self.committed_at,
                frame: self.frame.clone(),
            }
        }
    }

    #[test]
    fn conversation_changes_signals_and_catch_ups_round_trip() {
        let aud = audience();
        let conv = ConversationId::new();
        let change = ConversationChange {
            audience: aud,
            kind: ConversationEvent::Assigned,
            conversation_id: conv,
            last_seq: 7,
            open: true,
            assignee: Some(AgentId::new()),
            frame: r#"{"type":"conversation"}"#.into(),
        };
        let Event::Conversation(c) = round_trip(&Event::Conversation(Arc::new(change))) else {
            panic!("not a conversation change");
        };
        assert_eq!(
            (c.kind, c.last_seq, c.open, c.conversation_id),
            (ConversationEvent::Assigned, 7, true, conv)
        );
        assert!(c.assignee.is_some());

        let read = Signal {
            audience: aud,
            targets: Targets::Agents,
            kind: SignalKind::Read {
                conversation_id: conv,
                by_agent: false,
                seq: 3,
            },
            frame: r#"{"type":"read"}"#.into(),
        };
        let Event::Signal(s) = round_trip(&Event::Signal(Arc::new(read))) else {
            panic!("not a signal");
        };
        assert_eq!(s.targets, Targets::Agents);
        assert_eq!(
            s.kind,
            SignalKind::Read {
                conversation_id: conv,
                by_agent: false,
                seq: 3
            }
        );
        assert_eq!(s.frame.as_str(), r#"{"type":"read"}"#);

        for opened in [false, true] {
            let catch_up = CatchUp {
                audience: aud,
                conversation_id: conv,
                last_seq: 9,
                opened: opened.then(|| {
                    Arc::new(ConversationChange {
                        audience: aud,
                        kind: ConversationEvent::Opened,
                        conversation_id: conv,
                        last_seq: 0,
                        open: true,
                        assignee: None,
                        frame: r#"{"type":"conversation","event":"opened"}"#.into(),
                    })
                }),
            };
            let Event::CatchUp(c) = round_trip(&Event::CatchUp(Arc::new(catch_up))) else {
                panic!("not a catch-up");
            };
            assert_eq!((c.conversation_id, c.last_seq), (conv, 9));
            match &c.opened {
                Some(o) => {
                    assert!(opened);
                    assert_eq!((o.kind, o.last_seq), (ConversationEvent::Opened, 0));
                    assert_eq!(
                        o.frame.as_str(),
                        r#"{"type":"conversation","event":"opened"}"#
                    );
                }
                None => assert!(!opened),
            }
        }
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        for bad in [
            &b""[..],
            b"no newline",
            b"{}\n{}",
            b"{\"v\":9}\n{}",
            b"{\"v\":1,\"t\":\"message\"}\n{}",
            b"\xff\xfe\n",
        ] {
            assert!(decode(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
        let ok = encode(
            &Event::CatchUp(Arc::new(CatchUp {
                audience: audience(),
                conversation_id: ConversationId::new(),
                last_seq: 1,
                opened: None,
            })),
            Uuid::new_v4(),
        )
        .expect("travels");
        let mut bad_frame = ok.to_vec();
        bad_frame.extend_from_slice(b"\xff");
        assert_eq!(
            decode(&Bytes::from(bad_frame)).err(),
            Some(WireError::Frame)
        );
        assert_eq!(
            decode(&Bytes::from_static(b"{\"v\":2}\n")).err(),
            Some(WireError::Version(2))
        );
    }
}
