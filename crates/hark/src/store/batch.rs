//! The backend-independent half of `append_batch`: deciding, from what the store already holds,
//! which messages of a batch are new, how many seqs each conversation needs, and what each
//! message's outcome is once the seqs are reserved. Backends do only the I/O around it, so the
//! idempotency and ordering rules live in one place for SQLite and PostgreSQL alike.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use super::{Appended, NewMessage, Route};
use crate::domain::{ClientMsgId, ConversationId, Message, MessageId, Seq};

/// The idempotency key of a message: its author and client id (system messages have none).
pub fn key(m: &NewMessage) -> Option<(Uuid, ClientMsgId)> {
    m.sender.author_id().zip(m.client_id)
}

enum Slot {
    /// A new message: the `nth` of its conversation in this batch.
    New { conv: ConversationId, nth: u64 },
    /// Already stored before this batch.
    Stored(Message),
    /// A repeat of the message at this index of the batch.
    Repeat(usize),
}

/// What a batch needs from the store, computed before any seq is reserved.
pub struct Plan {
    slots: Vec<Slot>,
    /// Seqs to reserve per conversation, in first-appearance order.
    pub needs: Vec<(ConversationId, u64)>,
}

impl Plan {
    /// `earlier` holds the messages already stored under the batch's idempotency keys.
    pub fn new(batch: &[NewMessage], earlier: &HashMap<(Uuid, ClientMsgId), Message>) -> Plan {
        let mut seen: HashMap<(Uuid, ClientMsgId), usize> = HashMap::new();
        let mut index: HashMap<ConversationId, usize> = HashMap::new();
        let mut needs: Vec<(ConversationId, u64)> = Vec::new();
        let mut slots = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            if let Some(k) = key(m) {
                if let Some(prev) = earlier.get(&k) {
                    slots.push(Slot::Stored(prev.clone()));
                    continue;
                }
                if let Some(&first) = seen.get(&k) {
                    slots.push(Slot::Repeat(first));
                    continue;
                }
                seen.insert(k, i);
            }
            let at = *index.entry(m.conversation_id).or_insert_with(|| {
                needs.push((m.conversation_id, 0));
                needs.len() - 1
            });
            needs[at].1 += 1;
            slots.push(Slot::New {
                conv: m.conversation_id,
                nth: needs[at].1,
            });
        }
        Plan { slots, needs }
    }

    /// The outcome of every message, given the seq ranges reserved (`granted`: the
    /// conversation's last seq before this batch, and its route) and the conversations that
    /// exist but are closed. New messages are returned separately, in batch order, for insertion.
    pub fn settle(
        self,
        batch: &[NewMessage],
        granted: &HashMap<ConversationId, (Seq, Route)>,
        closed: &HashSet<ConversationId>,
        now: i64,
    ) -> (Vec<Appended>, Vec<Message>) {
        let mut results: Vec<Appended> = Vec::with_capacity(batch.len());
        let mut new = Vec::new();
        for (m, slot) in batch.iter().zip(self.slots) {
            let outcome = match slot {
                Slot::Stored(prev) => Appended::Duplicate(prev),
                Slot::Repeat(first) => match &results[first] {
                    Appended::Stored(prev) => Appended::Duplicate(prev.clone()),
                    other => other.clone(),
                },
                Slot::New { conv, nth } => match granted.get(&conv) {
                    Some((base, _)) => {
                        let msg = Message {
                            id: MessageId::new(),
                            conversation_id: conv,
                            seq: base + nth,
                            sender: m.sender.clone(),
                            text: m.text.clone(),
                            created_at: now,
                            client_id: m.client_id,
                        };
                        new.push(msg.clone());
                        Appended::Stored(msg)
                    }
                    None if closed.contains(&conv) => Appended::Closed,
                    None => Appended::NotFound,
                },
            };
            results.push(outcome);
        }
        (results, new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Sender, SiteId, VisitorId};

    fn msg(conv: ConversationId, author: VisitorId, client: Option<ClientMsgId>) -> NewMessage {
        NewMessage {
            conversation_id: conv,
            sender: Sender::Visitor(author),
            text: "t".into(),
            client_id: client,
        }
    }

    #[test]
    fn seqs_follow_batch_order_and_repeats_share_the_first_outcome() {
        let (a, b) = (ConversationId::new(), ConversationId::new());
        let v = VisitorId::new();
        let c1 = ClientMsgId::new();
        let batch = vec![
            msg(a, v, Some(c1)),
            msg(b, v, Some(ClientMsgId::new())),
            msg(a, v, Some(c1)),
            msg(a, v, None),
        ];
        let plan = Plan::new(&batch, &HashMap::new());
        assert_eq!(plan.needs, vec![(a, 2), (b, 1)]);
        let route = Route {
            site_id: SiteId::new(),
            visitor_id: v,
        };
        let granted = HashMap::from([(a, (10, route)), (b, (0, route))]);
        let (out, new) = plan.settle(&batch, &granted, &HashSet::new(), 5);
        let seqs: Vec<Seq> = new.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![11, 1, 12]);
        assert!(matches!(&out[2], Appended::Duplicate(m) if m.seq == 11));
    }

    #[test]
    fn closed_and_unknown_conversations_get_their_outcome() {
        let (open, closed, gone) = (
            ConversationId::new(),
            ConversationId::new(),
            ConversationId::new(),
        );
        let v = VisitorId::new();
        let batch = vec![msg(open, v, None), msg(closed, v, None), msg(gone, v, None)];
        let plan = Plan::new(&batch, &HashMap::new());
        let route = Route {
            site_id: SiteId::new(),
            visitor_id: v,
        };
        let granted = HashMap::from([(open, (0, route))]);
        let (out, new) = plan.settle(&batch, &granted, &HashSet::from([closed]), 5);
        assert_eq!(new.len(), 1);
        assert!(matches!(out[1], Appended::Closed));
        assert!(matches!(out[2], Appended::NotFound));
    }
}
