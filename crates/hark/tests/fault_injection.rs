//! Fault injection on a real cluster under continuous traffic: three `hark serve` processes, a
//! three-server NATS cluster and a private PostgreSQL, with ~30 visitors and 3 agents chatting
//! through clients that behave like the widget and the console (they keep unacked sends and
//! resend them with the same client id, reconnect with backoff and jitter to another node,
//! honour `reconnect`, `Retry-After` and close codes, and resume from the highest seq they hold),
//! plus one console per node following the visitor list.
//!
//! The faults, one after another: kill -9 of each Hark node (then restart it), kill of one NATS
//! server, restart of the whole NATS cluster, kill -9 of PostgreSQL, and a rolling restart
//! (SIGTERM, drain, start again). After each: nothing acknowledged is lost, nothing is stored or
//! received twice, every receiver's seqs per conversation are gap-free and in order, and every
//! console's list equals the visitors that are connected. The time to recover is measured and
//! printed as a table (`cargo test --test fault_injection -- --nocapture`).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use common::cluster::{tail, HarkNode, PrivatePostgres};
use common::nats::NatsServer;
use common::{Ws, ORIGIN};
use futures_util::{SinkExt, StreamExt};
use hark::domain::{AgentRole, Email, Origin, SiteId};
use hark::store::postgres::{PostgresOptions, PostgresStore};
use hark::store::{ConversationFilter, NewAgent, NewSite, SeqRange, SessionRow, Store};
use hark_protocol::{
    ClientFrame, ConversationEvent, ErrorCode, ListMode, ListResume, PageView, ResumePoint,
    ServerFrame, SessionInfo,
};
use rand::Rng;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const NODES: usize = 3;
const VISITORS: usize = 30;
const AGENTS: usize = 3;
/// Pause between two sends of one visitor, in ms (about 2 messages/s each).
const VISITOR_SEND_MS: (u64, u64) = (250, 750);
/// Pause between two sends of one agent, in ms (about 3 messages/s each).
const AGENT_SEND_MS: (u64, u64) = (150, 450);
/// Traffic alone before the first fault and between faults.
const QUIET: Duration = Duration::from_secs(2);
/// How long the NATS cluster and PostgreSQL stay down.
const OUTAGE: Duration = Duration::from_secs(3);
/// A client not recovered this long after a fault healed never will: the test fails.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
/// A console list not converged this long after a fault healed is stuck: the test fails. (The
/// goal, asserted at the end, is `PRESENCE_GOAL`.)
const PRESENCE_DEADLINE: Duration = Duration::from_secs(20);
/// Receivers must hold every stored message this soon after the store was read.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(15);
/// An ack later than this after its send counts as delayed by the fault.
const SLOW_ACK: Duration = Duration::from_millis(250);
/// Brief goals: clients resumed p99 < 5 s after kill -9 of a node; presence right within 10 s.
const RESUME_GOAL: Duration = Duration::from_secs(5);
const PRESENCE_GOAL: Duration = Duration::from_secs(10);
/// A drained client comes back after the server's `after_ms` (jitter below
/// `reconnect_jitter_ms`, 5 s by default), so a drain's resume bound is that plus a reconnect.
const DRAIN_RESUME_BOUND: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------------------------
// The simulated clients.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Visitor,
    /// Sends into visitors' conversations and receives every message of the site.
    Agent,
    /// An agent console pinned to one node, following the visitor list (and the messages).
    Console,
}

/// A send not acknowledged yet.
struct Pending {
    client_id: String,
    conv: Option<String>,
    text: String,
    created: Instant,
    /// Set after a retryable error: resend then (on this connection).
    retry_at: Option<Instant>,
}

struct Acked {
    conv: String,
    seq: u64,
    created: Instant,
    at: Instant,
}

/// What one client received of one conversation.
struct Received {
    /// The seq the client held when it started following the conversation.
    start: u64,
    /// What told the client about the conversation (for failure reports).
    how: String,
    held: u64,
    /// seq → client id of every message received.
    got: BTreeMap<u64, Option<String>>,
}

impl Received {
    fn from(start: u64, how: String) -> Received {
        Received {
            start,
            how,
            held: start,
            got: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retire {
    /// Still here.
    No,
    /// Gone without a word: the connection is left to die (with its node), never reopened.
    Vanish,
    /// Closes its connection cleanly now and never comes back.
    Leave,
}

/// Everything a client knows, shared with the test (std mutex, never held across `.await`).
struct State {
    name: String,
    kind: Kind,
    site_id: String,
    created: Instant,
    ready: bool,
    /// The node of the current connection.
    node: Option<usize>,
    readies: Vec<Instant>,
    /// Connection ends and failed attempts, with a short reason.
    events: Vec<(Instant, String)>,
    drops: Vec<Instant>,
    token: Option<String>,
    visitor_id: Option<String>,
    own_conv: Option<String>,
    pending: Vec<Pending>,
    acked: HashMap<String, Acked>,
    recv: HashMap<String, Received>,
    sent: u64,
    /// Console: its copy of the site's visitor list.
    list: BTreeSet<String>,
    epoch: Option<String>,
    version: u64,
    snapshot_open: bool,
    violations: Vec<String>,
    retire: Retire,
}

impl State {
    fn violation(&mut self, what: String) {
        let line = format!("{}: {what}", self.name);
        if self.violations.len() < 100 {
            self.violations.push(line);
        }
    }

    fn event(&mut self, what: String) {
        self.events.push((Instant::now(), what));
    }

    fn settled(&self, t_ref: Instant, down: &[usize]) -> bool {
        self.ready
            && self.node.is_some_and(|n| !down.contains(&n))
            && self.pending.iter().all(|p| p.created > t_ref)
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a client reaches the cluster.
#[derive(Clone)]
struct Cfg {
    kind: Kind,
    /// (node index, address) in the order this client tries them; it moves on at each failure.
    nodes: Vec<(usize, String)>,
    bearer: Option<String>,
    site_key: String,
    page: String,
    /// Largest backoff before a reconnect (the protocol's 30 s for widgets and consoles; the
    /// test's pinned consoles retry faster, they are observers).
    backoff_cap: Duration,
    send_every: Option<(u64, u64)>,
    traffic: Arc<AtomicBool>,
}

enum ConnErr {
    /// An HTTP answer instead of the upgrade: status, `Retry-After` (s), error code.
    Refused(u16, Option<u64>, String),
    Failed(String),
}

async fn connect(cfg: &Cfg, addr: &str) -> Result<Ws, ConnErr> {
    let url = match cfg.kind {
        Kind::Visitor => format!("ws://{addr}/ws/visitor?site_key={}", cfg.site_key),
        _ => format!("ws://{addr}/ws/agent"),
    };
    let mut req = url.into_client_request().expect("request");
    let h = req.headers_mut();
    match &cfg.bearer {
        Some(t) => h.insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        ),
        None => h.insert("origin", ORIGIN.parse().expect("header")),
    };
    let attempt = tokio_tungstenite::connect_async_with_config(req, None, true);
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let retry = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            let code = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .and_then(|v| Some(v.get("error")?.get("code")?.as_str()?.to_owned()))
                .unwrap_or_default();
            Err(ConnErr::Refused(resp.status().as_u16(), retry, code))
        }
        Ok(Err(e)) => Err(ConnErr::Failed(short(&e.to_string()))),
        Err(_) => Err(ConnErr::Failed("connect timed out".into())),
    }
}

fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

/// Full jitter: a random delay in [0, min(cap, 500 ms × 2^attempt)).
fn backoff(attempt: u32, cap: Duration) -> Duration {
    let ceiling = Duration::from_millis(500)
        .saturating_mul(1u32 << attempt.min(10))
        .min(cap);
    let ms = ceiling.as_millis().max(1) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(0..ms))
}

fn pause(range: (u64, u64)) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(range.0..=range.1))
}

/// A client's life: connect, session, reconnect elsewhere, until stopped or retired.
async fn run_client(st: Shared, cfg: Cfg, stop: CancellationToken) {
    let mut at = 0usize;
    let mut attempt = 0u32;
    loop {
        if stop.is_cancelled() || lock(&st).retire != Retire::No {
            return;
        }
        let (idx, addr) = cfg.nodes[at % cfg.nodes.len()].clone();
        let delay = match connect(&cfg, &addr).await {
            Ok(ws) => {
                let out = session(&st, &cfg, idx, ws, &stop).await;
                let mut s = lock(&st);
                s.ready = false;
                s.node = None;
                s.drops.push(Instant::now());
                s.event(format!("node{idx}: {}", out.reason));
                if out.reached_ready {
                    attempt = 0;
                }
                out.after
                    .unwrap_or_else(|| backoff(attempt, cfg.backoff_cap))
            }
            Err(ConnErr::Refused(status, retry, code)) => {
                lock(&st).event(format!("node{idx}: refused {status} {code}"));
                match retry {
                    Some(secs) => {
                        Duration::from_secs(secs)
                            + Duration::from_millis(rand::thread_rng().gen_range(0..250))
                    }
                    None => backoff(attempt, cfg.backoff_cap),
                }
            }
            Err(ConnErr::Failed(why)) => {
                lock(&st).event(format!("node{idx}: connect failed ({why})"));
                backoff(attempt, cfg.backoff_cap)
            }
        };
        attempt = attempt.saturating_add(1);
        at += 1;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

struct Outcome {
    reached_ready: bool,
    /// The server's `reconnect.after_ms`.
    after: Option<Duration>,
    reason: String,
}

/// What the session loop must do after a frame was handled under the lock.
#[derive(Default)]
struct Todo {
    send: Vec<ClientFrame>,
    welcome_heartbeat: Option<u64>,
    ready: bool,
    reconnect_after: Option<u64>,
}

async fn send_frame(ws: &mut Ws, f: &ClientFrame) -> Result<(), String> {
    let text = serde_json::to_string(f).expect("encode");
    match tokio::time::timeout(Duration::from_secs(5), ws.send(Message::text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed ({})", short(&e.to_string()))),
        Err(_) => Err("write timed out".into()),
    }
}

/// One connection: hello, resume, then live traffic until the connection ends.
async fn session(
    st: &Shared,
    cfg: &Cfg,
    idx: usize,
    mut ws: Ws,
    stop: &CancellationToken,
) -> Outcome {
    let mut out = Outcome {
        reached_ready: false,
        after: None,
        reason: String::new(),
    };
    let hello = {
        let mut s = lock(st);
        s.node = Some(idx);
        s.snapshot_open = false;
        ClientFrame::Hello {
            token: s.token.clone(),
            resume: s
                .recv
                .iter()
                .map(|(c, r)| ResumePoint {
                    conversation_id: c.clone(),
                    seq: r.held,
                })
                .collect(),
            page: (cfg.kind == Kind::Visitor).then(|| PageView {
                url: cfg.page.clone(),
                title: Some(s.name.clone()),
                referrer: None,
            }),
            presence: match (&s.epoch, cfg.kind) {
                (Some(epoch), Kind::Console) => vec![ListResume {
                    site_id: s.site_id.clone(),
                    epoch: epoch.clone(),
                    version: s.version,
                }],
                _ => vec![],
            },
        }
    };
    if let Err(e) = send_frame(&mut ws, &hello).await {
        out.reason = e;
        return out;
    }
    // Until the welcome, the server's hello timeout; then twice the heartbeat plus a margin.
    let mut silence = Duration::from_secs(12);
    let mut last_heard = Instant::now();
    let mut ready = false;
    let mut closing: Option<String> = None;
    let mut next_send = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let retry_due = if ready && closing.is_none() {
            lock(st).pending.iter().filter_map(|p| p.retry_at).min()
        } else {
            None
        };
        let may_send = ready && closing.is_none() && cfg.send_every.is_some();
        let mut todo = Todo::default();
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = ws.close(None).await;
                out.reason = "stopped".into();
                return out;
            }
            m = ws.next() => {
                last_heard = Instant::now();
                match m {
                    None => {
                        out.reason = closing.unwrap_or_else(|| "connection ended".into());
                        return out;
                    }
                    Some(Err(e)) => {
                        out.reason = closing.unwrap_or_else(|| format!("read error ({})", short(&e.to_string())));
                        return out;
                    }
                    Some(Ok(Message::Text(t))) => {
                        match serde_json::from_str::<ServerFrame>(t.as_str()) {
                            Ok(f) => handle(&mut lock(st), cfg, f, &mut todo),
                            Err(e) => lock(st).violation(format!("undecodable frame {t}: {e}")),
                        }
                    }
                    Some(Ok(Message::Close(c))) => {
                        // tungstenite answers the close; polling on flushes the answer and then
                        // ends the stream.
                        let code = c.map(|c| u16::from(c.code)).unwrap_or(1005);
                        closing = Some(format!("closed {code}"));
                        if code == 4003 {
                            let mut s = lock(st);
                            s.violation("closed 4003 unauthorized".into());
                            s.token = None;
                        }
                    }
                    Some(Ok(_)) => {}
                }
            }
            _ = tokio::time::sleep_until(last_heard + silence) => {
                out.reason = closing.unwrap_or_else(|| "silent: given up".into());
                return out;
            }
            _ = tokio::time::sleep_until(next_send), if may_send => {
                next_send = Instant::now() + pause(cfg.send_every.unwrap_or((500, 500)));
                if cfg.traffic.load(Ordering::Relaxed) {
                    if let Some(f) = new_send(&mut lock(st)) {
                        todo.send.push(f);
                    }
                }
            }
            _ = tokio::time::sleep_until(retry_due.unwrap_or_else(Instant::now)), if retry_due.is_some() => {
                let now = Instant::now();
                let mut s = lock(st);
                for p in s.pending.iter_mut().filter(|p| p.retry_at.is_some_and(|t| t <= now)) {
                    p.retry_at = None;
                    todo.send.push(send_of(p));
                }
            }
            _ = tick.tick() => {
                if lock(st).retire == Retire::Leave && closing.is_none() {
                    let _ = ws
                        .send(Message::Close(Some(CloseFrame {
                            code: CloseCode::Normal,
                            reason: "bye".into(),
                        })))
                        .await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                    out.reason = "left".into();
                    return out;
                }
            }
        }
        if let Some(hb) = todo.welcome_heartbeat {
            silence = Duration::from_millis(hb * 2) + Duration::from_secs(3);
        }
        if todo.ready {
            ready = true;
            out.reached_ready = true;
            next_send = Instant::now() + pause(cfg.send_every.unwrap_or((500, 500)));
        }
        if let Some(ms) = todo.reconnect_after {
            out.after = Some(Duration::from_millis(ms));
        }
        if closing.is_none() {
            for f in &todo.send {
                if let Err(e) = send_frame(&mut ws, f).await {
                    out.reason = e;
                    return out;
                }
            }
        }
    }
}

fn send_of(p: &Pending) -> ClientFrame {
    ClientFrame::Send {
        client_id: p.client_id.clone(),
        conversation_id: p.conv.clone(),
        text: p.text.clone(),
    }
}

/// A new message, as a person would type it: a visitor into its conversation (the first one
/// opens it; it waits for that one's ack before typing on), an agent into any conversation.
fn new_send(s: &mut State) -> Option<ClientFrame> {
    let conv = match s.kind {
        Kind::Visitor => {
            if s.own_conv.is_none() && !s.pending.is_empty() {
                return None;
            }
            s.own_conv.clone()
        }
        Kind::Agent => {
            let keys: Vec<&String> = s.recv.keys().collect();
            if keys.is_empty() {
                return None;
            }
            Some(keys[rand::thread_rng().gen_range(0..keys.len())].clone())
        }
        Kind::Console => return None,
    };
    s.sent += 1;
    let p = Pending {
        client_id: uuid::Uuid::new_v4().to_string(),
        conv,
        text: format!("{} says #{}", s.name, s.sent),
        created: Instant::now(),
        retry_at: None,
    };
    let f = send_of(&p);
    s.pending.push(p);
    Some(f)
}

/// Handles one server frame: bookkeeping and the online checks (order, duplicates, acks).
fn handle(s: &mut State, cfg: &Cfg, f: ServerFrame, todo: &mut Todo) {
    let now = Instant::now();
    match f {
        ServerFrame::Ping => todo.send.push(ClientFrame::Pong),
        ServerFrame::Welcome {
            session,
            token,
            conversations,
            heartbeat_ms,
            ..
        } => {
            if let Some(t) = token {
                s.token = Some(t);
            }
            if let SessionInfo::Visitor { visitor_id, .. } = session {
                match &s.visitor_id {
                    Some(v) if *v != visitor_id => {
                        let was = v.clone();
                        s.violation(format!("visitor id changed from {was} to {visitor_id}"));
                    }
                    _ => s.visitor_id = Some(visitor_id),
                }
            }
            for c in conversations {
                if s.kind == Kind::Visitor && s.own_conv.is_none() {
                    s.own_conv = Some(c.id.clone());
                }
                s.recv.entry(c.id).or_insert_with(|| {
                    Received::from(c.last_seq, format!("its welcome (last_seq {})", c.last_seq))
                });
            }
            todo.welcome_heartbeat = Some(heartbeat_ms);
        }
        ServerFrame::Ready => {
            s.ready = true;
            s.readies.push(now);
            todo.ready = true;
            // Every unacked send again, with its client id, in the order they were made.
            if !s.pending.is_empty() {
                let n = s.pending.len();
                s.event(format!("resent {n} after reconnecting"));
            }
            for p in s.pending.iter_mut() {
                p.retry_at = None;
                todo.send.push(send_of(p));
            }
        }
        ServerFrame::Ack {
            client_id,
            conversation_id,
            seq,
            duplicate,
            ..
        } => {
            if duplicate {
                s.event("ack duplicate:true".into());
            }
            if let Some(prev) = s.acked.get(&client_id) {
                if prev.conv != conversation_id || prev.seq != seq {
                    let was = format!("{}#{}", prev.conv, prev.seq);
                    s.violation(format!(
                        "client id {client_id} acked as {was}, then as {conversation_id}#{seq}"
                    ));
                }
            } else if let Some(i) = s.pending.iter().position(|p| p.client_id == client_id) {
                let p = s.pending.remove(i);
                if s.kind == Kind::Visitor && s.own_conv.is_none() {
                    s.own_conv = Some(conversation_id.clone());
                }
                s.acked.insert(
                    client_id,
                    Acked {
                        conv: conversation_id,
                        seq,
                        created: p.created,
                        at: now,
                    },
                );
            } else {
                s.violation(format!("ack for a client id never sent: {client_id}"));
            }
        }
        ServerFrame::Message(m) => {
            let conv = m.conversation_id.clone();
            if !s.recv.contains_key(&conv) {
                if m.seq != 1 {
                    s.violation(format!(
                        "first message of conversation {conv} it did not know has seq {} \
                         (1..{} never delivered)",
                        m.seq, m.seq
                    ));
                }
                s.recv.insert(
                    conv.clone(),
                    Received::from(m.seq - 1, "its first message".into()),
                );
            }
            let r = s.recv.get_mut(&conv).expect("inserted");
            let (held, start) = (r.held, r.start);
            let again = r.got.contains_key(&m.seq);
            if m.seq > held {
                r.held = m.seq;
                r.got.insert(m.seq, m.client_id.clone());
            }
            if m.seq <= held {
                let how = r.how.clone();
                s.violation(format!(
                    "{conv}: received seq {} again (holds {held}; {}; it started at {start}, \
                     as told by {how})",
                    m.seq,
                    if again {
                        "duplicate"
                    } else {
                        "below its start"
                    }
                ));
            } else if m.seq != held + 1 {
                s.violation(format!(
                    "{conv}: gap: received seq {} while holding {held}",
                    m.seq
                ));
            }
        }
        ServerFrame::Conversation {
            event,
            conversation,
        } => {
            if matches!(
                event,
                ConversationEvent::Opened | ConversationEvent::Reopened
            ) {
                if s.kind == Kind::Visitor && s.own_conv.is_none() {
                    s.own_conv = Some(conversation.id.clone());
                }
                // Like the server (`start_if_unknown`): the connection follows the conversation
                // from the `last_seq` the event states.
                s.recv.entry(conversation.id).or_insert_with(|| {
                    let how = format!(
                        "a `conversation` {event:?} event with last_seq {}",
                        conversation.last_seq
                    );
                    Received::from(conversation.last_seq, how)
                });
            }
        }
        ServerFrame::Error(e) => {
            let retryable = matches!(
                e.code,
                ErrorCode::RateLimited | ErrorCode::Overloaded | ErrorCode::Unavailable
            );
            match (&e.client_id, retryable) {
                (Some(cid), true) => {
                    let at = now + Duration::from_millis(e.retry_after_ms.unwrap_or(1000));
                    s.event(format!("send error {}", e.code.as_str()));
                    if let Some(p) = s.pending.iter_mut().find(|p| p.client_id == *cid) {
                        p.retry_at = Some(at);
                    }
                }
                _ => s.violation(format!("error frame {e:?}")),
            }
        }
        ServerFrame::Reconnect { after_ms, reason } => {
            s.event(format!("reconnect {reason:?} after {after_ms} ms"));
            todo.reconnect_after = Some(after_ms);
        }
        f if cfg.kind == Kind::Console => apply_presence(s, &f),
        _ => {}
    }
}

/// A console's copy of the visitor list, following `docs/protocol.md` (The visitor list).
fn apply_presence(s: &mut State, f: &ServerFrame) {
    match f {
        ServerFrame::VisitorList {
            site_id,
            epoch,
            version,
            mode,
            visitors,
            gone,
            done,
            ..
        } if *site_id == s.site_id => {
            match mode {
                ListMode::Snapshot => {
                    if !s.snapshot_open {
                        s.list.clear();
                    }
                    s.snapshot_open = !done;
                }
                ListMode::Changes => {
                    if s.epoch.as_ref() != Some(epoch) {
                        s.violation(format!("changes of epoch {epoch}, held {:?}", s.epoch));
                    }
                    for g in gone {
                        s.list.remove(g);
                    }
                }
            }
            s.list.extend(visitors.iter().map(|v| v.visitor_id.clone()));
            s.epoch = Some(epoch.clone());
            s.version = *version;
        }
        ServerFrame::Visitor {
            site_id,
            version,
            visitor,
        } if *site_id == s.site_id => {
            delta_version(s, *version);
            s.list.insert(visitor.visitor_id.clone());
        }
        ServerFrame::VisitorGone {
            site_id,
            version,
            visitor_id,
            ..
        } if *site_id == s.site_id => {
            delta_version(s, *version);
            s.list.remove(visitor_id);
        }
        ServerFrame::AgentStatus {
            site_id, version, ..
        } if *site_id == s.site_id => delta_version(s, *version),
        _ => {}
    }
}

fn delta_version(s: &mut State, version: u64) {
    if version <= s.version {
        let held = s.version;
        s.violation(format!("list delta version {version} not above {held}"));
    }
    s.version = version;
}

// ---------------------------------------------------------------------------------------------
// The cluster and the test's bookkeeping.
// ---------------------------------------------------------------------------------------------

struct Handle {
    kind: Kind,
    st: Shared,
}

/// A fault as [`World::measure`] times it: it began at `since` and healed at `t_ref` (clients
/// are timed from there), consoles from `presence_from`; `down` nodes are still down and only
/// the consoles of `consoles` are compared.
struct Fault<'a> {
    name: String,
    since: Instant,
    t_ref: Instant,
    presence_from: Instant,
    down: &'a [usize],
    consoles: &'a [usize],
    resume_goal: Option<Duration>,
}

/// One line of the recovery table.
struct Row {
    fault: String,
    /// Clients that reconnected, or had a send waiting across the fault.
    affected: usize,
    reconnected: usize,
    /// Time from the fault (or its healing) until each affected client was resumed: `ready`
    /// again and every send made before acked.
    resumed: Vec<Duration>,
    presence: Option<Duration>,
    /// Time from `t_ref` until every receiver held every message stored when it healed.
    delivered: Option<Duration>,
    notes: String,
    /// The goal asserted on this row's resumed p99, if any.
    resume_goal: Option<Duration>,
}

/// A client event without its node and details: "node1: closed 1001" → "closed 1001".
fn category(event: &str) -> String {
    let e = event.split_once(": ").map_or(event, |(_, k)| k);
    if e.contains("Connection refused") {
        "connect refused".into()
    } else if e.contains("reset") || e.contains("Reset") {
        "connection reset".into()
    } else if e.starts_with("resent ") {
        "resent after reconnecting".into()
    } else if let Some(r) = e.strip_prefix("reconnect ") {
        format!("reconnect {}", r.split(" after ").next().unwrap_or(r))
    } else {
        e.to_owned()
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2}s", d.as_secs_f64()))
        .unwrap_or_else(|| "-".into())
}

struct World {
    dir: tempfile::TempDir,
    pg: PrivatePostgres,
    nats: Vec<NatsServer>,
    nodes: Vec<HarkNode>,
    store: PostgresStore,
    site_id: SiteId,
    site_key: String,
    agent_tokens: Vec<String>,
    console_token: String,
    clients: Vec<Handle>,
    stop: CancellationToken,
    traffic: Arc<AtomicBool>,
    rows: Vec<Row>,
    checks: Vec<String>,
    /// Broken invariants found by the checks, and every problem line already reported.
    failures: Vec<String>,
    reported: std::collections::HashSet<String>,
    visitors_made: usize,
}

impl World {
    async fn start() -> World {
        let dir = tempfile::Builder::new()
            .prefix("hark-faults-")
            .tempdir()
            .expect("tempdir");
        let pg = PrivatePostgres::start().await;
        let nats = NatsServer::cluster(3).await;
        let urls: Vec<String> = nats.iter().map(NatsServer::url).collect();
        let store = PostgresStore::open(
            &pg.url(),
            PostgresOptions {
                max_connections: 4,
                ..PostgresOptions::default()
            },
        )
        .await
        .expect("open the store (migrates the private database)");
        let site = store
            .create_site(NewSite {
                name: "Shop".into(),
                allowed_origins: vec![Origin::parse(ORIGIN).expect("origin")],
            })
            .await
            .expect("site");
        let hash = hark::auth::hash_password("correct horse battery").expect("hash");
        let mut tokens = Vec::new();
        for i in 0..=AGENTS {
            let name = if i < AGENTS {
                format!("agent{i}")
            } else {
                "watcher".into()
            };
            let agent = store
                .create_agent(NewAgent {
                    email: Email::parse(&format!("{name}@shop.test")).expect("email"),
                    name: name.clone(),
                    role: AgentRole::Agent,
                    password_hash: hash.clone(),
                    site_ids: vec![site.id],
                })
                .await
                .expect("agent");
            let t = hark::auth::new_session_token();
            store
                .create_session(
                    &t.hash,
                    SessionRow {
                        agent_id: agent.id,
                        csrf_token: t.csrf,
                        expires_at: hark::domain::now_ms() + 3_600_000,
                    },
                )
                .await
                .expect("session");
            tokens.push(t.token);
        }
        let console_token = tokens.pop().expect("watcher");
        let mut nodes = Vec::new();
        for i in 0..NODES {
            // Every node gets all three NATS servers, each in another order.
            let order: Vec<String> = (0..urls.len())
                .map(|k| urls[(i + k) % urls.len()].clone())
                .collect();
            nodes.push(HarkNode::start(&format!("node{i}"), dir.path(), &pg.url(), &order).await);
        }
        World {
            dir,
            pg,
            nats,
            nodes,
            store,
            site_id: site.id,
            site_key: site.key.as_str().to_owned(),
            agent_tokens: tokens,
            console_token,
            clients: Vec::new(),
            stop: CancellationToken::new(),
            traffic: Arc::new(AtomicBool::new(true)),
            rows: Vec::new(),
            checks: Vec::new(),
            failures: Vec::new(),
            reported: std::collections::HashSet::new(),
            visitors_made: 0,
        }
    }

    fn spawn(&mut self, name: String, kind: Kind, nodes: Vec<usize>) -> Shared {
        let st: Shared = Arc::new(Mutex::new(State {
            name: name.clone(),
            kind,
            site_id: self.site_id.to_string(),
            created: Instant::now(),
            ready: false,
            node: None,
            readies: Vec::new(),
            events: Vec::new(),
            drops: Vec::new(),
            token: None,
            visitor_id: None,
            own_conv: None,
            pending: Vec::new(),
            acked: HashMap::new(),
            recv: HashMap::new(),
            sent: 0,
            list: BTreeSet::new(),
            epoch: None,
            version: 0,
            snapshot_open: false,
            violations: Vec::new(),
            retire: Retire::No,
        }));
        let cfg = Cfg {
            kind,
            nodes: nodes.iter().map(|&i| (i, self.nodes[i].addr())).collect(),
            bearer: match kind {
                Kind::Visitor => None,
                Kind::Agent => {
                    let n = self
                        .clients
                        .iter()
                        .filter(|c| c.kind == Kind::Agent)
                        .count();
                    Some(self.agent_tokens[n].clone())
                }
                Kind::Console => Some(self.console_token.clone()),
            },
            site_key: self.site_key.clone(),
            page: format!("{ORIGIN}/{name}"),
            backoff_cap: match kind {
                Kind::Console => Duration::from_secs(1),
                _ => Duration::from_secs(30),
            },
            send_every: match kind {
                Kind::Visitor => Some(VISITOR_SEND_MS),
                Kind::Agent => Some(AGENT_SEND_MS),
                Kind::Console => None,
            },
            traffic: self.traffic.clone(),
        };
        tokio::spawn(run_client(st.clone(), cfg, self.stop.clone()));
        self.clients.push(Handle {
            kind,
            st: st.clone(),
        });
        st
    }

    /// All three nodes, starting at `first`, so that clients spread and each rotates.
    fn rotation(first: usize) -> Vec<usize> {
        (0..NODES).map(|k| (first + k) % NODES).collect()
    }

    fn spawn_visitor(&mut self) {
        let i = self.visitors_made;
        self.visitors_made += 1;
        self.spawn(
            format!("visitor{i}"),
            Kind::Visitor,
            Self::rotation(i % NODES),
        );
    }

    fn of(&self, kind: Kind) -> impl Iterator<Item = &Handle> {
        self.clients.iter().filter(move |c| c.kind == kind)
    }

    /// Clients that must be connected: visitors not retired, and agents.
    fn active(&self) -> impl Iterator<Item = &Handle> {
        self.clients
            .iter()
            .filter(|c| c.kind != Kind::Console && lock(&c.st).retire == Retire::No)
    }

    /// Polls `cond` every 20 ms until it holds; the instant it held, or None at the deadline.
    async fn wait_for(
        &self,
        deadline: Instant,
        mut cond: impl FnMut(&World) -> bool,
    ) -> Option<Instant> {
        loop {
            if cond(self) {
                return Some(Instant::now());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn settled(&self, t_ref: Instant, down: &[usize]) -> bool {
        self.active().all(|c| lock(&c.st).settled(t_ref, down))
    }

    /// The visitors that are connected now, if every visitor that should be is.
    fn live_visitors(&self) -> Option<BTreeSet<String>> {
        let mut live = BTreeSet::new();
        for c in self.of(Kind::Visitor) {
            let s = lock(&c.st);
            match s.retire {
                Retire::No if s.ready => live.insert(s.visitor_id.clone()?),
                Retire::No => return None,
                _ => continue,
            };
        }
        Some(live)
    }

    /// Every console on `nodes` is connected and lists exactly the connected visitors.
    fn converged(&self, nodes: &[usize]) -> bool {
        let Some(live) = self.live_visitors() else {
            return false;
        };
        self.of(Kind::Console).enumerate().all(|(i, c)| {
            let s = lock(&c.st);
            !nodes.contains(&i) || (s.ready && s.list == live)
        })
    }

    /// A visitor connected to `node` (or to any node), not retired yet.
    fn pick_visitor(&self, node: Option<usize>) -> Option<Shared> {
        self.of(Kind::Visitor)
            .find(|c| {
                let s = lock(&c.st);
                s.retire == Retire::No
                    && s.ready
                    && s.own_conv.is_some()
                    && node.is_none_or(|n| s.node == Some(n))
            })
            .map(|c| c.st.clone())
    }

    /// Churn with every fault: one visitor leaves cleanly, one arrives.
    fn churn(&mut self) {
        if let Some(v) = self.pick_visitor(None) {
            lock(&v).retire = Retire::Leave;
        }
        self.spawn_visitor();
    }

    /// Waits until every client has recovered from a fault that began at `since` and healed at
    /// `t_ref`, and every console on `consoles` lists exactly the connected visitors; records a
    /// row. Presence is timed from `presence_from`.
    async fn measure(&mut self, f: Fault<'_>) {
        let Fault {
            name: fault,
            since,
            t_ref,
            presence_from,
            down,
            consoles,
            resume_goal,
        } = f;
        let fault = fault.as_str();
        // What the store holds as the fault heals: every receiver must get it.
        let heads = self.stored_heads().await;
        let (mut settled, mut delivered, mut converged) = (None, None, None);
        loop {
            let now = Instant::now();
            if settled.is_none() && self.settled(t_ref, down) {
                settled = Some(now);
            }
            if delivered.is_none() && self.behind(&heads, consoles).is_empty() {
                delivered = Some(now);
            }
            // Presence counts once every client is back (before, a list may look right only
            // because a visitor that reconnects has not been noticed yet).
            if settled.is_some() && converged.is_none() && self.converged(consoles) {
                converged = Some(now);
            }
            if settled.is_some() && delivered.is_some() && converged.is_some() {
                break;
            }
            if settled.is_none() && now > t_ref + SETTLE_DEADLINE {
                let who = self.unsettled(t_ref, down);
                self.fail(&format!(
                    "{fault}: clients not recovered {SETTLE_DEADLINE:?} after the fault healed:\n{who}"
                ));
            }
            if delivered.is_none() && now > t_ref + SETTLE_DEADLINE {
                let b = self.behind(&heads, consoles);
                self.fail(&format!(
                    "{fault}: messages stored before the fault healed not delivered \
                     {SETTLE_DEADLINE:?} later: {:?}",
                    &b[..b.len().min(20)]
                ));
            }
            if settled.is_some() && converged.is_none() && now > presence_from + PRESENCE_DEADLINE {
                let lists = self.presence_report(consoles);
                self.fail(&format!(
                    "{fault}: visitor lists not converged {PRESENCE_DEADLINE:?} after the fault \
                     healed:\n{lists}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (affected, reconnected, resumed) = self.recovery(since, t_ref);
        let notes = self.notes(since);
        self.record(Row {
            fault: fault.to_owned(),
            affected,
            reconnected,
            resumed,
            presence: converged.map(|t| t.saturating_duration_since(presence_from)),
            delivered: delivered.map(|t| t.saturating_duration_since(t_ref)),
            notes,
            resume_goal,
        });
    }

    /// Keeps a row of the table and prints it at once (progress, with `--nocapture`).
    fn record(&mut self, row: Row) {
        if self.rows.is_empty() {
            println!("{}", Self::header());
        }
        println!("{}", Self::line(&row));
        self.rows.push(row);
    }

    /// The last seq and the visitor of every conversation of the site, as the store has them.
    async fn stored_heads(&self) -> HashMap<String, (u64, String)> {
        let convs = self
            .store
            .list_conversations(&ConversationFilter {
                site_ids: Some(vec![self.site_id]),
                limit: 10_000,
                ..ConversationFilter::default()
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("listing conversations: {e}")));
        convs
            .into_iter()
            .map(|c| (c.id.to_string(), (c.last_seq, c.visitor_id.to_string())))
            .collect()
    }

    /// Receivers that must be connected and hold what `heads` says is stored, and do not: every
    /// agent, every visitor not retired (its own conversation), the consoles on `consoles`.
    fn behind(&self, heads: &HashMap<String, (u64, String)>, consoles: &[usize]) -> Vec<String> {
        let mut out = Vec::new();
        let mut console = 0;
        for c in &self.clients {
            let s = lock(&c.st);
            let required = match c.kind {
                Kind::Console => {
                    console += 1;
                    consoles.contains(&(console - 1))
                }
                _ => s.retire == Retire::No,
            };
            if !required {
                continue;
            }
            if !s.ready {
                out.push(format!("{} is not connected", s.name));
                continue;
            }
            for (conv, (n, visitor)) in heads {
                let follows = s.kind != Kind::Visitor || s.visitor_id.as_ref() == Some(visitor);
                let held = s.recv.get(conv).map(|r| r.held);
                if follows && *n > 0 && held.is_none_or(|h| h < *n) {
                    out.push(format!("{} holds {conv} up to {held:?} of {n}", s.name));
                }
            }
        }
        out
    }

    /// Presence only (a node back after a restart): its console and the others converge.
    async fn measure_presence(&mut self, what: &str, from: Instant) {
        let all: Vec<usize> = (0..NODES).collect();
        let converged = self
            .wait_for(from + PRESENCE_DEADLINE, |w| w.converged(&all))
            .await;
        let Some(converged) = converged else {
            let lists = self.presence_report(&all);
            self.fail(&format!(
                "{what}: visitor lists not converged {PRESENCE_DEADLINE:?} later:\n{lists}"
            ));
        };
        self.record(Row {
            fault: what.to_owned(),
            affected: 0,
            reconnected: 0,
            resumed: Vec::new(),
            presence: Some(converged.saturating_duration_since(from)),
            delivered: None,
            notes: String::new(),
            resume_goal: None,
        });
    }

    /// Per client that reconnected after `since` or had a send in flight across the fault: the
    /// time from `t_ref` until it was resumed.
    fn recovery(&self, since: Instant, t_ref: Instant) -> (usize, usize, Vec<Duration>) {
        let mut times = Vec::new();
        let mut reconnected = 0;
        for c in self.active() {
            let s = lock(&c.st);
            if s.created >= since {
                continue;
            }
            let mut done: Option<Instant> = None;
            if s.drops.iter().any(|t| *t >= since) {
                reconnected += 1;
                done = s.readies.last().copied();
            }
            for a in s.acked.values() {
                // A send made before the fault healed and acked late (not in the normal few ms).
                if a.created <= t_ref && a.at >= since && a.at - a.created > SLOW_ACK {
                    done = done.max(Some(a.at));
                }
            }
            if let Some(d) = done {
                times.push(d.saturating_duration_since(t_ref));
            }
        }
        times.sort();
        (times.len(), reconnected, times)
    }

    /// Connection ends and send errors since `since`, counted by kind.
    fn notes(&self, since: Instant) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for c in &self.clients {
            let s = lock(&c.st);
            for (t, what) in &s.events {
                if *t >= since {
                    *counts.entry(category(what)).or_default() += 1;
                }
            }
        }
        counts
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn unsettled(&self, t_ref: Instant, down: &[usize]) -> String {
        let mut out = String::new();
        for c in self.active() {
            let s = lock(&c.st);
            if s.settled(t_ref, down) {
                continue;
            }
            let oldest = s
                .pending
                .iter()
                .map(|p| p.created)
                .min()
                .map(|t| t.elapsed());
            let _ = writeln!(
                out,
                "  {} ready={} node={:?} pending={} (oldest {:?} ago) last events: {:?}",
                s.name,
                s.ready,
                s.node,
                s.pending.len(),
                oldest,
                s.events
                    .iter()
                    .rev()
                    .take(6)
                    .map(|(t, e)| format!("{e} ({:.1}s ago)", t.elapsed().as_secs_f64()))
                    .collect::<Vec<_>>()
            );
        }
        out
    }

    fn presence_report(&self, consoles: &[usize]) -> String {
        let live = self.live_visitors();
        let mut out = format!("  connected visitors: {live:?}\n");
        if live.is_none() {
            for c in self.of(Kind::Visitor) {
                let s = lock(&c.st);
                if s.retire == Retire::No && !s.ready {
                    let _ = writeln!(out, "  not connected: {} {:?}", s.name, s.events.last());
                }
            }
        }
        let live = live.unwrap_or_default();
        let names: HashMap<String, String> = self
            .of(Kind::Visitor)
            .filter_map(|c| {
                let s = lock(&c.st);
                Some((
                    s.visitor_id.clone()?,
                    format!("{} ({:?})", s.name, s.retire),
                ))
            })
            .collect();
        for (i, c) in self.of(Kind::Console).enumerate() {
            if !consoles.contains(&i) {
                continue;
            }
            let s = lock(&c.st);
            let extra: Vec<_> = s.list.difference(&live).map(|v| &names[v]).collect();
            let missing: Vec<_> = live.difference(&s.list).map(|v| &names[v]).collect();
            let _ = writeln!(
                out,
                "  console on node{i}: ready={} listed={} stuck (listed, not connected)={extra:?} \
                 missing={missing:?}",
                s.ready,
                s.list.len()
            );
        }
        out
    }

    /// Reads every message of the site from the store and checks the invariants against what
    /// the clients were acked and received. Returns how long receivers took to catch up with
    /// the store as read.
    async fn check(&mut self, label: &str) -> Duration {
        // Acks first: whatever was acked before the store is read must be in it.
        let mut acked: Vec<(String, String, u64, String)> = Vec::new();
        for c in &self.clients {
            let s = lock(&c.st);
            for (cid, a) in &s.acked {
                acked.push((cid.clone(), a.conv.clone(), a.seq, s.name.clone()));
            }
        }
        let mut problems: Vec<String> = Vec::new();
        let convs = self
            .store
            .list_conversations(&ConversationFilter {
                site_ids: Some(vec![self.site_id]),
                limit: 10_000,
                ..ConversationFilter::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{label}: listing conversations: {e}"));
        // conv → client id by seq (index seq - 1); conv → visitor.
        let mut stored: HashMap<String, Vec<Option<String>>> = HashMap::new();
        let mut owner: HashMap<String, String> = HashMap::new();
        let mut by_client_id: HashMap<String, (String, u64)> = HashMap::new();
        for conv in &convs {
            let id = conv.id.to_string();
            owner.insert(id.clone(), conv.visitor_id.to_string());
            let mut seqs: Vec<Option<String>> = Vec::new();
            loop {
                let (page, more) = self
                    .store
                    .messages(conv.id, SeqRange::After(seqs.len() as u64), 1000)
                    .await
                    .unwrap_or_else(|e| panic!("{label}: reading messages: {e}"));
                for m in page {
                    if m.seq != seqs.len() as u64 + 1 {
                        problems.push(format!(
                            "STORE GAP: {id} has seq {} after {}",
                            m.seq,
                            seqs.len()
                        ));
                    }
                    let cid = m.client_id.map(|c| c.to_string());
                    if let Some(cid) = &cid {
                        if let Some((c, q)) = by_client_id.insert(cid.clone(), (id.clone(), m.seq))
                        {
                            problems.push(format!(
                                "DUPLICATE STORED: client id {cid} at {c}#{q} and {id}#{}",
                                m.seq
                            ));
                        }
                    }
                    seqs.push(cid);
                }
                if !more {
                    break;
                }
            }
            stored.insert(id, seqs);
        }
        let messages: usize = stored.values().map(Vec::len).sum();
        for (cid, conv, seq, who) in &acked {
            let at = stored
                .get(conv)
                .and_then(|s| s.get((*seq as usize).wrapping_sub(1)));
            match at {
                Some(Some(c)) if c == cid => {}
                other => problems.push(format!(
                    "LOST ACKED: {who}'s {cid} acked as {conv}#{seq}, the store has {other:?}"
                )),
            }
        }
        // Every receiver catches up with the store as read.
        let heads: HashMap<String, (u64, String)> = stored
            .iter()
            .map(|(c, s)| (c.clone(), (s.len() as u64, owner[c].clone())))
            .collect();
        let all: Vec<usize> = (0..NODES).collect();
        let read_at = Instant::now();
        let caught_up = self
            .wait_for(read_at + CATCH_UP_DEADLINE, |w| {
                w.behind(&heads, &all).is_empty()
            })
            .await;
        if caught_up.is_none() {
            let b = self.behind(&heads, &all);
            problems.push(format!(
                "NOT DELIVERED within {CATCH_UP_DEADLINE:?} of reading the store: {} \
                 receivers/conversations behind, e.g. {:?}",
                b.len(),
                &b[..b.len().min(10)]
            ));
        }
        let catch_up = caught_up.map_or(CATCH_UP_DEADLINE, |t| t - read_at);
        // Nothing changes in the visitor list now: every console must still be right (a
        // visitor that comes back after convergence, or a list that drifts, shows here).
        if !self.converged(&all) {
            let lists = self.presence_report(&all);
            problems.push(format!(
                "PRESENCE: a visitor list drifted after converging:\n{lists}"
            ));
        }
        // What each client received is what the store holds, and a visitor only its own.
        for c in &self.clients {
            let mut s = lock(&c.st);
            for (conv, r) in &s.recv {
                if s.kind == Kind::Visitor && s.visitor_id.as_ref() != owner.get(conv) {
                    problems.push(format!("FOREIGN: {} follows {conv}, not its own", s.name));
                }
                let Some(st) = stored.get(conv) else {
                    problems.push(format!(
                        "UNKNOWN: {} received {conv}, not in the store",
                        s.name
                    ));
                    continue;
                };
                for (seq, cid) in &r.got {
                    if let Some(want) = st.get(*seq as usize - 1) {
                        if want != cid {
                            problems.push(format!(
                                "WRONG MESSAGE: {} got {conv}#{seq} with client id {cid:?}, \
                                 stored {want:?}",
                                s.name
                            ));
                        }
                    }
                }
                let from = r.start;
                if r.got.keys().next().is_some_and(|&first| first != from + 1) {
                    problems.push(format!(
                        "ORDER: {} started {conv} at {from}, first received {:?}",
                        s.name,
                        r.got.keys().next()
                    ));
                }
            }
            problems.append(&mut s.violations);
        }
        let mut received = 0usize;
        for c in self.of(Kind::Agent) {
            received += lock(&c.st)
                .recv
                .values()
                .map(|r| r.got.len())
                .sum::<usize>();
        }
        self.checks.push(format!(
            "{label}: {} conversations, {messages} messages stored, {} acked, agents received \
             {received}, caught up in {:.2}s",
            convs.len(),
            acked.len(),
            catch_up.as_secs_f64()
        ));
        // Broken invariants are recorded and the faults go on (each is reported once), so that
        // one run shows every phase; the test fails at the end.
        let mut new: Vec<String> = problems
            .into_iter()
            .filter(|p| self.reported.insert(p.clone()))
            .collect();
        if !new.is_empty() {
            let n = new.len();
            new.truncate(40);
            let text = format!("{label}: {n} problems:\n  {}", new.join("\n  "));
            println!("CHECK FAILED {text}");
            self.failures.push(text);
        }
        catch_up
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", Self::header());
        for r in &self.rows {
            let _ = writeln!(out, "{}", Self::line(r));
        }
        out
    }

    fn header() -> String {
        format!(
            "{:<34} {:>8} {:>6} {:>8} {:>8} {:>8} {:>9} {:>9}  notes",
            "fault", "affected", "recon", "res p50", "res p99", "res max", "presence", "delivered"
        )
    }

    fn line(r: &Row) -> String {
        format!(
            "{:<34} {:>8} {:>6} {:>8} {:>8} {:>8} {:>9} {:>9}  {}",
            r.fault,
            r.affected,
            r.reconnected,
            secs(percentile(&r.resumed, 50)),
            secs(percentile(&r.resumed, 99)),
            secs(r.resumed.last().copied()),
            secs(r.presence),
            secs(r.delivered),
            r.notes
        )
    }

    /// Prints what helps to find the cause (the table so far, the checks, the nodes' warnings)
    /// and fails the test.
    fn fail(&self, msg: &str) -> ! {
        let mut out = format!("{}\n", self.table());
        for c in &self.checks {
            let _ = writeln!(out, "{c}");
        }
        for f in &self.failures {
            let _ = writeln!(out, "CHECK FAILED {f}");
        }
        for n in &self.nodes {
            let log = std::fs::read_to_string(n.log()).unwrap_or_default();
            let warn: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            let _ = writeln!(
                out,
                "--- {} ({}) warnings and errors, last 15:\n{}",
                n.name,
                n.log().display(),
                warn[warn.len().saturating_sub(15)..].join("\n")
            );
        }
        let _ = writeln!(
            out,
            "--- postgres, last 10 lines:\n{}",
            tail(&self.pg.log(), 10)
        );
        // Keep the logs for a look after the failure.
        let kept = self.dir.path().to_owned();
        let _ = std::fs::create_dir_all("/tmp/hark-fault-logs");
        for n in &self.nodes {
            let _ = std::fs::copy(n.log(), format!("/tmp/hark-fault-logs/{}.log", n.name));
        }
        let _ = std::fs::copy(self.pg.log(), "/tmp/hark-fault-logs/postgres.log");
        panic!(
            "{msg}\n\n{out}(logs of {} copied to /tmp/hark-fault-logs)",
            kept.display()
        );
    }

    // -----------------------------------------------------------------------------------------
    // The phases.
    // -----------------------------------------------------------------------------------------

    async fn warm_up(&mut self) {
        for i in 0..NODES {
            self.spawn(format!("console{i}"), Kind::Console, vec![i]);
        }
        for i in 0..AGENTS {
            self.spawn(format!("agent{i}"), Kind::Agent, Self::rotation(i % NODES));
        }
        let t = Instant::now();
        let ok = self
            .wait_for(t + Duration::from_secs(20), |w| {
                w.clients.iter().all(|c| lock(&c.st).ready)
            })
            .await;
        if ok.is_none() {
            self.fail("agents and consoles did not connect");
        }
        for _ in 0..VISITORS {
            self.spawn_visitor();
        }
        let t = Instant::now();
        let all: Vec<usize> = (0..NODES).collect();
        let ok = self
            .wait_for(t + Duration::from_secs(30), |w| {
                w.of(Kind::Visitor).all(|c| {
                    let s = lock(&c.st);
                    s.ready && s.own_conv.is_some()
                }) && w.converged(&all)
            })
            .await;
        if ok.is_none() {
            let who = self.unsettled(t, &[]);
            let lists = self.presence_report(&all);
            self.fail(&format!("visitors did not start chatting:\n{who}\n{lists}"));
        }
        tokio::time::sleep(QUIET).await;
        self.check("warm-up").await;
    }

    async fn kill_node(&mut self, i: usize) {
        // One visitor of that node vanishes with it (it must leave every list); one leaves
        // cleanly elsewhere; one arrives.
        if let Some(v) = self.pick_visitor(Some(i)) {
            lock(&v).retire = Retire::Vanish;
        }
        self.churn();
        let t0 = Instant::now();
        self.nodes[i].kill9().await;
        let others: Vec<usize> = (0..NODES).filter(|&n| n != i).collect();
        self.measure(Fault {
            name: format!("kill -9 node{i}"),
            since: t0,
            t_ref: t0,
            presence_from: t0,
            down: &[i],
            consoles: &others,
            resume_goal: Some(RESUME_GOAL),
        })
        .await;
        self.nodes[i].start_again().await;
        let back = Instant::now();
        self.measure_presence(&format!("  node{i} restarted"), back)
            .await;
        self.check(&format!("after kill -9 node{i}")).await;
        tokio::time::sleep(QUIET).await;
    }

    async fn kill_one_nats(&mut self) {
        self.churn();
        // The server most Hark nodes are connected to (async-nats picks one of its list).
        let mut busiest = (0, 0);
        for (i, s) in self.nats.iter().enumerate() {
            let n = s.connections().await.unwrap_or(0);
            if n > busiest.1 {
                busiest = (i, n);
            }
        }
        let (k, clients) = busiest;
        let t0 = Instant::now();
        self.nats[k].kill();
        let all: Vec<usize> = (0..NODES).collect();
        self.measure(Fault {
            name: format!("kill nats{k} ({clients} Hark conns)"),
            since: t0,
            t_ref: t0,
            presence_from: t0,
            down: &[],
            consoles: &all,
            resume_goal: None,
        })
        .await;
        self.nats[k].restart().await;
        for s in &self.nats {
            s.wait_routes(2).await;
        }
        self.check(&format!("after killing nats{k}")).await;
        tokio::time::sleep(QUIET).await;
    }

    async fn restart_all_nats(&mut self) {
        self.churn();
        let t0 = Instant::now();
        for s in &mut self.nats {
            s.kill();
        }
        tokio::time::sleep(OUTAGE).await;
        for s in &mut self.nats {
            s.restart().await;
        }
        for s in &self.nats {
            s.wait_routes(2).await;
        }
        let healed = Instant::now();
        let all: Vec<usize> = (0..NODES).collect();
        self.measure(Fault {
            name: format!("NATS cluster down {}s, restarted", OUTAGE.as_secs()),
            since: t0,
            t_ref: healed,
            presence_from: healed,
            down: &[],
            consoles: &all,
            resume_goal: None,
        })
        .await;
        self.check("after the NATS cluster restart").await;
        tokio::time::sleep(QUIET).await;
    }

    async fn kill_postgres(&mut self) {
        self.churn();
        let t0 = Instant::now();
        self.pg.kill9().await;
        tokio::time::sleep(OUTAGE).await;
        self.pg.start_again().await;
        let healed = Instant::now();
        let all: Vec<usize> = (0..NODES).collect();
        self.measure(Fault {
            name: format!("kill -9 postgres, {}s down", OUTAGE.as_secs()),
            since: t0,
            t_ref: healed,
            presence_from: healed,
            down: &[],
            consoles: &all,
            resume_goal: None,
        })
        .await;
        self.check("after kill -9 of PostgreSQL").await;
        tokio::time::sleep(QUIET).await;
    }

    async fn rolling_restart(&mut self) {
        for i in 0..NODES {
            let t0 = Instant::now();
            let status = self.nodes[i].terminate().await;
            let drained = t0.elapsed();
            if !status.success() {
                self.fail(&format!("node{i} exited with {status} after SIGTERM"));
            }
            self.nodes[i].start_again().await;
            let back = Instant::now();
            let all: Vec<usize> = (0..NODES).collect();
            self.measure(Fault {
                name: format!("SIGTERM node{i} (drained {:.2}s)", drained.as_secs_f64()),
                since: t0,
                t_ref: t0,
                presence_from: back,
                down: &[],
                consoles: &all,
                resume_goal: Some(DRAIN_RESUME_BOUND),
            })
            .await;
            self.check(&format!("after the drain of node{i}")).await;
        }
    }

    /// Traffic stops; every send is acked; the last check covers everything.
    async fn finish(&mut self) {
        self.traffic.store(false, Ordering::Relaxed);
        let t = Instant::now();
        if self
            .wait_for(t + SETTLE_DEADLINE, |w| {
                w.active().all(|c| {
                    let s = lock(&c.st);
                    s.ready && s.pending.is_empty()
                })
            })
            .await
            .is_none()
        {
            let who = self.unsettled(t, &[]);
            self.fail(&format!("sends not acked after traffic stopped:\n{who}"));
        }
        self.check("final").await;
        self.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_loses_nothing_and_heals_through_every_fault() {
    let began = Instant::now();
    let mut w = World::start().await;
    w.warm_up().await;
    for i in 0..NODES {
        w.kill_node(i).await;
    }
    w.kill_one_nats().await;
    w.restart_all_nats().await;
    w.kill_postgres().await;
    w.rolling_restart().await;
    w.finish().await;
    let table = w.table();
    println!("\n{table}");
    for c in &w.checks {
        println!("{c}");
    }
    println!("total {:.1}s", began.elapsed().as_secs_f64());
    if !w.failures.is_empty() {
        w.fail(&format!("broken invariants:\n{}", w.failures.join("\n")));
    }
    // The goals of the brief, asserted where they apply. Measured on the 2-core dev machine
    // (debug build, seven runs, other builds running beside):
    // - kill -9 of a node: resumed p99 0.34-0.94 s, every receiver holds what was stored
    //   0.4-1.0 s after the kill, visitor lists right after 4.1-5.1 s (a dead node is declared
    //   down after 5 s: then the visitor that vanished with it leaves; those that reconnected
    //   elsewhere stay listed); its console is right 0.02-1.1 s after the node is back;
    // - one NATS server killed: no client disturbed, lists right after 3.0-3.3 s (the 3 s grace
    //   of the visitor who left meanwhile);
    // - the whole NATS cluster down 3 s: lists right 0.1-0.9 s and messages delivered 0.1-0.6 s
    //   after it is back;
    // - kill -9 of PostgreSQL, down 3 s: sends wait and are acked 1.4-2.4 s (p99) after it
    //   accepts connections again; lists right after 1.5-2.4 s;
    // - SIGTERM (drain, 0.01-0.5 s): resumed p99 4.5-5.3 s, which is the server's reconnect
    //   jitter (`after_ms` < 5 s) plus a reconnect; lists right 4.4-5.0 s after the node is back.
    for r in &w.rows {
        if let (Some(goal), Some(p99)) = (r.resume_goal, percentile(&r.resumed, 99)) {
            assert!(
                p99 < goal,
                "{}: clients resumed p99 {p99:?}, goal < {goal:?}\n{table}",
                r.fault
            );
        }
        if let Some(p) = r.presence {
            assert!(
                p < PRESENCE_GOAL,
                "{}: visitor lists right after {p:?}, goal < {PRESENCE_GOAL:?}\n{table}",
                r.fault
            );
        }
    }
}
