//! The `hark` binary: reads configuration, sets up logging and signals, and calls the library.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hark::config::{Config, LogFormat, Overrides};
use hark::domain::AgentRole;
use hark::server::{open_store, raise_open_files_limit, Server};

#[derive(Parser)]
#[command(name = "hark", version, about = "Self-hosted live chat for websites")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Manage sites and agents in the store the server uses.
    Admin {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

/// Where the data lives (shared by `serve` and `admin`).
#[derive(Args, Clone)]
struct StoreArgs {
    /// TOML configuration file.
    #[arg(long, env = "HARK_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Directory of the embedded store [default: ./hark-data].
    #[arg(long, env = "HARK_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// PostgreSQL URL (cluster mode) instead of the embedded store.
    #[arg(long, env = "HARK_DATABASE", global = true, hide_env_values = true)]
    database: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "HARK_LISTEN")]
    listen: Option<SocketAddr>,
    /// NATS servers, comma-separated (cluster mode).
    #[arg(long, env = "HARK_NATS")]
    nats: Option<String>,
    /// Public base URL when behind a proxy, e.g. https://chat.example.com.
    #[arg(long, env = "HARK_PUBLIC_URL")]
    public_url: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "HARK_LOG_FORMAT", value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    /// MaxMind GeoIP2/GeoLite2 City or Country database (.mmdb) for visitors' locations.
    #[arg(long, env = "HARK_GEOIP")]
    geoip: Option<PathBuf>,
    /// Take client addresses from X-Forwarded-For (right-most entry) or X-Real-IP, as set by the
    /// reverse proxy in front of Hark. `--trust-proxy` alone means true.
    #[arg(
        long,
        env = "HARK_TRUST_PROXY",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    trust_proxy: Option<bool>,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a site; prints its site key for the install snippet.
    CreateSite {
        #[arg(long)]
        name: String,
        /// An origin allowed to embed the chat, e.g. https://www.example.com (repeatable).
        #[arg(long = "origin")]
        origins: Vec<String>,
    },
    /// List sites.
    ListSites,
    /// Create an agent. The password is read from standard input (prompted on a terminal).
    CreateAgent {
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
        /// admin (manages everything) or agent.
        #[arg(long, default_value = "agent", value_parser = parse_role)]
        role: AgentRole,
        /// Site id the agent answers for (repeatable).
        #[arg(long = "site")]
        sites: Vec<String>,
    },
    /// List agents.
    ListAgents,
    /// Set an agent's password (read from standard input) and end its sessions.
    SetPassword {
        #[arg(long)]
        email: String,
    },
}

fn parse_role(s: &str) -> Result<AgentRole, String> {
    AgentRole::parse(s).ok_or_else(|| "role must be admin or agent".into())
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("log format must be text or json".into()),
    }
}

fn load_config(store: &StoreArgs, serve: Option<&ServeArgs>) -> anyhow::Result<Config> {
    let over = Overrides {
        data_dir: store.data_dir.clone(),
        database: store.database.clone(),
        listen: serve.and_then(|s| s.listen),
        nats: serve.and_then(|s| s.nats.clone()),
        public_url: serve.and_then(|s| s.public_url.clone()),
        log_format: serve.and_then(|s| s.log_format),
        geoip: serve.and_then(|s| s.geoip.clone()),
        trust_proxy: serve.and_then(|s| s.trust_proxy),
    };
    Ok(Config::load(store.config.as_deref(), over)?)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Reads a password: from a prompt without echo on a terminal, else one line of standard input.
fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let read_line = |prompt: &str| -> anyhow::Result<String> {
        if tty {
            eprint!("{prompt}");
            let _ = std::io::stderr().flush();
        }
        let _echo = tty.then(EchoOff::new);
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("reading the password")?;
        if tty {
            eprintln!();
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    };
    let pw = read_line("Password: ")?;
    if tty && read_line("Again: ")? != pw {
        bail!("the passwords differ");
    }
    if pw.is_empty() {
        bail!("no password given on standard input");
    }
    Ok(pw)
}

/// Turns terminal echo off while alive.
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: tcgetattr/tcsetattr only fill and read the termios struct we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return EchoOff(None);
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            EchoOff(Some(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the settings read in `new`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args.store, Some(&args))?;
    init_logging(config.log_format);
    match raise_open_files_limit() {
        Ok((soft, hard)) => tracing::info!(soft, hard, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not read the open files limit"),
    }
    // Where `hark admin` must look to reach this node's data; never the database password.
    let store_flag = match &config.database {
        Some(_) => "--database <the same postgres:// URL>".to_owned(),
        None => format!("--data-dir {}", config.data_dir.display()),
    };
    let public = config.public_url.clone();
    let server = Server::build(config).await?;
    let addr = server.local_addr();
    let url = public.unwrap_or_else(|| format!("http://{addr}"));
    let agents = server.app().store.count_agents().await?;
    println!("Hark is running at {url}  (try a chat by hand: {url}/try)");
    if agents == 0 {
        println!(
            "No agents yet. Create the first admin (it asks for a password):\n  hark admin {store_flag} create-agent --email you@example.com --name 'Your Name' --role admin"
        );
    }
    server.run(shutdown_signal()).await?;
    Ok(())
}

async fn admin(store_args: StoreArgs, cmd: AdminCommand) -> anyhow::Result<()> {
    let config = load_config(&store_args, None)?;
    let store = open_store(&config).await?;
    let store = store.as_ref();
    let mut out = std::io::stdout();
    match cmd {
        AdminCommand::CreateSite { name, origins } => {
            hark::admin::create_site(store, &name, &origins, &mut out).await?;
        }
        AdminCommand::ListSites => hark::admin::list_sites(store, &mut out).await?,
        AdminCommand::CreateAgent {
            email,
            name,
            role,
            sites,
        } => {
            let pw = read_password()?;
            hark::admin::create_agent(store, &email, &name, role, &sites, pw, &mut out).await?;
        }
        AdminCommand::ListAgents => hark::admin::list_agents(store, &mut out).await?,
        AdminCommand::SetPassword { email } => {
            let pw = read_password()?;
            hark::admin::set_password(store, &email, pw, &mut out).await?;
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Admin { store, command } => admin(store, command).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn serve_args(args: &[&str]) -> ServeArgs {
        let argv = ["hark", "serve"].iter().chain(args);
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Serve(a)) => a,
            _ => panic!("`hark serve {args:?}` does not parse"),
        }
    }

    #[test]
    fn trust_proxy_and_geoip_flags_parse() {
        Cli::command().debug_assert();
        assert_eq!(serve_args(&["--trust-proxy"]).trust_proxy, Some(true));
        assert_eq!(
            serve_args(&["--trust-proxy=false"]).trust_proxy,
            Some(false)
        );
        assert_eq!(serve_args(&["--trust-proxy=1"]).trust_proxy, Some(true));
        let a = serve_args(&["--trust-proxy", "--geoip", "/srv/GeoLite2-City.mmdb"]);
        assert_eq!(a.trust_proxy, Some(true));
        assert_eq!(a.geoip, Some(PathBuf::from("/srv/GeoLite2-City.mmdb")));
    }
}
