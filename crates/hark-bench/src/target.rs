//! The server under test: one the bench spawns itself, or an existing one on loopback.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::api::Api;

pub const ADMIN_EMAIL: &str = "bench-admin@example.com";

pub struct Target {
    /// `http://127.0.0.1:port`
    pub base_url: String,
    pub addr: SocketAddr,
    /// `host:port` for the `Host` header and ws:// URLs.
    pub host: String,
    pub server_pid: Option<u32>,
    pub admin_email: String,
    pub admin_password: String,
    child: Option<Child>,
    work_dir: Option<PathBuf>,
    log_path: Option<PathBuf>,
}

pub struct SpawnOpts<'a> {
    pub hark: &'a Path,
    pub server_args: &'a [String],
    pub config: Option<&'a Path>,
    pub keep: bool,
}

pub fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Resolves `http://host:port` and refuses anything that is not loopback.
pub fn parse_loopback_url(url: &str) -> Result<(String, SocketAddr, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("--url must start with http:// (got {url:?})"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    if hostport.is_empty() {
        bail!("--url has no host: {url:?}");
    }
    let with_port = if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {with_port}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| anyhow!("{with_port} resolves to no address"))?;
    if !addr.ip().is_loopback() {
        bail!("the bench only targets loopback servers; {with_port} resolves to {addr}");
    }
    Ok((format!("http://{hostport}"), addr, hostport.to_owned()))
}

impl Target {
    pub fn existing(
        url: &str,
        email: String,
        password: String,
        pid: Option<u32>,
    ) -> Result<Target> {
        let (base_url, addr, host) = parse_loopback_url(url)?;
        Ok(Target {
            base_url,
            addr,
            host,
            server_pid: pid,
            admin_email: email,
            admin_password: password,
            child: None,
            work_dir: None,
            log_path: None,
        })
    }

    /// Starts `hark serve` on a free loopback port with a fresh data directory, waits for
    /// `/readyz`, and bootstraps an admin through `hark admin create-agent`.
    pub async fn spawn(opts: SpawnOpts<'_>) -> Result<Target> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free loopback port")?
            .port();
        let work_dir = std::env::temp_dir().join(format!(
            "hark-bench-{}-{}",
            std::process::id(),
            random_token(6)
        ));
        let data_dir = work_dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let log_path = work_dir.join("server.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let log2 = log.try_clone().context("duplicating the log file handle")?;
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(opts.hark);
        cmd.arg("serve")
            .arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(&data_dir);
        if let Some(c) = opts.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(opts.server_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&work_dir);
                return Err(anyhow!(e).context(format!("starting {} serve", opts.hark.display())));
            }
        };
        let pid = child.id();
        let (base_url, addr, host) = parse_loopback_url(&format!("http://{listen}"))?;
        let mut target = Target {
            base_url,
            addr,
            host,
            server_pid: pid,
            admin_email: ADMIN_EMAIL.to_owned(),
            admin_password: random_token(24),
            child: Some(child),
            work_dir: Some(work_dir),
            log_path: Some(log_path),
        };
        if let Err(e) = target.bootstrap(opts.hark, &data_dir, opts.config).await {
            let tail = target.log_tail(40);
            target.shutdown(opts.keep).await;
            return Err(e.context(format!("server log tail:\n{tail}")));
        }
        Ok(target)
    }

    async fn bootstrap(
        &mut self,
        hark: &Path,
        data_dir: &Path,
        config: Option<&Path>,
    ) -> Result<()> {
        let api = Api::new(&self.base_url)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if api.ready().await {
                break;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("hark serve exited during startup with {status}");
                }
            }
            if Instant::now() > deadline {
                bail!("GET /readyz did not answer 200 within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut cmd = Command::new(hark);
        cmd.args(["admin", "create-agent", "--data-dir"])
            .arg(data_dir)
            .args([
                "--email",
                &self.admin_email,
                "--name",
                "Bench",
                "--role",
                "admin",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let mut admin = cmd.spawn().context("starting hark admin create-agent")?;
        if let Some(mut stdin) = admin.stdin.take() {
            let line = format!("{}\n", self.admin_password);
            stdin
                .write_all(line.as_bytes())
                .await
                .context("writing the admin password to hark admin create-agent")?;
            drop(stdin);
        }
        let out = tokio::time::timeout(Duration::from_secs(60), admin.wait_with_output())
            .await
            .map_err(|_| anyhow!("hark admin create-agent did not finish within 60 s"))?
            .context("waiting for hark admin create-agent")?;
        if !out.status.success() {
            bail!(
                "hark admin create-agent failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn log_path(&self) -> Option<&Path> {
        self.log_path.as_deref()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let Some(p) = &self.log_path else {
            return String::new();
        };
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether a spawned server is still running (always true for an existing one).
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Waits until `end`, checking every second that a spawned server still runs. Returns
    /// `false` (early) if it died.
    pub async fn hold_until(&mut self, end: std::time::Instant) -> bool {
        while std::time::Instant::now() < end {
            let next = (std::time::Instant::now() + std::time::Duration::from_secs(1)).min(end);
            tokio::time::sleep_until(next.into()).await;
            if !self.alive() {
                return false;
            }
        }
        true
    }

    /// Stops a spawned server (SIGTERM, then SIGKILL after 15 s) and removes its directory
    /// unless `keep`.
    pub async fn shutdown(&mut self, keep: bool) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // SAFETY: plain signal to our own child process.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
            match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("hark serve did not exit within 15 s of SIGTERM; killing it");
                    let _ = child.kill().await;
                }
            }
        }
        if let Some(dir) = self.work_dir.take() {
            if keep {
                eprintln!("kept the server directory {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}
