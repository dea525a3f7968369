//! This node's live connections and the fan-out of events to them.
//!
//! Connections register by site (agents) or by visitor (visitors' tabs); admins register once for
//! every site. Dispatch never blocks and never buffers without bound: each connection has a
//! bounded outbound queue, and a connection whose queue is full is *kicked* (told to close with
//! `slow_consumer`); its client reconnects and resumes from the store.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::event::{Event, PresenceTargets, Targets};
use super::outbox::{Outbox, PushError};
use crate::domain::{SiteId, VisitorId};

/// Identifies one connection on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// How the hub reaches one connection.
#[derive(Clone)]
pub struct Subscriber {
    pub conn: ConnId,
    pub tx: Outbox,
    /// Cancelled when the connection must close because it fell behind.
    pub kick: CancellationToken,
}

#[derive(Default)]
struct SiteSubs {
    agents: Vec<Subscriber>,
    visitors: HashMap<VisitorId, Vec<Subscriber>>,
}

impl SiteSubs {
    fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.visitors.is_empty()
    }
}

const SHARDS: usize = 16;

struct Inner {
    /// Sharded by site so that dispatch for different sites does not contend. Each lock is held
    /// only to copy out or edit a list (no `.await`, no I/O inside), so `std::sync::Mutex` fits.
    shards: Vec<Mutex<HashMap<SiteId, SiteSubs>>>,
    /// Admins, who see every site.
    everywhere: Mutex<Vec<Subscriber>>,
    hasher: std::collections::hash_map::RandomState,
    next_conn: AtomicU64,
    connections: AtomicU64,
    /// Sees every event dispatched here before the connections do (the presence table, which
    /// follows chats and read marks). Set once at start.
    observer: std::sync::OnceLock<Arc<dyn Observer>>,
}

/// Something that watches the events this node dispatches.
pub trait Observer: Send + Sync + 'static {
    fn observe(&self, event: &Event);
}

/// Cheap handle; clone freely.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

/// Where a connection listens.
#[derive(Debug, Clone)]
pub enum Interest {
    Visitor { site: SiteId, visitor: VisitorId },
    Agent { sites: Vec<SiteId> },
    Everywhere,
}

/// Keeps a connection registered; unregisters it when dropped, on every path out of the
/// connection task (close, error, panic), so no entry can outlive its connection.
pub struct Registration {
    hub: Hub,
    conn: ConnId,
    interest: Interest,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.remove(self.conn, &self.interest);
        self.hub.inner.connections.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("hark_connections").decrement(1.0);
    }
}

impl Hub {
    pub fn new() -> Hub {
        Hub {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                everywhere: Mutex::new(Vec::new()),
                hasher: Default::default(),
                next_conn: AtomicU64::new(1),
                connections: AtomicU64::new(0),
                observer: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn next_conn_id(&self) -> ConnId {
        ConnId(self.inner.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// Registered connections on this node.
    pub fn connections(&self) -> u64 {
        self.inner.connections.load(Ordering::Relaxed)
    }

    fn shard<K: Hash>(&self, key: &K) -> &Mutex<HashMap<SiteId, SiteSubs>> {
        let h = self.inner.hasher.hash_one(key) as usize;
        &self.inner.shards[h % SHARDS]
    }

    pub fn register(&self, sub: Subscriber, interest: Interest) -> Registration {
        let conn = sub.conn;
        match &interest {
            Interest::Visitor { site, visitor } => {
                let mut g = lock(self.shard(site));
                g.entry(*site)
                    .or_default()
                    .visitors
                    .entry(*visitor)
                    .or_default()
                    .push(sub);
            }
            Interest::Agent { sites } => {
                for site in sites {
                    let mut g = lock(self.shard(site));
                    g.entry(*site).or_default().agents.push(sub.clone());
                }
            }
            Interest::Everywhere => lock(&self.inner.everywhere).push(sub),
        }
        self.inner.connections.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("hark_connections").increment(1.0);
        Registration {
            hub: self.clone(),
            conn,
            interest,
        }
    }

    fn remove(&self, conn: ConnId, interest: &Interest) {
        match interest {
            Interest::Visitor { site, visitor } => {
                let mut g = lock(self.shard(site));
                if let Some(s) = g.get_mut(site) {
                    if let Some(list) = s.visitors.get_mut(visitor) {
                        list.retain(|x| x.conn != conn);
                        if list.is_empty() {
                            s.visitors.remove(visitor);
                        }
                    }
                    if s.is_empty() {
                        g.remove(site);
                    }
                }
            }
            Interest::Agent { sites } => {
                for site in sites {
                    let mut g = lock(self.shard(site));
                    if let Some(s) = g.get_mut(site) {
                        s.agents.retain(|x| x.conn != conn);
                        if s.is_empty() {
                            g.remove(site);
                        }
                    }
                }
            }
            Interest::Everywhere => lock(&self.inner.everywhere).retain(|x| x.conn != conn),
        }
    }

    /// Sets the observer that sees every dispatched event; only the first call has an effect.
    pub fn set_observer(&self, observer: Arc<dyn Observer>) {
        let _ = self.inner.observer.set(observer);
    }

    /// Hands `event` to every interested connection on this node without waiting.
    pub fn dispatch(&self, event: &Event) {
        if let Some(o) = self.inner.observer.get() {
            o.observe(event);
        }
        let site = event.site_id();
        // (agents and admins?, one visitor's connections?, every visitor of the site?)
        let (agents, visitor, all_visitors) = match event {
            Event::Message(m) => (true, Some(m.audience.visitor_id), false),
            Event::Conversation(c) => (true, Some(c.audience.visitor_id), false),
            Event::CatchUp(c) => (true, Some(c.audience.visitor_id), false),
            Event::Signal(s) => match s.targets {
                Targets::AgentsAndVisitor => (true, Some(s.audience.visitor_id), false),
                Targets::Agents => (true, None, false),
            },
            Event::Presence(p) => match p.targets {
                PresenceTargets::Agents => (true, None, false),
                PresenceTargets::Visitors => (false, None, true),
            },
        };
        let mut targets: Vec<Subscriber> = Vec::new();
        {
            let g = lock(self.shard(&site));
            if let Some(s) = g.get(&site) {
                if agents {
                    targets.extend(s.agents.iter().cloned());
                }
                if let Some(v) = visitor.and_then(|v| s.visitors.get(&v)) {
                    targets.extend(v.iter().cloned());
                }
                if all_visitors {
                    targets.extend(s.visitors.values().flatten().cloned());
                }
            }
        }
        if agents {
            let g = lock(&self.inner.everywhere);
            targets.extend(g.iter().cloned());
        }
        for t in targets {
            match t.tx.try_push(event.clone()) {
                Ok(()) => {}
                Err(PushError::Full) => {
                    metrics::counter!("hark_outbound_overflow_total").increment(1);
                    t.kick.cancel();
                }
                // The connection is closing; its registration goes with it.
                Err(PushError::Closed) => {}
            }
        }
    }
}

/// Locks a mutex; a panic while holding one of these (none of the critical sections can panic)
/// would not leave the data inconsistent, so a poisoned lock is used as is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::event::{Audience, ConversationChange};
    use crate::domain::ConversationId;

    fn sub(hub: &Hub, cap: usize) -> (Subscriber, crate::delivery::outbox::Inbox) {
        let (tx, rx) = crate::delivery::outbox::outbox(cap);
        (
            Subscriber {
                conn: hub.next_conn_id(),
                tx,
                kick: CancellationToken::new(),
            },
            rx,
        )
    }

    fn event(site: SiteId, visitor: VisitorId) -> Event {
        Event::Conversation(Arc::new(ConversationChange {
            audience: Audience {
                site_id: site,
                visitor_id: visitor,
            },
            kind: hark_protocol::ConversationEvent::Opened,
            conversation_id: ConversationId::new(),
            last_seq: 0,
            open: true,
            assignee: None,
            frame: "{}".into(),
        }))
    }

    #[test]
    fn events_reach_the_site_agents_and_only_the_visitor_concerned() {
        let hub = Hub::new();
        let (site_a, site_b) = (SiteId::new(), SiteId::new());
        let (v1, v2) = (VisitorId::new(), VisitorId::new());
        let (agent_a, mut rx_agent_a) = sub(&hub, 8);
        let (agent_b, mut rx_agent_b) = sub(&hub, 8);
        let (admin, mut rx_admin) = sub(&hub, 8);
        let (tab1, mut rx_tab1) = sub(&hub, 8);
        let (tab2, mut rx_tab2) = sub(&hub, 8);
        let (other, mut rx_other) = sub(&hub, 8);
        let _r = [
            hub.register(
                agent_a,
                Interest::Agent {
                    sites: vec![site_a],
                },
            ),
            hub.register(
                agent_b,
                Interest::Agent {
                    sites: vec![site_b],
                },
            ),
            hub.register(admin, Interest::Everywhere),
            hub.register(
                tab1,
                Interest::Visitor {
                    site: site_a,
                    visitor: v1,
                },
            ),
            hub.register(
                tab2,
                Interest::Visitor {
                    site: site_a,
                    visitor: v1,
                },
            ),
            hub.register(
                other,
                Interest::Visitor {
                    site: site_a,
                    visitor: v2,
                },
            ),
        ];
        assert_eq!(hub.connections(), 6);
        hub.dispatch(&event(site_a, v1));
        assert!(rx_agent_a.try_pop().is_some());
        assert!(rx_admin.try_pop().is_some());
        assert!(rx_tab1.try_pop().is_some());
        assert!(rx_tab2.try_pop().is_some());
        assert!(
            rx_agent_b.try_pop().is_none(),
            "site B's agent must not see site A"
        );
        assert!(
            rx_other.try_pop().is_none(),
            "another visitor must not see it"
        );
    }

    #[test]
    fn a_full_queue_kicks_the_connection_and_dropping_unregisters() {
        let hub = Hub::new();
        let site = SiteId::new();
        let v = VisitorId::new();
        let (s, _rx) = sub(&hub, 1);
        let kick = s.kick.clone();
        let reg = hub.register(s, Interest::Visitor { site, visitor: v });
        hub.dispatch(&event(site, v));
        assert!(!kick.is_cancelled());
        hub.dispatch(&event(site, v));
        assert!(kick.is_cancelled());
        drop(reg);
        assert_eq!(hub.connections(), 0);
        assert!(
            lock(hub.shard(&site)).get(&site).is_none(),
            "no entry outlives its connection"
        );
    }
}
