//! One simulated client (visitor or agent) of a load run: connects, sends on a paced schedule
//! (visitors) or replies (agents), retries what the server asks to retry, reconnects with
//! resume, and records what it received for the end-of-run delivery check.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hark_protocol::{Author, ClientFrame, ErrorCode, MessageBody, ResumePoint, ServerFrame};
use http::header::{HeaderName, AUTHORIZATION, ORIGIN};
use rand::Rng;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::stats::{Examples, Latency, Tally};
use crate::ws::{self, close_key, ConnectError, ConnectSpec, Ws};

/// A connection from which nothing arrived for this long is considered dead (protocol: 25 s).
const DEAD_AFTER: Duration = Duration::from_secs(30);
/// Highest seq tracked per conversation (memory bound of the tracker).
const MAX_TRACK_SEQ: u64 = 20_000_000;
/// Resume entries an agent puts in its hello (the frame limit is 64 KiB).
const MAX_RESUME: usize = 700;

/// Phase boundaries of a run, fixed once every client is connected.
#[derive(Debug, Clone, Copy)]
pub struct Times {
    pub start: Instant,
    pub send_end: Instant,
    pub grace_end: Instant,
    pub warmup_end_ns: u64,
    pub send_end_ns: u64,
}

#[derive(Debug, Clone)]
pub struct LoadParams {
    pub sites: usize,
    pub visitors: usize,
    pub agents_per_site: usize,
    pub rate: f64,
    pub reply_ratio: f64,
    pub duration: f64,
    pub warmup: f64,
    pub grace: f64,
    pub text_bytes: usize,
    pub connect_rate: f64,
    /// Other nodes of the same cluster (address, Host header): clients are spread over the
    /// target and these, round robin by client index.
    pub also: Vec<(std::net::SocketAddr, String)>,
}

#[derive(Default)]
pub struct Counters {
    pub connected: AtomicU64,
    pub connect_failed: AtomicU64,
    pub sent: AtomicU64,
    pub sent_window: AtomicU64,
    pub agent_sent: AtomicU64,
    pub resends: AtomicU64,
    pub acked: AtomicU64,
    pub acked_window: AtomicU64,
    pub dup_acks: AtomicU64,
    pub stray_acks: AtomicU64,
    pub deliveries: AtomicU64,
    pub deliveries_window: AtomicU64,
    pub unique_deliveries: AtomicU64,
    pub expected_deliveries: AtomicU64,
    pub pending: AtomicI64,
    pub reconnects: AtomicU64,
    pub send_failed: AtomicU64,
    pub schedule_skipped: AtomicU64,
    pub undecodable: AtomicU64,
}

pub struct Shared {
    pub t0: Instant,
    pub addr: std::net::SocketAddr,
    pub host: String,
    pub params: LoadParams,
    pub times: OnceLock<Times>,
    pub setup_deadline: Instant,
    pub c: Counters,
    /// Every bench message received by someone other than its sender, send → receive.
    pub deliver_hist: Latency,
    /// Only agent replies, send → receive (by the visitor and other agents).
    pub reply_hist: Latency,
    /// Send → ack (first attempt to ack, retries included).
    pub ack_hist: Latency,
    /// How late the bench created scheduled sends (its own timeliness).
    pub sched_lag_hist: Latency,
    pub errors: Tally,
    pub closes: Tally,
    pub connect_errors: Tally,
    pub frames: Tally,
    pub examples: Examples,
}

impl Shared {
    pub fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// Whether a time (ns since t0) lies in the measured window.
    pub fn in_window(&self, ns: u64) -> bool {
        match self.times.get() {
            Some(t) => ns >= t.warmup_end_ns && ns < t.send_end_ns,
            None => false,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Role {
    Visitor { site_key: String },
    Agent { token: String, index_in_site: usize },
}

/// What one connection received of one conversation.
#[derive(Debug, Default, Clone)]
pub struct ConvTrack {
    /// Per seq: the connection epoch that last received it (0 = never).
    recv: Vec<u32>,
    /// Per seq: this client sent it (and got its ack).
    own: Vec<bool>,
    conn_epoch: u32,
    conn_last: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receipt {
    New,
    Duplicate,
    Redelivered,
    OutOfRange,
}

impl ConvTrack {
    fn receive(&mut self, seq: u64, epoch: u32) -> (Receipt, bool) {
        if seq == 0 || seq > MAX_TRACK_SEQ {
            return (Receipt::OutOfRange, false);
        }
        let i = seq as usize;
        if self.recv.len() <= i {
            self.recv.resize(i + 1, 0);
        }
        let prev = self.recv[i];
        self.recv[i] = epoch;
        let r = if prev == epoch {
            Receipt::Duplicate
        } else if prev != 0 {
            Receipt::Redelivered
        } else {
            Receipt::New
        };
        if self.conn_epoch != epoch {
            self.conn_epoch = epoch;
            self.conn_last = 0;
        }
        let ooo = r != Receipt::Duplicate && seq < self.conn_last;
        self.conn_last = self.conn_last.max(seq);
        (r, ooo)
    }

    fn mark_own(&mut self, seq: u64) {
        if seq == 0 || seq > MAX_TRACK_SEQ {
            return;
        }
        let i = seq as usize;
        if self.own.len() <= i {
            self.own.resize(i + 1, false);
        }
        self.own[i] = true;
    }

    pub fn received(&self, seq: u64) -> bool {
        self.recv.get(seq as usize).is_some_and(|e| *e != 0)
    }

    fn holds(&self, seq: u64) -> bool {
        self.received(seq) || self.own.get(seq as usize).copied().unwrap_or(false)
    }

    /// Highest seq up to which this client holds every message.
    fn held_contiguous(&self) -> u64 {
        let mut s = 0;
        while self.holds(s + 1) {
            s += 1;
        }
        s
    }
}

struct Pending {
    text: String,
    conv: Option<String>,
    /// When the message was created (its scheduled send time); the stamp in its text.
    sent_ns: u64,
    /// Written to the wire at least once.
    on_wire: bool,
    /// Waiting in the outbound queue.
    queued: bool,
}

/// What a client hands back at the end.
pub struct ClientResult {
    pub is_agent: bool,
    pub site: usize,
    pub idx: usize,
    pub connected: bool,
    pub tracks: HashMap<String, ConvTrack>,
    /// (conversation, seq) of every send of this client that was acked.
    pub acks: Vec<(String, u64)>,
    pub unacked: usize,
    pub never_sent: usize,
    pub duplicates: u64,
    pub redelivered: u64,
    pub out_of_order: u64,
    pub echoes: u64,
}

pub enum Outcome {
    Stop,
    Lost,
}

pub struct Client {
    sh: Arc<Shared>,
    idx: usize,
    site: usize,
    role: Role,
    epoch: u32,
    token: Option<String>,
    my_id: Option<String>,
    pending: HashMap<String, Pending>,
    /// Sends waiting for the wire, in order (retries go to the front).
    queue: VecDeque<String>,
    /// No sends before this (the server said rate_limited / overloaded / unavailable).
    blocked_until: Option<Instant>,
    /// Client-side token bucket mirroring the server's per-connection send limit.
    tokens: f64,
    tokens_at: Instant,
    bucket_rate: f64,
    bucket_burst: f64,
    tracks: HashMap<String, ConvTrack>,
    acks: Vec<(String, u64)>,
    reply_acc: f64,
    scheduled: bool,
    next_send: Option<Instant>,
    interval: Duration,
    reconnect_after: Option<Duration>,
    last_rx: Instant,
    connected: bool,
    duplicates: u64,
    redelivered: u64,
    out_of_order: u64,
    echoes: u64,
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The send time a bench message carries: `t=<nanos since bench start>;…`.
pub fn parse_stamp(text: &str) -> Option<u64> {
    let rest = text.strip_prefix("t=")?;
    let end = rest.find(';')?;
    rest[..end].parse().ok()
}

pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn backoff(attempt: u32) -> Duration {
    let cap = (250u64 << attempt.min(5)).min(5_000);
    Duration::from_millis(rand::thread_rng().gen_range(50..=cap.max(51)))
}

impl Client {
    pub fn new(sh: Arc<Shared>, idx: usize, site: usize, role: Role) -> Client {
        Client {
            sh,
            idx,
            site,
            role,
            epoch: 0,
            token: None,
            my_id: None,
            pending: HashMap::new(),
            queue: VecDeque::new(),
            blocked_until: None,
            tokens: 0.0,
            tokens_at: Instant::now(),
            bucket_rate: 10.0,
            bucket_burst: 10.0,
            tracks: HashMap::new(),
            acks: Vec::new(),
            reply_acc: 0.0,
            scheduled: false,
            next_send: None,
            interval: Duration::from_secs(1),
            reconnect_after: None,
            last_rx: Instant::now(),
            connected: false,
            duplicates: 0,
            redelivered: 0,
            out_of_order: 0,
            echoes: 0,
        }
    }

    fn is_agent(&self) -> bool {
        matches!(self.role, Role::Agent { .. })
    }

    fn label(&self) -> String {
        if self.is_agent() {
            format!("agent#{} (site {})", self.idx, self.site)
        } else {
            format!("visitor#{} (site {})", self.idx, self.site)
        }
    }

    fn resume_points(&self) -> Vec<ResumePoint> {
        let mut pts: Vec<ResumePoint> = self
            .tracks
            .iter()
            .map(|(conv, t)| ResumePoint {
                conversation_id: conv.clone(),
                seq: t.held_contiguous(),
            })
            .collect();
        if pts.len() > MAX_RESUME {
            pts.sort_by_key(|p| std::cmp::Reverse(p.seq));
            pts.truncate(MAX_RESUME);
        }
        pts
    }

    async fn open(&mut self) -> Result<Ws, ConnectError> {
        let (path, headers): (String, Vec<(HeaderName, String)>) = match &self.role {
            Role::Visitor { site_key } => (
                format!("/ws/visitor?site_key={}", url_encode(site_key)),
                vec![(ORIGIN, ws::ORIGIN.to_owned())],
            ),
            Role::Agent { token, .. } => (
                "/ws/agent".to_owned(),
                vec![(AUTHORIZATION, format!("Bearer {token}"))],
            ),
        };
        // Round robin over the cluster's nodes (the target alone without --also-url).
        let nodes = 1 + self.sh.params.also.len();
        let (addr, host) = match self.idx % nodes {
            0 => (self.sh.addr, self.sh.host.as_str()),
            k => {
                let (a, h) = &self.sh.params.also[k - 1];
                (*a, h.as_str())
            }
        };
        let spec = ConnectSpec {
            addr,
            host,
            path: &path,
            headers: &headers,
            source_ip: None,
            read_buffer: if self.is_agent() { 64 * 1024 } else { 4096 },
            timeout: Duration::from_secs(15),
        };
        let mut conn = ws::connect(&spec).await?;
        let hello = ClientFrame::Hello {
            token: if self.is_agent() {
                None
            } else {
                self.token.clone()
            },
            resume: self.resume_points(),
            page: None,
            presence: Vec::new(),
        };
        let w = ws::hello(&mut conn, &hello, Duration::from_secs(15)).await?;
        if !self.is_agent() {
            if let Some(t) = w.token {
                self.token = Some(t);
            }
        }
        if w.id.is_some() {
            self.my_id = w.id;
        }
        // Stay a little under the server's limit; start with half the burst.
        self.bucket_rate = (w.sends_per_sec.max(1) as f64) * 0.95;
        self.bucket_burst = (w.send_burst.max(2) as f64 / 2.0).max(1.0);
        self.tokens = self.bucket_burst;
        self.tokens_at = Instant::now();
        self.blocked_until = None;
        Ok(conn)
    }

    async fn connect_retry(
        &mut self,
        deadline: Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Ws> {
        let mut attempt = 0u32;
        loop {
            if *stop.borrow() {
                return None;
            }
            let err = match self.open().await {
                Ok(conn) => return Some(conn),
                Err(e) => e,
            };
            self.sh.connect_errors.add(err.key(), 1);
            let unauthorized_token = matches!(&err, ConnectError::Hello(m) if m.contains("unauthorized"))
                && self.token.is_some();
            if unauthorized_token {
                self.token = None;
            }
            if !(err.retryable() || unauthorized_token) || Instant::now() >= deadline {
                self.sh.examples.push(format!("{}: {err}", self.label()));
                return None;
            }
            let delay = match &err {
                ConnectError::Refused {
                    retry_after: Some(d),
                    ..
                } => *d + backoff(0),
                _ => backoff(attempt),
            };
            attempt += 1;
            let until = (Instant::now() + delay).min(deadline);
            if self.offline_wait(until, stop).await {
                return None;
            }
        }
    }

    /// Runs the client until the run stops; returns what it saw.
    pub async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
        mut started: watch::Receiver<bool>,
    ) -> ClientResult {
        let setup_deadline = self.sh.setup_deadline;
        let Some(mut conn) = self.connect_retry(setup_deadline, &mut stop).await else {
            self.sh.c.connect_failed.fetch_add(1, Ordering::Relaxed);
            return self.finish();
        };
        self.connected = true;
        self.epoch = 1;
        self.last_rx = Instant::now();
        self.sh.c.connected.fetch_add(1, Ordering::Relaxed);
        loop {
            match self.drive(&mut conn, &mut stop, &mut started).await {
                Outcome::Stop => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(None)).await;
                    break;
                }
                Outcome::Lost => {
                    drop(conn);
                    let deadline = match self.sh.times.get() {
                        Some(t) => t.grace_end,
                        None => setup_deadline,
                    };
                    let delay = self.reconnect_after.take().unwrap_or_else(|| backoff(0));
                    let until = (Instant::now() + delay).min(deadline);
                    if self.offline_wait(until, &mut stop).await {
                        break;
                    }
                    match self.connect_retry(deadline, &mut stop).await {
                        Some(c) => {
                            conn = c;
                            self.epoch += 1;
                            self.last_rx = Instant::now();
                            self.sh.c.reconnects.fetch_add(1, Ordering::Relaxed);
                            self.requeue_all();
                            if self.drain(&mut conn).await.is_err() {
                                continue;
                            }
                        }
                        None => break,
                    }
                }
            }
        }
        self.finish()
    }

    fn finish(self) -> ClientResult {
        ClientResult {
            is_agent: self.is_agent(),
            site: self.site,
            idx: self.idx,
            connected: self.connected,
            unacked: self.pending.values().filter(|p| p.on_wire).count(),
            never_sent: self.pending.values().filter(|p| !p.on_wire).count(),
            tracks: self.tracks,
            acks: self.acks,
            duplicates: self.duplicates,
            redelivered: self.redelivered,
            out_of_order: self.out_of_order,
            echoes: self.echoes,
        }
    }

    fn schedule(&mut self) {
        if self.scheduled {
            return;
        }
        let Some(t) = self.sh.times.get().copied() else {
            return;
        };
        self.scheduled = true;
        let p = &self.sh.params;
        if !self.is_agent() && p.rate > 0.0 && p.visitors > 0 {
            self.interval = Duration::from_secs_f64(p.visitors as f64 / p.rate);
            let offset = Duration::from_secs_f64(self.idx as f64 / p.rate);
            self.next_send = Some(t.start + offset);
        }
    }

    async fn drive(
        &mut self,
        conn: &mut Ws,
        stop: &mut watch::Receiver<bool>,
        started: &mut watch::Receiver<bool>,
    ) -> Outcome {
        loop {
            if *stop.borrow() {
                return Outcome::Stop;
            }
            self.schedule();
            let now = Instant::now();
            if now.duration_since(self.last_rx) >= DEAD_AFTER {
                self.sh.closes.add("client_saw_nothing_for_30s", 1);
                return Outcome::Lost;
            }
            let mut wake = self.last_rx + DEAD_AFTER;
            if let (Some(t), Some(next)) = (self.sh.times.get(), self.next_send) {
                if next < t.send_end {
                    wake = wake.min(next);
                }
            }
            if let Some(at) = self.queue_wake(now) {
                wake = wake.min(at);
            }
            let waiting = !self.scheduled;
            tokio::select! {
                biased;
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return Outcome::Stop;
                    }
                }
                r = started.changed(), if waiting => {
                    if r.is_err() {
                        return Outcome::Stop;
                    }
                }
                m = conn.next() => {
                    self.last_rx = Instant::now();
                    match m {
                        Some(Ok(msg)) => {
                            if let Err(o) = self.on_message(conn, msg).await {
                                return o;
                            }
                        }
                        Some(Err(e)) => {
                            self.sh.closes.add("ws_error", 1);
                            self.sh.examples.push(format!("{}: websocket error: {e}", self.label()));
                            return Outcome::Lost;
                        }
                        None => {
                            self.sh.closes.add("eof_without_close", 1);
                            return Outcome::Lost;
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    if let Err(o) = self.on_timer(conn).await {
                        return o;
                    }
                }
            }
        }
    }

    /// Sleeps until `until` while disconnected, still creating the scheduled sends (a client's
    /// offline queue; they go out after the reconnect). Returns true when the run stops.
    async fn offline_wait(&mut self, until: Instant, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            self.create_due(true);
            let now = Instant::now();
            if now >= until {
                return *stop.borrow();
            }
            let step = (now + Duration::from_millis(100)).min(until);
            tokio::select! {
                _ = tokio::time::sleep_until(step.into()) => {}
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return true;
                    }
                }
            }
        }
    }

    /// Creates the scheduled sends that are due. Online, a message is stamped when it is
    /// created; offline (reconnecting), with its scheduled time, since that is when the user
    /// "typed" it.
    fn create_due(&mut self, offline: bool) {
        let now = Instant::now();
        if let (Some(t), Some(mut next)) = (self.sh.times.get().copied(), self.next_send) {
            let mut n = 0;
            while next <= now && next < t.send_end && (offline || n < 4) {
                if offline {
                    let stamp = next.saturating_duration_since(self.sh.t0).as_nanos() as u64;
                    self.create_send_at(None, stamp);
                } else {
                    self.sh
                        .sched_lag_hist
                        .record_ns(now.saturating_duration_since(next).as_nanos() as u64);
                    self.create_send(None);
                }
                next += self.interval;
                n += 1;
            }
            if !offline && next < t.send_end && next + Duration::from_secs(1) < now {
                // Hopelessly behind schedule (bench starved): skip rather than burst.
                while next <= now && next < t.send_end {
                    next += self.interval;
                    self.sh.c.schedule_skipped.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.next_send = Some(next);
        }
    }

    async fn on_timer(&mut self, conn: &mut Ws) -> Result<(), Outcome> {
        self.create_due(false);
        self.drain(conn).await
    }

    /// When the outbound queue can next send, if it holds anything.
    fn queue_wake(&self, now: Instant) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        let mut at = now;
        if let Some(b) = self.blocked_until {
            at = at.max(b);
        }
        let tokens = self.tokens_now(now);
        if tokens < 1.0 {
            at = at.max(now + Duration::from_secs_f64((1.0 - tokens) / self.bucket_rate));
        }
        Some(at)
    }

    fn tokens_now(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.tokens_at).as_secs_f64();
        (self.tokens + dt * self.bucket_rate).min(self.bucket_burst)
    }

    /// Writes queued sends while the bucket and the server's retry hints allow.
    async fn drain(&mut self, conn: &mut Ws) -> Result<(), Outcome> {
        loop {
            let now = Instant::now();
            if self.queue.is_empty() {
                return Ok(());
            }
            if self.blocked_until.is_some_and(|b| b > now) {
                return Ok(());
            }
            self.blocked_until = None;
            let tokens = self.tokens_now(now);
            self.tokens_at = now;
            self.tokens = tokens;
            if tokens < 1.0 {
                return Ok(());
            }
            let Some(cid) = self.queue.pop_front() else {
                return Ok(());
            };
            let Some(p) = self.pending.get_mut(&cid) else {
                continue;
            };
            if !p.queued {
                continue;
            }
            p.queued = false;
            self.tokens -= 1.0;
            let c = &self.sh.c;
            if p.on_wire {
                c.resends.fetch_add(1, Ordering::Relaxed);
            } else {
                p.on_wire = true;
                if p.conv.is_none() {
                    c.sent.fetch_add(1, Ordering::Relaxed);
                    if self.sh.in_window(self.sh.now_ns()) {
                        c.sent_window.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    c.agent_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            let frame = ClientFrame::Send {
                client_id: cid,
                conversation_id: p.conv.clone(),
                text: p.text.clone(),
            };
            ws::send_frame(conn, &frame)
                .await
                .map_err(|_| Outcome::Lost)?;
        }
    }

    /// After a reconnect: every unacked send goes out again, oldest first, same client_id.
    fn requeue_all(&mut self) {
        let mut ids: Vec<(u64, String)> = self
            .pending
            .iter()
            .map(|(k, p)| (p.sent_ns, k.clone()))
            .collect();
        ids.sort();
        self.queue.clear();
        for (_, cid) in ids {
            if let Some(p) = self.pending.get_mut(&cid) {
                p.queued = true;
            }
            self.queue.push_back(cid);
        }
    }

    fn make_text(&self, ns: u64) -> String {
        let mut s = format!("t={ns};");
        let want = self.sh.params.text_bytes;
        if s.len() < want {
            s.extend(std::iter::repeat_n('x', want - s.len()));
        }
        s
    }

    /// Creates a message (stamped now) and queues it; `conv` = None for visitors.
    fn create_send(&mut self, conv: Option<String>) {
        let ns = self.sh.now_ns();
        self.create_send_at(conv, ns);
    }

    fn create_send_at(&mut self, conv: Option<String>, ns: u64) {
        let cid = Uuid::new_v4().to_string();
        let text = self.make_text(ns);
        self.pending.insert(
            cid.clone(),
            Pending {
                text,
                conv,
                sent_ns: ns,
                on_wire: false,
                queued: true,
            },
        );
        self.queue.push_back(cid);
        self.sh.c.pending.fetch_add(1, Ordering::Relaxed);
    }

    async fn on_message(&mut self, conn: &mut Ws, msg: Message) -> Result<(), Outcome> {
        match msg {
            Message::Text(t) => match serde_json::from_str::<ServerFrame>(t.as_str()) {
                Ok(f) => self.on_frame(conn, f).await,
                Err(e) => {
                    self.sh.c.undecodable.fetch_add(1, Ordering::Relaxed);
                    let ty = serde_json::from_str::<serde_json::Value>(t.as_str())
                        .ok()
                        .and_then(|v| v.get("type").and_then(|x| x.as_str()).map(str::to_owned))
                        .unwrap_or_else(|| "not_json".to_owned());
                    self.sh.frames.add(format!("undecodable:{ty}"), 1);
                    self.sh.examples.push(format!(
                        "{}: undecodable frame ({e}): {}",
                        self.label(),
                        hark_protocol::abbreviate(t.as_str(), 300)
                    ));
                    Ok(())
                }
            },
            Message::Binary(_) => {
                self.sh.frames.add("binary", 1);
                Ok(())
            }
            Message::Close(f) => {
                self.sh.closes.add(close_key(f.as_ref()), 1);
                Err(Outcome::Lost)
            }
            _ => Ok(()),
        }
    }

    async fn on_frame(&mut self, conn: &mut Ws, f: ServerFrame) -> Result<(), Outcome> {
        match f {
            ServerFrame::Ack {
                client_id,
                conversation_id,
                seq,
                duplicate,
                ..
            } => {
                let c = &self.sh.c;
                let now_ns = self.sh.now_ns();
                if duplicate {
                    c.dup_acks.fetch_add(1, Ordering::Relaxed);
                }
                match self.pending.remove(&client_id) {
                    Some(p) => {
                        c.pending.fetch_sub(1, Ordering::Relaxed);
                        c.acked.fetch_add(1, Ordering::Relaxed);
                        if self.sh.in_window(now_ns) {
                            c.acked_window.fetch_add(1, Ordering::Relaxed);
                        }
                        if self.sh.in_window(p.sent_ns) && !self.is_agent() {
                            self.sh.ack_hist.record_ns(now_ns.saturating_sub(p.sent_ns));
                        }
                        c.expected_deliveries
                            .fetch_add(self.sh.params.agents_per_site as u64, Ordering::Relaxed);
                        match self.tracks.get_mut(&conversation_id) {
                            Some(t) => t.mark_own(seq),
                            None => {
                                let mut t = ConvTrack::default();
                                t.mark_own(seq);
                                self.tracks.insert(conversation_id.clone(), t);
                            }
                        }
                        self.acks.push((conversation_id, seq));
                    }
                    None => {
                        c.stray_acks.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            }
            ServerFrame::Message(body) => self.on_delivery(conn, body).await,
            ServerFrame::Error(e) => {
                self.sh.errors.add(e.code.as_str(), 1);
                if let Some(cid) = &e.client_id {
                    if self.pending.contains_key(cid) {
                        let retry = matches!(
                            e.code,
                            ErrorCode::RateLimited | ErrorCode::Overloaded | ErrorCode::Unavailable
                        );
                        if retry {
                            let ms = e.retry_after_ms.unwrap_or(100).clamp(1, 30_000);
                            let until = Instant::now() + Duration::from_millis(ms);
                            self.blocked_until =
                                Some(self.blocked_until.map_or(until, |b| b.max(until)));
                            if let Some(p) = self.pending.get_mut(cid) {
                                if !p.queued {
                                    p.queued = true;
                                    self.queue.push_front(cid.clone());
                                }
                            }
                        } else {
                            self.pending.remove(cid);
                            self.sh.c.pending.fetch_sub(1, Ordering::Relaxed);
                            self.sh.c.send_failed.fetch_add(1, Ordering::Relaxed);
                            self.sh.examples.push(format!(
                                "{}: send refused: {} ({})",
                                self.label(),
                                e.code.as_str(),
                                e.message
                            ));
                        }
                    }
                } else if e.code == ErrorCode::Unauthorized {
                    self.token = None;
                } else if !matches!(e.code, ErrorCode::RateLimited | ErrorCode::Overloaded) {
                    self.sh.examples.push(format!(
                        "{}: error frame: {} ({})",
                        self.label(),
                        e.code.as_str(),
                        e.message
                    ));
                }
                Ok(())
            }
            ServerFrame::Reconnect { reason, after_ms } => {
                self.sh.frames.add(format!("reconnect:{reason:?}"), 1);
                self.reconnect_after = Some(Duration::from_millis(after_ms.min(60_000)));
                Ok(())
            }
            ServerFrame::Ping => ws::send_frame(conn, &ClientFrame::Pong)
                .await
                .map_err(|_| Outcome::Lost),
            ServerFrame::Conversation { .. } => {
                self.sh.frames.add("conversation", 1);
                Ok(())
            }
            ServerFrame::Welcome { .. } => {
                self.sh.frames.add("unexpected_welcome", 1);
                Ok(())
            }
            ServerFrame::Ready | ServerFrame::Pong | ServerFrame::History { .. } => Ok(()),
            // Presence (visitor lists, availability), typing and read receipts: counted only.
            ServerFrame::VisitorList { .. } => {
                self.sh.frames.add("visitor_list", 1);
                Ok(())
            }
            ServerFrame::Visitor { .. } => {
                self.sh.frames.add("visitor", 1);
                Ok(())
            }
            ServerFrame::VisitorGone { .. } => {
                self.sh.frames.add("visitor_gone", 1);
                Ok(())
            }
            ServerFrame::AgentStatus { .. } => {
                self.sh.frames.add("agent_status", 1);
                Ok(())
            }
            ServerFrame::Availability { .. } => {
                self.sh.frames.add("availability", 1);
                Ok(())
            }
            ServerFrame::Typing { .. } => {
                self.sh.frames.add("typing", 1);
                Ok(())
            }
            ServerFrame::Read { .. } => {
                self.sh.frames.add("read", 1);
                Ok(())
            }
        }
    }

    async fn on_delivery(&mut self, conn: &mut Ws, body: MessageBody) -> Result<(), Outcome> {
        let sh = self.sh.clone();
        let now_ns = sh.now_ns();
        let stamp = parse_stamp(&body.text);
        let (from_visitor, author_id) = match &body.author {
            Author::Visitor { id } => (true, Some(id.as_str())),
            Author::Agent { id, .. } => (false, Some(id.as_str())),
            Author::System => (false, None),
        };
        let from_me = author_id.is_some()
            && author_id == self.my_id.as_deref()
            && (from_visitor != self.is_agent());
        if from_me {
            self.echoes += 1;
            if self.echoes == 1 && self.idx < 3 {
                sh.examples.push(format!(
                    "{}: its own send came back as a `message` frame (besides the ack): {}",
                    self.label(),
                    serde_json::to_string(&ServerFrame::Message(body.clone())).unwrap_or_default()
                ));
            }
        }
        if !from_me {
            sh.c.deliveries.fetch_add(1, Ordering::Relaxed);
            if sh.in_window(now_ns) {
                sh.c.deliveries_window.fetch_add(1, Ordering::Relaxed);
            }
        }
        let epoch = self.epoch;
        let (receipt, ooo) = match self.tracks.get_mut(&body.conversation_id) {
            Some(t) => t.receive(body.seq, epoch),
            None => {
                let mut t = ConvTrack::default();
                let r = t.receive(body.seq, epoch);
                self.tracks.insert(body.conversation_id.clone(), t);
                r
            }
        };
        if ooo {
            self.out_of_order += 1;
        }
        match receipt {
            Receipt::New => {
                if let (Some(s), false) = (stamp, from_me) {
                    sh.c.unique_deliveries.fetch_add(1, Ordering::Relaxed);
                    if sh.in_window(s) && s <= now_ns {
                        let lat = now_ns - s;
                        sh.deliver_hist.record_ns(lat);
                        if !from_visitor {
                            sh.reply_hist.record_ns(lat);
                        }
                    }
                }
            }
            Receipt::Duplicate => {
                self.duplicates += 1;
                if self.duplicates <= 3 {
                    sh.examples.push(format!(
                        "{}: duplicate delivery of conversation {} seq {} on one connection",
                        self.label(),
                        body.conversation_id,
                        body.seq
                    ));
                }
            }
            Receipt::Redelivered => self.redelivered += 1,
            Receipt::OutOfRange => {}
        }
        if let Role::Agent { index_in_site, .. } = self.role {
            let p = &sh.params;
            let before_end = sh.times.get().is_some_and(|t| Instant::now() < t.send_end);
            if from_visitor
                && receipt == Receipt::New
                && stamp.is_some()
                && p.reply_ratio > 0.0
                && before_end
                && (fnv(&body.conversation_id) % p.agents_per_site.max(1) as u64)
                    == index_in_site as u64
            {
                self.reply_acc += p.reply_ratio;
                if self.reply_acc >= 1.0 {
                    self.reply_acc -= 1.0;
                    self.create_send(Some(body.conversation_id));
                    self.drain(conn).await?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip() {
        assert_eq!(parse_stamp("t=123;xxxx"), Some(123));
        assert_eq!(parse_stamp("hello"), None);
        assert_eq!(parse_stamp("t=abc;"), None);
    }

    #[test]
    fn tracker_counts_duplicates_and_order() {
        let mut t = ConvTrack::default();
        assert_eq!(t.receive(1, 1), (Receipt::New, false));
        assert_eq!(t.receive(3, 1), (Receipt::New, false));
        assert_eq!(t.receive(2, 1), (Receipt::New, true));
        assert_eq!(t.receive(3, 1), (Receipt::Duplicate, false));
        assert_eq!(t.held_contiguous(), 3);
        assert_eq!(t.receive(3, 2), (Receipt::Redelivered, false));
        t.mark_own(4);
        assert_eq!(t.held_contiguous(), 4);
        assert!(t.received(2));
        assert!(!t.received(4));
    }
}
