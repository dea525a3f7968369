//! The cluster bus: events between nodes over NATS core subjects, one per site
//! (`hark.ev.<site_id>`); every node subscribes to `hark.ev.>`.
//!
//! NATS core delivers at most once, and the bus is only a hint anyway (the store is the truth):
//!
//! - **Local first.** An event published here goes to this node's hub at once, as with
//!   [`super::LocalBus`]; no local receiver waits for a NATS round trip.
//! - **Never blocks the committer.** Events for NATS go through a bounded queue to one publisher
//!   task. A full queue, or a connection that is down, drops the event and counts it
//!   (`hark_bus_dropped_total`); receivers repair what they miss, below.
//! - **Own echo.** Each event carries this process's incarnation id (fresh at every start); a
//!   node ignores events bearing its own. (The connection also asks the server not to echo, which
//!   saves the traffic; the id check is what correctness rests on.)
//! - **Catch-up.** A gap is repaired by the sequencer when a later message reveals it; when none
//!   comes, nobody would notice. So whenever events may have been lost (the connection was down,
//!   this node dropped publishes, NATS reported us as a slow consumer), the node lists the
//!   conversations updated since shortly before the loss and sends a [`CatchUp`] event for each,
//!   to its own hub and on NATS: every connection behind on one of them backfills from the
//!   store. A slow sweep of recent conversations (local only) covers losses nobody can see,
//!   such as a route between NATS servers failing.
//!
//! [`CatchUp`]: crate::delivery::event::CatchUp

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{ConnectOptions, ServerAddr};
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{wire, Bus};
use crate::delivery::event::{catch_up_event, Event};
use crate::delivery::hub::Hub;
use crate::domain::now_ms;
use crate::store::{ConversationFilter, Store};

/// Subjects are `hark.ev.<site_id>`.
pub const SUBJECT_PREFIX: &str = "hark.ev";

/// Events waiting for the publisher task. A burst of one commit batch (512) per site fits many
/// times over; past this the node is publishing slower than it commits, and dropping (then
/// catching up from the store) beats queueing without bound.
const PUBLISH_QUEUE: usize = 16_384;
/// Events taken from the queue per wake-up of the publisher.
const PUBLISH_BATCH: usize = 256;
/// How often the client pings its server; a silent connection is declared dead after about
/// three intervals (async-nats allows two unanswered pings).
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How far before a loss a catch-up looks: covers the time to notice a dead connection (three
/// ping intervals), events still queued when it died, and clock skew between nodes (a
/// conversation's `updated_at` comes from the clock of the node that committed).
const CATCH_UP_MARGIN_MS: i64 = 20_000;
/// Conversations read per store query during a catch-up.
const CATCH_UP_PAGE: u32 = 500;
/// Shortest time between two catch-ups, so that repeated drops under load cost one store query
/// per interval, not one per drop.
const CATCH_UP_SPACING: Duration = Duration::from_millis(300);
/// The local sweep for losses no one can see.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// The longest wait between reconnection attempts: a NATS server that comes back is used within
/// this, which bounds how late messages committed during the outage arrive.
const RECONNECT_DELAY_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("--nats names no server")]
    NoServers,
    #[error("bad NATS address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot connect to NATS at {servers}: {source}")]
    Connect {
        servers: String,
        source: async_nats::ConnectError,
    },
    #[error("waiting for NATS to confirm the subscription: {0}")]
    Flush(String),
    #[error("subscribing to {subject}: {source}")]
    Subscribe {
        subject: String,
        source: async_nats::SubscribeError,
    },
}

/// What a catch-up should cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    /// Conversations updated at or after this time (ms).
    since: i64,
    /// Also publish the catch-up events on NATS (other nodes may have missed events of this
    /// node), not only to this node's hub.
    broadcast: bool,
}

impl Pending {
    fn merge(a: Option<Pending>, b: Pending) -> Pending {
        match a {
            None => b,
            Some(a) => Pending {
                since: a.since.min(b.since),
                broadcast: a.broadcast || b.broadcast,
            },
        }
    }
}

/// Shared between the bus, the connection-event callback and the catch-up task.
#[derive(Default)]
struct Losses {
    /// The catch-up still to do. A std mutex: held for a copy or a merge, never across `.await`.
    pending: Mutex<Option<Pending>>,
    /// When the connection went down (ms), while it is down. Same kind of lock as above.
    down_since: Mutex<Option<i64>>,
    wake: Notify,
}

impl Losses {
    fn request(&self, p: Pending) {
        {
            let mut g = lock(&self.pending);
            *g = Some(Pending::merge(*g, p));
        }
        self.wake.notify_one();
    }

    fn is_down(&self) -> bool {
        lock(&self.down_since).is_some()
    }

    fn take(&self) -> Option<Pending> {
        lock(&self.pending).take()
    }

    fn on_connection_event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Disconnected => {
                metrics::counter!("hark_bus_disconnects_total").increment(1);
                metrics::gauge!("hark_bus_connected").set(0.0);
                lock(&self.down_since).get_or_insert_with(now_ms);
            }
            async_nats::Event::Connected => {
                metrics::gauge!("hark_bus_connected").set(1.0);
                if let Some(down) = lock(&self.down_since).take() {
                    tracing::info!(
                        down_ms = now_ms() - down,
                        "NATS connection is back; catching up"
                    );
                    self.request(Pending {
                        since: down - CATCH_UP_MARGIN_MS,
                        broadcast: true,
                    });
                }
            }
            // The server dropped messages for us, or async-nats did (subscription full).
            async_nats::Event::SlowConsumer(_) => {
                metrics::counter!("hark_bus_slow_consumer_total").increment(1);
                self.request(Pending {
                    since: now_ms() - CATCH_UP_MARGIN_MS,
                    broadcast: false,
                });
            }
            other => tracing::info!(event = %other, "NATS"),
        }
    }
}

/// The bus of a cluster node. Dropping it stops its tasks; the connection closes with the last
/// handle to it (see [`NatsBus::client`]).
pub struct NatsBus {
    hub: Hub,
    client: async_nats::Client,
    queue: mpsc::Sender<Event>,
    losses: Arc<Losses>,
    incarnation: Uuid,
    stop: CancellationToken,
}

impl NatsBus {
    /// Connects to the given servers (any of them; async-nats fails over among them and those
    /// they advertise, and reconnects forever), subscribes, and starts the publisher, receiver
    /// and catch-up tasks.
    ///
    /// Fails if no server answers now: a wrong address is then an error at start, not a node
    /// that looks up but never reaches its peers. After the start, an outage only makes the
    /// node unready (`/readyz`) until the connection is back.
    pub async fn connect(
        servers: &[String],
        hub: Hub,
        store: Arc<dyn Store>,
    ) -> Result<NatsBus, NatsError> {
        if servers.is_empty() {
            return Err(NatsError::NoServers);
        }
        let addrs = servers
            .iter()
            .map(|s| {
                s.parse::<ServerAddr>().map_err(|e| NatsError::Address {
                    addr: redact(s),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let incarnation = Uuid::new_v4();
        let losses = Arc::new(Losses::default());
        let on_event = losses.clone();
        let client = ConnectOptions::new()
            .name(format!("hark {incarnation}"))
            .no_echo()
            .ping_interval(PING_INTERVAL)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let losses = on_event.clone();
                async move { losses.on_connection_event(event) }
            })
            .connect(addrs)
            .await
            .map_err(|source| NatsError::Connect {
                servers: redacted(servers),
                source,
            })?;
        metrics::gauge!("hark_bus_connected").set(1.0);
        let subject = format!("{SUBJECT_PREFIX}.>");
        let subscription =
            client
                .subscribe(subject.clone())
                .await
                .map_err(|source| NatsError::Subscribe {
                    subject: subject.clone(),
                    source,
                })?;
        // Subscribe before announcing: once the server has answered a PING after the SUB, every
        // event published from then on reaches this node, so it may accept connections.
        client
            .flush()
            .await
            .map_err(|e| NatsError::Flush(e.to_string()))?;
        tracing::info!(
            servers = %redacted(servers),
            %incarnation,
            "connected to NATS"
        );

        let stop = CancellationToken::new();
        let (queue, rx) = mpsc::channel(PUBLISH_QUEUE);
        tokio::spawn(publish_loop(client.clone(), rx, incarnation, stop.clone()));
        tokio::spawn(receive_loop(
            subscription,
            hub.clone(),
            incarnation,
            stop.clone(),
        ));
        tokio::spawn(
            CatchUpTask {
                client: client.clone(),
                hub: hub.clone(),
                store,
                queue: queue.clone(),
                losses: losses.clone(),
                stop: stop.clone(),
            }
            .run(),
        );
        Ok(NatsBus {
            hub,
            client,
            queue,
            losses,
            incarnation,
            stop,
        })
    }

    /// This process's id on the bus (new at every start).
    pub fn incarnation(&self) -> Uuid {
        self.incarnation
    }

    /// The connection, for other cluster traffic of this node (presence) to share: one
    /// connection per node, one reconnection logic. Its `no_echo` applies to them too.
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Bus for NatsBus {
    fn publish(&self, event: Event) {
        self.hub.dispatch(&event);
        if matches!(event, Event::Presence(_)) {
            return;
        }
        match self.queue.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("hark_bus_dropped_total", "reason" => "queue_full").increment(1);
                // The other nodes miss this event; tell them what to fetch once there is room.
                self.losses.request(Pending {
                    since: now_ms() - CATCH_UP_MARGIN_MS,
                    broadcast: true,
                });
            }
            // Only while the node stops.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn is_ready(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn catch_up_since(&self, since_ms: i64) {
        self.losses.request(Pending {
            since: since_ms - CATCH_UP_MARGIN_MS,
            // Whoever saw the loss asks on each node; nothing to tell the others.
            broadcast: false,
        });
    }
}

/// A server address fit for logs and errors: credentials (`nats://user:pass@host`) left out.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn redacted(servers: &[String]) -> String {
    servers
        .iter()
        .map(|s| redact(s))
        .collect::<Vec<_>>()
        .join(",")
}

/// Retries at once, then after 100, 200, 400 ms, then every 500 ms, with up to 100 ms of jitter
/// so that the nodes of a cluster do not all knock at the same instant. (async-nats counts an
/// attempt per server tried, and resets the count once connected.)
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = (attempts - 2).min(8) as u32;
    let base = Duration::from_millis(100 * 2u64.pow(exp)).min(RECONNECT_DELAY_MAX);
    base + Duration::from_millis(rand::thread_rng().gen_range(0..100))
}

/// Takes events from the queue and publishes them on their site's subject.
async fn publish_loop(
    client: async_nats::Client,
    mut rx: mpsc::Receiver<Event>,
    incarnation: Uuid,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, PUBLISH_BATCH) => if n == 0 { break },
            _ = stop.cancelled() => break,
        }
        metrics::gauge!("hark_bus_publish_queue").set(rx.len() as f64);
        for event in batch.drain(..) {
            // While the connection is down, async-nats would buffer (and then block); these
            // events are repaired by the catch-up after the reconnection instead.
            if client.connection_state() != State::Connected {
                metrics::counter!("hark_bus_dropped_total", "reason" => "disconnected")
                    .increment(1);
                continue;
            }
            let Some(payload) = wire::encode(&event, incarnation) else {
                continue;
            };
            match client
                .publish(wire::subject(event.site_id()), payload)
                .await
            {
                Ok(()) => metrics::counter!("hark_bus_published_total").increment(1),
                Err(e) => {
                    tracing::debug!(error = %e, "NATS publish failed");
                    metrics::counter!("hark_bus_dropped_total", "reason" => "error").increment(1);
                }
            }
        }
    }
    tracing::debug!("NATS publisher stopped");
}

/// Hands what other nodes publish to this node's hub.
async fn receive_loop(
    mut subscription: async_nats::Subscriber,
    hub: Hub,
    incarnation: Uuid,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = subscription.next() => m,
            _ = stop.cancelled() => break,
        };
        let Some(msg) = msg else { break };
        match wire::decode(&msg.payload) {
            Ok((from, _)) if from == incarnation => {}
            Ok((_, event)) => {
                metrics::counter!("hark_bus_received_total").increment(1);
                hub.dispatch(&event);
            }
            Err(e) => {
                metrics::counter!("hark_bus_undecodable_total").increment(1);
                tracing::debug!(error = %e, subject = %msg.subject, "undecodable bus event");
            }
        }
    }
    tracing::debug!("NATS receiver stopped");
}

struct CatchUpTask {
    client: async_nats::Client,
    hub: Hub,
    store: Arc<dyn Store>,
    queue: mpsc::Sender<Event>,
    losses: Arc<Losses>,
    stop: CancellationToken,
}

impl CatchUpTask {
    async fn run(self) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; nothing can have been lost yet.
        sweep.tick().await;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = self.losses.wake.notified() => {}
                _ = sweep.tick() => self.losses.request(Pending {
                    since: now_ms() - SWEEP_EVERY.as_millis() as i64 - CATCH_UP_MARGIN_MS,
                    broadcast: false,
                }),
            }
            // Events lost while the connection is down are caught up once it is back (the
            // reconnection requests it), when the catch-up can also reach the other nodes.
            // (Judged by the connection events, not `connection_state()`: async-nats reports
            // `Connected` to the callback just before it updates the state.)
            if self.losses.is_down() {
                continue;
            }
            let Some(pending) = self.losses.take() else {
                continue;
            };
            let started = Instant::now();
            match self.catch_up(pending).await {
                Ok(n) => {
                    metrics::counter!("hark_bus_catch_ups_total").increment(1);
                    metrics::counter!("hark_bus_catch_up_conversations_total").increment(n);
                    metrics::histogram!("hark_bus_catch_up_seconds")
                        .record(started.elapsed().as_secs_f64());
                    tracing::debug!(conversations = n, ?pending, "caught up");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "catch-up failed; retrying");
                    metrics::counter!("hark_bus_catch_up_failures_total").increment(1);
                    self.losses.request(pending);
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(CATCH_UP_SPACING) => {}
            }
        }
    }

    /// Sends a catch-up event for every conversation updated since `p.since`; returns how many.
    async fn catch_up(&self, p: Pending) -> Result<u64, CatchUpError> {
        // After a reconnection the subscription is renewed asynchronously; a flush (PING/PONG)
        // returns once the server has it. Everything committed after this point therefore
        // arrives live, and everything before is in the store when it is read below.
        tokio::time::timeout(Duration::from_secs(5), self.client.flush())
            .await
            .map_err(|_| CatchUpError::Nats("flush timed out".into()))?
            .map_err(|e| CatchUpError::Nats(e.to_string()))?;
        let mut n = 0u64;
        let mut filter = ConversationFilter {
            updated_since: Some(p.since),
            limit: CATCH_UP_PAGE,
            ..Default::default()
        };
        loop {
            let page = self.store.list_conversations(&filter).await?;
            for conv in &page {
                let event = catch_up_event(conv, p.since);
                self.hub.dispatch(&event);
                if p.broadcast {
                    // Waits for room rather than dropping: this task is nobody's hot path, and
                    // a dropped catch-up would only ask for another.
                    tokio::select! {
                        r = self.queue.send(event) => if r.is_err() { return Ok(n) },
                        _ = self.stop.cancelled() => return Ok(n),
                    }
                }
                n += 1;
            }
            match page.last() {
                Some(last) if page.len() == CATCH_UP_PAGE as usize => {
                    filter.before = Some((last.updated_at, last.id));
                }
                _ => return Ok(n),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum CatchUpError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A poisoned lock here guards a plain value that no panic can leave half-written.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_catch_ups_merge_to_the_earliest_and_widest() {
        let a = Pending {
            since: 100,
            broadcast: false,
        };
        let b = Pending {
            since: 50,
            broadcast: true,
        };
        assert_eq!(Pending::merge(None, a), a);
        assert_eq!(
            Pending::merge(Some(a), b),
            Pending {
                since: 50,
                broadcast: true
            }
        );
        assert_eq!(
            Pending::merge(Some(b), a),
            Pending {
                since: 50,
                broadcast: true
            }
        );
    }

    #[test]
    fn credentials_never_reach_logs_or_errors() {
        assert_eq!(
            redacted(&[
                "nats://user:secret@a:4222".to_owned(),
                "nats://b:4222".to_owned(),
                "nats://tok@c:4222".to_owned(),
            ]),
            "nats://***@a:4222,nats://b:4222,nats://***@c:4222"
        );
    }

    #[test]
    fn reconnection_delays_start_at_zero_and_stay_under_the_cap() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        for attempts in 2..100 {
            let d = reconnect_delay(attempts);
            assert!(d >= Duration::from_millis(100), "{attempts}: {d:?}");
            assert!(d < RECONNECT_DELAY_MAX + Duration::from_millis(100));
        }
    }

    #[test]
    fn a_reconnection_asks_for_a_broadcast_catch_up_from_before_the_loss() {
        let l = Losses::default();
        l.on_connection_event(async_nats::Event::Connected);
        assert_eq!(
            l.take(),
            None,
            "the first connection has nothing to catch up"
        );
        let before = now_ms();
        l.on_connection_event(async_nats::Event::Disconnected);
        l.on_connection_event(async_nats::Event::Disconnected);
        l.on_connection_event(async_nats::Event::Connected);
        let p = l.take().expect("a catch-up");
        assert!(p.broadcast);
        assert!(
            p.since <= before - CATCH_UP_MARGIN_MS + 5
                && p.since >= before - CATCH_UP_MARGIN_MS - 1_000
        );
        assert_eq!(l.take(), None);
    }
}
