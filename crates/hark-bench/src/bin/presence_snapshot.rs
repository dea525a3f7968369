//! `hark-presence-snapshot`: one site's visitor list at populations one process cannot hold
//! sockets for on the dev machines (the open-files limit is 20,000 per process).
//!
//! Starts a real Hark node in this process (the library's `Server`, as the integration tests do,
//! with the allocator the `hark` binary uses), fills its presence table with `--visitors`
//! entries through the same `Presence::visitor_join` the WebSocket gateway calls (realistic page
//! URLs, titles, referrers and user agents; a long `limits.visitor_lease_ms`, since no socket
//! answers pings for them), and then connects real agent consoles over WebSocket and times how
//! long the snapshot takes to arrive. With `--churn R` it then adds and removes entries at R per
//! second (half each) and measures how fast the `visitor` / `visitor_gone` deltas reach a
//! console, and checks its copy of the list at the end.
//!
//! What this leaves out, compared with real visitors: their sockets and connection tasks (~5 KiB
//! each, measured by `hark-bench --idle`), their hub registrations, their pings, and the store
//! write a new visitor's `hello` makes. The entries' own memory is reported.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(dead_code)]
#[path = "../console.rs"]
mod console;
#[allow(dead_code)]
#[path = "../fixtures.rs"]
mod fixtures;
#[allow(dead_code)]
#[path = "../stats.rs"]
mod stats;
#[allow(dead_code)]
#[path = "../sys.rs"]
mod sys;
#[allow(dead_code)]
#[path = "../ws.rs"]
mod ws;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use hark::config::Config;
use hark::domain::{AgentRole, Email, Origin, VisitorId};
use hark::presence::{ChatSeed, VisitorJoin, VisitorLease};
use hark::server::Server;
use hark::store::{NewAgent, NewSite, SessionRow};
use rand::Rng;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use console::{Console, ConsoleSpec};
use stats::{latency_json, Latency};
use sys::mono_ns;

#[derive(Parser, Debug)]
#[command(
    name = "hark-presence-snapshot",
    about = "Visitor-list snapshot and deltas at a large population, entries made without sockets"
)]
struct Cli {
    /// Online visitors to put in the site's presence table.
    #[arg(long, default_value_t = 50_000)]
    visitors: usize,
    /// How many times a console loads the list at the full population.
    #[arg(long, default_value_t = 5)]
    snapshots: usize,
    /// Entries added + removed per second after the snapshots (0 = no churn).
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Seconds of churn before the measured window.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Measured seconds of churn.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// `limits.presence_grace_ms` of the node (a removed entry is announced after it).
    #[arg(long, default_value_t = 0)]
    grace_ms: u64,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    sys::raise_nofile_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hark-presence-snapshot: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hark-presence-snapshot: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn kb(v: Option<u64>) -> Value {
    json!(v)
}

async fn run(cli: Cli) -> Result<()> {
    let dir = tempfile::tempdir().context("creating a data directory")?;
    let mut config = Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    // Nothing answers pings for these entries: give them a lease longer than the run.
    config.limits.visitor_lease_ms = 24 * 3_600_000;
    config.limits.presence_grace_ms = cli.grace_ms;
    let server = Server::build(config)
        .await
        .map_err(|e| anyhow!("building the server: {e}"))?;
    let addr = server.local_addr();
    let app = server.app().clone();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let server_task = tokio::spawn(async move {
        if let Err(e) = server.run(async move { stop.cancelled().await }).await {
            eprintln!("server: {e}");
        }
    });

    let site = app
        .store
        .create_site(NewSite {
            name: "Example Outdoor Shop".into(),
            allowed_origins: vec![Origin::parse(ws::ORIGIN).ok_or_else(|| anyhow!("bad origin"))?],
        })
        .await
        .map_err(|e| anyhow!("creating the site: {e}"))?;
    let agent = app
        .store
        .create_agent(NewAgent {
            email: Email::parse("snapshot-agent@example.com")
                .ok_or_else(|| anyhow!("bad email"))?,
            name: "Snapshot agent".into(),
            role: AgentRole::Agent,
            // Hashed on a thread of its own, which takes the hash's ~20 MiB with it when it
            // ends, so that they do not sit in a runtime thread's heap for the entries to reuse.
            password_hash: std::thread::spawn(|| {
                hark::auth::hash_password("correct horse battery")
            })
            .join()
            .map_err(|_| anyhow!("the password hashing thread panicked"))?
            .map_err(|e| anyhow!("{e}"))?,
            site_ids: vec![site.id],
        })
        .await
        .map_err(|e| anyhow!("creating the agent: {e}"))?;
    let session = hark::auth::new_session_token();
    app.store
        .create_session(
            &session.hash,
            SessionRow {
                agent_id: agent.id,
                csrf_token: session.csrf,
                expires_at: hark::domain::now_ms() + 3_600_000,
            },
        )
        .await
        .map_err(|e| anyhow!("creating a session: {e}"))?;
    let spec = || ConsoleSpec {
        addr,
        host: addr.to_string(),
        token: session.token.clone(),
        site_id: site.id.to_string(),
    };

    // Fill, with no console connected (the deltas go to nobody).
    let rss_zero = sys::settled_rss_kb(None, Duration::from_secs(30)).await;
    let anon_zero = sys::rss_anon_kb(None);
    let presence = app.presence.clone();
    let hub = app.hub.clone();
    let join = |i: u64| -> (VisitorId, VisitorLease) {
        let visitor = VisitorId::new();
        let lease = presence.visitor_join(VisitorJoin {
            site: site.id,
            visitor,
            conn: hub.next_conn_id(),
            kick: CancellationToken::new(),
            page: Some(fixtures::page(i)),
            user_agent: Some(fixtures::user_agent(i).to_owned()),
            ip: Some(IpAddr::V4(Ipv4Addr::new(
                10,
                (i >> 16) as u8,
                (i >> 8) as u8,
                i as u8,
            ))),
            name: None,
            email: None,
            chat: ChatSeed::default(),
        });
        (visitor, lease)
    };
    let mut leases: Vec<(VisitorId, VisitorLease)> = Vec::with_capacity(cli.visitors * 2);
    // Half the entries, memory, the rest, memory: the slope between the two readings is free of
    // start-up memory (password hashing) that the first entries reuse.
    let half = cli.visitors as u64 / 2;
    let mut fill_secs = 0.0;
    let mut rss_half = None;
    let mut anon_half = None;
    for (from, to) in [(0, half), (half, cli.visitors as u64)] {
        let t_fill = Instant::now();
        for i in from..to {
            leases.push(join(i));
            if i % 1000 == 999 {
                tokio::task::yield_now().await;
            }
        }
        fill_secs += t_fill.elapsed().as_secs_f64();
        if from == 0 {
            rss_half = sys::settled_rss_kb(None, Duration::from_secs(30)).await;
            anon_half = sys::rss_anon_kb(None);
        }
    }
    let rss_full = sys::settled_rss_kb(None, Duration::from_secs(30)).await;
    let anon_full = sys::rss_anon_kb(None);
    // Only the part of the vector written so far is resident.
    let holder_bytes = leases.len() * std::mem::size_of::<(VisitorId, VisitorLease)>();
    let listed = app.presence.online_visitors(site.id);
    eprintln!(
        "{listed} entries in {fill_secs:.2} s; RSS {} → {} KiB",
        rss_zero.unwrap_or(0),
        rss_full.unwrap_or(0)
    );
    // What the sweeper costs with the table full (it walks every entry every 250 ms).
    let cpu0 = sys::cpu_secs(None);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_cpu = match (cpu0, sys::cpu_secs(None)) {
        (Some(a), Some(b)) => Some(((b - a) / 5.0 * 1000.0).round() / 1000.0),
        _ => None,
    };

    let mut snapshots = Vec::new();
    let mut keep: Option<Console> = None;
    for k in 0..cli.snapshots.max(1) {
        let c = Console::start(&format!("snapshot {}", k + 1), spec()).await?;
        let t = c.wait_loaded(Duration::from_secs(120)).await?;
        eprintln!(
            "snapshot {}: {} visitors, {} bytes in {} frames, done {:.1} ms after hello (welcome {:.1} ms)",
            k + 1,
            t.visitors,
            t.bytes,
            t.frames,
            t.done_ms.unwrap_or(f64::NAN),
            t.welcome_ms.unwrap_or(f64::NAN),
        );
        snapshots.push(t.json());
        if k + 1 < cli.snapshots.max(1) {
            c.stop().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        } else {
            keep = Some(c);
        }
    }
    let console = keep.ok_or_else(|| anyhow!("no console"))?;
    let rss_after_snapshots = sys::rss_kb(None);

    // Churn: entries added and removed at the given rate, the last console watching.
    let mut churn_report = Value::Null;
    if cli.churn > 0.0 {
        let total = cli.warmup + cli.duration;
        eprintln!(
            "churning at {}/s for {total} s ({} s measured)",
            cli.churn, cli.duration
        );
        let mut joined: HashMap<String, u64> = HashMap::new();
        let mut left: HashMap<String, u64> = HashMap::new();
        let gap = Duration::from_secs_f64(1.0 / cli.churn);
        let t0 = tokio::time::Instant::now();
        let m0 = mono_ns();
        let window = (m0 + (cli.warmup * 1e9) as u64, m0 + (total * 1e9) as u64);
        let end = t0 + Duration::from_secs_f64(total);
        let cpu0 = sys::cpu_secs(None);
        let mut k = 0u64;
        let mut lag_max = Duration::ZERO;
        let mut next_i = cli.visitors as u64;
        loop {
            let at = t0 + gap.mul_f64(k as f64);
            if at >= end {
                break;
            }
            tokio::time::sleep_until(at).await;
            lag_max = lag_max.max(tokio::time::Instant::now().saturating_duration_since(at));
            if k.is_multiple_of(2) {
                let t = mono_ns();
                let (id, lease) = join(next_i);
                next_i += 1;
                joined.insert(id.to_string(), t);
                leases.push((id, lease));
            } else if !leases.is_empty() {
                let p = rand::thread_rng().gen_range(0..leases.len());
                let (id, lease) = leases.swap_remove(p);
                let t = mono_ns();
                drop(lease);
                left.insert(id.to_string(), t);
            }
            k += 1;
        }
        let churn_cpu = match (cpu0, sys::cpu_secs(None)) {
            (Some(a), Some(b)) => Some(((b - a) / total * 1000.0).round() / 1000.0),
            _ => None,
        };
        tokio::time::sleep(Duration::from_millis(cli.grace_ms + 2_000)).await;
        let s = console.state();
        let (arr, dep) = (Latency::new(), Latency::new());
        let (mut arr_n, mut arr_lost, mut dep_n, mut dep_lost) = (0u64, 0u64, 0u64, 0u64);
        for (id, t) in &joined {
            if *t < window.0 || *t >= window.1 {
                continue;
            }
            arr_n += 1;
            match s.first_seen.get(id) {
                Some(r) => arr.record_ns(r.saturating_sub(*t)),
                None => arr_lost += 1,
            }
        }
        let grace_ns = cli.grace_ms * 1_000_000;
        for (id, t) in &left {
            if *t < window.0 || *t >= window.1 {
                continue;
            }
            dep_n += 1;
            match s.gone_at.get(id) {
                Some(r) => dep.record_ns(r.saturating_sub(*t).saturating_sub(grace_ns)),
                None => dep_lost += 1,
            }
        }
        let expected: HashSet<String> = leases.iter().map(|(id, _)| id.to_string()).collect();
        let missing = expected.iter().filter(|id| !s.copy.contains(*id)).count();
        let extra = s.copy.iter().filter(|id| !expected.contains(*id)).count();
        churn_report = json!({
            "per_sec": cli.churn,
            "warmup_secs": cli.warmup,
            "measured_secs": cli.duration,
            "schedule_lag_max_ms": lag_max.as_secs_f64() * 1000.0,
            "process_cores": churn_cpu,
            "arrival_join_to_delta": latency_json(&arr.snapshot()),
            "departure_drop_to_gone_minus_grace": latency_json(&dep.snapshot()),
            "arrivals_measured": arr_n,
            "arrivals_lost": arr_lost,
            "departures_measured": dep_n,
            "departures_lost": dep_lost,
            "out_of_order": s.out_of_order,
            "final_check": {
                "list_size": s.copy.len(),
                "held": expected.len(),
                "missing_from_list": missing,
                "extra_in_list": extra,
                "equal": missing == 0 && extra == 0,
            },
        });
    }
    let console_summary = console.summary();
    console.stop().await;
    drop(leases);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), server_task).await;

    let per_entry = |rss: Option<u64>, minus: usize| match (rss_zero, rss) {
        (Some(z), Some(f)) if cli.visitors > 0 => {
            Some((((f as f64 - z as f64) * 1024.0 - minus as f64) / cli.visitors as f64).round())
        }
        _ => None,
    };
    // Sizes of what a presence entry is made of (the entry struct itself is private to the
    // presence module; it holds a VisitorPresence, a ChatSeed, a Vec of connections, a version
    // and an Option<Instant>, and sits inline in the site's HashMap<VisitorId, _>).
    let sample = fixtures::page(0);
    let type_sizes = json!({
        "VisitorPresence": std::mem::size_of::<hark_protocol::VisitorPresence>(),
        "ChatSeed": std::mem::size_of::<ChatSeed>(),
        "LeaseCell": std::mem::size_of::<hark::presence::LeaseCell>(),
        "VisitorLease": std::mem::size_of::<VisitorLease>(),
        "VisitorId": std::mem::size_of::<VisitorId>(),
        "sample_page_bytes": sample.url.len()
            + sample.title.as_ref().map_or(0, String::len)
            + sample.referrer.as_ref().map_or(0, String::len),
    });
    let report = json!({
        "mode": "presence-table",
        "type_sizes": type_sizes,
        "visitors": cli.visitors,
        "entries_listed": listed,
        "fill_secs": (fill_secs * 1000.0).round() / 1000.0,
        "joins_per_sec": (cli.visitors as f64 / fill_secs).round(),
        "process_cores_idle_with_full_table": idle_cpu,
        "snapshots": snapshots,
        "churn": churn_report,
        "console": console_summary,
        "memory": {
            "rss_zero_kb": kb(rss_zero),
            "rss_full_kb": kb(rss_full),
            "rss_after_snapshots_kb": kb(rss_after_snapshots),
            "bytes_per_entry": per_entry(rss_full, 0),
            "bench_holder_bytes": holder_bytes,
            "bytes_per_entry_without_the_bench_holder": per_entry(rss_full, holder_bytes),
            "rss_half_kb": kb(rss_half),
            "rss_anon_half_kb": kb(anon_half),
            "bytes_per_entry_second_half": match (rss_half, rss_full) {
                (Some(a), Some(b)) if cli.visitors as u64 > half => Some(
                    (((b as f64 - a as f64) * 1024.0
                        - ((cli.visitors as u64 - half) as usize
                            * std::mem::size_of::<(VisitorId, VisitorLease)>()) as f64)
                        / (cli.visitors as u64 - half) as f64)
                        .round(),
                ),
                _ => None,
            },
            "rss_anon_zero_kb": kb(anon_zero),
            "rss_anon_full_kb": kb(anon_full),
        },
    });
    print(&report);
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn print(r: &Value) {
    let f = |v: &Value| match v {
        Value::Null => "n/a".to_owned(),
        other => other.to_string(),
    };
    println!("== hark-presence-snapshot (entries without sockets) ==");
    println!(
        "{} entries listed, made in {} s ({} joins/s); process at rest with the full table: {} cores",
        f(&r["entries_listed"]),
        f(&r["fill_secs"]),
        f(&r["joins_per_sec"]),
        f(&r["process_cores_idle_with_full_table"]),
    );
    let m = &r["memory"];
    println!(
        "memory: RSS {} KiB → {} KiB (after snapshots {} KiB): {} bytes per entry, {} without the bench's own lease vector ({} bytes)",
        f(&m["rss_zero_kb"]),
        f(&m["rss_full_kb"]),
        f(&m["rss_after_snapshots_kb"]),
        f(&m["bytes_per_entry"]),
        f(&m["bytes_per_entry_without_the_bench_holder"]),
        f(&m["bench_holder_bytes"]),
    );
    println!(
        "  from half the entries ({} KiB) to all: {} bytes per entry without the bench's vector",
        f(&m["rss_half_kb"]),
        f(&m["bytes_per_entry_second_half"]),
    );
    println!("  type sizes (bytes): {}", r["type_sizes"]);
    if let Some(a) = r["snapshots"].as_array() {
        for (i, s) in a.iter().enumerate() {
            println!(
                "snapshot {}: {} visitors, {} bytes in {} frames; hello → welcome {} ms, first list frame {} ms, done {} ms",
                i + 1,
                f(&s["visitors"]),
                f(&s["bytes"]),
                f(&s["frames"]),
                f(&s["welcome_ms"]),
                f(&s["first_list_frame_ms"]),
                f(&s["done_ms"]),
            );
        }
    }
    let c = &r["churn"];
    if !c.is_null() {
        let lat = |v: &Value| {
            format!(
                "p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (n={})",
                v["p50_ms"].as_f64().unwrap_or(0.0),
                v["p90_ms"].as_f64().unwrap_or(0.0),
                v["p99_ms"].as_f64().unwrap_or(0.0),
                v["max_ms"].as_f64().unwrap_or(0.0),
                f(&v["count"]),
            )
        };
        println!(
            "churn {}/s: process {} cores, schedule lag max {:.1} ms",
            f(&c["per_sec"]),
            f(&c["process_cores"]),
            c["schedule_lag_max_ms"].as_f64().unwrap_or(0.0),
        );
        println!(
            "  arrival join → visitor:       {}",
            lat(&c["arrival_join_to_delta"])
        );
        println!(
            "  departure drop → visitor_gone: {}  (grace subtracted)",
            lat(&c["departure_drop_to_gone_minus_grace"])
        );
        println!(
            "  lost: {} of {} arrivals, {} of {} departures; out of order {}; final check: list {} vs held {} → {}",
            f(&c["arrivals_lost"]),
            f(&c["arrivals_measured"]),
            f(&c["departures_lost"]),
            f(&c["departures_measured"]),
            f(&c["out_of_order"]),
            f(&c["final_check"]["list_size"]),
            f(&c["final_check"]["held"]),
            if c["final_check"]["equal"].as_bool() == Some(true) {
                "EQUAL"
            } else {
                "DIFFERENT"
            },
        );
    }
}
