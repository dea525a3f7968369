//! Configuration: one typed struct, layered defaults → TOML file → environment → flags.
//!
//! The binary's flags (clap, with `env = "HARK_…"`) already merge flags over environment; this
//! module merges the result over the optional file and the defaults, and keeps secrets (the
//! database URL may carry a password) out of `Debug` output.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A value that must never be printed (logs, `Debug`, error messages).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Bounds that protect the node (`docs/protocol.md`, brief invariant 6).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Sustained sends per second per visitor connection.
    pub visitor_sends_per_sec: u32,
    pub visitor_send_burst: u32,
    /// Sustained sends per second per agent connection.
    pub agent_sends_per_sec: u32,
    pub agent_send_burst: u32,
    /// Frames of any kind per second per connection before the connection is closed as a flood.
    pub frames_per_sec: u32,
    pub frame_burst: u32,
    /// Outbound frames queued per connection before it is cut loose as a slow consumer. At least
    /// `commit_batch`: one commit may publish a whole batch to one agent at once.
    pub outbound_queue: usize,
    /// Sends of one connection waiting for their commit before it stops reading.
    pub in_flight_sends: usize,
    /// Messages waiting for the committer before new sends are shed with `overloaded`.
    pub commit_queue: usize,
    /// Messages one commit carries at most.
    pub commit_batch: usize,
    /// New WebSocket connections admitted per second (burst = one second's worth).
    pub accepts_per_sec: u32,
    /// Open WebSocket connections; 0 = as many as the open-files limit allows.
    pub max_connections: usize,
    /// Seconds without any frame before a connection is closed.
    pub idle_timeout_secs: u64,
    /// Seconds between server pings.
    pub heartbeat_secs: u64,
    /// Seconds a client has to send `hello`.
    pub hello_timeout_secs: u64,
    /// Seconds a drain waits for connections to finish before exiting anyway.
    pub drain_secs: u64,
    /// Largest jitter, in milliseconds, of the reconnect delay given to drained clients.
    pub reconnect_jitter_ms: u64,
    /// Milliseconds between pings to visitors. Shorter than agents': a visitor whose network
    /// vanished must leave the visitor list within 10 s, and silence is the only sign of it.
    pub visitor_heartbeat_ms: u64,
    /// Milliseconds without any frame after which a visitor connection's presence lease ends
    /// (it leaves the visitor list at once) and the connection is closed.
    pub visitor_lease_ms: u64,
    /// Milliseconds a visitor whose last tab closed stays listed, so that moving to the next
    /// page does not flap it out and back in.
    pub presence_grace_ms: u64,
    /// Seconds without console activity after which an available agent shows as away.
    pub agent_away_after_secs: u64,
    /// Typing frames per second per connection (excess ones are dropped: the next supersedes).
    pub typing_per_sec: u32,
    pub typing_burst: u32,
    /// Outbound frames queued per agent connection: agents also receive the visitor list's
    /// deltas, which come in bursts while a long snapshot is being written.
    pub agent_outbound_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            visitor_sends_per_sec: 10,
            visitor_send_burst: 20,
            agent_sends_per_sec: 30,
            agent_send_burst: 60,
            frames_per_sec: 100,
            frame_burst: 200,
            outbound_queue: 1024,
            in_flight_sends: 64,
            commit_queue: 5_000,
            commit_batch: 512,
            accepts_per_sec: 2_000,
            max_connections: 0,
            idle_timeout_secs: 25,
            heartbeat_secs: 10,
            hello_timeout_secs: 10,
            drain_secs: 10,
            reconnect_jitter_ms: 5_000,
            visitor_heartbeat_ms: 2_500,
            visitor_lease_ms: 6_000,
            presence_grace_ms: 3_000,
            agent_away_after_secs: 600,
            typing_per_sec: 4,
            typing_burst: 8,
            agent_outbound_queue: 8_192,
        }
    }
}

impl Limits {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs.max(1))
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(2))
    }
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_secs(self.hello_timeout_secs.max(1))
    }
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_secs)
    }
    pub fn visitor_heartbeat(&self) -> Duration {
        Duration::from_millis(self.visitor_heartbeat_ms.max(100))
    }
    pub fn visitor_lease(&self) -> Duration {
        Duration::from_millis(self.visitor_lease_ms.max(200))
    }
    pub fn presence(&self) -> crate::presence::PresenceConfig {
        crate::presence::PresenceConfig {
            visitor_lease: self.visitor_lease(),
            agent_lease: self.idle_timeout(),
            grace: Duration::from_millis(self.presence_grace_ms),
            away_after: Duration::from_secs(self.agent_away_after_secs.max(1)),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The whole configuration of a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `postgres://…`: use PostgreSQL instead of the embedded SQLite store.
    pub database: Option<Secret>,
    /// NATS servers for fan-out between nodes; empty = this node alone.
    pub nats: Vec<String>,
    /// Public base URL, when Hark sits behind a proxy (for printed links and snippets).
    pub public_url: Option<String>,
    pub log_format: LogFormat,
    /// A MaxMind GeoIP2/GeoLite2 City or Country database (`.mmdb`): visitors' approximate place.
    pub geoip: Option<PathBuf>,
    /// Take the client's address from the proxy's `X-Forwarded-For` (right-most entry) or
    /// `X-Real-IP` instead of the socket peer. Only behind a proxy that sets them.
    pub trust_proxy: bool,
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./hark-data"),
            database: None,
            nats: Vec::new(),
            public_url: None,
            log_format: LogFormat::Text,
            geoip: None,
            trust_proxy: false,
            limits: Limits::default(),
        }
    }
}

/// The TOML file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub database: Option<Secret>,
    pub nats: Option<Vec<String>>,
    pub public_url: Option<String>,
    pub log_format: Option<LogFormat>,
    pub geoip: Option<PathBuf>,
    pub trust_proxy: Option<bool>,
    pub limits: Option<Limits>,
}

/// What flags and environment said (clap merges those two).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub database: Option<String>,
    pub nats: Option<String>,
    pub public_url: Option<String>,
    pub log_format: Option<LogFormat>,
    pub geoip: Option<PathBuf>,
    pub trust_proxy: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Layers: defaults, then the file (if any), then flags/environment.
    pub fn load(file: Option<&Path>, over: Overrides) -> Result<Config, ConfigError> {
        let file_cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        Config::layer(file_cfg, over)
    }

    pub fn layer(file: FileConfig, over: Overrides) -> Result<Config, ConfigError> {
        let d = Config::default();
        let nats = match over.nats {
            Some(list) => split_list(&list),
            None => file.nats.unwrap_or(d.nats),
        };
        let cfg = Config {
            listen: over.listen.or(file.listen).unwrap_or(d.listen),
            data_dir: over.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            database: over
                .database
                .filter(|s| !s.trim().is_empty())
                .map(Secret::new)
                .or(file.database),
            nats,
            public_url: over.public_url.or(file.public_url),
            log_format: over.log_format.or(file.log_format).unwrap_or(d.log_format),
            geoip: over.geoip.or(file.geoip),
            trust_proxy: over
                .trust_proxy
                .or(file.trust_proxy)
                .unwrap_or(d.trust_proxy),
            limits: file.limits.unwrap_or(d.limits),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(db) = &self.database {
            let url = db.expose();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError::Invalid(
                    "--database must be a postgres:// URL (leave it out to use the embedded store)"
                        .into(),
                ));
            }
        }
        for n in &self.nats {
            if !n.starts_with("nats://") {
                return Err(ConfigError::Invalid(format!(
                    "--nats entries must be nats:// URLs, got {n:?}"
                )));
            }
        }
        let l = &self.limits;
        if l.outbound_queue == 0
            || l.commit_queue == 0
            || l.commit_batch == 0
            || l.in_flight_sends == 0
        {
            return Err(ConfigError::Invalid(
                "limits.outbound_queue, commit_queue, commit_batch and in_flight_sends must be > 0"
                    .into(),
            ));
        }
        if l.visitor_lease_ms < 2 * l.visitor_heartbeat_ms {
            return Err(ConfigError::Invalid(
                "limits.visitor_lease_ms must be at least twice limits.visitor_heartbeat_ms (a lease must survive one lost ping)"
                    .into(),
            ));
        }
        if l.agent_outbound_queue < l.outbound_queue {
            return Err(ConfigError::Invalid(
                "limits.agent_outbound_queue must be at least limits.outbound_queue".into(),
            ));
        }
        if l.outbound_queue < l.commit_batch {
            return Err(ConfigError::Invalid(
                "limits.outbound_queue must be at least limits.commit_batch (one commit's burst)"
                    .into(),
            ));
        }
        if l.visitor_sends_per_sec == 0
            || l.agent_sends_per_sec == 0
            || l.frames_per_sec == 0
            || l.accepts_per_sec == 0
        {
            return Err(ConfigError::Invalid("rate limits must be > 0".into()));
        }
        Ok(())
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_nothing() {
        let c = Config::layer(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("./hark-data"));
        assert!(c.database.is_none() && c.nats.is_empty());
    }

    #[test]
    fn flags_beat_file_beat_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            data_dir = "/srv/hark"
            nats = ["nats://a:4222"]
            [limits]
            outbound_queue = 2048
            "#,
        )
        .unwrap();
        let over = Overrides {
            listen: Some("0.0.0.0:7000".parse().unwrap()),
            nats: Some("nats://x:1, nats://y:2".into()),
            ..Overrides::default()
        };
        let c = Config::layer(file, over).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:7000");
        assert_eq!(c.data_dir, PathBuf::from("/srv/hark"));
        assert_eq!(c.nats, vec!["nats://x:1", "nats://y:2"]);
        assert_eq!(c.limits.outbound_queue, 2048);
        assert_eq!(c.limits.commit_batch, Limits::default().commit_batch);
    }

    #[test]
    fn geoip_and_trust_proxy_layer_like_the_rest() {
        let d = Config::layer(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!((d.geoip, d.trust_proxy), (None, false));

        let file = || -> FileConfig {
            toml::from_str(
                r#"
                geoip = "/srv/GeoLite2-City.mmdb"
                trust_proxy = true
                "#,
            )
            .unwrap()
        };
        let c = Config::layer(file(), Overrides::default()).unwrap();
        assert_eq!(c.geoip, Some(PathBuf::from("/srv/GeoLite2-City.mmdb")));
        assert!(c.trust_proxy);

        // Flags/environment beat the file, including an explicit `--trust-proxy=false`.
        let over = Overrides {
            geoip: Some("/opt/GeoLite2-Country.mmdb".into()),
            trust_proxy: Some(false),
            ..Overrides::default()
        };
        let c = Config::layer(file(), over).unwrap();
        assert_eq!(c.geoip, Some(PathBuf::from("/opt/GeoLite2-Country.mmdb")));
        assert!(!c.trust_proxy);
    }

    #[test]
    fn secrets_do_not_print_and_bad_values_are_refused() {
        let over = Overrides {
            database: Some("postgres://hark:hunter2@db/hark".into()),
            ..Overrides::default()
        };
        let c = Config::layer(FileConfig::default(), over).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let bad = Overrides {
            database: Some("mysql://x".into()),
            ..Overrides::default()
        };
        assert!(Config::layer(FileConfig::default(), bad).is_err());
        assert!(toml::from_str::<FileConfig>("unknown_key = 1").is_err());
    }
}
