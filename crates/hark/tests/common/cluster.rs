//! Processes for fault-injection tests, each of which a test may kill and start again: real
//! `hark serve` nodes (the binary Cargo built for the tests) and a private PostgreSQL 15
//! instance in a temporary directory (never the machine's shared one, which other tests use).
//! Every wait has a deadline; every process is killed when its handle is dropped.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sqlx::Connection;
use tokio::process::{Child, Command};

use super::nats::free_port;

/// The `hark` binary under test.
pub const HARK_BIN: &str = env!("CARGO_BIN_EXE_hark");

/// Where Debian's `postgresql-15` package puts the server programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// How long a process gets to start (or to stop) before the test fails.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Sends `sig` to `pid`; false if there is no such process.
pub fn signal(pid: u32, sig: i32) -> bool {
    // SAFETY: kill(2) with a pid we started; no memory is touched.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// The last `n` lines of a log file (for failure reports).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

/// A program on PATH or at one of the usual places.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A PostgreSQL 15 server of this test alone: its own data directory and port, trust
/// authentication on loopback. As root it runs as the `postgres` user through `runuser`
/// (PostgreSQL refuses to run as root); as anyone else, as that user. It can be killed with
/// SIGKILL and started again on the same port and data directory.
pub struct PrivatePostgres {
    pub port: u16,
    dir: tempfile::TempDir,
    /// The process started: `runuser` (the postmaster is its child) or the postmaster.
    child: Option<Child>,
    /// `runuser`, when running as root.
    runuser: Option<PathBuf>,
}

impl PrivatePostgres {
    /// Creates a cluster with `initdb` and starts it. Fails (never skips) when the tools are
    /// missing: this suite is part of the normal test run.
    pub async fn start() -> PrivatePostgres {
        let initdb = Path::new(PG_BIN).join("initdb");
        assert!(
            initdb.is_file() && Path::new(PG_BIN).join("postgres").is_file(),
            "the fault-injection test needs PostgreSQL 15's server programs in {PG_BIN} \
             (apt-get install postgresql-15)"
        );
        let dir = tempfile::Builder::new()
            .prefix("hark-pg-")
            .tempdir()
            .expect("tempdir");
        // SAFETY: geteuid has no preconditions.
        let runuser = if unsafe { libc::geteuid() } == 0 {
            let runuser = find_program("runuser").unwrap_or_else(|| {
                panic!(
                    "the fault-injection test runs its private PostgreSQL as user `postgres` \
                     through `runuser` when run as root (PostgreSQL refuses root), and runuser \
                     is not installed (util-linux)"
                )
            });
            let chown = std::process::Command::new("chown")
                .args(["postgres:", &dir.path().to_string_lossy()])
                .status()
                .expect("chown runs");
            assert!(
                chown.success(),
                "chown postgres: {} failed (is there a `postgres` user?)",
                dir.path().display()
            );
            Some(runuser)
        } else {
            None
        };
        let mut pg = PrivatePostgres {
            port: free_port(),
            dir,
            child: None,
            runuser,
        };
        let log = pg.log();
        let out = pg
            .command(&initdb)
            .arg("-D")
            .arg(pg.data())
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .stdin(Stdio::null())
            .output()
            .await
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::write(&log, &out.stdout);
        pg.start_again().await;
        pg
    }

    /// `program` as the user PostgreSQL runs as.
    fn command(&self, program: &Path) -> Command {
        match &self.runuser {
            Some(runuser) => {
                let mut c = Command::new(runuser);
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// The superuser's URL for the default database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let log = self.log();
        let child = self
            .command(&Path::new(PG_BIN).join("postgres"))
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "max_connections=100"])
            // The faults here kill processes, never the machine: what PostgreSQL has written
            // survives in the kernel either way, so syncing to disk would only add this shared
            // machine's disk stalls (seconds under a parallel build) to the commits. Commits stay
            // synchronous: a commit is written to the WAL before it is acknowledged.
            .args(["-c", "fsync=off"])
            .stdin(Stdio::null())
            .stdout(append(&log))
            .stderr(append(&log))
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
    }

    /// Starts the server (again, after [`PrivatePostgres::kill9`]) on the same port and data
    /// directory; returns once it accepts connections. After a kill the server first recovers
    /// from its WAL; it may also refuse to start while backends of the killed one still exit,
    /// so a start that ends at once is retried until the deadline.
    pub async fn start_again(&mut self) {
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        self.spawn();
        loop {
            if let Ok(Ok(c)) = tokio::time::timeout(
                Duration::from_secs(2),
                sqlx::PgConnection::connect(&self.url()),
            )
            .await
            {
                let _ = c.close().await;
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the private PostgreSQL did not accept connections within {START_DEADLINE:?}; \
                 its log ends with:\n{}",
                tail(&self.log(), 30)
            );
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.spawn();
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The postmaster's pid, from its lock file.
    fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Kills the postmaster with SIGKILL, as a crash would, and waits until it is gone. Its
    /// backends notice the postmaster's death and exit by themselves.
    pub async fn kill9(&mut self) {
        let pid = self
            .postmaster_pid()
            .expect("the private PostgreSQL runs (postmaster.pid)");
        assert!(signal(pid, libc::SIGKILL), "kill -9 {pid}");
        if let Some(mut c) = self.child.take() {
            tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .expect("the killed postmaster is reaped in time")
                .expect("wait");
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, which also ends the backends.
        if let Some(pid) = self.postmaster_pid() {
            signal(pid, libc::SIGQUIT);
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// One `hark serve` process of a cluster, on a fixed loopback port (kept across restarts, so
/// clients find it again), logging to a file that outlives its restarts.
pub struct HarkNode {
    pub name: String,
    pub port: u16,
    database: String,
    nats: Vec<String>,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl HarkNode {
    /// Starts a node on `database` and the NATS servers `nats` (in this order); returns once
    /// `/readyz` answers 200. Logs go to `<dir>/<name>.log`.
    pub async fn start(name: &str, dir: &Path, database: &str, nats: &[String]) -> HarkNode {
        let data_dir = dir.join(name);
        std::fs::create_dir_all(&data_dir).expect("node data dir");
        let mut node = HarkNode {
            name: name.to_owned(),
            port: free_port(),
            database: database.to_owned(),
            nats: nats.to_vec(),
            log: dir.join(format!("{name}.log")),
            data_dir,
            child: None,
        };
        node.start_again().await;
        node
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the process (again) on the same port; returns once it is ready.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let log = append(&self.log);
        let child = Command::new(HARK_BIN)
            .args(["serve", "--listen", &self.addr()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--database", &self.database])
            .args(["--nats", &self.nats.join(",")])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn hark");
        self.child = Some(child);
        let url = format!("http://{}/readyz", self.addr());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("http client");
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "{} exited while starting ({exited:?}); its log ends with:\n{}",
                self.name,
                tail(&self.log, 30)
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} was not ready within {START_DEADLINE:?}; its log ends with:\n{}",
                self.name,
                tail(&self.log, 30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal (SIGSTOP and SIGCONT freeze and thaw the node).
    pub fn send_signal(&self, sig: i32) {
        assert!(signal(self.pid(), sig), "signal {sig} to {}", self.name);
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .unwrap_or_else(|| panic!("{} does not run", self.name))
    }

    /// SIGKILL, then reaps the process.
    pub async fn kill9(&mut self) {
        assert!(signal(self.pid(), libc::SIGKILL), "kill -9 {}", self.name);
        if let Some(mut c) = self.child.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .expect("a killed node is reaped in time");
        }
    }

    /// SIGTERM (a drain), then waits for the process to exit; returns its exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        assert!(
            signal(self.pid(), libc::SIGTERM),
            "kill -TERM {}",
            self.name
        );
        let mut c = self.child.take().expect("running");
        match tokio::time::timeout(START_DEADLINE, c.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!(
                "{} did not exit within {START_DEADLINE:?} of SIGTERM; its log ends with:\n{}",
                self.name,
                tail(&self.log, 30)
            ),
        }
    }
}
