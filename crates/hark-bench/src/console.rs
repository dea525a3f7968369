//! An agent console watching one site's visitor list over a real WebSocket: it loads the
//! snapshot (timed from its `hello`), keeps a copy from the deltas that follow, and records when
//! each visitor first appeared (`visitor`) and when each left (`visitor_gone`), on the machine's
//! monotonic clock (`sys::mono_ns`), so that they can be matched with the times the visitors'
//! side took.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, Result};
use futures_util::StreamExt;
use hark_protocol::{ClientFrame, ListMode, ServerFrame};
use http::header::{HeaderName, AUTHORIZATION};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::sys::mono_ns;
use crate::ws::{self, close_key, ConnectSpec};

/// How the snapshot load went, in ms from sending `hello` (`connect_ms` is before it).
#[derive(Debug, Clone, Default)]
pub struct SnapshotTimes {
    pub connect_ms: f64,
    pub welcome_ms: Option<f64>,
    pub first_list_ms: Option<f64>,
    pub done_ms: Option<f64>,
    pub ready_ms: Option<f64>,
    /// Bytes of the `visitor_list` frames (the JSON text).
    pub bytes: u64,
    pub frames: u64,
    /// Visitors in the loaded list.
    pub visitors: usize,
}

impl SnapshotTimes {
    pub fn json(&self) -> Value {
        let r = |v: Option<f64>| v.map(|x| (x * 10.0).round() / 10.0);
        json!({
            "connect_ms": (self.connect_ms * 10.0).round() / 10.0,
            "welcome_ms": r(self.welcome_ms),
            "first_list_frame_ms": r(self.first_list_ms),
            "done_ms": r(self.done_ms),
            "ready_ms": r(self.ready_ms),
            "bytes": self.bytes,
            "frames": self.frames,
            "visitors": self.visitors,
        })
    }
}

#[derive(Default)]
pub struct ConsoleState {
    pub snapshot: SnapshotTimes,
    pub loaded: bool,
    pub version: u64,
    pub copy: HashSet<String>,
    pending: Option<HashSet<String>>,
    /// visitor id → when its first `visitor` delta arrived.
    pub first_seen: HashMap<String, u64>,
    /// visitor id → when its `visitor_gone` arrived.
    pub gone_at: HashMap<String, u64>,
    pub deltas: u64,
    pub out_of_order: u64,
    pub other_frames: BTreeMap<String, u64>,
    pub pings: u64,
    pub ended: Option<String>,
}

pub struct Console {
    pub label: String,
    state: Arc<Mutex<ConsoleState>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

pub struct ConsoleSpec {
    pub addr: SocketAddr,
    pub host: String,
    pub token: String,
    pub site_id: String,
}

fn lock(m: &Mutex<ConsoleState>) -> MutexGuard<'_, ConsoleState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Console {
    /// Connects and starts loading; returns at once (see `wait_loaded`).
    pub async fn start(label: &str, spec: ConsoleSpec) -> Result<Console> {
        let headers: Vec<(HeaderName, String)> =
            vec![(AUTHORIZATION, format!("Bearer {}", spec.token))];
        let t_connect = mono_ns();
        let mut conn = ws::connect(&ConnectSpec {
            addr: spec.addr,
            host: &spec.host,
            path: "/ws/agent",
            headers: &headers,
            source_ip: None,
            read_buffer: 256 * 1024,
            timeout: Duration::from_secs(15),
        })
        .await
        .map_err(|e| anyhow!("console {label}: {e}"))?;
        let t_hello = mono_ns();
        let state = Arc::new(Mutex::new(ConsoleState {
            snapshot: SnapshotTimes {
                connect_ms: (t_hello - t_connect) as f64 / 1e6,
                ..Default::default()
            },
            ..Default::default()
        }));
        ws::send_frame(
            &mut conn,
            &ClientFrame::Hello {
                token: None,
                resume: Vec::new(),
                page: None,
                presence: Vec::new(),
            },
        )
        .await
        .map_err(|e| anyhow!("console {label}: sending hello: {e}"))?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let st = state.clone();
        let site = spec.site_id.clone();
        let task = tokio::spawn(async move { run(conn, st, site, t_hello, stop_rx).await });
        Ok(Console {
            label: label.to_owned(),
            state,
            stop: stop_tx,
            task,
        })
    }

    pub fn state(&self) -> MutexGuard<'_, ConsoleState> {
        lock(&self.state)
    }

    /// Waits until the snapshot is loaded (`done`), the connection ended, or `within` passed.
    pub async fn wait_loaded(&self, within: Duration) -> Result<SnapshotTimes> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            {
                let s = self.state();
                if s.loaded && s.snapshot.ready_ms.is_some() {
                    return Ok(s.snapshot.clone());
                }
                if let Some(e) = &s.ended {
                    return Err(anyhow!(
                        "console {} ended before its list loaded: {e}",
                        self.label
                    ));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!(
                    "console {}: the list did not load within {within:?}",
                    self.label
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Closes the connection and waits for the task.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let abort = self.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }

    pub fn summary(&self) -> Value {
        let s = self.state();
        json!({
            "label": self.label,
            "snapshot": s.snapshot.json(),
            "list_size": s.copy.len(),
            "deltas": s.deltas,
            "out_of_order": s.out_of_order,
            "pings_answered": s.pings,
            "other_frames": s.other_frames,
            "ended": s.ended,
        })
    }
}

async fn run(
    mut conn: ws::Ws,
    state: Arc<Mutex<ConsoleState>>,
    site: String,
    t_hello: u64,
    mut stop: watch::Receiver<bool>,
) {
    let ms = |t: u64| (t.saturating_sub(t_hello)) as f64 / 1e6;
    loop {
        let msg = tokio::select! {
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(None)).await;
                    lock(&state).ended = Some("stopped by the bench".into());
                    return;
                }
                continue;
            }
            m = conn.next() => m,
        };
        let t = mono_ns();
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => {
                lock(&state).ended =
                    Some(format!("closed by the server: {}", close_key(f.as_ref())));
                return;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                lock(&state).ended = Some(format!("read error: {e}"));
                return;
            }
            None => {
                lock(&state).ended = Some("connection ended without a close".into());
                return;
            }
        };
        let frame = match serde_json::from_str::<ServerFrame>(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                let mut s = lock(&state);
                *s.other_frames
                    .entry(format!("undecodable: {e}"))
                    .or_insert(0) += 1;
                continue;
            }
        };
        if matches!(frame, ServerFrame::Ping) {
            lock(&state).pings += 1;
            if ws::send_frame(&mut conn, &ClientFrame::Pong).await.is_err() {
                lock(&state).ended = Some("write error on pong".into());
                return;
            }
            continue;
        }
        let mut s = lock(&state);
        match frame {
            ServerFrame::Welcome { .. } => s.snapshot.welcome_ms = Some(ms(t)),
            ServerFrame::Ready => {
                if s.snapshot.ready_ms.is_none() {
                    s.snapshot.ready_ms = Some(ms(t));
                }
            }
            ServerFrame::VisitorList {
                site_id,
                version,
                mode,
                visitors,
                gone,
                done,
                ..
            } if site_id == site => {
                if s.snapshot.first_list_ms.is_none() {
                    s.snapshot.first_list_ms = Some(ms(t));
                }
                if !s.loaded {
                    s.snapshot.bytes += text.len() as u64;
                    s.snapshot.frames += 1;
                }
                let mut target = match s.pending.take() {
                    Some(p) => p,
                    None => match mode {
                        ListMode::Snapshot => HashSet::new(),
                        ListMode::Changes => s.copy.clone(),
                    },
                };
                for g in gone {
                    target.remove(&g);
                }
                for v in visitors {
                    target.insert(v.visitor_id);
                }
                if done {
                    s.copy = target;
                    s.version = version;
                    if !s.loaded {
                        s.loaded = true;
                        s.snapshot.done_ms = Some(ms(t));
                        s.snapshot.visitors = s.copy.len();
                    }
                } else {
                    s.pending = Some(target);
                }
            }
            ServerFrame::Visitor {
                site_id,
                version,
                visitor,
            } if site_id == site => {
                s.deltas += 1;
                if version <= s.version {
                    s.out_of_order += 1;
                }
                s.version = s.version.max(version);
                let id = visitor.visitor_id;
                s.first_seen.entry(id.clone()).or_insert(t);
                s.copy.insert(id);
            }
            ServerFrame::VisitorGone {
                site_id,
                version,
                visitor_id,
                ..
            } if site_id == site => {
                s.deltas += 1;
                if version <= s.version {
                    s.out_of_order += 1;
                }
                s.version = s.version.max(version);
                s.copy.remove(&visitor_id);
                s.gone_at.entry(visitor_id).or_insert(t);
            }
            ServerFrame::AgentStatus {
                site_id, version, ..
            } if site_id == site => {
                if version <= s.version {
                    s.out_of_order += 1;
                }
                s.version = s.version.max(version);
                *s.other_frames.entry("agent_status".into()).or_insert(0) += 1;
            }
            other => {
                let name = serde_json::to_value(&other)
                    .ok()
                    .and_then(|v| v["type"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "?".into());
                *s.other_frames.entry(name).or_insert(0) += 1;
            }
        }
    }
}
