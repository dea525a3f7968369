//! Real `nats-server` processes for cluster tests, on free loopback ports, killed when dropped.
//! No mock: the tests exercise the same client, reconnection and cluster routing as production.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::DEADLINE;

/// The `nats-server` binary: on PATH, or where Debian's package puts it.
fn binary() -> String {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = std::path::Path::new(dir).join("nats-server");
        if p.is_file() {
            return p.to_string_lossy().into_owned();
        }
    }
    let debian = "/usr/sbin/nats-server";
    assert!(
        std::path::Path::new(debian).is_file(),
        "nats-server is not installed (scripts/test installs it: apt-get install nats-server)"
    );
    debian.to_owned()
}

/// A loopback port nobody listens on right now, for a server started next. Taken below Linux's
/// ephemeral range (32768–60999), where the outgoing connections of concurrent tests get their
/// local ports: a port from port 0 could be taken by one of them before the server binds it.
pub fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000")
}

pub struct NatsServer {
    pub port: u16,
    /// The monitoring port (`/routez`, `/connz`).
    pub monitor: u16,
    /// The cluster (route) port, for servers of a cluster.
    pub cluster: Option<u16>,
    args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// One server, no cluster.
    pub async fn start() -> NatsServer {
        let mut s = NatsServer::new(None, &[]);
        s.spawn();
        s.wait_accepting().await;
        s
    }

    /// `n` servers routed to each other as one cluster; returns once every route is up.
    pub async fn cluster(n: usize) -> Vec<NatsServer> {
        Self::cluster_with(n, false).await
    }

    /// Like [`NatsServer::cluster`], but the servers do not tell clients about each other
    /// (`--no_advertise`): a client then stays with the servers it was given, so a test can cut
    /// one node off NATS while the others stay connected.
    pub async fn cluster_unadvertised(n: usize) -> Vec<NatsServer> {
        Self::cluster_with(n, true).await
    }

    async fn cluster_with(n: usize, no_advertise: bool) -> Vec<NatsServer> {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut servers: Vec<NatsServer> = cluster_ports
            .iter()
            .map(|&p| {
                let routes: Vec<u16> = cluster_ports.iter().copied().filter(|&q| q != p).collect();
                let mut s = NatsServer::new(Some(p), &routes);
                if no_advertise {
                    s.args.push("--no_advertise=true".into());
                }
                s
            })
            .collect();
        for s in &mut servers {
            s.spawn();
        }
        for s in &servers {
            s.wait_accepting().await;
        }
        for s in &servers {
            s.wait_routes(n - 1).await;
        }
        servers
    }

    fn new(cluster: Option<u16>, routes: &[u16]) -> NatsServer {
        let (port, monitor) = (free_port(), free_port());
        let mut args: Vec<String> = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-m".into(),
            monitor.to_string(),
        ];
        if let Some(c) = cluster {
            args.extend([
                "--cluster_name".into(),
                "hark-test".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{c}"),
                "--routes".into(),
                routes
                    .iter()
                    .map(|r| format!("nats://127.0.0.1:{r}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]);
        }
        NatsServer {
            port,
            monitor,
            cluster,
            args,
            child: None,
        }
    }

    fn spawn(&mut self) {
        let child = Command::new(binary())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same ports; returns once it accepts connections.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_accepting().await;
    }

    /// Waits until the server accepts clients (it greets a connection with `INFO`).
    pub async fn wait_accepting(&self) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                let mut buf = [0u8; 4];
                if tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf)
                    .await
                    .is_ok()
                    && &buf == b"INFO"
                {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server on port {} did not start within {DEADLINE:?}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the server reports `n` routes to other servers.
    pub async fn wait_routes(&self, n: usize) {
        let url = format!("http://127.0.0.1:{}/routez", self.monitor);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let routes = async {
                let v: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
                v.get("num_routes")?.as_u64()
            }
            .await;
            if routes.is_some_and(|r| r as usize >= n) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server on port {} has {routes:?} routes, not {n}, after {DEADLINE:?}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many clients the server has now.
    pub async fn connections(&self) -> Option<u64> {
        let url = format!("http://127.0.0.1:{}/connz", self.monitor);
        let v: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
        v.get("num_connections")?.as_u64()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
