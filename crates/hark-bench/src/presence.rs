//! Presence runs: a population of visitors on one site (each `hello` carries a page), kept
//! alive by answering the server's pings, then churned — visitors arriving and leaving at a
//! fixed rate, population about constant — while agent consoles keep copies of the visitor
//! list. Reports the snapshot time at the full population, how fast arrivals and departures
//! reach the consoles, whether every delta arrived and the copies match the connected visitors,
//! and the server's memory per online visitor.
//!
//! With `--procs P` the visitors are spread over P child processes of the bench (the open-files
//! limit is per process), each from its own loopback source address. Children take commands on
//! stdin (`churn <secs>`, `report`; EOF = stop) and report events as JSON lines on stdout. Times
//! are `CLOCK_MONOTONIC` (`sys::mono_ns`), one clock for every process on the machine.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use hark_protocol::{ClientFrame, ServerFrame};
use http::header::{HeaderName, ORIGIN, USER_AGENT};
use rand::Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::api::Api;
use crate::console::{Console, ConsoleSpec};
use crate::fixtures;
use crate::stats::{kb_to_mib, latency_json, Latency};
use crate::sys::{self, mono_ns};
use crate::target::{parse_loopback_url, random_token, Target};
use crate::ws::{self, close_key, ConnectError, ConnectSpec};

#[derive(Debug, Clone)]
pub struct PresenceParams {
    pub visitors: usize,
    pub procs: usize,
    pub connect_rate: f64,
    /// Arrivals + departures per second, in total.
    pub churn: f64,
    pub warmup: f64,
    pub duration: f64,
    /// Seconds to wait after the churn before the final check (besides the grace period).
    pub settle: f64,
    pub snapshots: usize,
    /// The server's `limits.presence_grace_ms`: departures are reported with it subtracted.
    pub grace_ms: u64,
}

// --- the visitors' side (in this process or a child) ----------------------------------------

/// Commands to a visitor worker.
#[derive(Debug)]
pub enum Cmd {
    /// Churn for this many seconds at the worker's rate.
    Churn(f64),
    /// Report the ids of the visitors connected now.
    Report,
    /// Go on from the first half of the population to all of it.
    Fill,
}

/// What one visitor task tells its worker.
enum Ctl {
    Joined { idx: u64, id: String },
    Failed { idx: u64 },
    Ended { idx: u64 },
}

#[derive(Clone)]
struct VisitorCtx {
    addr: SocketAddr,
    host: Arc<String>,
    site_key: Arc<String>,
    source_ip: Option<IpAddr>,
    out: mpsc::UnboundedSender<Value>,
    ctl: mpsc::UnboundedSender<Ctl>,
    /// Distinguishes the pages of different workers.
    seed: u64,
}

/// One visitor tab: connect, `hello` with a page, answer pings until told to close (or dropped).
async fn visitor(
    cx: VisitorCtx,
    idx: u64,
    phase: &'static str,
    mut close: oneshot::Receiver<()>,
    deadline: Instant,
) {
    let path = format!(
        "/ws/visitor?site_key={}",
        crate::client::url_encode(&cx.site_key)
    );
    let n = cx.seed.wrapping_mul(1_000_003).wrapping_add(idx);
    let headers: Vec<(HeaderName, String)> = vec![
        (ORIGIN, ws::ORIGIN.to_owned()),
        (USER_AGENT, fixtures::user_agent(n).to_owned()),
    ];
    let spec = ConnectSpec {
        addr: cx.addr,
        host: &cx.host,
        path: &path,
        headers: &headers,
        source_ip: cx.source_ip,
        read_buffer: 4096,
        timeout: Duration::from_secs(15),
    };
    let hello = ClientFrame::Hello {
        token: None,
        resume: Vec::new(),
        page: Some(fixtures::page(n)),
        presence: Vec::new(),
    };
    let t_connect = mono_ns();
    let mut attempt = 0u32;
    let (mut conn, id, t_hello) = loop {
        let res = match ws::connect(&spec).await {
            Ok(mut c) => {
                let t = mono_ns();
                match ws::hello(&mut c, &hello, Duration::from_secs(15)).await {
                    Ok(w) => Ok((c, w, t)),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        let err = match res {
            Ok((c, w, t)) => match w.id {
                Some(id) => break (c, id, t),
                None => ConnectError::Hello("welcome without a visitor id".into()),
            },
            Err(e) => e,
        };
        if !err.retryable() || Instant::now() >= deadline {
            let _ = cx
                .out
                .send(json!({"e": "fail", "why": err.key(), "detail": err.to_string()}));
            let _ = cx.ctl.send(Ctl::Failed { idx });
            return;
        }
        let _ = cx.out.send(json!({"e": "retry", "why": err.key()}));
        let delay = match &err {
            ConnectError::Refused {
                retry_after: Some(d),
                ..
            } => *d,
            _ => Duration::from_millis(200 << attempt.min(4)),
        } + Duration::from_millis(rand::random::<u64>() % 300);
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut close => {
                let _ = cx.ctl.send(Ctl::Failed { idx });
                return;
            }
        }
    };
    let _ = cx.out.send(json!({
        "e": "arr", "id": id, "t": t_hello, "tc": t_connect, "ph": phase,
    }));
    let _ = cx.ctl.send(Ctl::Joined {
        idx,
        id: id.clone(),
    });
    let why = loop {
        tokio::select! {
            r = &mut close => {
                if r.is_err() {
                    // The worker is gone: end quietly.
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(None)).await;
                    return;
                }
                let t = mono_ns();
                let _ = cx.out.send(json!({"e": "dep", "id": id, "t": t}));
                // Close, then read until the server ends the TCP connection (so that the
                // server, which closes first, keeps the TIME_WAIT and not our port).
                let _ = tokio::time::timeout(Duration::from_secs(3), async {
                    if conn.close(None).await.is_ok() {
                        while let Some(Ok(_)) = conn.next().await {}
                    }
                })
                .await;
                return;
            }
            m = conn.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(ServerFrame::Ping) = serde_json::from_str::<ServerFrame>(t.as_str()) {
                        if ws::send_frame(&mut conn, &ClientFrame::Pong).await.is_err() {
                            break "write_error".to_owned();
                        }
                    }
                }
                Some(Ok(Message::Close(f))) => break close_key(f.as_ref()),
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("ws_error: {e}"),
                None => break "eof_without_close".to_owned(),
            }
        }
    };
    let _ = cx.out.send(json!({"e": "drop", "id": id, "why": why}));
    let _ = cx.ctl.send(Ctl::Ended { idx });
}

struct Slot {
    idx: u64,
    id: String,
    close: oneshot::Sender<()>,
}

/// The visitors of one process: fills to `n`, then churns on command, and reports.
pub struct WorkerCfg {
    pub addr: SocketAddr,
    pub host: String,
    pub site_key: String,
    pub source_ip: Option<IpAddr>,
    pub n: usize,
    pub connect_rate: f64,
    /// This worker's arrivals + departures per second.
    pub churn: f64,
    pub seed: u64,
}

pub async fn worker(
    cfg: WorkerCfg,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    out: mpsc::UnboundedSender<Value>,
) {
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Ctl>();
    let cx = VisitorCtx {
        addr: cfg.addr,
        host: Arc::new(cfg.host.clone()),
        site_key: Arc::new(cfg.site_key.clone()),
        source_ip: cfg.source_ip,
        out: out.clone(),
        ctl: ctl_tx,
        seed: cfg.seed,
    };
    let mut pending: HashMap<u64, oneshot::Sender<()>> = HashMap::new();
    let mut live: Vec<Slot> = Vec::new();
    let mut pos: HashMap<u64, usize> = HashMap::new();
    let mut next_idx = 0u64;
    let mut failed = 0u64;
    let mut dropped = 0u64;
    let connect_deadline = Instant::now()
        + Duration::from_secs_f64(cfg.n as f64 / cfg.connect_rate.max(1.0) * 3.0 + 60.0);

    fn remove(live: &mut Vec<Slot>, pos: &mut HashMap<u64, usize>, idx: u64) -> Option<Slot> {
        let p = pos.remove(&idx)?;
        let slot = live.swap_remove(p);
        if let Some(moved) = live.get(p) {
            pos.insert(moved.idx, p);
        }
        Some(slot)
    }

    // Fill: half the population, then (on `Fill`) the rest, so that memory can be read at both.
    let gap = Duration::from_secs_f64(1.0 / cfg.connect_rate.max(1.0));
    let mut t0 = tokio::time::Instant::now();
    let mut spawned = 0usize;
    let mut target = cfg.n / 2;
    let mut stage = 1u32;
    let mut filled_sent = 0u32;
    // Churn state.
    let mut churn: Option<(tokio::time::Instant, tokio::time::Instant, u64)> = None;
    let churn_gap = Duration::from_secs_f64(1.0 / cfg.churn.max(0.001));
    let (mut arrivals, mut departures, mut lag_max_ns, mut lag_sum_ns) = (0u64, 0u64, 0u64, 0u64);
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    loop {
        if filled_sent < stage && spawned == target && live.len() + failed as usize >= target {
            filled_sent = stage;
            let _ = out.send(json!({
                "e": "filled", "stage": stage, "connected": live.len(), "failed": failed,
            }));
        }
        let next_fill = if spawned < target {
            t0 + gap.mul_f64(spawned as f64)
        } else {
            far
        };
        let next_churn = match churn {
            Some((start, end, k)) => {
                let at = start + churn_gap.mul_f64(k as f64);
                if at >= end {
                    churn = None;
                    let _ = out.send(json!({
                        "e": "churned", "arrivals": arrivals, "departures": departures,
                        "lag_max_ms": lag_max_ns as f64 / 1e6,
                        "lag_mean_ms": if k > 0 { lag_sum_ns as f64 / k as f64 / 1e6 } else { 0.0 },
                        "live": live.len(),
                    }));
                    continue;
                }
                at
            }
            None => far,
        };
        tokio::select! {
            biased;
            c = ctl_rx.recv() => match c {
                Some(Ctl::Joined { idx, id }) => {
                    if let Some(close) = pending.remove(&idx) {
                        pos.insert(idx, live.len());
                        live.push(Slot { idx, id, close });
                    }
                }
                Some(Ctl::Failed { idx }) => {
                    pending.remove(&idx);
                    failed += 1;
                }
                Some(Ctl::Ended { idx }) => {
                    pending.remove(&idx);
                    if remove(&mut live, &mut pos, idx).is_some() {
                        dropped += 1;
                    }
                }
                None => break,
            },
            c = cmds.recv() => match c {
                Some(Cmd::Churn(secs)) => {
                    let now = tokio::time::Instant::now();
                    churn = Some((now, now + Duration::from_secs_f64(secs), 0));
                    arrivals = 0;
                    departures = 0;
                }
                Some(Cmd::Fill) => {
                    if stage == 1 {
                        stage = 2;
                        target = cfg.n;
                        t0 = tokio::time::Instant::now()
                            .checked_sub(gap.mul_f64(spawned as f64))
                            .unwrap_or(t0);
                    }
                }
                Some(Cmd::Report) => {
                    let ids: Vec<&str> = live.iter().map(|s| s.id.as_str()).collect();
                    let _ = out.send(json!({
                        "e": "live", "ids": ids, "pending": pending.len(),
                        "failed": failed, "dropped": dropped,
                    }));
                }
                None => break,
            },
            _ = tokio::time::sleep_until(next_fill), if spawned < target => {
                let idx = next_idx;
                next_idx += 1;
                spawned += 1;
                let (tx, rx) = oneshot::channel();
                pending.insert(idx, tx);
                tokio::spawn(visitor(cx.clone(), idx, "fill", rx, connect_deadline));
            }
            _ = tokio::time::sleep_until(next_churn), if churn.is_some() => {
                let lag = tokio::time::Instant::now().saturating_duration_since(next_churn);
                lag_max_ns = lag_max_ns.max(lag.as_nanos() as u64);
                lag_sum_ns += lag.as_nanos() as u64;
                let k = churn.map(|c| c.2).unwrap_or(0);
                if let Some(c) = churn.as_mut() {
                    c.2 += 1;
                }
                if k.is_multiple_of(2) {
                    let idx = next_idx;
                    next_idx += 1;
                    let (tx, rx) = oneshot::channel();
                    pending.insert(idx, tx);
                    arrivals += 1;
                    tokio::spawn(visitor(
                        cx.clone(),
                        idx,
                        "churn",
                        rx,
                        Instant::now() + Duration::from_secs(20),
                    ));
                } else if !live.is_empty() {
                    let p = rand::thread_rng().gen_range(0..live.len());
                    let idx = live[p].idx;
                    if let Some(slot) = remove(&mut live, &mut pos, idx) {
                        departures += 1;
                        let _ = slot.close.send(());
                    }
                }
            }
        }
    }
    // Stop: close everything still open.
    for s in live.drain(..) {
        drop(s.close);
    }
    pending.clear();
}

/// The hidden `--presence-child` mode: one process's share of a presence run.
pub async fn child_main(cfg: WorkerCfg, max_secs: f64) -> Result<()> {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Value>();
    let w = tokio::spawn(worker(cfg, cmd_rx, out_tx));
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(v) = out_rx.recv().await {
            let mut line = v.to_string();
            line.push('\n');
            if stdout.write_all(line.as_bytes()).await.is_err() {
                break;
            }
            let _ = stdout.flush().await;
        }
    });
    let read = async {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let mut parts = l.split_whitespace();
            match parts.next() {
                Some("churn") => {
                    let secs = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
                    let _ = cmd_tx.send(Cmd::Churn(secs));
                }
                Some("report") => {
                    let _ = cmd_tx.send(Cmd::Report);
                }
                Some("fill") => {
                    let _ = cmd_tx.send(Cmd::Fill);
                }
                _ => {}
            }
        }
    };
    tokio::select! {
        _ = read => {}
        _ = tokio::time::sleep(Duration::from_secs_f64(max_secs)) => {}
    }
    drop(cmd_tx);
    let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    // Give the visitors' closes a moment, then report the process's own CPU.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "{}",
        json!({"e": "done", "cpu_secs": sys::cpu_secs(None), "rss_kb": sys::rss_kb(None)})
    );
    let _ = stdout.flush();
    drop(stdout);
    writer.abort();
    Ok(())
}

// --- the parent ---------------------------------------------------------------------------

/// Everything the visitors' side reported.
#[derive(Default)]
struct Record {
    /// id → (hello sent, connect started, churn phase?)
    arrivals: HashMap<String, (u64, u64, bool)>,
    /// id → close sent
    departures: HashMap<String, u64>,
    drops: HashMap<String, u64>,
    drop_examples: Vec<String>,
    fails: HashMap<String, u64>,
    fail_examples: Vec<String>,
    retries: HashMap<String, u64>,
    filled: Vec<(usize, Value)>,
    churned: Vec<(usize, Value)>,
    live: Vec<(usize, Value)>,
    done: Vec<(usize, Value)>,
}

impl Record {
    fn take(&mut self, proc_idx: usize, v: Value) {
        match v["e"].as_str().unwrap_or("") {
            "arr" => {
                if let (Some(id), Some(t), Some(tc)) =
                    (v["id"].as_str(), v["t"].as_u64(), v["tc"].as_u64())
                {
                    self.arrivals
                        .insert(id.to_owned(), (t, tc, v["ph"] == "churn"));
                }
            }
            "dep" => {
                if let (Some(id), Some(t)) = (v["id"].as_str(), v["t"].as_u64()) {
                    self.departures.insert(id.to_owned(), t);
                }
            }
            "drop" => {
                let why = v["why"].as_str().unwrap_or("?").to_owned();
                *self.drops.entry(why.clone()).or_insert(0) += 1;
                if self.drop_examples.len() < 10 {
                    self.drop_examples.push(format!(
                        "{} dropped: {why}",
                        v["id"].as_str().unwrap_or("?")
                    ));
                }
            }
            "fail" => {
                *self
                    .fails
                    .entry(v["why"].as_str().unwrap_or("?").to_owned())
                    .or_insert(0) += 1;
                if self.fail_examples.len() < 10 {
                    self.fail_examples
                        .push(v["detail"].as_str().unwrap_or("?").to_owned());
                }
            }
            "retry" => {
                *self
                    .retries
                    .entry(v["why"].as_str().unwrap_or("?").to_owned())
                    .or_insert(0) += 1;
            }
            "filled" => self.filled.push((proc_idx, v)),
            "churned" => self.churned.push((proc_idx, v)),
            "live" => self.live.push((proc_idx, v)),
            "done" => self.done.push((proc_idx, v)),
            _ => {}
        }
    }
}

struct ChildProc {
    proc: tokio::process::Child,
    pid: Option<u32>,
    stdin: Option<tokio::process::ChildStdin>,
}

/// The visitor workers: in this process, or child processes.
enum Workers {
    Local {
        cmd: mpsc::UnboundedSender<Cmd>,
        task: tokio::task::JoinHandle<()>,
    },
    Children(Vec<ChildProc>),
}

impl Workers {
    async fn send(&mut self, cmd: Cmd) {
        match self {
            Workers::Local { cmd: tx, .. } => {
                let _ = tx.send(cmd);
            }
            Workers::Children(cs) => {
                let line = match cmd {
                    Cmd::Churn(secs) => format!("churn {secs}\n"),
                    Cmd::Report => "report\n".to_owned(),
                    Cmd::Fill => "fill\n".to_owned(),
                };
                for c in cs.iter_mut() {
                    if let Some(stdin) = c.stdin.as_mut() {
                        let _ = stdin.write_all(line.as_bytes()).await;
                        let _ = stdin.flush().await;
                    }
                }
            }
        }
    }

    fn count(&self) -> usize {
        match self {
            Workers::Local { .. } => 1,
            Workers::Children(cs) => cs.len(),
        }
    }

    fn children_cpu(&self) -> f64 {
        match self {
            Workers::Local { .. } => 0.0,
            Workers::Children(cs) => cs
                .iter()
                .map(|c| c.pid.and_then(|p| sys::cpu_secs(Some(p))).unwrap_or(0.0))
                .sum(),
        }
    }

    async fn stop(self) {
        match self {
            Workers::Local { cmd, task } => {
                drop(cmd);
                let abort = task.abort_handle();
                if tokio::time::timeout(Duration::from_secs(10), task)
                    .await
                    .is_err()
                {
                    abort.abort();
                }
            }
            Workers::Children(mut cs) => {
                for c in cs.iter_mut() {
                    c.stdin.take();
                }
                for c in cs.iter_mut() {
                    if tokio::time::timeout(Duration::from_secs(15), c.proc.wait())
                        .await
                        .is_err()
                    {
                        let _ = c.proc.kill().await;
                    }
                }
            }
        }
    }
}

/// Waits until `pred` holds on the record, or the deadline.
async fn wait_record(
    rec: &Mutex<Record>,
    deadline: tokio::time::Instant,
    label: &str,
    pred: impl Fn(&Record) -> bool,
) -> bool {
    let mut last = Instant::now();
    loop {
        {
            let r = rec.lock().unwrap_or_else(|p| p.into_inner());
            if pred(&r) {
                return true;
            }
            if last.elapsed() > Duration::from_secs(5) {
                last = Instant::now();
                eprintln!(
                    "{label}: {} arrivals, {} failed so far",
                    r.arrivals.len(),
                    r.fails.values().sum::<u64>()
                );
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cores(cpu: Option<f64>, secs: f64) -> Value {
    match cpu {
        Some(c) if secs > 0.0 => json!((c / secs * 1000.0).round() / 1000.0),
        _ => Value::Null,
    }
}

pub async fn run(target: &mut Target, p: PresenceParams) -> Result<Value> {
    let run_id = random_token(6).to_lowercase();
    let api = Api::new(&target.base_url)?;
    let admin = api
        .login(&target.admin_email, &target.admin_password)
        .await
        .map_err(|e| e.context("logging in as the admin"))?;
    let site = api
        .create_site(&admin, &format!("bench {run_id} presence site"), ws::ORIGIN)
        .await
        .map_err(|e| e.context("creating a site"))?;
    let password = random_token(20);
    let mut tokens = Vec::new();
    for a in ["watcher", "snapshot"] {
        let email = format!("bench-{run_id}-{a}@example.com");
        api.create_agent(
            &admin,
            &email,
            &format!("Bench {a}"),
            &password,
            std::slice::from_ref(&site.id),
        )
        .await
        .map_err(|e| e.context("creating an agent"))?;
        tokens.push(
            api.login(&email, &password)
                .await
                .map_err(|e| e.context("logging in as a bench agent"))?,
        );
    }
    // Password hashing (each login) holds ~20 MiB in a blocking thread of the server until that
    // thread exits, 10 s after its last task (tokio's keep-alive): read the baseline after that.
    let baseline_not_before = tokio::time::Instant::now() + Duration::from_secs(12);
    let console_spec = |token: &str| ConsoleSpec {
        addr: target.addr,
        host: target.host.clone(),
        token: token.to_owned(),
        site_id: site.id.clone(),
    };
    let pid = target.server_pid;

    // The watcher: connected before any visitor, it builds its copy from deltas alone.
    let watcher = Console::start("watcher", console_spec(&tokens[0])).await?;
    watcher.wait_loaded(Duration::from_secs(30)).await?;
    tokio::time::sleep_until(baseline_not_before).await;
    let rss_zero = match pid {
        Some(p) => sys::settled_rss_kb(Some(p), Duration::from_secs(30)).await,
        None => None,
    };
    let anon_zero = pid.and_then(|p| sys::rss_anon_kb(Some(p)));
    let sampler = pid.map(|p| sys::RssSampler::start(p, Duration::from_millis(250)));
    let self_cpu0 = sys::cpu_secs(None);

    // The visitors.
    let rec = Arc::new(Mutex::new(Record::default()));
    let (line_tx, mut line_rx) = mpsc::unbounded_channel::<(usize, Value)>();
    {
        let rec = rec.clone();
        tokio::spawn(async move {
            while let Some((i, v)) = line_rx.recv().await {
                rec.lock().unwrap_or_else(|e| e.into_inner()).take(i, v);
            }
        });
    }
    let procs = p.procs.max(1);
    let t_fill = Instant::now();
    let mut workers = if procs == 1 {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Value>();
        let tx = line_tx.clone();
        tokio::spawn(async move {
            while let Some(v) = out_rx.recv().await {
                if tx.send((0, v)).is_err() {
                    break;
                }
            }
        });
        let task = tokio::spawn(worker(
            WorkerCfg {
                addr: target.addr,
                host: target.host.clone(),
                site_key: site.site_key.clone(),
                source_ip: None,
                n: p.visitors,
                connect_rate: p.connect_rate,
                churn: p.churn,
                seed: 0,
            },
            cmd_rx,
            out_tx,
        ));
        Workers::Local { cmd: cmd_tx, task }
    } else {
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let max_secs = p.visitors as f64 / p.connect_rate.max(1.0) * 3.0
            + 300.0
            + p.warmup
            + p.duration
            + p.settle
            + 60.0 * p.snapshots as f64;
        let mut cs = Vec::new();
        for i in 0..procs {
            let n = p.visitors / procs + usize::from(i < p.visitors % procs);
            let ip = Ipv4Addr::new(127, 0, 0, (2 + i % 250) as u8);
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("--presence-child")
                .arg("--url")
                .arg(&target.base_url)
                .arg("--child-site-keys")
                .arg(&site.site_key)
                .arg("--visitors")
                .arg(n.to_string())
                .arg("--connect-rate")
                .arg(format!("{}", p.connect_rate / procs as f64))
                .arg("--churn")
                .arg(format!("{}", p.churn / procs as f64))
                .arg("--source-ip")
                .arg(ip.to_string())
                .arg("--child-seed")
                .arg(i.to_string())
                .arg("--child-max-secs")
                .arg(format!("{max_secs}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            let mut child = cmd.spawn().context("starting a presence child process")?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("child stdout missing"))?;
            let tx = line_tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if let Ok(v) = serde_json::from_str::<Value>(&l) {
                        if tx.send((i, v)).is_err() {
                            break;
                        }
                    }
                }
            });
            cs.push(ChildProc {
                pid: child.id(),
                stdin: child.stdin.take(),
                proc: child,
            });
        }
        Workers::Children(cs)
    };
    let nworkers = workers.count();
    let fill_deadline = tokio::time::Instant::now()
        + Duration::from_secs_f64(p.visitors as f64 / p.connect_rate.max(1.0) * 3.0 + 90.0);
    let stage_counts = |r: &Record, stage: u64| {
        r.filled
            .iter()
            .filter(|(_, v)| v["stage"].as_u64() == Some(stage))
            .fold((0usize, 0u64, 0u64), |(n, c, f), (_, v)| {
                (
                    n + 1,
                    c + v["connected"].as_u64().unwrap_or(0),
                    f + v["failed"].as_u64().unwrap_or(0),
                )
            })
    };
    // First half, memory, second half, memory.
    if !wait_record(&rec, fill_deadline, "filling (first half)", |r| {
        stage_counts(r, 1).0 >= nworkers
    })
    .await
    {
        eprintln!("not every worker reported its first half within the deadline");
    }
    let half_secs = t_fill.elapsed().as_secs_f64();
    let (_, connected_half, _) = stage_counts(&rec.lock().unwrap_or_else(|e| e.into_inner()), 1);
    let rss_half = match pid {
        Some(p) => sys::settled_rss_kb(Some(p), Duration::from_secs(30)).await,
        None => None,
    };
    let anon_half = pid.and_then(|p| sys::rss_anon_kb(Some(p)));
    let t_second = Instant::now();
    workers.send(Cmd::Fill).await;
    if !wait_record(&rec, fill_deadline, "filling", |r| {
        stage_counts(r, 2).0 >= nworkers
    })
    .await
    {
        eprintln!("not every worker reported its fill within the deadline");
    }
    let fill_secs = half_secs + t_second.elapsed().as_secs_f64();
    let (_, connected, fill_failed) =
        stage_counts(&rec.lock().unwrap_or_else(|e| e.into_inner()), 2);
    eprintln!("{connected} visitors connected, {fill_failed} failed in {fill_secs:.1} s");
    if connected == 0 {
        workers.stop().await;
        watcher.stop().await;
        bail!("no visitor could connect");
    }
    // Let the watcher take in the fill's deltas and the server settle, then read its memory.
    let rss_full = match pid {
        Some(p) => sys::settled_rss_kb(Some(p), Duration::from_secs(30)).await,
        None => None,
    };
    let anon_full = pid.and_then(|p| sys::rss_anon_kb(Some(p)));
    let watcher_after_fill = watcher.state().copy.len();
    eprintln!(
        "server RSS {} → {} → {} KiB at 0, {connected_half} and {connected} visitors; the watcher lists {watcher_after_fill}",
        rss_zero.unwrap_or(0),
        rss_half.unwrap_or(0),
        rss_full.unwrap_or(0)
    );

    // Snapshots at the full population; the last console stays for the churn.
    let mut snapshots = Vec::new();
    let mut snap_console: Option<Console> = None;
    for k in 0..p.snapshots.max(1) {
        let c = Console::start(&format!("snapshot {}", k + 1), console_spec(&tokens[1])).await?;
        let times = c.wait_loaded(Duration::from_secs(60)).await?;
        eprintln!(
            "snapshot {}: {} visitors, {} bytes in {} frames, done {:.1} ms after hello",
            k + 1,
            times.visitors,
            times.bytes,
            times.frames,
            times.done_ms.unwrap_or(f64::NAN)
        );
        snapshots.push(times.json());
        if k + 1 < p.snapshots.max(1) {
            c.stop().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        } else {
            snap_console = Some(c);
        }
    }
    let snap_console = snap_console.ok_or_else(|| anyhow!("no snapshot console"))?;
    let rss_after_snapshots = pid.and_then(|p| sys::rss_kb(Some(p)));

    // Churn.
    let churn_secs = p.warmup + p.duration;
    let srv_cpu0 = pid.and_then(|p| sys::cpu_secs(Some(p)));
    let bench_cpu0 = sys::cpu_secs(None).unwrap_or(0.0) + workers.children_cpu();
    let t_churn = mono_ns();
    let window = (
        t_churn + (p.warmup * 1e9) as u64,
        t_churn + (churn_secs * 1e9) as u64,
    );
    if p.churn > 0.0 {
        eprintln!(
            "churning at {}/s for {churn_secs} s ({} s measured)",
            p.churn, p.duration
        );
        workers.send(Cmd::Churn(churn_secs)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(churn_secs + 60.0);
        if !wait_record(&rec, deadline, "churning", |r| r.churned.len() >= nworkers).await {
            eprintln!("not every worker finished its churn within the deadline");
        }
    }
    let churn_wall = (mono_ns() - t_churn) as f64 / 1e9;
    let srv_cpu1 = pid.and_then(|p| sys::cpu_secs(Some(p)));
    let bench_cpu1 = sys::cpu_secs(None).unwrap_or(0.0) + workers.children_cpu();

    // Settle (grace period + a sweep + --grace), then the final check.
    tokio::time::sleep(Duration::from_millis(p.grace_ms + 500) + Duration::from_secs_f64(p.settle))
        .await;
    let n_live_before = rec.lock().unwrap_or_else(|e| e.into_inner()).live.len();
    workers.send(Cmd::Report).await;
    wait_record(
        &rec,
        tokio::time::Instant::now() + Duration::from_secs(30),
        "final report",
        |r| r.live.len() >= n_live_before + nworkers,
    )
    .await;
    let mut connected_now: HashSet<String> = HashSet::new();
    let mut still_pending = 0u64;
    {
        let r = rec.lock().unwrap_or_else(|e| e.into_inner());
        for (_, v) in &r.live {
            if let Some(a) = v["ids"].as_array() {
                connected_now.extend(a.iter().filter_map(|x| x.as_str().map(str::to_owned)));
            }
            still_pending += v["pending"].as_u64().unwrap_or(0);
        }
    }
    let check = |c: &Console| {
        let s = c.state();
        let missing: Vec<&String> = connected_now
            .iter()
            .filter(|id| !s.copy.contains(*id))
            .collect();
        let extra: Vec<&String> = s
            .copy
            .iter()
            .filter(|id| !connected_now.contains(*id))
            .collect();
        json!({
            "console": c.label,
            "list_size": s.copy.len(),
            "connected": connected_now.len(),
            "missing_from_list": missing.len(),
            "extra_in_list": extra.len(),
            "missing_examples": missing.iter().take(5).collect::<Vec<_>>(),
            "extra_examples": extra.iter().take(5).collect::<Vec<_>>(),
            "equal": missing.is_empty() && extra.is_empty(),
        })
    };
    let checks = vec![check(&watcher), check(&snap_console)];
    let rss_end = pid.and_then(|p| sys::rss_kb(Some(p)));
    let self_cpu1 = sys::cpu_secs(None);
    let children_cpu = workers.children_cpu();

    // Latencies, per console.
    let grace_ns = p.grace_ms * 1_000_000;
    let lat = |c: &Console| {
        let s = c.state();
        let r = rec.lock().unwrap_or_else(|e| e.into_inner());
        let (arr, arr_conn, dep_raw, dep) = (
            Latency::new(),
            Latency::new(),
            Latency::new(),
            Latency::new(),
        );
        let (mut arr_n, mut arr_lost, mut dep_n, mut dep_lost, mut dep_early) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut lost_examples = Vec::new();
        for (id, (t_hello, t_conn, churned)) in &r.arrivals {
            if !churned || *t_hello < window.0 || *t_hello >= window.1 {
                continue;
            }
            arr_n += 1;
            match s.first_seen.get(id) {
                Some(t) => {
                    arr.record_ns(t.saturating_sub(*t_hello));
                    arr_conn.record_ns(t.saturating_sub(*t_conn));
                }
                None => {
                    arr_lost += 1;
                    if lost_examples.len() < 5 {
                        lost_examples.push(format!("arrival {id}: no `visitor` delta"));
                    }
                }
            }
        }
        for (id, t_close) in &r.departures {
            if *t_close < window.0 || *t_close >= window.1 {
                continue;
            }
            dep_n += 1;
            match s.gone_at.get(id) {
                Some(t) => {
                    let raw = t.saturating_sub(*t_close);
                    dep_raw.record_ns(raw);
                    if raw < grace_ns {
                        dep_early += 1;
                    }
                    dep.record_ns(raw.saturating_sub(grace_ns));
                }
                None => {
                    dep_lost += 1;
                    if lost_examples.len() < 10 {
                        lost_examples.push(format!("departure {id}: no `visitor_gone`"));
                    }
                }
            }
        }
        json!({
            "console": c.label,
            "arrival_hello_to_delta": latency_json(&arr.snapshot()),
            "arrival_connect_to_delta": latency_json(&arr_conn.snapshot()),
            "departure_close_to_gone_minus_grace": latency_json(&dep.snapshot()),
            "departure_close_to_gone_raw": latency_json(&dep_raw.snapshot()),
            "arrivals_measured": arr_n,
            "arrivals_lost": arr_lost,
            "departures_measured": dep_n,
            "departures_lost": dep_lost,
            "departures_announced_before_the_grace_ended": dep_early,
            "lost_examples": lost_examples,
        })
    };
    let latencies = vec![lat(&watcher), lat(&snap_console)];
    let consoles = vec![watcher.summary(), snap_console.summary()];
    watcher.stop().await;
    snap_console.stop().await;
    workers.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = rec.lock().unwrap_or_else(|e| e.into_inner());
    let churned: Vec<Value> = r.churned.iter().map(|(_, v)| v.clone()).collect();
    let slope = |a: Option<u64>, b: Option<u64>, n: u64| match (a, b) {
        (Some(a), Some(b)) if n > 0 => Some(((b as f64 - a as f64) * 1024.0 / n as f64).round()),
        _ => None,
    };
    let per_visitor_anon = slope(anon_zero, anon_full, connected);
    let second_half = connected.saturating_sub(connected_half);
    let per_visitor_second_half = slope(rss_half, rss_full, second_half);
    let per_visitor_second_half_anon = slope(anon_half, anon_full, second_half);
    let per_visitor = |rss: Option<u64>| match (rss_zero, rss) {
        (Some(z), Some(f)) if connected > 0 => {
            Some(((f as f64 - z as f64) * 1024.0 / connected as f64).round())
        }
        _ => None,
    };
    let bench_churn_cpu = bench_cpu1 - bench_cpu0;
    Ok(json!({
        "mode": "presence",
        "config": {
            "visitors": p.visitors,
            "procs": procs,
            "connect_rate": p.connect_rate,
            "churn_per_sec": p.churn,
            "warmup_secs": p.warmup,
            "measured_secs": p.duration,
            "snapshots": p.snapshots,
            "presence_grace_ms": p.grace_ms,
        },
        "fill": {
            "connected": connected,
            "failed": fill_failed,
            "secs": (fill_secs * 10.0).round() / 10.0,
            "watcher_listed_after_fill": watcher_after_fill,
        },
        "snapshots": snapshots,
        "churn": {
            "workers": churned,
            "wall_secs": (churn_wall * 100.0).round() / 100.0,
            "server_cores": cores(match (srv_cpu0, srv_cpu1) { (Some(a), Some(b)) => Some(b - a), _ => None }, churn_wall),
            "bench_cores": cores(Some(bench_churn_cpu), churn_wall),
        },
        "latency": latencies,
        "final_check": checks,
        "final_check_connecting_at_check": still_pending,
        "visitors_side": {
            "failed": r.fails,
            "fail_examples": r.fail_examples,
            "retries": r.retries,
            "dropped": r.drops,
            "drop_examples": r.drop_examples,
            "arrivals_total": r.arrivals.len(),
            "departures_total": r.departures.len(),
        },
        "consoles": consoles,
        "server": {
            "pid": pid,
            "rss_zero_kb": rss_zero,
            "rss_full_kb": rss_full,
            "rss_after_snapshots_kb": rss_after_snapshots,
            "rss_end_kb": rss_end,
            "rss_peak_kb": sampler.as_ref().map(|s| s.peak_kb()),
            "hwm_kb": pid.and_then(|p| sys::hwm_kb(Some(p))),
            "bytes_per_online_visitor": per_visitor(rss_full),
            "bytes_per_online_visitor_at_end": per_visitor(rss_end),
            "rss_half_kb": rss_half,
            "visitors_at_half": connected_half,
            "bytes_per_online_visitor_second_half": per_visitor_second_half,
            "anon_bytes_per_online_visitor_second_half": per_visitor_second_half_anon,
            "rss_anon_half_kb": anon_half,
            "rss_anon_zero_kb": anon_zero,
            "rss_anon_full_kb": anon_full,
            "anon_bytes_per_online_visitor": per_visitor_anon,
        },
        "bench": {
            "cpu_secs_including_children": match (self_cpu0, self_cpu1) {
                (Some(a), Some(b)) => Some(((b - a + children_cpu) * 100.0).round() / 100.0),
                _ => None,
            },
        },
    }))
}

pub fn print(r: &Value) {
    let f = |v: &Value| match v {
        Value::Null => "n/a".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mib = |v: &Value| match v.as_u64() {
        Some(kb) => format!("{:.1} MiB", kb_to_mib(kb)),
        None => "n/a".to_owned(),
    };
    let c = &r["config"];
    println!("== hark-bench presence run ==");
    println!(
        "config: {} visitors on one site over {} process(es), connect rate {}/s, churn {}/s (arrivals + departures), {} s warmup + {} s measured, grace subtracted {} ms",
        f(&c["visitors"]),
        f(&c["procs"]),
        f(&c["connect_rate"]),
        f(&c["churn_per_sec"]),
        f(&c["warmup_secs"]),
        f(&c["measured_secs"]),
        f(&c["presence_grace_ms"]),
    );
    println!(
        "fill: {} connected, {} failed in {} s; the watcher listed {} after the fill",
        f(&r["fill"]["connected"]),
        f(&r["fill"]["failed"]),
        f(&r["fill"]["secs"]),
        f(&r["fill"]["watcher_listed_after_fill"]),
    );
    if let Some(a) = r["snapshots"].as_array() {
        for (i, s) in a.iter().enumerate() {
            println!(
                "snapshot {}: {} visitors, {} bytes in {} frames; hello → welcome {} ms, first list frame {} ms, done {} ms, ready {} ms",
                i + 1,
                f(&s["visitors"]),
                f(&s["bytes"]),
                f(&s["frames"]),
                f(&s["welcome_ms"]),
                f(&s["first_list_frame_ms"]),
                f(&s["done_ms"]),
                f(&s["ready_ms"]),
            );
        }
    }
    println!(
        "churn: {} s wall; server {} cores, bench {} cores",
        f(&r["churn"]["wall_secs"]),
        f(&r["churn"]["server_cores"]),
        f(&r["churn"]["bench_cores"]),
    );
    if let Some(ws) = r["churn"]["workers"].as_array() {
        for w in ws {
            println!(
                "  worker: {} arrivals, {} departures started, schedule lag mean {:.2} ms max {:.1} ms",
                f(&w["arrivals"]),
                f(&w["departures"]),
                w["lag_mean_ms"].as_f64().unwrap_or(0.0),
                w["lag_max_ms"].as_f64().unwrap_or(0.0),
            );
        }
    }
    if let Some(ls) = r["latency"].as_array() {
        for l in ls {
            println!("console {}:", f(&l["console"]));
            println!(
                "  arrival hello → visitor:       {}",
                lat_line(&l["arrival_hello_to_delta"])
            );
            println!(
                "  arrival connect → visitor:     {}",
                lat_line(&l["arrival_connect_to_delta"])
            );
            println!(
                "  departure close → visitor_gone: {}  (grace subtracted)",
                lat_line(&l["departure_close_to_gone_minus_grace"])
            );
            println!(
                "  lost: {} of {} arrivals, {} of {} departures",
                f(&l["arrivals_lost"]),
                f(&l["arrivals_measured"]),
                f(&l["departures_lost"]),
                f(&l["departures_measured"]),
            );
        }
    }
    if let Some(cs) = r["final_check"].as_array() {
        for c in cs {
            println!(
                "final check ({}): list {} vs connected {}: {} missing, {} extra → {}",
                f(&c["console"]),
                f(&c["list_size"]),
                f(&c["connected"]),
                f(&c["missing_from_list"]),
                f(&c["extra_in_list"]),
                if c["equal"].as_bool() == Some(true) {
                    "EQUAL"
                } else {
                    "DIFFERENT"
                }
            );
        }
    }
    let v = &r["visitors_side"];
    println!(
        "visitors: failed {}, retries {}, dropped {}",
        crate::load::obj_line(&v["failed"]),
        crate::load::obj_line(&v["retries"]),
        crate::load::obj_line(&v["dropped"]),
    );
    if let Some(cs) = r["consoles"].as_array() {
        for c in cs {
            println!(
                "console {}: {} deltas, {} out of order, other frames {}, ended: {}",
                f(&c["label"]),
                f(&c["deltas"]),
                f(&c["out_of_order"]),
                crate::load::obj_line(&c["other_frames"]),
                f(&c["ended"]),
            );
        }
    }
    let s = &r["server"];
    println!(
        "server (pid {}): RSS at 0 visitors {}, at full population {}, after snapshots {}, at the end {}, peak {}",
        f(&s["pid"]),
        mib(&s["rss_zero_kb"]),
        mib(&s["rss_full_kb"]),
        mib(&s["rss_after_snapshots_kb"]),
        mib(&s["rss_end_kb"]),
        mib(&s["rss_peak_kb"]),
    );
    let kib = |v: &Value| match v.as_f64() {
        Some(b) => format!("{:.2} KiB ({b} bytes)", b / 1024.0),
        None => "n/a".to_owned(),
    };
    println!(
        "server memory per online visitor (connection + presence entry): {} after the fill, {} at the end; anonymous memory only (RssAnon): {}",
        kib(&s["bytes_per_online_visitor"]),
        kib(&s["bytes_per_online_visitor_at_end"]),
        kib(&s["anon_bytes_per_online_visitor"]),
    );
    println!(
        "  from {} visitors ({}) to all: {} per visitor ({} anonymous) — free of start-up memory the first visitors reuse",
        f(&s["visitors_at_half"]),
        mib(&s["rss_half_kb"]),
        kib(&s["bytes_per_online_visitor_second_half"]),
        kib(&s["anon_bytes_per_online_visitor_second_half"]),
    );
    let mut ex: Vec<String> = Vec::new();
    for key in ["fail_examples", "drop_examples"] {
        if let Some(a) = v[key].as_array() {
            ex.extend(a.iter().filter_map(|x| x.as_str().map(str::to_owned)));
        }
    }
    if let Some(ls) = r["latency"].as_array() {
        for l in ls {
            if let Some(a) = l["lost_examples"].as_array() {
                ex.extend(a.iter().filter_map(|x| x.as_str().map(str::to_owned)));
            }
        }
    }
    if !ex.is_empty() {
        println!("examples of problems:");
        for e in ex.iter().take(20) {
            println!("  - {e}");
        }
    }
}

pub fn lat_line(v: &Value) -> String {
    if v["count"].as_u64().unwrap_or(0) == 0 {
        return "no samples".to_owned();
    }
    format!(
        "p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (n={})",
        v["p50_ms"].as_f64().unwrap_or(0.0),
        v["p90_ms"].as_f64().unwrap_or(0.0),
        v["p99_ms"].as_f64().unwrap_or(0.0),
        v["max_ms"].as_f64().unwrap_or(0.0),
        v["count"]
    )
}

/// Parses the child's URL for a worker config.
pub fn child_cfg(
    url: &str,
    site_key: String,
    n: usize,
    connect_rate: f64,
    churn: f64,
    source_ip: Option<IpAddr>,
    seed: u64,
) -> Result<WorkerCfg> {
    let (_, addr, host) = parse_loopback_url(url)?;
    Ok(WorkerCfg {
        addr,
        host,
        site_key,
        source_ip,
        n,
        connect_rate,
        churn,
        seed,
    })
}
