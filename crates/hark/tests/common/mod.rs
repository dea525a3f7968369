//! Shared test harness: a real Hark node on port 0 with a temporary data directory, and a real
//! WebSocket client speaking the wire protocol. Every wait has a deadline.
#![allow(dead_code)]

pub mod cluster;
pub mod nats;
pub mod pg;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hark::config::Config;
use hark::domain::{AgentRole, Email, Origin, Site, SiteId};
use hark::server::Server;
use hark::store::{NewAgent, NewSite, Store};
use hark_protocol::{ClientFrame, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const ORIGIN: &str = "http://shop.test";
pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub store: Arc<dyn Store>,
    pub shutdown: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<()>>,
    pub dir: Option<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        edit(&mut config);
        let server = Server::build(config).await.expect("server builds");
        let addr = server.local_addr();
        let store = server.app().store.clone();
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        let task = tokio::spawn(async move {
            server
                .run(async move { s.cancelled().await })
                .await
                .expect("server runs");
        });
        TestServer {
            addr,
            store,
            shutdown,
            task: Some(task),
            dir: Some(dir),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub async fn create_site(&self, origins: &[&str]) -> Site {
        self.store
            .create_site(NewSite {
                name: "Shop".into(),
                allowed_origins: origins
                    .iter()
                    .map(|o| Origin::parse(o).expect("origin"))
                    .collect(),
            })
            .await
            .expect("site")
    }

    /// Creates an agent directly in the store and logs it in over REST; returns its bearer token.
    pub async fn agent(&self, email: &str, role: AgentRole, sites: &[SiteId]) -> String {
        let password = "correct horse battery";
        self.store
            .create_agent(NewAgent {
                email: Email::parse(email).expect("email"),
                name: email.split('@').next().unwrap_or("agent").to_owned(),
                role,
                password_hash: hark::auth::hash_password(password).expect("hash"),
                site_ids: sites.to_vec(),
            })
            .await
            .expect("agent");
        self.login(email, password).await
    }

    pub async fn create_admin(&self, email: &str, password: &str) {
        self.store
            .create_agent(NewAgent {
                email: Email::parse(email).expect("email"),
                name: "Admin".into(),
                role: AgentRole::Admin,
                password_hash: hark::auth::hash_password(password).expect("hash"),
                site_ids: vec![],
            })
            .await
            .expect("admin");
    }

    /// Creates a session directly (no REST round trip) and returns its bearer token.
    pub async fn login(&self, email: &str, _password: &str) -> String {
        let (agent, _) = self
            .store
            .agent_login(&Email::parse(email).expect("email"))
            .await
            .expect("store")
            .expect("agent exists");
        let t = hark::auth::new_session_token();
        self.store
            .create_session(
                &t.hash,
                hark::store::SessionRow {
                    agent_id: agent.id,
                    csrf_token: t.csrf,
                    expires_at: hark::domain::now_ms() + 3_600_000,
                },
            )
            .await
            .expect("session");
        t.token
    }

    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("server stops in time")
                .expect("server task");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol client over a real socket.
pub struct Client {
    pub ws: Ws,
    /// Whether presence frames (visitor lists and deltas, agent status, availability) are
    /// returned; tests about other things skip them.
    pub presence: bool,
}

/// Frames that belong to presence, skipped unless a client watches presence.
pub fn is_presence(f: &ServerFrame) -> bool {
    matches!(
        f,
        ServerFrame::VisitorList { .. }
            | ServerFrame::Visitor { .. }
            | ServerFrame::VisitorGone { .. }
            | ServerFrame::AgentStatus { .. }
            | ServerFrame::Availability { .. }
    )
}

pub enum Upgrade {
    Ok(Box<Client>),
    Refused(u16, String),
}

pub async fn connect_raw(url: &str, headers: &[(&str, &str)]) -> Upgrade {
    let mut req = url.into_client_request().expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            v.parse().expect("header value"),
        );
    }
    match tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(req)).await {
        Ok(Ok((ws, _))) => Upgrade::Ok(Box::new(Client {
            ws,
            presence: false,
        })),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Upgrade::Refused(resp.status().as_u16(), body)
        }
        Ok(Err(e)) => panic!("connect failed: {e}"),
        Err(_) => panic!("connect timed out"),
    }
}

impl Client {
    pub async fn visitor(server: &TestServer, site_key: &str) -> Client {
        let url = format!("ws://{}/ws/visitor?site_key={site_key}", server.addr);
        match connect_raw(&url, &[("origin", ORIGIN)]).await {
            Upgrade::Ok(c) => *c,
            Upgrade::Refused(s, b) => panic!("visitor refused: {s} {b}"),
        }
    }

    pub async fn agent(server: &TestServer, token: &str) -> Client {
        let url = format!("ws://{}/ws/agent", server.addr);
        let auth = format!("Bearer {token}");
        match connect_raw(&url, &[("authorization", &auth)]).await {
            Upgrade::Ok(c) => *c,
            Upgrade::Refused(s, b) => panic!("agent refused: {s} {b}"),
        }
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        let text = serde_json::to_string(frame).expect("encode");
        self.send_text(&text).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        tokio::time::timeout(DEADLINE, self.ws.send(Message::text(text)))
            .await
            .expect("send in time")
            .expect("send");
    }

    /// The next server frame, skipping pings (answered).
    pub async fn next(&mut self) -> ServerFrame {
        match self.next_within(DEADLINE).await {
            Some(f) => f,
            None => panic!("no frame within {DEADLINE:?}"),
        }
    }

    /// The next server frame within `d`, or None. Panics if the connection closes.
    pub async fn next_within(&mut self, d: Duration) -> Option<ServerFrame> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) => panic!("connection ended"),
                Ok(Some(Err(e))) => panic!("read error: {e}"),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    let f: ServerFrame = serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("bad server frame {t}: {e}"));
                    if f == ServerFrame::Ping {
                        self.send(&ClientFrame::Pong).await;
                        continue;
                    }
                    if !self.presence && is_presence(&f) {
                        continue;
                    }
                    return Some(f);
                }
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => continue,
            }
        }
    }

    /// Reads until the server closes; returns the close code and reason, and the frames before.
    pub async fn closed(&mut self) -> (u16, String, Vec<ServerFrame>) {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(DEADLINE, self.ws.next()).await {
                Err(_) => panic!("not closed within {DEADLINE:?}; got {frames:?}"),
                Ok(None) => return (1006, String::new(), frames),
                Ok(Some(Err(_))) => return (1006, String::new(), frames),
                Ok(Some(Ok(Message::Close(c)))) => {
                    let (code, reason) = c
                        .map(|c| (u16::from(c.code), c.reason.to_string()))
                        .unwrap_or((CloseCode::Status.into(), String::new()));
                    // Complete the closing handshake as a browser does: polling on flushes the
                    // queued close reply; the stream then ends.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Some(Ok(_)) = self.ws.next().await {}
                    })
                    .await;
                    return (code, reason, frames);
                }
                Ok(Some(Ok(Message::Text(t)))) => {
                    if let Ok(f) = serde_json::from_str::<ServerFrame>(t.as_str()) {
                        if self.presence || !is_presence(&f) {
                            frames.push(f);
                        }
                    }
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Sends hello and returns the welcome, then reads up to `ready`, returning what came between.
    pub async fn hello(
        &mut self,
        token: Option<String>,
        resume: Vec<(String, u64)>,
    ) -> (ServerFrame, Vec<ServerFrame>) {
        self.send(&ClientFrame::Hello {
            token,
            resume: resume
                .into_iter()
                .map(|(c, s)| hark_protocol::ResumePoint {
                    conversation_id: c,
                    seq: s,
                })
                .collect(),
            page: None,
            presence: Vec::new(),
        })
        .await;
        let welcome = self.next().await;
        assert!(
            matches!(welcome, ServerFrame::Welcome { .. }),
            "expected welcome, got {welcome:?}"
        );
        let mut between = Vec::new();
        loop {
            match self.next().await {
                ServerFrame::Ready => return (welcome, between),
                f => between.push(f),
            }
        }
    }

    pub async fn say(&mut self, client_id: &str, conversation: Option<&str>, text: &str) {
        self.send(&ClientFrame::Send {
            client_id: client_id.to_owned(),
            conversation_id: conversation.map(str::to_owned),
            text: text.to_owned(),
        })
        .await;
    }

    /// Reads frames until one matches, with a deadline; returns it and the frames skipped.
    pub async fn until(
        &mut self,
        mut pred: impl FnMut(&ServerFrame) -> bool,
    ) -> (ServerFrame, Vec<ServerFrame>) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Some(f) if pred(&f) => return (f, skipped),
                Some(f) => skipped.push(f),
                None => panic!("no matching frame in time; skipped {skipped:?}"),
            }
        }
    }
}

pub fn welcome_token(f: &ServerFrame) -> String {
    match f {
        ServerFrame::Welcome { token: Some(t), .. } => t.clone(),
        other => panic!("no token in {other:?}"),
    }
}

pub fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}
