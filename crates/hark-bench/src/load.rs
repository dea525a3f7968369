//! Throughput / latency runs: sites, agents and visitors, a paced send schedule, and the report.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::api::Api;
use crate::client::{Client, ClientResult, Counters, LoadParams, Role, Shared, Times};
use crate::stats::{kb_to_mib, latency_json, tally_line, Examples, Latency, Tally};
use crate::sys;
use crate::target::{random_token, Target};
use crate::ws::ORIGIN;

struct AgentLogin {
    site: usize,
    index_in_site: usize,
    token: String,
}

/// Creates sites and agents through the REST API; returns site keys and agent tokens.
async fn setup(
    target: &Target,
    p: &LoadParams,
    run_id: &str,
) -> Result<(Vec<String>, Vec<AgentLogin>)> {
    let api = Api::new(&target.base_url)?;
    let admin = api
        .login(&target.admin_email, &target.admin_password)
        .await
        .map_err(|e| e.context("logging in as the admin"))?;
    let mut keys = Vec::new();
    let mut agents = Vec::new();
    let password = random_token(20);
    for s in 0..p.sites {
        let site = api
            .create_site(&admin, &format!("bench {run_id} site {s}"), ORIGIN)
            .await
            .map_err(|e| e.context("creating a site"))?;
        for a in 0..p.agents_per_site {
            let email = format!("bench-{run_id}-s{s}-a{a}@example.com");
            api.create_agent(
                &admin,
                &email,
                &format!("Bench agent {s}.{a}"),
                &password,
                std::slice::from_ref(&site.id),
            )
            .await
            .map_err(|e| e.context("creating an agent"))?;
            let token = api
                .login(&email, &password)
                .await
                .map_err(|e| e.context("logging in as a bench agent"))?;
            agents.push(AgentLogin {
                site: s,
                index_in_site: a,
                token,
            });
        }
        keys.push(site.site_key);
    }
    Ok((keys, agents))
}

fn cores(cpu: Option<f64>, secs: f64) -> Value {
    match cpu {
        Some(c) if secs > 0.0 => json!((c / secs * 1000.0).round() / 1000.0),
        _ => Value::Null,
    }
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(((b - a) * 1000.0).round() / 1000.0),
        _ => None,
    }
}

pub async fn run(target: &mut Target, p: LoadParams) -> Result<Value> {
    let run_id = random_token(6).to_lowercase();
    let setup_started = Instant::now();
    let (keys, agent_logins) = setup(target, &p, &run_id).await?;
    let pid = target.server_pid;
    let rss_start = pid.and_then(|p| sys::rss_kb(Some(p)));
    let sampler = pid.map(|p| sys::RssSampler::start(p, Duration::from_millis(250)));

    let connect_secs = (p.visitors + agent_logins.len()) as f64 / p.connect_rate.max(1.0);
    let sh = Arc::new(Shared {
        t0: Instant::now(),
        addr: target.addr,
        host: target.host.clone(),
        params: p.clone(),
        times: OnceLock::new(),
        setup_deadline: Instant::now() + Duration::from_secs_f64(connect_secs * 3.0 + 60.0),
        c: Counters::default(),
        deliver_hist: Latency::new(),
        reply_hist: Latency::new(),
        ack_hist: Latency::new(),
        sched_lag_hist: Latency::new(),
        errors: Tally::default(),
        closes: Tally::default(),
        connect_errors: Tally::default(),
        frames: Tally::default(),
        examples: Examples::default(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (start_tx, start_rx) = watch::channel(false);
    let mut handles = Vec::new();

    // Agents first, so that they see every conversation from its first message.
    let gap = Duration::from_secs_f64(1.0 / p.connect_rate.max(1.0));
    let n_agents = agent_logins.len();
    for (i, a) in agent_logins.into_iter().enumerate() {
        let client = Client::new(
            sh.clone(),
            i,
            a.site,
            Role::Agent {
                token: a.token,
                index_in_site: a.index_in_site,
            },
        );
        handles.push(tokio::spawn(client.run(stop_rx.clone(), start_rx.clone())));
        tokio::time::sleep(gap).await;
    }
    let agents_deadline = Instant::now() + Duration::from_secs(30);
    while (sh.c.connected.load(Ordering::Relaxed) + sh.c.connect_failed.load(Ordering::Relaxed))
        < n_agents as u64
        && Instant::now() < agents_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let agents_connected = sh.c.connected.load(Ordering::Relaxed);
    if n_agents > 0 && agents_connected == 0 {
        let _ = stop_tx.send(true);
        bail!(
            "no agent could connect to /ws/agent: {}",
            sh.examples.snapshot().join("; ")
        );
    }

    // Visitors, paced at --connect-rate.
    let t_conn = tokio::time::Instant::now();
    for i in 0..p.visitors {
        let site = i % p.sites.max(1);
        let client = Client::new(
            sh.clone(),
            i,
            site,
            Role::Visitor {
                site_key: keys[site].clone(),
            },
        );
        handles.push(tokio::spawn(client.run(stop_rx.clone(), start_rx.clone())));
        tokio::time::sleep_until(t_conn + gap.mul_f64((i + 1) as f64)).await;
    }
    let total = (n_agents + p.visitors) as u64;
    let mut last_print = Instant::now();
    while sh.c.connected.load(Ordering::Relaxed) + sh.c.connect_failed.load(Ordering::Relaxed)
        < total
        && Instant::now() < sh.setup_deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if last_print.elapsed() > Duration::from_secs(5) {
            last_print = Instant::now();
            eprintln!(
                "connecting: {} connected, {} failed of {total}",
                sh.c.connected.load(Ordering::Relaxed),
                sh.c.connect_failed.load(Ordering::Relaxed)
            );
        }
    }
    let connected = sh.c.connected.load(Ordering::Relaxed);
    let visitors_connected = connected.saturating_sub(agents_connected);
    if p.visitors > 0 && visitors_connected == 0 {
        let _ = stop_tx.send(true);
        bail!(
            "no visitor could connect to /ws/visitor: {}",
            sh.examples.snapshot().join("; ")
        );
    }
    let setup_secs = setup_started.elapsed().as_secs_f64();
    eprintln!(
        "setup done in {setup_secs:.1} s: {agents_connected}/{n_agents} agents, {visitors_connected}/{} visitors connected; sending for {} s (+{} s warmup)",
        p.visitors, p.duration, p.warmup
    );

    // Fix the schedule and go.
    let start = Instant::now() + Duration::from_millis(200);
    let warmup_end = start + Duration::from_secs_f64(p.warmup);
    let send_end = warmup_end + Duration::from_secs_f64(p.duration);
    let grace_end = send_end + Duration::from_secs_f64(p.grace);
    let ns = |t: Instant| t.duration_since(sh.t0).as_nanos() as u64;
    let times = Times {
        start,
        send_end,
        grace_end,
        warmup_end_ns: ns(warmup_end),
        send_end_ns: ns(send_end),
    };
    let _ = sh.times.set(times);
    let _ = start_tx.send(true);

    tokio::time::sleep_until(warmup_end.into()).await;
    let self_cpu0 = sys::cpu_secs(None);
    let srv_cpu0 = pid.and_then(|p| sys::cpu_secs(Some(p)));
    let server_died = !target.hold_until(send_end).await;
    let self_cpu1 = sys::cpu_secs(None);
    let srv_cpu1 = pid.and_then(|p| sys::cpu_secs(Some(p)));
    let rss_end = pid.and_then(|p| sys::rss_kb(Some(p)));
    let window = p.duration;

    // Grace: wait for outstanding acks and deliveries, at most --grace seconds.
    let mut drained = false;
    // Late timers may still create a send scheduled just before the end.
    tokio::time::sleep(Duration::from_millis(250)).await;
    while Instant::now() < grace_end && !server_died {
        let pending = sh.c.pending.load(Ordering::Relaxed);
        let exp = sh.c.expected_deliveries.load(Ordering::Relaxed);
        let got = sh.c.unique_deliveries.load(Ordering::Relaxed);
        if pending <= 0 && got >= exp {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_secs = Instant::now()
        .saturating_duration_since(send_end)
        .as_secs_f64();
    let _ = stop_tx.send(true);

    let mut results: Vec<ClientResult> = Vec::new();
    let join_deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut hung = 0u64;
    for h in handles {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(join_deadline, h).await {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(_)) => hung += 1,
            Err(_) => {
                abort.abort();
                hung += 1;
            }
        }
    }

    let check = delivery_check(&results, p.sites);
    let c = &sh.c;
    let deliver = sh.deliver_hist.snapshot();
    let reply = sh.reply_hist.snapshot();
    let ack = sh.ack_hist.snapshot();
    let lag = sh.sched_lag_hist.snapshot();
    let rate = |n: u64| (n as f64 / window * 10.0).round() / 10.0;
    let srv_cpu = diff(srv_cpu0, srv_cpu1);
    let self_cpu = diff(self_cpu0, self_cpu1);
    let report = json!({
        "mode": "load",
        "config": {
            "sites": p.sites,
            "visitors": p.visitors,
            "agents_per_site": p.agents_per_site,
            "rate": p.rate,
            "agent_reply_ratio": p.reply_ratio,
            "duration_secs": p.duration,
            "warmup_secs": p.warmup,
            "grace_secs": p.grace,
            "text_bytes": p.text_bytes,
            "connect_rate": p.connect_rate,
            "per_visitor_rate": if p.visitors > 0 { p.rate / p.visitors as f64 } else { 0.0 },
        },
        "setup": {
            "secs": (setup_secs * 10.0).round() / 10.0,
            "agents_connected": agents_connected,
            "visitors_connected": visitors_connected,
            "connect_failed": c.connect_failed.load(Ordering::Relaxed),
            "connect_errors": sh.connect_errors.snapshot(),
        },
        "window_secs": window,
        "sent": c.sent.load(Ordering::Relaxed),
        "sent_window": c.sent_window.load(Ordering::Relaxed),
        "agent_replies_sent": c.agent_sent.load(Ordering::Relaxed),
        "send_rate": rate(c.sent_window.load(Ordering::Relaxed)),
        "ack_rate": rate(c.acked_window.load(Ordering::Relaxed)),
        "delivery_rate": rate(c.deliveries_window.load(Ordering::Relaxed)),
        "acked": c.acked.load(Ordering::Relaxed),
        "deliveries": c.deliveries.load(Ordering::Relaxed),
        "resends": c.resends.load(Ordering::Relaxed),
        "schedule_skipped": c.schedule_skipped.load(Ordering::Relaxed),
        "latency": {
            "send_to_receive": latency_json(&deliver),
            "agent_reply_to_receive": latency_json(&reply),
            "send_to_ack": latency_json(&ack),
            "bench_schedule_lag": latency_json(&lag),
        },
        "delivery_check": {
            "drained_within_grace": drained,
            "drain_secs": (drain_secs * 100.0).round() / 100.0,
            "acked_messages": check.acked,
            "expected_deliveries": check.expected,
            "lost": check.lost_to_agents + check.lost_to_visitors,
            "lost_to_agents": check.lost_to_agents,
            "lost_to_visitors": check.lost_to_visitors,
            "duplicated": check.duplicates,
            "redelivered_after_reconnect": check.redelivered,
            "out_of_order": check.out_of_order,
            "echo_to_sender": check.echoes,
            "unacked_at_end": check.unacked,
            "queued_never_sent": check.never_sent,
            "send_refused": c.send_failed.load(Ordering::Relaxed),
            "duplicate_acks": c.dup_acks.load(Ordering::Relaxed),
            "stray_acks": c.stray_acks.load(Ordering::Relaxed),
            "lost_examples": check.examples,
        },
        "errors": sh.errors.snapshot(),
        "closes": sh.closes.snapshot(),
        "other_frames": sh.frames.snapshot(),
        "undecodable_frames": c.undecodable.load(Ordering::Relaxed),
        "reconnects": c.reconnects.load(Ordering::Relaxed),
        "client_tasks_hung": hung,
        "server": {
            "pid": pid,
            "died_during_run": server_died,
            "rss_start_kb": rss_start,
            "rss_peak_kb": sampler.as_ref().map(|s| s.peak_kb().max(rss_end.unwrap_or(0))),
            "rss_end_kb": rss_end,
            "vm_hwm_kb": pid.and_then(|p| sys::hwm_kb(Some(p))),
            "cpu_secs_window": srv_cpu,
            "cpu_cores_window": cores(srv_cpu, window),
        },
        "bench": {
            "pid": std::process::id(),
            "cpu_secs_window": self_cpu,
            "cpu_cores_window": cores(self_cpu, window),
            "rss_kb": sys::rss_kb(None),
        },
        "examples": sh.examples.snapshot(),
    });
    Ok(report)
}

struct Check {
    acked: u64,
    expected: u64,
    lost_to_agents: u64,
    lost_to_visitors: u64,
    duplicates: u64,
    redelivered: u64,
    out_of_order: u64,
    echoes: u64,
    unacked: u64,
    never_sent: u64,
    examples: Vec<String>,
}

/// Compares every acked (conversation, seq) with what each expected receiver got.
fn delivery_check(results: &[ClientResult], sites: usize) -> Check {
    let mut agents_by_site: Vec<Vec<&ClientResult>> = vec![Vec::new(); sites.max(1)];
    let mut visitor_of_conv: HashMap<&str, &ClientResult> = HashMap::new();
    let mut ck = Check {
        acked: 0,
        expected: 0,
        lost_to_agents: 0,
        lost_to_visitors: 0,
        duplicates: 0,
        redelivered: 0,
        out_of_order: 0,
        echoes: 0,
        unacked: 0,
        never_sent: 0,
        examples: Vec::new(),
    };
    for r in results {
        ck.duplicates += r.duplicates;
        ck.redelivered += r.redelivered;
        ck.out_of_order += r.out_of_order;
        ck.echoes += r.echoes;
        ck.unacked += r.unacked as u64;
        ck.never_sent += r.never_sent as u64;
        if r.is_agent {
            if let Some(v) = agents_by_site.get_mut(r.site) {
                v.push(r);
            }
        } else {
            for (conv, _) in &r.acks {
                visitor_of_conv.insert(conv.as_str(), r);
            }
        }
    }
    let note = |ck: &mut Check, s: String| {
        if ck.examples.len() < 10 {
            ck.examples.push(s);
        }
    };
    for r in results {
        let site_agents = agents_by_site.get(r.site).map(Vec::as_slice).unwrap_or(&[]);
        for (conv, seq) in &r.acks {
            ck.acked += 1;
            for a in site_agents {
                if r.is_agent && a.idx == r.idx {
                    continue;
                }
                ck.expected += 1;
                if !a.connected {
                    continue;
                }
                if !a.tracks.get(conv).is_some_and(|t| t.received(*seq)) {
                    ck.lost_to_agents += 1;
                    note(
                        &mut ck,
                        format!("agent#{} never received {conv} seq {seq}", a.idx),
                    );
                }
            }
            if r.is_agent {
                if let Some(v) = visitor_of_conv.get(conv.as_str()) {
                    ck.expected += 1;
                    if !v.tracks.get(conv).is_some_and(|t| t.received(*seq)) {
                        ck.lost_to_visitors += 1;
                        note(
                            &mut ck,
                            format!("visitor#{} never received {conv} seq {seq}", v.idx),
                        );
                    }
                }
            }
        }
    }
    ck
}

fn f(v: &Value, path: &[&str]) -> String {
    let mut cur = v;
    for k in path {
        cur = &cur[*k];
    }
    match cur {
        Value::Null => "n/a".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn mib(v: &Value, path: &[&str]) -> String {
    let mut cur = v;
    for k in path {
        cur = &cur[*k];
    }
    match cur.as_u64() {
        Some(kb) => format!("{:.1} MiB", kb_to_mib(kb)),
        None => "n/a".to_owned(),
    }
}

/// Human-readable report.
pub fn print(r: &Value) {
    println!("== hark-bench load run ==");
    println!(
        "config: {} site(s), {} visitors, {} agent(s)/site, rate {} msg/s ({:.2}/visitor/s), reply ratio {}, {} s measured after {} s warmup, text {} B",
        f(r, &["config", "sites"]),
        f(r, &["config", "visitors"]),
        f(r, &["config", "agents_per_site"]),
        f(r, &["config", "rate"]),
        r["config"]["per_visitor_rate"].as_f64().unwrap_or(0.0),
        f(r, &["config", "agent_reply_ratio"]),
        f(r, &["config", "duration_secs"]),
        f(r, &["config", "warmup_secs"]),
        f(r, &["config", "text_bytes"]),
    );
    println!(
        "setup: {} s, agents connected {}, visitors connected {}, connect failures {} ({})",
        f(r, &["setup", "secs"]),
        f(r, &["setup", "agents_connected"]),
        f(r, &["setup", "visitors_connected"]),
        f(r, &["setup", "connect_failed"]),
        obj_line(&r["setup"]["connect_errors"]),
    );
    println!(
        "throughput: sent {} msg/s, acked {} msg/s, deliveries {} frames/s (agent replies sent: {}, resends: {}, schedule skipped: {})",
        f(r, &["send_rate"]),
        f(r, &["ack_rate"]),
        f(r, &["delivery_rate"]),
        f(r, &["agent_replies_sent"]),
        f(r, &["resends"]),
        f(r, &["schedule_skipped"]),
    );
    println!(
        "send→receive:       {}",
        lat_line(&r["latency"]["send_to_receive"])
    );
    println!(
        "agent reply→receive: {}",
        lat_line(&r["latency"]["agent_reply_to_receive"])
    );
    println!(
        "send→ack:           {}",
        lat_line(&r["latency"]["send_to_ack"])
    );
    println!(
        "bench schedule lag: {}",
        lat_line(&r["latency"]["bench_schedule_lag"])
    );
    let d = &r["delivery_check"];
    println!(
        "delivery: acked {} msgs, expected deliveries {}, lost {} (agents {}, visitors {}), duplicated {}, out-of-order {}, echo-to-sender {}, redelivered after reconnect {}, unacked at end {} (+{} queued, never sent), refused {}, drained {} in {} s",
        f(d, &["acked_messages"]),
        f(d, &["expected_deliveries"]),
        f(d, &["lost"]),
        f(d, &["lost_to_agents"]),
        f(d, &["lost_to_visitors"]),
        f(d, &["duplicated"]),
        f(d, &["out_of_order"]),
        f(d, &["echo_to_sender"]),
        f(d, &["redelivered_after_reconnect"]),
        f(d, &["unacked_at_end"]),
        f(d, &["queued_never_sent"]),
        f(d, &["send_refused"]),
        f(d, &["drained_within_grace"]),
        f(d, &["drain_secs"]),
    );
    println!("errors: {}", obj_line(&r["errors"]));
    println!(
        "closes: {}; reconnects {}; other frames: {}; undecodable {}",
        obj_line(&r["closes"]),
        f(r, &["reconnects"]),
        obj_line(&r["other_frames"]),
        f(r, &["undecodable_frames"]),
    );
    println!(
        "server (pid {}): RSS start {}, peak {}, end {}; CPU {} s = {} cores over the window{}",
        f(r, &["server", "pid"]),
        mib(r, &["server", "rss_start_kb"]),
        mib(r, &["server", "rss_peak_kb"]),
        mib(r, &["server", "rss_end_kb"]),
        f(r, &["server", "cpu_secs_window"]),
        f(r, &["server", "cpu_cores_window"]),
        if r["server"]["died_during_run"].as_bool() == Some(true) {
            " — THE SERVER DIED DURING THE RUN"
        } else {
            ""
        },
    );
    println!(
        "bench: CPU {} s = {} cores over the window, RSS {}",
        f(r, &["bench", "cpu_secs_window"]),
        f(r, &["bench", "cpu_cores_window"]),
        mib(r, &["bench", "rss_kb"]),
    );
    print_examples(r);
}

pub fn print_examples(r: &Value) {
    let mut ex: Vec<String> = Vec::new();
    if let Some(a) = r["examples"].as_array() {
        ex.extend(a.iter().filter_map(|v| v.as_str().map(str::to_owned)));
    }
    if let Some(a) = r["delivery_check"]["lost_examples"].as_array() {
        ex.extend(a.iter().filter_map(|v| v.as_str().map(str::to_owned)));
    }
    if !ex.is_empty() {
        println!("examples of problems:");
        for e in ex {
            println!("  - {e}");
        }
    }
}

pub fn obj_line(v: &Value) -> String {
    match v.as_object() {
        Some(m) => tally_line(
            &m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect(),
        ),
        None => "none".to_owned(),
    }
}

fn lat_line(v: &Value) -> String {
    if v["count"].as_u64().unwrap_or(0) == 0 {
        return "no samples".to_owned();
    }
    format!(
        "p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  (n={})",
        v["p50_ms"].as_f64().unwrap_or(0.0),
        v["p90_ms"].as_f64().unwrap_or(0.0),
        v["p99_ms"].as_f64().unwrap_or(0.0),
        v["p999_ms"].as_f64().unwrap_or(0.0),
        v["max_ms"].as_f64().unwrap_or(0.0),
        v["count"]
    )
}
