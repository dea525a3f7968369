//! Presence between the nodes of a cluster, over NATS core subjects.
//!
//! Each node owns the leases of its own connections and announces its *holding* of each visitor
//! and agent (`Holding`, `AgentHolding`) as it changes; every node merges the holdings it hears
//! into its own lists. What keeps the lists true without anyone clearing them:
//!
//! - **Heartbeats.** Every node publishes a beat each second. A node not heard from for
//!   [`NODE_TIMEOUT`] is declared down and everything it held is dropped (removals count as
//!   expired). While this node itself is cut off from NATS it declares nobody down (it cannot
//!   tell), and gives every peer a fresh timeout when it is back.
//! - **No resurrection.** Updates from a node declared down (or never seen) are ignored until
//!   that node has sent its full state again; a node waking from a stall leaves out of its state
//!   the connections whose lease ran out meanwhile.
//! - **Full state on demand.** A node that sees a new or returning peer, or a gap in a peer's
//!   message numbers, asks that peer for its full state. A starting node asks everyone. A node
//!   that had to drop an announcement (its queue was full) sends its full state unasked. The
//!   state goes out one site at a time, each built while that site is locked and queued behind
//!   the updates made before it, so it never undoes a newer update.
//!
//! Messages are JSON, numbered per sender (`seq`), on `hark.presence.<kind>`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{AgentHolding, Holding, NodeId, Presence, Replicator};
use crate::domain::{AgentId, SiteId, VisitorId};

/// How often a node says it is alive.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// A node silent this long is declared down. With one check per [`CHECK_EVERY`], a dead node's
/// visitors leave every list within 5.5 s.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(5);
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// Announcements queued for NATS before the node falls back to sending its full state.
const QUEUE: usize = 65_536;
/// Visitors per state message (NATS messages are limited to 1 MB by default).
const STATE_CHUNK: usize = 1_000;
const PREFIX: &str = "hark.presence";

// Bodies are built, encoded and sent at once; boxing the large variants would only add an
// allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Body {
    /// The node is alive.
    Beat,
    Visitor {
        site: SiteId,
        visitor: VisitorId,
        holding: Option<Holding>,
    },
    Agent {
        agent: AgentId,
        holding: Option<AgentHolding>,
    },
    /// `to` (or everyone, if absent) should send its full state.
    Sync { to: Option<NodeId> },
    /// Part of the sender's full state: everything it holds on one site.
    StateSite {
        state: u64,
        site: SiteId,
        visitors: Vec<(VisitorId, Holding)>,
    },
    /// The last part of a full state: its agents; sites not sent hold nothing.
    StateEnd {
        state: u64,
        agents: Vec<(AgentId, AgentHolding)>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    node: NodeId,
    seq: u64,
    #[serde(flatten)]
    body: Body,
}

/// What this node queues for NATS.
enum Out {
    /// Boxed: the queue holds up to 65,536 of these.
    Body(Box<Body>),
    /// Send the full state (asked for, or after a loss).
    State,
}

/// Queues announcements from the presence table (called under its locks: never blocks).
struct Link {
    queue: mpsc::Sender<Out>,
    lost: Arc<AtomicBool>,
}

impl Link {
    fn push(&self, body: Body) {
        if self.queue.try_send(Out::Body(Box::new(body))).is_err() {
            metrics::counter!("hark_presence_announcements_dropped_total").increment(1);
            self.lost.store(true, Ordering::Relaxed);
        }
    }
}

impl Replicator for Link {
    fn visitor(&self, site: SiteId, visitor: VisitorId, holding: Option<Holding>) {
        self.push(Body::Visitor {
            site,
            visitor,
            holding,
        });
    }
    fn agent(&self, agent: AgentId, holding: Option<AgentHolding>) {
        self.push(Body::Agent { agent, holding });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerState {
    /// Its updates are applied.
    Live,
    /// Never seen, or declared down: its updates are ignored until its full state arrives.
    Waiting,
}

struct Peer {
    heard: Instant,
    state: PeerState,
    seq: u64,
    /// Sites received of the full state being assembled.
    state_sites: HashSet<SiteId>,
    /// When this node last asked the peer for its state (to avoid asking in a loop).
    asked: Option<Instant>,
}

/// Starts the presence link of a cluster node on `client`.
pub fn start(
    presence: Presence,
    client: async_nats::Client,
    node: NodeId,
    shutdown: CancellationToken,
) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let lost = Arc::new(AtomicBool::new(false));
    presence.set_replicator(Arc::new(Link {
        queue: tx.clone(),
        lost: lost.clone(),
    }));
    tokio::spawn(publisher(
        presence.clone(),
        client.clone(),
        node,
        rx,
        shutdown.clone(),
    ));
    tokio::spawn(receiver(presence, client, node, tx, lost, shutdown));
}

async fn publish(client: &async_nats::Client, node: NodeId, seq: &mut u64, body: Body) {
    *seq += 1;
    let env = Envelope {
        node,
        seq: *seq,
        body,
    };
    let subject = match &env.body {
        Body::Beat => "beat",
        Body::Visitor { .. } => "visitor",
        Body::Agent { .. } => "agent",
        Body::Sync { .. } => "sync",
        Body::StateSite { .. } | Body::StateEnd { .. } => "state",
    };
    match serde_json::to_vec(&env) {
        Ok(bytes) => {
            // async-nats buffers while disconnected and fails only when its buffer is full;
            // receivers then see a gap in `seq` and ask for the full state.
            if let Err(e) = client
                .publish(format!("{PREFIX}.{subject}"), bytes.into())
                .await
            {
                tracing::debug!(error = %e, "presence announcement not sent");
                metrics::counter!("hark_presence_announcements_dropped_total").increment(1);
            }
        }
        Err(e) => tracing::error!(error = %e, "encoding a presence announcement"),
    }
}

/// Sends queued announcements in order, and the full state when asked. The state is built here,
/// in the same task, so it is ordered after every update queued before it.
async fn publisher(
    presence: Presence,
    client: async_nats::Client,
    node: NodeId,
    mut rx: mpsc::Receiver<Out>,
    shutdown: CancellationToken,
) {
    let mut seq = 0u64;
    let mut state_no = 0u64;
    loop {
        let out = tokio::select! {
            _ = shutdown.cancelled() => return,
            out = rx.recv() => match out {
                Some(o) => o,
                None => return,
            },
        };
        match out {
            Out::Body(body) => publish(&client, node, &mut seq, *body).await,
            Out::State => {
                state_no += 1;
                // Collect under the locks (no await inside), then send.
                let mut parts: Vec<Body> = Vec::new();
                presence.each_local_site(|site, visitors| {
                    if visitors.is_empty() {
                        parts.push(Body::StateSite {
                            state: state_no,
                            site,
                            visitors,
                        });
                    } else {
                        for chunk in visitors.chunks(STATE_CHUNK) {
                            parts.push(Body::StateSite {
                                state: state_no,
                                site,
                                visitors: chunk.to_vec(),
                            });
                        }
                    }
                });
                let mut agents = Vec::new();
                presence.local_agents(|a| agents = a);
                parts.push(Body::StateEnd {
                    state: state_no,
                    agents,
                });
                // Updates queued while the state was built are newer: they were queued after
                // this `Out::State` and are sent after it.
                for part in parts {
                    publish(&client, node, &mut seq, part).await;
                }
                let _ = client.flush().await;
            }
        }
    }
}

async fn receiver(
    presence: Presence,
    client: async_nats::Client,
    node: NodeId,
    queue: mpsc::Sender<Out>,
    lost: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut sub = loop {
        match client.subscribe(format!("{PREFIX}.>")).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "subscribing to presence; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut peers: HashMap<NodeId, Peer> = HashMap::new();
    let mut beat = tokio::time::interval(BEAT_EVERY);
    let mut check = tokio::time::interval(CHECK_EVERY);
    let mut was_connected = true;
    let mut last_check = Instant::now();
    // A starting node asks everyone for their state and offers its own.
    let _ = queue.try_send(Out::Body(Box::new(Body::Sync { to: None })));
    let _ = queue.try_send(Out::State);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = beat.tick() => {
                if presence.beat() {
                    // Back from a stall: peers have probably declared this node down. Its state
                    // now leaves out connections not heard from since; once every live one has
                    // been heard again (within a lease), send the state again to include them.
                    tracing::warn!("this node stalled; its peers may have declared it down");
                    let again = queue.clone();
                    let lease = presence.config().visitor_lease;
                    tokio::spawn(async move {
                        tokio::time::sleep(lease).await;
                        let _ = again.try_send(Out::State);
                    });
                }
                let _ = queue.try_send(Out::Body(Box::new(Body::Beat)));
                if lost.swap(false, Ordering::Relaxed) {
                    // Something was not announced: send everything instead.
                    let _ = queue.try_send(Out::State);
                }
            }
            _ = check.tick() => {
                // This node itself stalled (frozen, starved): the silence it sees is its own;
                // what peers sent meanwhile is still unread. Give them a fresh timeout.
                let now = Instant::now();
                if now.saturating_duration_since(last_check) > CHECK_EVERY * 5 {
                    for p in peers.values_mut() {
                        p.heard = now;
                    }
                }
                last_check = now;
                let connected = client.connection_state() == async_nats::connection::State::Connected;
                if connected && !was_connected {
                    // Back from an outage: nobody could be heard meanwhile. Give every peer a
                    // fresh timeout, ask for everything that may have been missed, and send
                    // what this node holds.
                    let now = Instant::now();
                    for p in peers.values_mut() {
                        p.heard = now;
                    }
                    let _ = queue.try_send(Out::Body(Box::new(Body::Sync { to: None })));
                    let _ = queue.try_send(Out::State);
                }
                was_connected = connected;
                if connected {
                    declare_down(&presence, &mut peers);
                }
            }
            msg = sub.next() => {
                let Some(msg) = msg else { return };
                let env: Envelope = match serde_json::from_slice(&msg.payload) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "undecodable presence message");
                        continue;
                    }
                };
                if env.node == node {
                    continue;
                }
                on_message(&presence, &queue, &mut peers, node, env);
            }
        }
    }
}

fn declare_down(presence: &Presence, peers: &mut HashMap<NodeId, Peer>) {
    let now = Instant::now();
    for (id, p) in peers.iter_mut() {
        if p.state == PeerState::Live && now.saturating_duration_since(p.heard) >= NODE_TIMEOUT {
            tracing::warn!(node = %id, "node silent for {NODE_TIMEOUT:?}: declared down, its presence dropped");
            metrics::counter!("hark_presence_nodes_down_total").increment(1);
            p.state = PeerState::Waiting;
            p.state_sites.clear();
            presence.drop_node(*id);
        }
    }
    // Forget peers gone for long (a stopped node's incarnation never returns).
    peers.retain(|_, p| now.saturating_duration_since(p.heard) < NODE_TIMEOUT * 60);
    metrics::gauge!("hark_presence_nodes").set(
        peers
            .values()
            .filter(|p| p.state == PeerState::Live)
            .count() as f64,
    );
}

fn on_message(
    presence: &Presence,
    queue: &mpsc::Sender<Out>,
    peers: &mut HashMap<NodeId, Peer>,
    me: NodeId,
    env: Envelope,
) {
    let now = Instant::now();
    let peer = peers.entry(env.node).or_insert_with(|| Peer {
        heard: now,
        state: PeerState::Waiting,
        seq: 0,
        state_sites: HashSet::new(),
        asked: None,
    });
    peer.heard = now;
    let gap = peer.seq != 0 && env.seq != peer.seq + 1;
    peer.seq = env.seq;
    if gap && peer.state == PeerState::Live {
        // Something from this node was lost: its state will repair it.
        metrics::counter!("hark_presence_gaps_total").increment(1);
        peer.state = PeerState::Waiting;
        peer.state_sites.clear();
        peer.asked = None;
    }
    match env.body {
        Body::Sync { to } => {
            if to.is_none() || to == Some(me) {
                let _ = queue.try_send(Out::State);
            }
        }
        Body::StateSite { site, visitors, .. } => {
            peer.state_sites.insert(site);
            presence.replace_node_site(env.node, site, visitors);
        }
        Body::StateEnd { agents, .. } => {
            presence.replace_node_agents(env.node, agents);
            let sent: Vec<SiteId> = peer.state_sites.drain().collect();
            presence.drop_node_sites(env.node, &sent);
            if peer.state != PeerState::Live {
                tracing::info!(node = %env.node, "node's presence state received");
            }
            peer.state = PeerState::Live;
        }
        Body::Visitor {
            site,
            visitor,
            holding,
        } => {
            if peer.state == PeerState::Live {
                presence.apply_visitor(env.node, site, visitor, holding);
            }
        }
        Body::Agent { agent, holding } => {
            if peer.state == PeerState::Live {
                presence.apply_agent(env.node, agent, holding);
            }
        }
        Body::Beat => {}
    }
    // A node whose updates are ignored is asked for its state (again after a while if the
    // answer was lost).
    if peer.state == PeerState::Waiting
        && peer
            .asked
            .is_none_or(|t| now.saturating_duration_since(t) >= NODE_TIMEOUT)
    {
        peer.asked = Some(now);
        let _ = queue.try_send(Out::Body(Box::new(Body::Sync { to: Some(env.node) })));
    }
}
