//! Idle-connection runs: open N visitor connections, hold them (answering pings), and report the
//! server's memory per connection. With `--procs P` the sockets are spread over P child
//! processes of the bench (the open-files limit is per process), each from its own loopback
//! source address.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use hark_protocol::{ClientFrame, ServerFrame};
use http::header::{HeaderName, ORIGIN};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::api::Api;
use crate::load::obj_line;
use crate::stats::{kb_to_mib, Examples, Tally};
use crate::sys;
use crate::target::{parse_loopback_url, random_token, Target};
use crate::ws::{self, close_key, ConnectError, ConnectSpec};

#[derive(Default)]
pub struct IdleCounters {
    connected: AtomicU64,
    failed: AtomicU64,
    pings: AtomicU64,
    dropped: AtomicU64,
    connect_errors: Tally,
    closes: Tally,
    examples: Examples,
}

impl IdleCounters {
    fn json(&self) -> Value {
        json!({
            "connected": self.connected.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
            "pings_answered": self.pings.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
            "connect_errors": self.connect_errors.snapshot(),
            "closes": self.closes.snapshot(),
            "examples": self.examples.snapshot(),
        })
    }
}

struct Worker {
    counters: Arc<IdleCounters>,
    handles: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

/// Spawns `n` idle visitor connections, paced at `rate` per second.
async fn start_worker(
    addr: SocketAddr,
    host: String,
    keys: Vec<String>,
    n: usize,
    rate: f64,
    source_ip: Option<IpAddr>,
    deadline: Instant,
) -> Worker {
    let counters = Arc::new(IdleCounters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let host = Arc::new(host);
    let gap = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let t0 = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let key = keys[i % keys.len().max(1)].clone();
        handles.push(tokio::spawn(idle_conn(
            addr,
            host.clone(),
            key,
            source_ip,
            counters.clone(),
            stop_rx.clone(),
            deadline,
        )));
        tokio::time::sleep_until(t0 + gap.mul_f64((i + 1) as f64)).await;
    }
    Worker {
        counters,
        handles,
        stop: stop_tx,
    }
}

async fn idle_conn(
    addr: SocketAddr,
    host: Arc<String>,
    site_key: String,
    source_ip: Option<IpAddr>,
    counters: Arc<IdleCounters>,
    mut stop: watch::Receiver<bool>,
    deadline: Instant,
) {
    let path = format!(
        "/ws/visitor?site_key={}",
        crate::client::url_encode(&site_key)
    );
    let headers: Vec<(HeaderName, String)> = vec![(ORIGIN, ws::ORIGIN.to_owned())];
    let spec = ConnectSpec {
        addr,
        host: &host,
        path: &path,
        headers: &headers,
        source_ip,
        read_buffer: 4096,
        timeout: Duration::from_secs(15),
    };
    let hello = ClientFrame::Hello {
        token: None,
        resume: Vec::new(),
        page: None,
        presence: Vec::new(),
    };
    let mut attempt = 0u32;
    let mut conn = loop {
        if *stop.borrow() {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let res = match ws::connect(&spec).await {
            Ok(mut c) => match ws::hello(&mut c, &hello, Duration::from_secs(15)).await {
                Ok(_) => Ok(c),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let err = match res {
            Ok(c) => break c,
            Err(e) => e,
        };
        counters.connect_errors.add(err.key(), 1);
        if !err.retryable() || Instant::now() >= deadline {
            counters.examples.push(err.to_string());
            counters.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let delay = match &err {
            ConnectError::Refused {
                retry_after: Some(d),
                ..
            } => *d,
            _ => Duration::from_millis(200 << attempt.min(4)),
        } + Duration::from_millis(rand::random::<u64>() % 500);
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {}
        }
    };
    counters.connected.fetch_add(1, Ordering::Relaxed);
    loop {
        tokio::select! {
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(None)).await;
                    return;
                }
            }
            m = conn.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(ServerFrame::Ping) = serde_json::from_str::<ServerFrame>(t.as_str()) {
                        counters.pings.fetch_add(1, Ordering::Relaxed);
                        if ws::send_frame(&mut conn, &ClientFrame::Pong).await.is_err() {
                            counters.dropped.fetch_add(1, Ordering::Relaxed);
                            counters.closes.add("write_error", 1);
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    counters.closes.add(close_key(f.as_ref()), 1);
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    counters.closes.add("ws_error", 1);
                    counters.examples.push(format!("idle connection error: {e}"));
                    return;
                }
                None => {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    counters.closes.add("eof_without_close", 1);
                    return;
                }
            }
        }
    }
}

async fn wait_connected(c: &IdleCounters, n: usize, deadline: Instant, label: &str) {
    let mut last = Instant::now();
    while c.connected.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed) < n as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !label.is_empty() && last.elapsed() > Duration::from_secs(5) {
            last = Instant::now();
            eprintln!(
                "{label}: {} connected, {} failed of {n}",
                c.connected.load(Ordering::Relaxed),
                c.failed.load(Ordering::Relaxed)
            );
        }
    }
}

async fn stop_worker(w: Worker) {
    let _ = w.stop.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for h in w.handles {
        let abort = h.abort_handle();
        if tokio::time::timeout_at(deadline, h).await.is_err() {
            abort.abort();
        }
    }
}

/// The hidden `--idle-child` mode: one slice of an idle run, driven by the parent over
/// stdin (EOF = stop) and stdout (JSON lines).
pub async fn child_main(
    url: &str,
    keys: Vec<String>,
    n: usize,
    rate: f64,
    source_ip: Option<IpAddr>,
    max_secs: f64,
) -> Result<()> {
    let (_, addr, host) = parse_loopback_url(url)?;
    let deadline = Instant::now() + Duration::from_secs_f64(max_secs);
    let connect_deadline =
        Instant::now() + Duration::from_secs_f64(n as f64 / rate.max(1.0) * 3.0 + 60.0);
    let w = start_worker(
        addr,
        host,
        keys,
        n,
        rate,
        source_ip,
        connect_deadline.min(deadline),
    )
    .await;
    wait_connected(&w.counters, n, connect_deadline.min(deadline), "").await;
    let mut line = json!({"event": "connected"});
    line["connected"] = json!(w.counters.connected.load(Ordering::Relaxed));
    line["failed"] = json!(w.counters.failed.load(Ordering::Relaxed));
    emit(&line);
    let stdin_eof = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = stdin_eof => {}
        _ = tokio::time::sleep_until(deadline.into()) => {}
    }
    let counters = w.counters.clone();
    stop_worker(w).await;
    let mut done = counters.json();
    done["event"] = json!("done");
    done["cpu_secs"] = json!(sys::cpu_secs(None));
    done["rss_kb"] = json!(sys::rss_kb(None));
    emit(&done);
    Ok(())
}

fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

#[derive(Debug, Clone)]
pub struct IdleParams {
    pub visitors: usize,
    pub procs: usize,
    pub sites: usize,
    pub connect_rate: f64,
    pub duration: f64,
}

struct Child {
    proc: tokio::process::Child,
    pid: Option<u32>,
    stdin: Option<tokio::process::ChildStdin>,
}

pub async fn run(target: &mut Target, p: IdleParams) -> Result<Value> {
    let run_id = random_token(6).to_lowercase();
    let api = Api::new(&target.base_url)?;
    let admin = api
        .login(&target.admin_email, &target.admin_password)
        .await
        .map_err(|e| e.context("logging in as the admin"))?;
    let mut keys = Vec::new();
    for s in 0..p.sites.max(1) {
        let site = api
            .create_site(&admin, &format!("bench {run_id} idle site {s}"), ws::ORIGIN)
            .await
            .map_err(|e| e.context("creating a site"))?;
        keys.push(site.site_key);
    }
    let pid = target.server_pid;
    // The login's password hashing holds ~20 MiB in a blocking thread of the server until that
    // thread exits, 10 s after its last task (tokio's keep-alive); a baseline read before then
    // would count that memory's release against the connections.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let rss_before = pid.and_then(|p| sys::rss_kb(Some(p)));
    let anon_before = pid.and_then(|p| sys::rss_anon_kb(Some(p)));
    let sampler = pid.map(|p| sys::RssSampler::start(p, Duration::from_millis(250)));
    let self_cpu0 = sys::cpu_secs(None);
    let srv_cpu0 = pid.and_then(|p| sys::cpu_secs(Some(p)));
    let t_start = Instant::now();
    let connect_deadline = Instant::now()
        + Duration::from_secs_f64(p.visitors as f64 / p.connect_rate.max(1.0) * 3.0 + 60.0);
    let procs = p.procs.max(1);

    let mut worker: Option<Worker> = None;
    let mut children: Vec<Child> = Vec::new();
    let (line_tx, mut line_rx) = mpsc::channel::<(usize, Value)>(64);
    let mut connected = 0u64;
    let mut failed = 0u64;
    if procs == 1 {
        let w = start_worker(
            target.addr,
            target.host.clone(),
            keys.clone(),
            p.visitors,
            p.connect_rate,
            None,
            connect_deadline,
        )
        .await;
        wait_connected(&w.counters, p.visitors, connect_deadline, "connecting").await;
        connected = w.counters.connected.load(Ordering::Relaxed);
        failed = w.counters.failed.load(Ordering::Relaxed);
        worker = Some(w);
    } else {
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let max_secs = p.visitors as f64 / p.connect_rate.max(1.0) * 3.0 + 120.0 + p.duration;
        for i in 0..procs {
            let n = p.visitors / procs + usize::from(i < p.visitors % procs);
            let ip = Ipv4Addr::new(127, 0, 0, (2 + i % 250) as u8);
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("--idle-child")
                .arg("--url")
                .arg(&target.base_url)
                .arg("--child-site-keys")
                .arg(keys.join(","))
                .arg("--visitors")
                .arg(n.to_string())
                .arg("--connect-rate")
                .arg(format!("{}", p.connect_rate / procs as f64))
                .arg("--source-ip")
                .arg(ip.to_string())
                .arg("--child-max-secs")
                .arg(format!("{max_secs}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            let mut child = cmd.spawn().context("starting an idle child process")?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("child stdout missing"))?;
            let tx = line_tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if let Ok(v) = serde_json::from_str::<Value>(&l) {
                        if tx.send((i, v)).await.is_err() {
                            break;
                        }
                    }
                }
            });
            children.push(Child {
                pid: child.id(),
                stdin: child.stdin.take(),
                proc: child,
            });
        }
        let mut reported = vec![false; procs];
        let wait_until = connect_deadline + Duration::from_secs(30);
        while reported.iter().any(|r| !r) {
            match tokio::time::timeout_at(wait_until.into(), line_rx.recv()).await {
                Ok(Some((i, v))) if v["event"] == "connected" => {
                    reported[i] = true;
                    connected += v["connected"].as_u64().unwrap_or(0);
                    failed += v["failed"].as_u64().unwrap_or(0);
                    eprintln!(
                        "child {i}: {} connected, {} failed",
                        v["connected"], v["failed"]
                    );
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("every idle child's output ended before it connected"),
                Err(_) => {
                    eprintln!("some idle children did not report within the connect deadline");
                    break;
                }
            }
        }
    }
    let connect_secs = t_start.elapsed().as_secs_f64();
    eprintln!(
        "{connected} connected, {failed} failed in {connect_secs:.1} s; holding for {} s",
        p.duration
    );
    if connected == 0 {
        bail!("no idle connection could be opened");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = pid.and_then(|p| sys::rss_kb(Some(p)));
    let hold_end = Instant::now() + Duration::from_secs_f64(p.duration);
    let server_died = !target.hold_until(hold_end).await;
    let rss_after = pid.and_then(|p| sys::rss_kb(Some(p)));
    let anon_after = pid.and_then(|p| sys::rss_anon_kb(Some(p)));
    let self_cpu1 = sys::cpu_secs(None);
    let srv_cpu1 = pid.and_then(|p| sys::cpu_secs(Some(p)));
    let mut children_cpu = 0.0;
    for c in &children {
        children_cpu += c.pid.and_then(|p| sys::cpu_secs(Some(p))).unwrap_or(0.0);
    }
    let wall = t_start.elapsed().as_secs_f64();

    // Stop and collect.
    let mut agg = json!({});
    if let Some(w) = worker {
        let counters = w.counters.clone();
        stop_worker(w).await;
        agg = counters.json();
    } else {
        for c in &mut children {
            c.stdin.take();
        }
        let mut pings = 0u64;
        let mut dropped = 0u64;
        let mut closes = serde_json::Map::new();
        let mut errors = serde_json::Map::new();
        let mut examples = Vec::new();
        let mut done = 0;
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while done < children.len() {
            match tokio::time::timeout_at(until, line_rx.recv()).await {
                Ok(Some((_, v))) if v["event"] == "done" => {
                    done += 1;
                    pings += v["pings_answered"].as_u64().unwrap_or(0);
                    dropped += v["dropped"].as_u64().unwrap_or(0);
                    merge(&mut closes, &v["closes"]);
                    merge(&mut errors, &v["connect_errors"]);
                    if let Some(a) = v["examples"].as_array() {
                        examples.extend(a.iter().take(3).cloned());
                    }
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        for c in &mut children {
            if tokio::time::timeout(Duration::from_secs(5), c.proc.wait())
                .await
                .is_err()
            {
                let _ = c.proc.kill().await;
            }
        }
        agg = json!({
            "connected": connected,
            "failed": failed,
            "pings_answered": pings,
            "dropped": dropped,
            "connect_errors": errors,
            "closes": closes,
            "examples": examples,
            "children_reported": done,
        });
    }
    let per_conn_kb = match (rss_before, rss_after) {
        (Some(b), Some(a)) if connected > 0 => {
            Some(((a as f64 - b as f64) / connected as f64 * 100.0).round() / 100.0)
        }
        _ => None,
    };
    let per_conn_anon_kb = match (anon_before, anon_after) {
        (Some(b), Some(a)) if connected > 0 => {
            Some(((a as f64 - b as f64) / connected as f64 * 100.0).round() / 100.0)
        }
        _ => None,
    };
    let per_conn_kb_connected = match (rss_before, rss_connected) {
        (Some(b), Some(a)) if connected > 0 => {
            Some(((a as f64 - b as f64) / connected as f64 * 100.0).round() / 100.0)
        }
        _ => None,
    };
    let self_cpu = match (self_cpu0, self_cpu1) {
        (Some(a), Some(b)) => Some(b - a + children_cpu),
        _ => None,
    };
    let srv_cpu = match (srv_cpu0, srv_cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok(json!({
        "mode": "idle",
        "config": {
            "visitors": p.visitors,
            "procs": procs,
            "sites": p.sites,
            "connect_rate": p.connect_rate,
            "hold_secs": p.duration,
        },
        "connected": connected,
        "failed": failed,
        "connect_secs": (connect_secs * 10.0).round() / 10.0,
        "clients": agg,
        "server": {
            "pid": pid,
            "died_during_run": server_died,
            "rss_before_kb": rss_before,
            "rss_connected_kb": rss_connected,
            "rss_after_kb": rss_after,
            "rss_peak_kb": sampler.as_ref().map(|s| s.peak_kb().max(rss_after.unwrap_or(0))),
            "per_connection_kb": per_conn_kb,
            "per_connection_kb_just_connected": per_conn_kb_connected,
            "rss_anon_before_kb": anon_before,
            "rss_anon_after_kb": anon_after,
            "per_connection_anon_kb": per_conn_anon_kb,
            "cpu_secs": srv_cpu.map(|c| (c * 100.0).round() / 100.0),
        },
        "bench": {
            "cpu_secs_including_children": self_cpu.map(|c| (c * 100.0).round() / 100.0),
            "rss_kb": sys::rss_kb(None),
        },
        "wall_secs": (wall * 10.0).round() / 10.0,
    }))
}

fn merge(into: &mut serde_json::Map<String, Value>, from: &Value) {
    if let Some(m) = from.as_object() {
        for (k, v) in m {
            let cur = into.get(k).and_then(Value::as_u64).unwrap_or(0);
            into.insert(k.clone(), json!(cur + v.as_u64().unwrap_or(0)));
        }
    }
}

pub fn print(r: &Value) {
    let f = |v: &Value| match v {
        Value::Null => "n/a".to_owned(),
        other => other.to_string(),
    };
    let mib = |v: &Value| match v.as_u64() {
        Some(kb) => format!("{:.1} MiB", kb_to_mib(kb)),
        None => "n/a".to_owned(),
    };
    println!("== hark-bench idle run ==");
    println!(
        "config: {} visitor connections over {} process(es), {} site(s), connect rate {}/s, held {} s",
        f(&r["config"]["visitors"]),
        f(&r["config"]["procs"]),
        f(&r["config"]["sites"]),
        f(&r["config"]["connect_rate"]),
        f(&r["config"]["hold_secs"]),
    );
    println!(
        "connections: {} connected, {} failed in {} s; pings answered {}, dropped {}",
        f(&r["connected"]),
        f(&r["failed"]),
        f(&r["connect_secs"]),
        f(&r["clients"]["pings_answered"]),
        f(&r["clients"]["dropped"]),
    );
    println!(
        "connect errors: {}; closes: {}",
        obj_line(&r["clients"]["connect_errors"]),
        obj_line(&r["clients"]["closes"])
    );
    let s = &r["server"];
    println!(
        "server (pid {}): RSS before {}, just connected {}, after hold {}, peak {}{}",
        f(&s["pid"]),
        mib(&s["rss_before_kb"]),
        mib(&s["rss_connected_kb"]),
        mib(&s["rss_after_kb"]),
        mib(&s["rss_peak_kb"]),
        if s["died_during_run"].as_bool() == Some(true) {
            " — THE SERVER DIED DURING THE RUN"
        } else {
            ""
        }
    );
    println!(
        "server memory per connection: {} KiB after the hold ({} KiB just after connecting; anonymous memory only {} KiB)",
        f(&s["per_connection_kb"]),
        f(&s["per_connection_kb_just_connected"]),
        f(&s["per_connection_anon_kb"]),
    );
    println!(
        "CPU: server {} s, bench {} s (incl. children) over {} s",
        f(&s["cpu_secs"]),
        f(&r["bench"]["cpu_secs_including_children"]),
        f(&r["wall_secs"]),
    );
    if let Some(a) = r["clients"]["examples"].as_array() {
        if !a.is_empty() {
            println!("examples of problems:");
            for e in a {
                println!("  - {}", e.as_str().unwrap_or(""));
            }
        }
    }
}
