//! Exactly-once, in-order delivery per conversation over an unreliable event stream.
//!
//! Each connection remembers the highest seq it has given its client per conversation. An event
//! arriving through the bus is then either stale (already given: drop it), next (give it), or
//! ahead (a gap: the bus dropped or reordered something, so fetch the missing range from the store
//! first). Pure bookkeeping, so that the rule can be property-tested apart from sockets.

use std::collections::HashMap;

use crate::domain::{ConversationId, Seq};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Already delivered.
    Stale,
    /// The next one: deliver it.
    Next,
    /// Messages after `after` and before this one are missing: backfill them, then deliver.
    Gap { after: Seq },
}

#[derive(Debug, Default)]
pub struct Delivered {
    last: HashMap<ConversationId, Seq>,
}

impl Delivered {
    /// The client holds everything up to `seq` (from `hello`, or the snapshot in `welcome`).
    pub fn start_at(&mut self, conv: ConversationId, seq: Seq) {
        self.last.insert(conv, seq);
    }

    /// Like [`Delivered::start_at`], unless the conversation is already tracked.
    pub fn start_if_unknown(&mut self, conv: ConversationId, seq: Seq) {
        self.last.entry(conv).or_insert(seq);
    }

    pub fn last(&self, conv: ConversationId) -> Option<Seq> {
        self.last.get(&conv).copied()
    }

    /// What to do with an event for `seq`. A conversation never seen starts at that event: the
    /// client did not hold it, and its history is a `history` request away.
    pub fn verdict(&self, conv: ConversationId, seq: Seq) -> Verdict {
        match self.last.get(&conv) {
            None => Verdict::Next,
            Some(&last) if seq <= last => Verdict::Stale,
            Some(&last) if seq == last + 1 => Verdict::Next,
            Some(&last) => Verdict::Gap { after: last },
        }
    }

    /// Records that the client now holds `seq` (and so everything before it).
    pub fn delivered(&mut self, conv: ConversationId, seq: Seq) {
        let e = self.last.entry(conv).or_insert(0);
        if seq > *e {
            *e = seq;
        }
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs a connection's delivery loop against a store holding seqs 1..=total, fed with the
    /// given event stream; returns what the client received.
    fn simulate(start: Seq, total: Seq, events: &[Seq]) -> Vec<Seq> {
        let conv = ConversationId::new();
        let mut d = Delivered::default();
        d.start_at(conv, start);
        let mut out = Vec::new();
        for &seq in events {
            match d.verdict(conv, seq) {
                Verdict::Stale => {}
                Verdict::Next => {
                    out.push(seq);
                    d.delivered(conv, seq);
                }
                Verdict::Gap { after } => {
                    // Backfill from the store: everything committed in (after, seq).
                    for s in (after + 1)..seq {
                        assert!(s <= total);
                        out.push(s);
                        d.delivered(conv, s);
                    }
                    out.push(seq);
                    d.delivered(conv, seq);
                }
            }
        }
        out
    }

    proptest! {
        /// Whatever the bus does (drop, duplicate, reorder), the client receives each seq after its
        /// starting point exactly once, in increasing order, with no gap, up to the highest seq
        /// any event announced.
        #[test]
        fn any_event_stream_yields_gap_free_exactly_once(
            start in 0u64..5,
            total in 1u64..60,
            picks in proptest::collection::vec((0u64..60, any::<bool>()), 0..200),
        ) {
            let events: Vec<Seq> = picks.iter().map(|(s, _)| 1 + s % total).collect();
            let out = simulate(start, total, &events);
            let highest = events.iter().copied().filter(|&s| s > start).max();
            let expected: Vec<Seq> = match highest {
                Some(h) => ((start + 1)..=h).collect(),
                None => vec![],
            };
            prop_assert_eq!(out, expected);
        }

        /// With a perfect bus (every event once, in order) no backfill is ever needed.
        #[test]
        fn an_orderly_stream_needs_no_backfill(start in 0u64..10, n in 0u64..50) {
            let conv = ConversationId::new();
            let mut d = Delivered::default();
            d.start_at(conv, start);
            for s in (start + 1)..=(start + n) {
                prop_assert_eq!(d.verdict(conv, s), Verdict::Next);
                d.delivered(conv, s);
            }
        }
    }

    #[test]
    fn unknown_conversations_start_at_their_first_event() {
        let conv = ConversationId::new();
        let mut d = Delivered::default();
        assert_eq!(d.verdict(conv, 7), Verdict::Next);
        d.delivered(conv, 7);
        assert_eq!(d.verdict(conv, 7), Verdict::Stale);
        assert_eq!(d.verdict(conv, 9), Verdict::Gap { after: 7 });
        d.start_if_unknown(conv, 0);
        assert_eq!(d.last(conv), Some(7));
    }
}
