//! `hark-bench`: load generator for Hark over real WebSockets.
//!
//! Either spawns a `hark serve` of its own (`--spawn`) or drives an existing server on loopback
//! (`--url`), sets up sites and agents through the REST API, then runs visitors that send on a
//! paced schedule and agents that receive (and optionally reply), and reports throughput,
//! send→receive and send→ack latency, a delivery check (lost / duplicated / out of order),
//! errors, and the server's memory and CPU. `--idle` measures memory per idle connection;
//! `--presence` the visitor list (snapshot time, delta latency under churn, memory per visitor).

mod api;
mod client;
mod console;
mod fixtures;
mod idle;
mod load;
mod presence;
mod stats;
mod sys;
mod target;
mod ws;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::client::LoadParams;
use crate::target::{SpawnOpts, Target};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "hark-bench",
    about = "Load generator for Hark: visitors and agents over real WebSockets",
    after_help = "Sending lasts --warmup + --duration seconds; only the last --duration seconds are measured."
)]
struct Cli {
    /// Start this `hark` binary (`hark serve` on a free loopback port, fresh data dir) and stop it at the end.
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    spawn: Option<PathBuf>,
    /// An existing server on loopback, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Another node of the same cluster as --url (repeatable): visitors and agents are spread
    /// over all the nodes round robin, so that messages cross nodes.
    #[arg(long, value_name = "URL", requires = "url")]
    also_url: Vec<String>,
    /// Admin login of the existing server (--url).
    #[arg(long)]
    admin_email: Option<String>,
    /// Admin password of the existing server (--url).
    #[arg(long, env = "HARK_BENCH_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// Pid of the existing server, for RSS and CPU readings (--url).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Extra argument for `hark serve` (repeatable), with --spawn.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Config file for `hark serve --config`, with --spawn.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Keep the spawned server's data directory and log.
    #[arg(long)]
    keep_data: bool,

    /// Number of sites (visitors are spread over them round robin).
    #[arg(long, default_value_t = 1)]
    sites: usize,
    /// Visitor connections in total.
    #[arg(long, default_value_t = 100)]
    visitors: usize,
    /// Agent connections per site.
    #[arg(long, default_value_t = 1)]
    agents: usize,
    /// Messages per second sent by all visitors together (paced evenly).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Fraction (0..1) of received visitor messages an agent answers.
    #[arg(long, default_value_t = 0.0)]
    agent_reply_ratio: f64,
    /// Measured seconds of sending (after the warmup); in --idle mode, seconds to hold.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of sending before the measured window (excluded from stats).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds after sending stops to wait for outstanding acks and deliveries.
    #[arg(long, default_value_t = 5.0)]
    grace: f64,
    /// Message text size in bytes (the send timestamp prefix counts).
    #[arg(long, default_value_t = 32)]
    text_bytes: usize,
    /// New WebSocket connections per second during setup.
    #[arg(long, default_value_t = 1000.0)]
    connect_rate: f64,
    /// Idle mode: open --visitors connections, hold them for --duration, report memory per connection.
    #[arg(long)]
    idle: bool,
    /// Idle and presence modes: spread the visitor connections over this many child processes.
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Presence mode: --visitors on one site with a page in hello; agent consoles load the
    /// visitor list (--snapshots times) and follow --churn arrivals + departures per second.
    #[arg(long, conflicts_with = "idle")]
    presence: bool,
    /// Presence mode: arrivals + departures per second in total (half each), after the fill.
    #[arg(long, default_value_t = 1000.0)]
    churn: f64,
    /// Presence mode: how many times an agent console loads the list at the full population.
    #[arg(long, default_value_t = 3)]
    snapshots: usize,
    /// Presence mode: the server's `limits.presence_grace_ms`. With --spawn and no --config the
    /// bench starts the server with this value; departure latencies are reported with it subtracted.
    #[arg(long, default_value_t = 0)]
    presence_grace_ms: u64,
    /// Write the machine-readable report here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    #[arg(long, hide = true)]
    idle_child: bool,
    #[arg(long, hide = true)]
    presence_child: bool,
    #[arg(long, hide = true, default_value_t = 0)]
    child_seed: u64,
    #[arg(long, hide = true)]
    child_site_keys: Option<String>,
    #[arg(long, hide = true)]
    source_ip: Option<IpAddr>,
    #[arg(long, hide = true, default_value_t = 600.0)]
    child_max_secs: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (soft, hard) = sys::raise_nofile_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hark-bench: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async move {
        if cli.idle_child || cli.presence_child {
            return child(cli).await;
        }
        if soft < (cli.visitors as u64 / cli.procs.max(1) as u64) + 100 {
            eprintln!(
                "warning: open-files limit is {soft} (hard {hard}); {} connections in one process will not fit — use --procs (with --idle or --presence)",
                cli.visitors / cli.procs.max(1)
            );
        }
        run(cli).await
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hark-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn child(cli: Cli) -> Result<()> {
    let url = cli.url.context("--idle-child needs --url")?;
    let keys: Vec<String> = cli
        .child_site_keys
        .context("--idle-child needs --child-site-keys")?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        bail!("--child-site-keys is empty");
    }
    if cli.presence_child {
        let cfg = presence::child_cfg(
            &url,
            keys[0].clone(),
            cli.visitors,
            cli.connect_rate,
            cli.churn,
            cli.source_ip,
            cli.child_seed,
        )?;
        return presence::child_main(cfg, cli.child_max_secs).await;
    }
    idle::child_main(
        &url,
        keys,
        cli.visitors,
        cli.connect_rate,
        cli.source_ip,
        cli.child_max_secs,
    )
    .await
}

fn validate(cli: &Cli) -> Result<()> {
    if cli.spawn.is_none() && cli.url.is_none() {
        bail!("give a target: --spawn <path to hark> or --url http://127.0.0.1:PORT");
    }
    if cli.url.is_some() && (cli.admin_email.is_none() || cli.admin_password.is_none()) {
        bail!("--url needs --admin-email and --admin-password (or HARK_BENCH_ADMIN_PASSWORD)");
    }
    if cli.sites == 0 {
        bail!("--sites must be at least 1");
    }
    if !(0.0..=1.0).contains(&cli.agent_reply_ratio) {
        bail!("--agent-reply-ratio must be within 0..=1");
    }
    if !(cli.duration > 0.0 && cli.duration.is_finite()) || cli.warmup < 0.0 || cli.grace < 0.0 {
        bail!("--duration must be > 0, --warmup and --grace >= 0");
    }
    if !(cli.rate >= 0.0 && cli.rate.is_finite()) || cli.connect_rate <= 0.0 {
        bail!("--rate must be >= 0 and --connect-rate > 0");
    }
    if cli.procs == 0 {
        bail!("--procs must be at least 1");
    }
    if cli.procs > 1 && !cli.idle && !cli.presence {
        bail!("--procs is for --idle and --presence runs only");
    }
    if cli.presence {
        if cli.visitors == 0 {
            bail!("--presence needs --visitors > 0");
        }
        if !(cli.churn >= 0.0 && cli.churn.is_finite()) {
            bail!("--churn must be >= 0");
        }
        if cli.snapshots == 0 {
            bail!("--snapshots must be at least 1");
        }
        if cli.config.is_some() && cli.spawn.is_some() {
            eprintln!(
                "note: with --config the server's grace period comes from that file; departures are reported minus --presence-grace-ms = {} ms",
                cli.presence_grace_ms
            );
        }
        return Ok(());
    }
    if cli.text_bytes > hark_protocol::MAX_TEXT_BYTES {
        bail!(
            "--text-bytes must be at most {}",
            hark_protocol::MAX_TEXT_BYTES
        );
    }
    if !cli.idle {
        if cli.visitors == 0 && cli.rate > 0.0 {
            bail!("--rate > 0 needs --visitors > 0");
        }
        if cli.visitors > 0 {
            let per = cli.rate / cli.visitors as f64;
            if per > 8.0 {
                eprintln!(
                    "warning: {per:.1} msgs/s per visitor is above 8/s; the server allows 10/s per connection (burst 20), expect rate_limited errors — use at least {} visitors",
                    (cli.rate / 8.0).ceil()
                );
            }
        }
        if cli.agent_reply_ratio > 0.0 && cli.agents > 0 {
            let per_agent = cli.rate * cli.agent_reply_ratio / (cli.sites * cli.agents) as f64;
            if per_agent > 24.0 {
                eprintln!(
                    "warning: each agent would reply {per_agent:.1} times/s; the server allows agents 30/s by default, expect rate_limited errors"
                );
            }
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    validate(&cli)?;
    // Presence runs on a spawned server get a config with the grace period asked for.
    let mut temp_config: Option<PathBuf> = None;
    if cli.presence && cli.spawn.is_some() && cli.config.is_none() {
        let path = std::env::temp_dir().join(format!(
            "hark-bench-presence-{}-{}.toml",
            std::process::id(),
            target::random_token(6)
        ));
        std::fs::write(
            &path,
            format!("[limits]\npresence_grace_ms = {}\n", cli.presence_grace_ms),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        temp_config = Some(path);
    }
    let config = cli.config.clone().or_else(|| temp_config.clone());
    let spawned = match &cli.spawn {
        Some(path) => Some(
            Target::spawn(SpawnOpts {
                hark: path,
                server_args: &cli.server_args,
                config: config.as_deref(),
                keep: cli.keep_data,
            })
            .await,
        ),
        None => None,
    };
    if let Some(p) = &temp_config {
        let _ = std::fs::remove_file(p);
    }
    let mut target = match spawned {
        Some(t) => {
            let t = t?;
            eprintln!(
                "spawned hark serve (pid {}) on {}, log {}",
                t.server_pid.map_or("?".to_owned(), |p| p.to_string()),
                t.base_url,
                t.log_path()
                    .map_or("-".to_owned(), |p| p.display().to_string())
            );
            t
        }
        None => Target::existing(
            cli.url.as_deref().unwrap_or_default(),
            cli.admin_email.clone().unwrap_or_default(),
            cli.admin_password.clone().unwrap_or_default(),
            cli.server_pid,
        )?,
    };
    let outcome = if cli.presence {
        presence::run(
            &mut target,
            presence::PresenceParams {
                visitors: cli.visitors,
                procs: cli.procs,
                connect_rate: cli.connect_rate,
                churn: cli.churn,
                warmup: cli.warmup,
                duration: cli.duration,
                settle: cli.grace,
                snapshots: cli.snapshots,
                grace_ms: cli.presence_grace_ms,
            },
        )
        .await
    } else if cli.idle {
        idle::run(
            &mut target,
            idle::IdleParams {
                visitors: cli.visitors,
                procs: cli.procs,
                sites: cli.sites,
                connect_rate: cli.connect_rate,
                duration: cli.duration,
            },
        )
        .await
    } else {
        let also = cli
            .also_url
            .iter()
            .map(|u| target::parse_loopback_url(u).map(|(_, addr, host)| (addr, host)))
            .collect::<Result<Vec<_>>>()?;
        load::run(
            &mut target,
            LoadParams {
                sites: cli.sites,
                visitors: cli.visitors,
                agents_per_site: cli.agents,
                rate: cli.rate,
                reply_ratio: cli.agent_reply_ratio,
                duration: cli.duration,
                warmup: cli.warmup,
                grace: cli.grace,
                text_bytes: cli.text_bytes,
                connect_rate: cli.connect_rate,
                also,
            },
        )
        .await
    };
    let report = match outcome {
        Ok(r) => r,
        Err(e) => {
            let tail = target.log_tail(30);
            target.shutdown(cli.keep_data).await;
            if tail.is_empty() {
                return Err(e);
            }
            return Err(e.context(format!("server log tail:\n{tail}")));
        }
    };
    target.shutdown(cli.keep_data).await;
    if cli.presence {
        presence::print(&report);
    } else if cli.idle {
        idle::print(&report);
    } else {
        load::print(&report);
    }
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
