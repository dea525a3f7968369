//! The node: wiring of store, bus, hub and committer behind the HTTP edge, and its lifecycle.
//!
//! `Server::build` opens everything and binds the listener (port 0 works, for tests);
//! `Server::run` serves until the shutdown future resolves, then drains: it stops accepting, asks
//! every client to reconnect elsewhere with jitter, lets the sends already read commit and be
//! acknowledged, and exits. The binary and the tests start nodes through this same path.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::VisitorTokens;
use crate::bus::{Bus, LocalBus, NatsBus};
use crate::config::Config;
use crate::delivery::committer::Committer;
use crate::delivery::hub::Hub;
use crate::gateway;
use crate::gateway::error::ApiError;
use crate::presence::client_info::GeoIp;
use crate::presence::Presence;
use crate::rate::TokenBucket;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("joining the cluster bus: {0}")]
    Bus(#[from] crate::bus::nats::NatsError),
    #[error("serving: {0}")]
    Serve(std::io::Error),
    #[error("{0}")]
    GeoIp(#[from] crate::presence::client_info::GeoIpError),
}

/// Admission control for new realtime connections: a rate of new connections per second and a
/// ceiling on open ones, so a herd of reconnecting clients is told to come back later instead of
/// melting the node.
pub struct Admission {
    /// Held for the duration of one `take` (no `.await` inside), so a std mutex fits.
    accepts: Mutex<TokenBucket>,
    open: Arc<Semaphore>,
    pub max_connections: usize,
}

impl Admission {
    fn new(per_sec: u32, max_connections: usize) -> Admission {
        Admission {
            accepts: Mutex::new(TokenBucket::new(per_sec, per_sec, Instant::now())),
            open: Arc::new(Semaphore::new(max_connections)),
            max_connections,
        }
    }

    /// A permit to hold for the connection's life, or the error to answer with.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        let rate = self
            .accepts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(Instant::now());
        if let Err(wait) = rate {
            metrics::counter!("hark_connections_refused_total", "reason" => "rate").increment(1);
            return Err(ApiError::overloaded(wait.as_secs().max(1)));
        }
        self.open.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("hark_connections_refused_total", "reason" => "full").increment(1);
            ApiError::overloaded(5)
        })
    }
}

pub struct AppInner {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub hub: Hub,
    /// Who is online: visitor list and agent availability, as leases.
    pub presence: Presence,
    pub bus: Arc<dyn Bus>,
    pub committer: Committer,
    pub tokens: VisitorTokens,
    pub metrics: PrometheusHandle,
    /// Cancelled when the node starts draining; every connection task listens to it.
    pub shutdown: CancellationToken,
    pub draining: AtomicBool,
    /// Every connection task, so that a drain can wait for them.
    pub tracker: TaskTracker,
    pub admission: Admission,
    /// Agent sessions with live sockets on this node.
    pub live_sessions: crate::gateway::session::LiveSessions,
}

/// Shared state of a node; a cheap handle.
#[derive(Clone)]
pub struct App(pub Arc<AppInner>);

impl std::ops::Deref for App {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl App {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// The process-wide metrics recorder (the `metrics` facade has one global recorder, so several
/// nodes in one test process share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let sizes = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 512.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("hark_store_batch_size".into()), &sizes)
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then ours just stays unused.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Raises this process's soft limit of open files to the hard limit, so one node can hold as
/// many sockets as the machine allows. Returns (soft, hard) after the change.
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Opens the store the configuration names.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    if let Some(url) = &config.database {
        let url = url.expose();
        // A malformed URL is the operator's mistake, not an outage: say so before connecting.
        crate::store::postgres::check_url(url)
            .map_err(|e| StartError::Unsupported(format!("--database: {e}")))?;
        let store = crate::store::postgres::PostgresStore::open(
            url,
            crate::store::postgres::PostgresOptions::default(),
        )
        .await?;
        return Ok(Arc::new(store));
    }
    let store = SqliteStore::open(&config.data_dir).await?;
    Ok(Arc::new(store))
}

/// The GeoIP database, when one is configured.
fn open_geoip(config: &Config) -> Result<Option<GeoIp>, StartError> {
    match &config.geoip {
        None => Ok(None),
        Some(path) => {
            let geo = GeoIp::open(path)?;
            tracing::info!(path = %path.display(), kind = geo.database_type(), "GeoIP database loaded");
            Ok(Some(geo))
        }
    }
}

pub struct Server {
    listener: TcpListener,
    app: App,
    committer_task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn build(config: Config) -> Result<Server, StartError> {
        let store = open_store(&config).await?;
        let key = store
            .secret(
                "visitor_token_key",
                crate::domain::random_token(32).into_bytes(),
            )
            .await?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        // The recorder first: metrics set while connecting (the bus's state) must not be lost.
        let metrics = metrics_handle();
        let hub = Hub::new();
        // One node needs no bus; with NATS servers given, the node joins a cluster.
        let (bus, nats): (Arc<dyn Bus>, _) = if config.nats.is_empty() {
            (Arc::new(LocalBus::new(hub.clone())), None)
        } else {
            let bus = NatsBus::connect(&config.nats, hub.clone(), store.clone()).await?;
            let link = (bus.client(), bus.incarnation());
            (Arc::new(bus), Some(link))
        };
        let (committer, committer_task) = Committer::spawn(
            store.clone(),
            bus.clone(),
            config.limits.commit_queue,
            config.limits.commit_batch,
        );
        let max_connections = match config.limits.max_connections {
            0 => {
                let (soft, _) = raise_open_files_limit().unwrap_or((1024, 1024));
                (soft as usize).saturating_sub(256).max(64)
            }
            n => n,
        };
        let admission = Admission::new(config.limits.accepts_per_sec, max_connections);
        let shutdown = CancellationToken::new();
        let presence = Presence::new(hub.clone(), config.limits.presence(), open_geoip(&config)?);
        presence.spawn_sweeper(shutdown.clone());
        if let Some((client, node)) = nats {
            crate::presence::cluster::start(presence.clone(), client, node, shutdown.clone());
        }
        // Histogram samples are kept raw until an upkeep folds them in; without a scraper they
        // would grow without bound, so fold them in regularly.
        let upkeep = metrics.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => upkeep.run_upkeep(),
                    _ = stop.cancelled() => break,
                }
            }
        });
        let app = App(Arc::new(AppInner {
            config,
            store,
            hub,
            presence,
            bus,
            committer,
            tokens: VisitorTokens::new(key),
            metrics,
            shutdown,
            draining: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            admission,
            live_sessions: Default::default(),
        }));
        Ok(Server {
            listener,
            app,
            committer_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.app.config.listen)
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let Server {
            listener,
            app,
            committer_task,
        } = self;
        let router = gateway::router(app.clone());
        let token = app.shutdown.clone();
        let drain_flag = app.clone();
        let serve_done = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            drain_flag.draining.store(true, Ordering::Relaxed);
            token.cancel();
        });
        // Small frames must leave at once: without TCP_NODELAY, Nagle's algorithm holds a frame
        // back until the client's delayed ACK, adding tens of milliseconds to a delivery.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
        });
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { serve_done.cancelled().await })
        .await
        .map_err(StartError::Serve)?;

        tracing::info!(connections = app.hub.connections(), "draining");
        app.tracker.close();
        let drain = app.config.limits.drain();
        if tokio::time::timeout(drain, app.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = app.tracker.len(),
                "drain timed out; closing the rest"
            );
        }
        let store = app.store.clone();
        drop(app);
        // The committer finishes what it holds once every handle is gone.
        if tokio::time::timeout(Duration::from_secs(10), committer_task)
            .await
            .is_err()
        {
            tracing::warn!("committer did not finish in time");
        }
        drop(store);
        tracing::info!("stopped");
        Ok(())
    }
}
