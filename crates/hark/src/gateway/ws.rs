//! The realtime endpoints, `/ws/visitor` and `/ws/agent` (`docs/protocol.md`).
//!
//! Each connection is one task that owns its socket and selects over: frames from the client,
//! events from the hub (its bounded outbound queue), outcomes of its sends from the committer,
//! the heartbeat, a kick (it fell behind) and the node's shutdown. One task per connection keeps
//! an idle connection small and makes the order of everything written to one socket obvious.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use hark_protocol::{
    close, ClientFrame, ConversationEvent, ErrorCode, ErrorFrame, Limits as WireLimits, ListResume,
    PageView, Party, ReconnectReason, ResumePoint, Role, ServerFrame, SessionInfo,
    DEFAULT_HISTORY_LIMIT, MAX_FRAME_BYTES, MAX_HISTORY_LIMIT, MAX_PREVIEW_BYTES,
};
use rand::Rng;
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::session::authenticate;
use crate::delivery::committer::{Outcome, Overloaded};
use crate::delivery::event::{
    conversation_event, Audience, CatchUp, Event, PresenceTargets, Signal, SignalKind, Targets,
};
use crate::delivery::hub::{ConnId, Interest, Subscriber};
use crate::delivery::outbox::{outbox, Inbox};
use crate::delivery::sequencer::{Delivered, Verdict};
use crate::domain::*;
use crate::presence::{AgentLease, ChatSeed, VisitorJoin, VisitorLease};
use crate::rate::TokenBucket;
use crate::server::App;
use crate::store::{Appended, ConversationFilter, NewMessage, SeqRange, StoreError};

/// How long one write to a client may block before the client counts as a slow consumer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an agent connection re-checks that its session still stands.
const SESSION_RECHECK: Duration = Duration::from_secs(30);
/// How long the close frame may take to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many queued events one wake-up writes before flushing the socket.
const WRITE_BATCH: usize = 64;
/// Malformed frames in a row before the connection is closed.
const MAX_VIOLATIONS: u32 = 10;
/// Resume entries accepted in one `hello`.
const MAX_RESUME: usize = 1000;
/// Open conversations listed in an agent's `welcome`.
const AGENT_SNAPSHOT: u32 = 500;
/// Conversations remembered as authorised per connection before the cache is reset.
const MAX_ALLOWED_CACHE: usize = 10_000;
/// Messages read from the store per page while resuming or filling a gap.
const BACKFILL_PAGE: u32 = 200;

static PING: &str = r#"{"type":"ping"}"#;
static PONG: &str = r#"{"type":"pong"}"#;
static READY: &str = r#"{"type":"ready"}"#;

#[derive(Deserialize)]
pub struct VisitorQuery {
    site_key: Option<String>,
}

fn configure(ws: WebSocketUpgrade) -> WebSocketUpgrade {
    // tungstenite allocates the read buffer up front; its default 128 KiB per connection would
    // dwarf everything else an idle connection holds. Chat frames are small, and the buffer grows
    // on demand for a larger one.
    ws.read_buffer_size(1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
}

type Upgrade = Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>;

/// The checks every upgrade starts with: not draining, and a WebSocket request at all.
fn admissible(app: &App, ws: Upgrade) -> Result<WebSocketUpgrade, ApiError> {
    if app.is_draining() {
        return Err(ApiError::draining(1));
    }
    ws.map_err(|_| ApiError::bad_request("expected a WebSocket upgrade request"))
}

pub async fn visitor_upgrade(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Query(q): Query<VisitorQuery>,
    headers: HeaderMap,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    let ws = admissible(&app, ws)?;
    let raw = q
        .site_key
        .ok_or_else(|| ApiError::bad_request("site_key is required"))?;
    let site = match SiteKey::parse(&raw) {
        Some(key) => app.store.site_by_key(&key).await?,
        None => None,
    }
    .ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "site_not_found",
            "no site has this key",
        )
    })?;
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .and_then(Origin::parse);
    if !origin.is_some_and(|o| site.allowed_origins.contains(&o)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this page's origin is not one of the site's allowed origins",
        ));
    }
    let permit = app.admission.admit()?;
    let client = Box::new(ClientFacts {
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| hark_protocol::truncate(s, 512)),
        ip: crate::presence::client_info::client_ip(peer, &headers, app.config.trust_proxy),
    });
    let who = Who::Visitor {
        site: site.id,
        client,
    };
    Ok(start(app, ws, who, permit))
}

/// Completes the upgrade and runs the connection as a tracked task (so a drain can wait for it).
fn start(app: App, ws: WebSocketUpgrade, who: Who, permit: OwnedSemaphorePermit) -> Response {
    configure(ws).on_upgrade(move |socket| {
        let tracker = app.tracker.clone();
        tracker.track_future(connection(app, socket, who, permit))
    })
}

pub async fn agent_upgrade(
    State(app): State<App>,
    headers: HeaderMap,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    let ws = admissible(&app, ws)?;
    // Cross-site WebSocket hijacking: a page elsewhere could open this socket with the agent's
    // cookie. Browsers always send Origin; it must name this very host.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(Origin::parse)
            .and_then(|o| o.as_str().split_once("://").map(|(_, h)| h.to_owned()));
        if origin_host.is_none() || origin_host != host {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "the agent console must be opened from this server",
            ));
        }
    }
    let authed = authenticate(&app, &headers, false).await?;
    let permit = app.admission.admit()?;
    let who = Who::Agent {
        agent: Box::new(authed.agent),
        session: authed.token_hash,
    };
    Ok(start(app, ws, who, permit))
}

/// What the upgrade request said about a visitor's browser, for the visitor list.
struct ClientFacts {
    user_agent: Option<String>,
    ip: std::net::IpAddr,
}

/// Who is on the other end, as known at the upgrade.
enum Who {
    Visitor {
        site: SiteId,
        client: Box<ClientFacts>,
    },
    Agent {
        agent: Box<Agent>,
        session: String,
    },
}

/// What `hello` carried.
struct Hello {
    token: Option<String>,
    resume: Vec<ResumePoint>,
    page: Option<PageView>,
    lists: Vec<ListResume>,
}

/// Who is on the other end, after `hello`.
enum Peer {
    Visitor {
        site: SiteId,
        visitor: VisitorId,
        /// The visitor's open conversation as last seen, for sends that name none.
        open: Option<ConversationId>,
        /// Boxed: presence state is rarely touched, and idle connections stay small.
        side: Box<VisitorSide>,
    },
    Agent(Box<AgentSide>),
}

struct VisitorSide {
    lease: VisitorLease,
    typing: TokenBucket,
}

struct AgentSide {
    agent: Agent,
    lease: AgentLease,
    typing: TokenBucket,
    /// The version of each site's visitor list this console holds.
    lists: std::collections::HashMap<SiteId, u64>,
}

impl Peer {
    /// The connection was heard from: its presence lease goes on.
    fn touch(&self) {
        match self {
            Peer::Visitor { side, .. } => side.lease.touch(),
            Peer::Agent(a) => a.lease.touch(),
        }
    }

    /// Whether the presence sweeper ended this connection's lease.
    fn lease_expired(&self) -> bool {
        match self {
            Peer::Visitor { side, .. } => side.lease.is_expired(),
            Peer::Agent(a) => a.lease.is_expired(),
        }
    }

    fn typing_allowed(&mut self) -> bool {
        let bucket = match self {
            Peer::Visitor { side, .. } => &mut side.typing,
            Peer::Agent(a) => &mut a.typing,
        };
        bucket.take(Instant::now()).is_ok()
    }
}

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client went away (close frame, reset, EOF).
    Gone,
    /// We close with this code and reason.
    Close(u16, &'static str),
    /// The node drains: finish the sends in flight, ask the client to come back, close.
    Drain,
    /// We cannot serve now (store down): ask the client to come back later.
    Unavailable,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::Gone => "client",
            End::Close(_, reason) => reason,
            End::Drain => "draining",
            End::Unavailable => "unavailable",
        }
    }
}

impl From<StoreError> for End {
    fn from(e: StoreError) -> End {
        tracing::warn!(error = %e, "store failed during a realtime request");
        End::Unavailable
    }
}

/// A send waiting for its commit.
struct Pending {
    client_id: String,
    msg: NewMessage,
    /// The visitor named no conversation: a closed one may be replaced by a new one, once.
    implicit: bool,
    outcome: Outcome,
}

type PendingFuture = Pin<Box<dyn std::future::Future<Output = Pending> + Send>>;

struct Conn {
    app: App,
    id: ConnId,
    ws: WebSocket,
    kick: CancellationToken,
    delivered: Delivered,
    /// Conversations this connection may touch, already checked against the store.
    allowed: HashSet<ConversationId>,
    pending: FuturesUnordered<PendingFuture>,
    sends: TokenBucket,
    frames: TokenBucket,
    last_heard: Instant,
    violations: u32,
    /// The agent's session token hash, re-checked while the connection lives.
    session: Option<String>,
    /// Cancelled when the agent's session ends on this node.
    revoked: CancellationToken,
    /// Frames were fed to the socket since the last flush.
    dirty: bool,
}

async fn connection(app: App, socket: WebSocket, who: Who, _permit: OwnedSemaphorePermit) {
    let role = match &who {
        Who::Visitor { .. } => "visitor",
        Who::Agent { .. } => "agent",
    };
    metrics::counter!("hark_connections_opened_total", "role" => role).increment(1);
    let now = Instant::now();
    let l = &app.config.limits;
    let (send_rate, send_burst) = match &who {
        Who::Visitor { .. } => (l.visitor_sends_per_sec, l.visitor_send_burst),
        Who::Agent { .. } => (l.agent_sends_per_sec, l.agent_send_burst),
    };
    let mut conn = Conn {
        id: app.hub.next_conn_id(),
        sends: TokenBucket::new(send_rate, send_burst, now),
        frames: TokenBucket::new(l.frames_per_sec, l.frame_burst, now),
        app: app.clone(),
        ws: socket,
        kick: CancellationToken::new(),
        delivered: Delivered::default(),
        allowed: HashSet::new(),
        pending: FuturesUnordered::new(),
        last_heard: now,
        violations: 0,
        session: None,
        revoked: CancellationToken::new(),
        dirty: false,
    };
    // An agent's socket lives only as long as its session.
    let session = match &who {
        Who::Agent { agent, session } => Some((agent.id, session.clone())),
        Who::Visitor { .. } => None,
    };
    let _watch = session.as_ref().map(|(agent, hash)| {
        app.live_sessions
            .watch(conn.id.0, *agent, hash, conn.revoked.clone())
    });
    conn.session = session.map(|(_, hash)| hash);
    let end = conn.serve(who).await;
    metrics::counter!("hark_connections_closed_total", "reason" => end.label()).increment(1);
    Box::pin(conn.finish(end)).await;
}

impl Conn {
    async fn serve(&mut self, who: Who) -> End {
        // The setup steps are boxed: an async fn's state is as large as its largest await point,
        // and every idle connection would otherwise carry the space of the rare, big ones.
        let hello = match Box::pin(self.await_hello()).await {
            Ok(h) => h,
            Err(end) => return end,
        };
        let l = &self.app.config.limits;
        let capacity = match who {
            Who::Visitor { .. } => l.outbound_queue,
            Who::Agent { .. } => l.agent_outbound_queue,
        };
        let (tx, mut rx) = outbox(capacity);
        let sub = Subscriber {
            conn: self.id,
            tx,
            kick: self.kick.clone(),
        };
        // Subscribe before reading the snapshot and the history, so nothing committed in
        // between can be missed; the sequencer drops what the snapshot already covered.
        let (peer, _registration) =
            match Box::pin(self.welcome(who, hello.token, hello.page, sub)).await {
                Ok(x) => x,
                Err(end) => return end,
            };
        let mut peer = peer;
        let resumed = match Box::pin(self.resume(&peer, hello.resume)).await {
            Ok(r) => r,
            Err(end) => return end,
        };
        if let Err(end) = Box::pin(self.after_resume(&mut peer, resumed, hello.lists)).await {
            return end;
        }
        if let Err(end) = self
            .write(Message::Text(Utf8Bytes::from_static(READY)))
            .await
        {
            return end;
        }
        match self.live(&mut peer, &mut rx).await {
            Ok(()) => End::Gone,
            Err(end) => end,
        }
    }

    async fn await_hello(&mut self) -> Result<Hello, End> {
        let deadline = tokio::time::Instant::now() + self.app.config.limits.hello_timeout();
        let shutdown = self.app.shutdown.clone();
        loop {
            let msg = tokio::select! {
                m = tokio::time::timeout_at(deadline, self.ws.recv()) => m,
                _ = shutdown.cancelled() => return Err(End::Drain),
            };
            let msg = match msg {
                Err(_) => return Err(End::Close(close::HELLO_TIMEOUT.0, close::HELLO_TIMEOUT.1)),
                Ok(None) => return Err(End::Gone),
                Ok(Some(m)) => m.map_err(read_error)?,
            };
            let frame = self.decode(msg).await?;
            if self.dirty {
                self.flush().await?;
            }
            match frame {
                Some(ClientFrame::Hello {
                    token,
                    resume,
                    page,
                    presence,
                }) => {
                    return Ok(Hello {
                        token,
                        resume,
                        page,
                        lists: presence,
                    })
                }
                Some(ClientFrame::Ping) => {
                    self.write(Message::Text(Utf8Bytes::from_static(PONG)))
                        .await?
                }
                Some(ClientFrame::Pong) | None => {}
                Some(_) => {
                    self.violation(ErrorFrame::new(
                        ErrorCode::HelloRequired,
                        "send hello first",
                    ))
                    .await?;
                    self.flush().await?;
                }
            }
        }
    }

    /// Identifies the client, registers it with the hub and sends `welcome`.
    async fn welcome(
        &mut self,
        who: Who,
        token: Option<String>,
        page: Option<PageView>,
        sub: Subscriber,
    ) -> Result<(Peer, crate::delivery::hub::Registration), End> {
        let app = self.app.clone();
        let l = &app.config.limits;
        let kick = sub.kick.clone();
        let (peer, registration, session, token, conversations, limits) = match who {
            Who::Visitor { site, client } => {
                let visitor = match token {
                    Some(t) => {
                        let known = match app.tokens.verify(&t, site) {
                            Ok(v) => app.store.visitor(v).await?.filter(|x| x.site_id == site),
                            Err(_) => None,
                        };
                        match known {
                            Some(v) => v,
                            None => {
                                let e = ErrorFrame::new(
                                    ErrorCode::Unauthorized,
                                    "visitor token is not valid here; connect again without it",
                                );
                                self.send(&ServerFrame::Error(e)).await?;
                                return Err(End::Close(
                                    close::UNAUTHORIZED.0,
                                    close::UNAUTHORIZED.1,
                                ));
                            }
                        }
                    }
                    None => app.store.create_visitor(site).await?,
                };
                let profile = (
                    visitor.name.clone(),
                    visitor.email.as_ref().map(|e| e.as_str().to_owned()),
                );
                let visitor = visitor.id;
                let registration = app.hub.register(sub, Interest::Visitor { site, visitor });
                let convs = app
                    .store
                    .list_conversations(&ConversationFilter {
                        visitor_id: Some(visitor),
                        site_ids: Some(vec![site]),
                        status: Some(Status::Open),
                        limit: 10,
                        ..Default::default()
                    })
                    .await?;
                let open = convs.first().map(|c| c.id);
                let chat = match convs.first() {
                    Some(c) if !app.presence.is_listed(site, visitor) => {
                        Box::pin(chat_seed(&app, c)).await?
                    }
                    _ => ChatSeed::default(),
                };
                let lease = app.presence.visitor_join(VisitorJoin {
                    site,
                    visitor,
                    conn: self.id,
                    kick,
                    page,
                    user_agent: client.user_agent,
                    ip: Some(client.ip),
                    name: profile.0,
                    email: profile.1,
                    chat,
                });
                let side = Box::new(VisitorSide {
                    lease,
                    typing: TokenBucket::new(l.typing_per_sec, l.typing_burst, Instant::now()),
                });
                (
                    Peer::Visitor {
                        site,
                        visitor,
                        open,
                        side,
                    },
                    registration,
                    SessionInfo::Visitor {
                        visitor_id: visitor.to_string(),
                        site_id: site.to_string(),
                    },
                    Some(app.tokens.issue(site, visitor)),
                    convs,
                    (l.visitor_sends_per_sec, l.visitor_send_burst),
                )
            }
            Who::Agent { agent, .. } => {
                let (interest, sites) = if agent.role == AgentRole::Admin {
                    (Interest::Everywhere, None)
                } else {
                    (
                        Interest::Agent {
                            sites: agent.site_ids.clone(),
                        },
                        Some(agent.site_ids.clone()),
                    )
                };
                let registration = app.hub.register(sub, interest);
                let convs = app
                    .store
                    .list_conversations(&ConversationFilter {
                        site_ids: sites,
                        status: Some(Status::Open),
                        limit: AGENT_SNAPSHOT,
                        ..Default::default()
                    })
                    .await?;
                let session = SessionInfo::Agent {
                    agent_id: agent.id.to_string(),
                    name: agent.name.clone(),
                    role: agent.role.as_str().to_owned(),
                    site_ids: agent.site_ids.iter().map(|s| s.to_string()).collect(),
                };
                let lease = app.presence.agent_join(&agent, self.id, kick);
                let side = Box::new(AgentSide {
                    agent: *agent,
                    lease,
                    typing: TokenBucket::new(l.typing_per_sec, l.typing_burst, Instant::now()),
                    lists: Default::default(),
                });
                (
                    Peer::Agent(side),
                    registration,
                    session,
                    None,
                    convs,
                    (l.agent_sends_per_sec, l.agent_send_burst),
                )
            }
        };
        for c in &conversations {
            self.delivered.start_at(c.id, c.last_seq);
            self.allowed.insert(c.id);
        }
        let welcome = ServerFrame::Welcome {
            role: match peer {
                Peer::Visitor { .. } => Role::Visitor,
                Peer::Agent(_) => Role::Agent,
            },
            session,
            token,
            conversations: conversations.iter().map(Conversation::view).collect(),
            heartbeat_ms: match peer {
                Peer::Visitor { .. } => l.visitor_heartbeat(),
                Peer::Agent(_) => l.heartbeat(),
            }
            .as_millis() as u64,
            limits: WireLimits {
                max_frame_bytes: MAX_FRAME_BYTES,
                max_text_bytes: hark_protocol::MAX_TEXT_BYTES,
                sends_per_sec: limits.0,
                send_burst: limits.1,
            },
        };
        self.send(&welcome).await?;
        Ok((peer, registration))
    }

    /// Sends each resumed conversation's missed messages, in order. Returns the conversations
    /// resumed.
    async fn resume(
        &mut self,
        peer: &Peer,
        points: Vec<ResumePoint>,
    ) -> Result<Vec<Conversation>, End> {
        let mut resumed = Vec::new();
        if points.len() > MAX_RESUME {
            let e = ErrorFrame::new(
                ErrorCode::BadRequest,
                format!("at most {MAX_RESUME} resume entries; the rest were ignored"),
            );
            self.send(&ServerFrame::Error(e)).await?;
        }
        for p in points.into_iter().take(MAX_RESUME) {
            let conv = match p.conversation_id.parse::<ConversationId>() {
                Ok(id) => self.app.store.conversation(id).await?,
                Err(_) => None,
            };
            let Some(conv) = conv.filter(|c| may_see(peer, c)) else {
                let e = ErrorFrame::new(ErrorCode::NotFound, "no such conversation")
                    .conversation_id(p.conversation_id);
                self.send(&ServerFrame::Error(e)).await?;
                continue;
            };
            self.allowed.insert(conv.id);
            let from = if p.seq > conv.last_seq {
                let mut e = ErrorFrame::new(
                    ErrorCode::SeqAhead,
                    "the conversation has fewer messages than the client holds",
                )
                .conversation_id(conv.id.to_string());
                e.last_seq = Some(conv.last_seq);
                self.send(&ServerFrame::Error(e)).await?;
                conv.last_seq
            } else if p.seq + 1 < conv.first_seq {
                let mut e = ErrorFrame::new(
                    ErrorCode::HistoryUnavailable,
                    "older messages of this conversation are no longer kept",
                )
                .conversation_id(conv.id.to_string());
                e.available_from_seq = Some(conv.first_seq);
                self.send(&ServerFrame::Error(e)).await?;
                conv.first_seq - 1
            } else {
                p.seq
            };
            self.delivered.start_at(conv.id, from);
            self.backfill(conv.id, None).await?;
            resumed.push(conv);
        }
        Ok(resumed)
    }

    /// What a client needs after its messages: visitors whether an agent is available, agents
    /// their visitor lists; both the other side's read marks of the conversations resumed (and
    /// a visitor's open one).
    async fn after_resume(
        &mut self,
        peer: &mut Peer,
        mut resumed: Vec<Conversation>,
        lists: Vec<ListResume>,
    ) -> Result<(), End> {
        let app = self.app.clone();
        match peer {
            Peer::Visitor {
                site,
                visitor,
                open,
                ..
            } => {
                let available = app.presence.agents_available(*site);
                self.send(&ServerFrame::Availability {
                    agents_available: available,
                })
                .await?;
                if let Some(c) = *open {
                    if !resumed.iter().any(|r| r.id == c) {
                        if let Some(conv) = app.store.conversation(c).await? {
                            resumed.push(conv);
                        }
                    }
                }
                let me = visitor.0;
                for conv in &resumed {
                    self.send_read_marks(conv, me).await?;
                }
            }
            Peer::Agent(side) => {
                let me = side.agent.id.0;
                for conv in &resumed {
                    self.send_read_marks(conv, me).await?;
                }
                let mut sites = side.agent.site_ids.clone();
                if side.agent.role == AgentRole::Admin {
                    for s in app.presence.sites() {
                        if !sites.contains(&s) {
                            sites.push(s);
                        }
                    }
                }
                for site in sites {
                    let held = lists.iter().find(|h| h.site_id == site.to_string());
                    let (version, frames) = app.presence.list(site, held);
                    side.lists.insert(site, version);
                    for f in frames {
                        self.feed(Message::Text(f.encode().into())).await?;
                        self.dirty = true;
                    }
                }
            }
        }
        if self.dirty {
            self.flush().await?;
        }
        Ok(())
    }

    /// The read marks of a conversation's other participants.
    async fn send_read_marks(&mut self, conv: &Conversation, me: uuid::Uuid) -> Result<(), End> {
        let marks = self.app.store.read_marks(conv.id).await?;
        for (reader, seq) in marks {
            if reader == me || seq == 0 {
                continue;
            }
            let (by, agent_id) = if reader == conv.visitor_id.0 {
                (Party::Visitor, None)
            } else {
                (Party::Agent, Some(reader.to_string()))
            };
            self.send(&ServerFrame::Read {
                conversation_id: conv.id.to_string(),
                by,
                agent_id,
                seq,
            })
            .await?;
        }
        Ok(())
    }

    /// Writes the stored messages after what the client holds, up to (not including) `until`, or
    /// all of them.
    async fn backfill(&mut self, conv: ConversationId, until: Option<Seq>) -> Result<(), End> {
        loop {
            let after = self.delivered.last(conv).unwrap_or(0);
            if until.is_some_and(|u| after + 1 >= u) {
                return Ok(());
            }
            let (msgs, more) = self
                .app
                .store
                .messages(conv, SeqRange::After(after), BACKFILL_PAGE)
                .await?;
            let n = msgs.len();
            for m in msgs {
                if until.is_some_and(|u| m.seq >= u) {
                    break;
                }
                self.feed(Message::Text(
                    ServerFrame::Message(m.body()).encode().into(),
                ))
                .await?;
                self.delivered.delivered(conv, m.seq);
                metrics::counter!("hark_messages_backfilled_total").increment(1);
            }
            self.flush().await?;
            if !more || n == 0 {
                return Ok(());
            }
        }
    }

    async fn live(&mut self, peer: &mut Peer, rx: &mut Inbox) -> Result<(), End> {
        let l = &self.app.config.limits;
        let (beat, idle_timeout, in_flight) = match peer {
            Peer::Visitor { .. } => (l.visitor_heartbeat(), l.visitor_lease(), l.in_flight_sends),
            Peer::Agent(_) => (l.heartbeat(), l.idle_timeout(), l.in_flight_sends),
        };
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.app.shutdown.clone();
        let kick = self.kick.clone();
        let revoked = self.revoked.clone();
        let mut session_checked = Instant::now();
        loop {
            let can_read = self.pending.len() < in_flight;
            tokio::select! {
                biased;
                _ = kick.cancelled() => {
                    // The kick also ends a presence lease that ran out.
                    if peer.lease_expired() {
                        return Err(End::Close(close::HEARTBEAT_TIMEOUT.0, close::HEARTBEAT_TIMEOUT.1));
                    }
                    return Err(End::Close(close::SLOW_CONSUMER.0, close::SLOW_CONSUMER.1));
                }
                _ = revoked.cancelled() => return Err(Box::pin(self.session_ended()).await),
                _ = shutdown.cancelled() => return Err(End::Drain),
                Some(done) = self.pending.next(), if !self.pending.is_empty() => {
                    Box::pin(self.on_outcome(peer, done)).await?;
                }
                ev = rx.pop() => {
                    self.on_event(peer, ev).await?;
                    for _ in 1..WRITE_BATCH {
                        match rx.try_pop() {
                            Some(ev) => self.on_event(peer, ev).await?,
                            None => break,
                        }
                    }
                    self.dirty = true;
                }
                msg = self.ws.recv(), if can_read => {
                    let Some(msg) = msg else { return Err(End::Gone) };
                    let msg = msg.map_err(read_error)?;
                    self.last_heard = Instant::now();
                    peer.touch();
                    if let Some(frame) = self.decode(msg).await? {
                        Box::pin(self.on_frame(peer, frame)).await?;
                    }
                }
                _ = heartbeat.tick() => {
                    if self.last_heard.elapsed() >= idle_timeout {
                        return Err(End::Close(close::HEARTBEAT_TIMEOUT.0, close::HEARTBEAT_TIMEOUT.1));
                    }
                    if session_checked.elapsed() >= SESSION_RECHECK {
                        session_checked = Instant::now();
                        if !Box::pin(self.session_valid(peer)).await? {
                            return Err(Box::pin(self.session_ended()).await);
                        }
                    }
                    self.feed(Message::Text(Utf8Bytes::from_static(PING))).await?;
                    self.dirty = true;
                }
                // Lowest priority: flush once nothing else is ready.
                _ = std::future::ready(()), if self.dirty => self.flush().await?,
            }
        }
    }

    /// Whether an agent's session still stands (not logged out, expired or disabled).
    async fn session_valid(&mut self, peer: &Peer) -> Result<bool, End> {
        let (Some(hash), Peer::Agent(side)) = (self.session.clone(), peer) else {
            return Ok(true);
        };
        let agent = &side.agent;
        let app = self.app.clone();
        let alive = app
            .store
            .session(&hash)
            .await?
            .is_some_and(|s| s.expires_at > now_ms() && s.agent_id == agent.id);
        Ok(alive
            && app
                .store
                .agent(agent.id)
                .await?
                .is_some_and(|a| !a.disabled))
    }

    /// Tells an agent its session ended and closes with `4003 unauthorized`.
    async fn session_ended(&mut self) -> End {
        let e = ErrorFrame::new(
            ErrorCode::Unauthorized,
            "your session has ended; log in again",
        );
        if let Err(end) = self.send(&ServerFrame::Error(e)).await {
            return end;
        }
        End::Close(close::UNAUTHORIZED.0, close::UNAUTHORIZED.1)
    }

    /// Queues one event's frame for the socket (the caller flushes).
    async fn on_event(&mut self, peer: &mut Peer, ev: Event) -> Result<(), End> {
        match ev {
            Event::Message(m) => match self.delivered.verdict(m.conversation_id, m.seq) {
                Verdict::Stale => Ok(()),
                Verdict::Next => {
                    self.deliver(m.conversation_id, m.seq, &m.frame, m.committed_at)
                        .await
                }
                Verdict::Gap { .. } => {
                    metrics::counter!("hark_delivery_gaps_total").increment(1);
                    Box::pin(self.backfill(m.conversation_id, Some(m.seq))).await?;
                    self.deliver(m.conversation_id, m.seq, &m.frame, m.committed_at)
                        .await
                }
            },
            Event::Conversation(c) => {
                if matches!(
                    c.kind,
                    ConversationEvent::Opened | ConversationEvent::Reopened
                ) {
                    self.delivered
                        .start_if_unknown(c.conversation_id, c.last_seq);
                }
                if let Peer::Visitor { open, .. } = peer {
                    match c.kind {
                        ConversationEvent::Opened | ConversationEvent::Reopened => {
                            *open = Some(c.conversation_id)
                        }
                        ConversationEvent::Closed if *open == Some(c.conversation_id) => {
                            *open = None
                        }
                        _ => {}
                    }
                }
                self.remember(c.conversation_id);
                self.feed(Message::Text(c.frame.clone())).await
            }
            Event::CatchUp(c) => Box::pin(self.catch_up(peer, c)).await,
            Event::Signal(s) => self.feed(Message::Text(s.frame.clone())).await,
            Event::Presence(p) => match (peer, p.targets) {
                (Peer::Agent(side), PresenceTargets::Agents) => {
                    // Deltas the list already covers (it was read after they were queued).
                    let held = side.lists.entry(p.site_id).or_insert(0);
                    if p.version <= *held {
                        return Ok(());
                    }
                    *held = p.version;
                    metrics::histogram!("hark_presence_fanout_seconds")
                        .record(p.at.elapsed().as_secs_f64());
                    self.feed(Message::Text(p.frame.clone())).await
                }
                (Peer::Visitor { .. }, PresenceTargets::Visitors) => {
                    self.feed(Message::Text(p.frame.clone())).await
                }
                _ => Ok(()),
            },
        }
    }

    /// Fetches from the store what the bus may have lost of a conversation (`event::CatchUp`).
    async fn catch_up(&mut self, peer: &mut Peer, c: std::sync::Arc<CatchUp>) -> Result<(), End> {
        if self.delivered.last(c.conversation_id).is_none() {
            match &c.opened {
                // Opened while events were lost: announce it as the lost event would have.
                Some(opened) => {
                    self.on_event(peer, Event::Conversation(opened.clone()))
                        .await?
                }
                None => return Ok(()),
            }
        }
        if self
            .delivered
            .last(c.conversation_id)
            .is_some_and(|held| held < c.last_seq)
        {
            metrics::counter!("hark_delivery_catch_ups_total").increment(1);
            self.backfill(c.conversation_id, None).await?;
        }
        Ok(())
    }

    async fn deliver(
        &mut self,
        conv: ConversationId,
        seq: Seq,
        frame: &Utf8Bytes,
        committed_at: Instant,
    ) -> Result<(), End> {
        self.feed(Message::Text(frame.clone())).await?;
        self.delivered.delivered(conv, seq);
        metrics::counter!("hark_messages_delivered_total").increment(1);
        metrics::histogram!("hark_delivery_seconds").record(committed_at.elapsed().as_secs_f64());
        Ok(())
    }

    async fn on_frame(&mut self, peer: &mut Peer, frame: ClientFrame) -> Result<(), End> {
        self.violations = 0;
        match frame {
            ClientFrame::Hello { .. } => {
                self.send(&ServerFrame::Error(ErrorFrame::new(
                    ErrorCode::AlreadyHello,
                    "hello was already received",
                )))
                .await
            }
            ClientFrame::Send {
                client_id,
                conversation_id,
                text,
            } => self.on_send(peer, client_id, conversation_id, text).await,
            ClientFrame::History {
                req_id,
                conversation_id,
                before_seq,
                after_seq,
                limit,
            } => {
                self.on_history(peer, req_id, conversation_id, before_seq, after_seq, limit)
                    .await
            }
            ClientFrame::Page(page) => match peer {
                Peer::Visitor { side, .. } => {
                    side.lease.page_view(page);
                    Ok(())
                }
                Peer::Agent(_) => self.refuse("only visitors report pages").await,
            },
            ClientFrame::Identify { name, email } => {
                Box::pin(self.on_identify(peer, name, email)).await
            }
            ClientFrame::Typing {
                conversation_id,
                typing,
                preview,
            } => Box::pin(self.on_typing(peer, conversation_id, typing, preview)).await,
            ClientFrame::Read {
                conversation_id,
                seq,
            } => Box::pin(self.on_read(peer, conversation_id, seq)).await,
            ClientFrame::Status { status } => match peer {
                Peer::Agent(side) => {
                    self.app.presence.set_status(side.agent.id, status);
                    Ok(())
                }
                Peer::Visitor { .. } => self.refuse("only agents have a status").await,
            },
            ClientFrame::Active => match peer {
                Peer::Agent(side) => {
                    self.app.presence.agent_active(side.agent.id);
                    Ok(())
                }
                Peer::Visitor { .. } => self.refuse("only agents report activity").await,
            },
            ClientFrame::Ping => {
                self.write(Message::Text(Utf8Bytes::from_static(PONG)))
                    .await
            }
            ClientFrame::Pong => Ok(()),
        }
    }

    async fn refuse(&mut self, why: &str) -> Result<(), End> {
        self.send(&ServerFrame::Error(ErrorFrame::new(
            ErrorCode::BadRequest,
            why,
        )))
        .await
    }

    async fn on_identify(
        &mut self,
        peer: &mut Peer,
        name: Option<String>,
        email: Option<String>,
    ) -> Result<(), End> {
        let Peer::Visitor { site, visitor, .. } = peer else {
            return self.refuse("only visitors identify themselves").await;
        };
        let name = match name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
            None => None,
            Some(n) => match DisplayName::parse(n) {
                Some(n) => Some(n.into_string()),
                None => return self.refuse("name must be 1 to 200 characters").await,
            },
        };
        let email = match email.as_deref().map(str::trim).filter(|e| !e.is_empty()) {
            None => None,
            Some(e) => match Email::parse(e) {
                Some(e) => Some(e),
                None => return self.refuse("email is not a valid address").await,
            },
        };
        let (site, visitor) = (*site, *visitor);
        self.app
            .store
            .set_visitor_profile(visitor, name.clone(), email.clone())
            .await?;
        self.app
            .presence
            .set_profile(site, visitor, name, email.map(|e| e.as_str().to_owned()));
        Ok(())
    }

    async fn on_typing(
        &mut self,
        peer: &mut Peer,
        conversation_id: Option<String>,
        typing: bool,
        preview: Option<String>,
    ) -> Result<(), End> {
        if !peer.typing_allowed() {
            // The next typing frame supersedes this one; clients expire stale indicators.
            metrics::counter!("hark_typing_dropped_total").increment(1);
            return Ok(());
        }
        if let Peer::Agent(side) = peer {
            self.app.presence.agent_active(side.agent.id);
        }
        let conv = match conversation_id {
            None => None,
            Some(raw) => match raw.parse::<ConversationId>().ok() {
                Some(c) if self.may_touch(peer, c).await? => Some(c),
                _ => {
                    let e = ErrorFrame::new(ErrorCode::NotFound, "no such conversation")
                        .conversation_id(raw);
                    return self.send(&ServerFrame::Error(e)).await;
                }
            },
        };
        let signal = match peer {
            Peer::Visitor { site, visitor, .. } => Signal {
                audience: Audience {
                    site_id: *site,
                    visitor_id: *visitor,
                },
                targets: Targets::Agents,
                kind: SignalKind::Typing,
                frame: ServerFrame::Typing {
                    visitor_id: visitor.to_string(),
                    conversation_id: conv.map(|c| c.to_string()),
                    from: Party::Visitor,
                    agent_id: None,
                    typing,
                    preview: preview
                        .filter(|_| typing)
                        .map(|p| hark_protocol::truncate(&p, MAX_PREVIEW_BYTES)),
                }
                .encode()
                .into(),
            },
            Peer::Agent(side) => {
                let Some(c) = conv else {
                    return self.refuse("agents must name the conversation_id").await;
                };
                let Some(conv) = self.app.store.conversation(c).await? else {
                    return Ok(());
                };
                // An agent's draft never leaves the console: no preview.
                Signal {
                    audience: Audience {
                        site_id: conv.site_id,
                        visitor_id: conv.visitor_id,
                    },
                    targets: Targets::AgentsAndVisitor,
                    kind: SignalKind::Typing,
                    frame: ServerFrame::Typing {
                        visitor_id: conv.visitor_id.to_string(),
                        conversation_id: Some(c.to_string()),
                        from: Party::Agent,
                        agent_id: Some(side.agent.id.to_string()),
                        typing,
                        preview: None,
                    }
                    .encode()
                    .into(),
                }
            }
        };
        self.app.bus.publish(Event::Signal(Arc::new(signal)));
        Ok(())
    }

    async fn on_read(&mut self, peer: &mut Peer, raw: String, seq: Seq) -> Result<(), End> {
        if !peer.typing_allowed() {
            let e = ErrorFrame::new(
                ErrorCode::RateLimited,
                "too many read receipts; retry later",
            )
            .conversation_id(raw)
            .retry_after_ms(500);
            return self.send(&ServerFrame::Error(e)).await;
        }
        let conv = match raw.parse::<ConversationId>().ok() {
            Some(c) if self.may_touch(peer, c).await? => self.app.store.conversation(c).await?,
            _ => None,
        };
        let Some(conv) = conv else {
            let e =
                ErrorFrame::new(ErrorCode::NotFound, "no such conversation").conversation_id(raw);
            return self.send(&ServerFrame::Error(e)).await;
        };
        let (reader, by, agent_id) = match peer {
            Peer::Visitor { visitor, .. } => (visitor.0, Party::Visitor, None),
            Peer::Agent(side) => (
                side.agent.id.0,
                Party::Agent,
                Some(side.agent.id.to_string()),
            ),
        };
        let Some(mark) = self.app.store.mark_read(conv.id, reader, seq).await? else {
            let e =
                ErrorFrame::new(ErrorCode::NotFound, "no such conversation").conversation_id(raw);
            return self.send(&ServerFrame::Error(e)).await;
        };
        let frame = ServerFrame::Read {
            conversation_id: conv.id.to_string(),
            by,
            agent_id,
            seq: mark,
        };
        self.app.bus.publish(Event::Signal(Arc::new(Signal {
            audience: Audience {
                site_id: conv.site_id,
                visitor_id: conv.visitor_id,
            },
            targets: Targets::AgentsAndVisitor,
            kind: SignalKind::Read {
                conversation_id: conv.id,
                by_agent: by == Party::Agent,
                seq: mark,
            },
            frame: frame.encode().into(),
        })));
        Ok(())
    }

    async fn on_send(
        &mut self,
        peer: &mut Peer,
        client_id: String,
        conversation_id: Option<String>,
        text: String,
    ) -> Result<(), End> {
        if let Peer::Agent(side) = peer {
            self.app.presence.agent_active(side.agent.id);
        }
        let fail = |code, msg: &str| ErrorFrame::new(code, msg).client_id(client_id.clone());
        if let Err(wait) = self.sends.take(Instant::now()) {
            metrics::counter!("hark_sends_rate_limited_total").increment(1);
            let e = fail(ErrorCode::RateLimited, "too many messages; retry later")
                .retry_after_ms(wait.as_millis() as u64 + 1);
            return self.send(&ServerFrame::Error(e)).await;
        }
        let Some(cid) = hark_protocol::parse_client_id(&client_id) else {
            let e = fail(ErrorCode::InvalidClientId, "client_id must be a UUID");
            return self.send(&ServerFrame::Error(e)).await;
        };
        let text = match MessageText::parse(&text) {
            Ok(t) => t,
            Err(TextError::Empty) => {
                let e = fail(ErrorCode::TextEmpty, "the message is empty");
                return self.send(&ServerFrame::Error(e)).await;
            }
            Err(TextError::TooLong) => {
                let e = fail(
                    ErrorCode::TextTooLong,
                    "the message is longer than 4096 bytes",
                );
                return self.send(&ServerFrame::Error(e)).await;
            }
        };
        let (conv, implicit) = match conversation_id {
            Some(raw) => {
                let conv = raw.parse::<ConversationId>().ok();
                match conv {
                    Some(c) if self.may_touch(peer, c).await? => (c, false),
                    _ => {
                        let e =
                            fail(ErrorCode::NotFound, "no such conversation").conversation_id(raw);
                        return self.send(&ServerFrame::Error(e)).await;
                    }
                }
            }
            None => match peer {
                Peer::Agent(_) => {
                    let e = fail(
                        ErrorCode::BadRequest,
                        "agents must name the conversation_id",
                    );
                    return self.send(&ServerFrame::Error(e)).await;
                }
                Peer::Visitor { open: Some(c), .. } => (*c, true),
                Peer::Visitor { visitor, .. } => {
                    // A retry of a send whose conversation has closed since must find the
                    // original, not open a new conversation for it.
                    if let Some(m) = self
                        .app
                        .store
                        .message_by_client_id(visitor.0, ClientMsgId(cid))
                        .await?
                    {
                        return self.send(&ack(&client_id, &m, true)).await;
                    }
                    (self.open_conversation(peer).await?, true)
                }
            },
        };
        let msg = NewMessage {
            conversation_id: conv,
            sender: match peer {
                Peer::Visitor { visitor, .. } => Sender::Visitor(*visitor),
                Peer::Agent(a) => Sender::Agent {
                    id: a.agent.id,
                    name: a.agent.name.clone(),
                },
            },
            text: text.into_string(),
            client_id: Some(ClientMsgId(cid)),
        };
        self.submit(client_id, msg, implicit).await
    }

    async fn submit(
        &mut self,
        client_id: String,
        msg: NewMessage,
        implicit: bool,
    ) -> Result<(), End> {
        match self.app.committer.submit(msg.clone()) {
            Ok(rx) => {
                self.pending.push(Box::pin(async move {
                    let outcome = rx.await.unwrap_or(Outcome::Unavailable);
                    Pending {
                        client_id,
                        msg,
                        implicit,
                        outcome,
                    }
                }));
                Ok(())
            }
            Err(Overloaded) => {
                let e = ErrorFrame::new(ErrorCode::Overloaded, "the server is busy; retry later")
                    .client_id(client_id)
                    .retry_after_ms(500);
                self.send(&ServerFrame::Error(e)).await
            }
        }
    }

    async fn on_outcome(&mut self, peer: &mut Peer, p: Pending) -> Result<(), End> {
        let frame = match p.outcome {
            Outcome::Appended(Appended::Stored(m)) => ack(&p.client_id, &m, false),
            Outcome::Appended(Appended::Duplicate(m)) => ack(&p.client_id, &m, true),
            Outcome::Appended(Appended::Closed) if p.implicit => {
                // The visitor's conversation closed under it: start a new one, once.
                if let Peer::Visitor { open, .. } = peer {
                    *open = None;
                }
                let conv = self.open_conversation(peer).await?;
                let msg = NewMessage {
                    conversation_id: conv,
                    ..p.msg
                };
                return self.submit(p.client_id, msg, false).await;
            }
            Outcome::Appended(Appended::Closed) => ServerFrame::Error(
                ErrorFrame::new(ErrorCode::ConversationClosed, "the conversation is closed")
                    .client_id(p.client_id)
                    .conversation_id(p.msg.conversation_id.to_string()),
            ),
            Outcome::Appended(Appended::NotFound) => ServerFrame::Error(
                ErrorFrame::new(ErrorCode::NotFound, "no such conversation")
                    .client_id(p.client_id)
                    .conversation_id(p.msg.conversation_id.to_string()),
            ),
            Outcome::Unavailable => ServerFrame::Error(
                ErrorFrame::new(ErrorCode::Unavailable, "the message was not stored; retry")
                    .client_id(p.client_id)
                    .retry_after_ms(1000),
            ),
        };
        self.send(&frame).await
    }

    /// The visitor's open conversation, opened now if needed (and announced if so).
    async fn open_conversation(&mut self, peer: &mut Peer) -> Result<ConversationId, End> {
        let Peer::Visitor {
            site,
            visitor,
            open,
            ..
        } = peer
        else {
            return Err(End::Close(
                close::PROTOCOL_VIOLATION.0,
                close::PROTOCOL_VIOLATION.1,
            ));
        };
        let (conv, created) = self.app.store.open_conversation(*site, *visitor).await?;
        *open = Some(conv.id);
        self.remember(conv.id);
        if created {
            metrics::counter!("hark_conversations_opened_total").increment(1);
            self.app
                .bus
                .publish(conversation_event(&conv, ConversationEvent::Opened));
        }
        Ok(conv.id)
    }

    async fn on_history(
        &mut self,
        peer: &mut Peer,
        req_id: String,
        conversation_id: String,
        before: Option<Seq>,
        after: Option<Seq>,
        limit: Option<u32>,
    ) -> Result<(), End> {
        let limit = limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
        let range = match (before, after) {
            (Some(_), Some(_)) => None,
            (Some(b), None) => Some(SeqRange::Before(b)),
            (None, Some(a)) => Some(SeqRange::After(a)),
            (None, None) => Some(SeqRange::Latest),
        };
        let Some(range) = range.filter(|_| (1..=MAX_HISTORY_LIMIT).contains(&limit)) else {
            let e = ErrorFrame::new(
                ErrorCode::BadRequest,
                "give at most one of before_seq and after_seq, and a limit from 1 to 200",
            )
            .req_id(req_id);
            return self.send(&ServerFrame::Error(e)).await;
        };
        let conv = conversation_id.parse::<ConversationId>().ok();
        let conv = match conv {
            Some(c) if self.may_touch(peer, c).await? => c,
            _ => {
                let e = ErrorFrame::new(ErrorCode::NotFound, "no such conversation")
                    .req_id(req_id)
                    .conversation_id(conversation_id);
                return self.send(&ServerFrame::Error(e)).await;
            }
        };
        let frame = match self.app.store.messages(conv, range, limit).await {
            Ok((msgs, has_more)) => ServerFrame::History {
                req_id,
                conversation_id,
                messages: msgs.iter().map(crate::domain::Message::body).collect(),
                has_more,
            },
            Err(e) => {
                tracing::warn!(error = %e, "history read failed");
                ServerFrame::Error(
                    ErrorFrame::new(ErrorCode::Unavailable, "history is unavailable; retry")
                        .req_id(req_id)
                        .retry_after_ms(1000),
                )
            }
        };
        self.send(&frame).await
    }

    /// Whether this client may read and write `conv`; unknown and foreign look the same.
    async fn may_touch(&mut self, peer: &Peer, conv: ConversationId) -> Result<bool, End> {
        if self.allowed.contains(&conv) {
            return Ok(true);
        }
        let ok = self
            .app
            .store
            .conversation(conv)
            .await?
            .is_some_and(|c| may_see(peer, &c));
        if ok {
            self.remember(conv);
        }
        Ok(ok)
    }

    fn remember(&mut self, conv: ConversationId) {
        if self.allowed.len() >= MAX_ALLOWED_CACHE {
            self.allowed.clear();
        }
        self.allowed.insert(conv);
    }

    /// Turns one WebSocket message into a client frame, answering malformed ones.
    async fn decode(&mut self, msg: Message) -> Result<Option<ClientFrame>, End> {
        if self.frames.take(Instant::now()).is_err() {
            return Err(End::Close(close::FLOOD.0, close::FLOOD.1));
        }
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                self.violation(ErrorFrame::new(
                    ErrorCode::BadFrame,
                    "binary frames are not accepted",
                ))
                .await?;
                return Ok(None);
            }
            Message::Ping(_) | Message::Pong(_) => return Ok(None),
            Message::Close(_) => return Err(End::Gone),
        };
        match ClientFrame::decode(text.as_str()) {
            Ok(f) => Ok(Some(f)),
            Err(e) => {
                self.violation(ErrorFrame::new(e.code(), e.to_string()))
                    .await?;
                Ok(None)
            }
        }
    }

    /// Answers a malformed frame (boxed: a rare path that would otherwise enlarge the state of
    /// every idle connection).
    fn violation(
        &mut self,
        e: ErrorFrame,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<(), End>> + Send + '_>> {
        Box::pin(self.answer_violation(e))
    }

    async fn answer_violation(&mut self, e: ErrorFrame) -> Result<(), End> {
        self.violations += 1;
        metrics::counter!("hark_frames_rejected_total", "code" => e.code.as_str()).increment(1);
        self.send(&ServerFrame::Error(e)).await?;
        if self.violations >= MAX_VIOLATIONS {
            return Err(End::Close(
                close::PROTOCOL_VIOLATION.0,
                close::PROTOCOL_VIOLATION.1,
            ));
        }
        Ok(())
    }

    /// Queues a frame for the socket; it leaves with the next flush (`live` flushes whenever it
    /// has nothing else ready, so frames produced together share one write).
    async fn send(&mut self, frame: &ServerFrame) -> Result<(), End> {
        self.feed(Message::Text(frame.encode().into())).await?;
        self.dirty = true;
        Ok(())
    }

    async fn write(&mut self, msg: Message) -> Result<(), End> {
        self.feed(msg).await?;
        self.flush().await
    }

    async fn feed(&mut self, msg: Message) -> Result<(), End> {
        let kick = self.kick.clone();
        tokio::select! {
            biased;
            r = tokio::time::timeout(WRITE_TIMEOUT, self.ws.feed(msg)) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(End::Gone),
                Err(_) => Err(End::Close(close::SLOW_CONSUMER.0, close::SLOW_CONSUMER.1)),
            },
            _ = kick.cancelled() => Err(End::Close(close::SLOW_CONSUMER.0, close::SLOW_CONSUMER.1)),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.dirty = false;
        let kick = self.kick.clone();
        tokio::select! {
            biased;
            r = tokio::time::timeout(WRITE_TIMEOUT, self.ws.flush()) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(End::Gone),
                Err(_) => Err(End::Close(close::SLOW_CONSUMER.0, close::SLOW_CONSUMER.1)),
            },
            _ = kick.cancelled() => Err(End::Close(close::SLOW_CONSUMER.0, close::SLOW_CONSUMER.1)),
        }
    }

    /// Closes the connection the way `end` says.
    async fn finish(&mut self, end: End) {
        let (code, reason) = match end {
            End::Gone => {
                // If the client closed, tungstenite has queued the close reply: send it.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.flush()).await;
                return;
            }
            End::Close(code, reason) => (code, reason),
            End::Drain => {
                // Sends already read are committed and acknowledged before we go.
                let deadline = tokio::time::Instant::now() + self.app.config.limits.drain();
                while !self.pending.is_empty() {
                    match tokio::time::timeout_at(deadline, self.pending.next()).await {
                        Ok(Some(p)) => {
                            let frame = match &p.outcome {
                                Outcome::Appended(Appended::Stored(m)) => {
                                    ack(&p.client_id, m, false)
                                }
                                Outcome::Appended(Appended::Duplicate(m)) => {
                                    ack(&p.client_id, m, true)
                                }
                                // Anything else is retried by the client on its next node.
                                _ => continue,
                            };
                            if self.send(&frame).await.is_err() {
                                return;
                            }
                        }
                        _ => break,
                    }
                }
                let jitter = self.app.config.limits.reconnect_jitter_ms.max(1);
                let after_ms = rand::thread_rng().gen_range(0..jitter);
                let frame = ServerFrame::Reconnect {
                    reason: ReconnectReason::Draining,
                    after_ms,
                };
                if self.send(&frame).await.is_err() {
                    return;
                }
                close::DRAINING
            }
            End::Unavailable => {
                let after_ms = 1000 + rand::thread_rng().gen_range(0..2000);
                let frame = ServerFrame::Reconnect {
                    reason: ReconnectReason::Overloaded,
                    after_ms,
                };
                if self.send(&frame).await.is_err() {
                    return;
                }
                close::OVERLOADED
            }
        };
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        // The closing handshake: send our close frame (a slow consumer's socket may be full, so
        // give it time), then read until the client's close reply, so that a client still
        // writing is not reset before it has read why it was closed.
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async move {
            if ws.send(Message::Close(Some(frame))).await.is_ok() {
                while let Some(Ok(_)) = ws.recv().await {}
            }
        })
        .await;
    }
}

/// Whether `peer` may see `conv` at all. Visitors see their own; agents their sites'.
fn may_see(peer: &Peer, conv: &Conversation) -> bool {
    match peer {
        Peer::Visitor { site, visitor, .. } => conv.visitor_id == *visitor && conv.site_id == *site,
        Peer::Agent(a) => a.agent.can_access(conv.site_id),
    }
}

/// A visitor's chat as the store has it, for a visitor not yet in the visitor list: who of the
/// agents wrote in the open conversation, and which visitor messages no agent has read.
async fn chat_seed(app: &App, conv: &Conversation) -> Result<ChatSeed, End> {
    let marks = app.store.read_marks(conv.id).await?;
    let mut agents_read = marks
        .iter()
        .filter(|(reader, _)| *reader != conv.visitor_id.0)
        .map(|(_, seq)| *seq)
        .max()
        .unwrap_or(0);
    let (msgs, _) = app
        .store
        .messages(conv.id, SeqRange::Latest, BACKFILL_PAGE)
        .await?;
    let mut writers = Vec::new();
    for m in &msgs {
        if let Sender::Agent { id, .. } = &m.sender {
            if !writers.contains(id) {
                writers.push(*id);
            }
            // An agent who answered has read what came before.
            agents_read = agents_read.max(m.seq);
        }
    }
    let unread = msgs
        .iter()
        .filter(|m| matches!(m.sender, Sender::Visitor(_)) && m.seq > agents_read)
        .map(|m| m.seq)
        .collect();
    Ok(ChatSeed {
        conversation: Some(conv.id),
        assignee: conv.assignee_id,
        writers,
        unread,
    })
}

fn ack(client_id: &str, m: &crate::domain::Message, duplicate: bool) -> ServerFrame {
    ServerFrame::Ack {
        client_id: client_id.to_owned(),
        conversation_id: m.conversation_id.to_string(),
        seq: m.seq,
        message_id: m.id.to_string(),
        created_at: m.created_at,
        duplicate,
    }
}

/// A failed read: an oversized frame gets its own close code; anything else means the client is
/// gone.
fn read_error(e: axum::Error) -> End {
    match e.into_inner().downcast::<tungstenite::Error>() {
        Ok(err) if matches!(*err, tungstenite::Error::Capacity(_)) => {
            End::Close(close::FRAME_TOO_LARGE.0, close::FRAME_TOO_LARGE.1)
        }
        _ => End::Gone,
    }
}
