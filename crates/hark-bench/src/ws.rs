//! WebSocket plumbing: connecting with the right headers, small buffers, hello → welcome.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hark_protocol::{ClientFrame, ServerFrame, SessionInfo};
use http::header::{HeaderName, HeaderValue};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

pub const ORIGIN: &str = "http://bench.local";

/// Why a connection attempt failed.
#[derive(Debug, Clone)]
pub enum ConnectError {
    /// The server refused the upgrade with an HTTP status (and maybe an error code).
    Refused {
        status: u16,
        code: Option<String>,
        retry_after: Option<Duration>,
    },
    /// TCP or handshake trouble.
    Io(String),
    /// The hello → welcome exchange failed (error frame, close, timeout).
    Hello(String),
}

impl ConnectError {
    /// A short key for counting.
    pub fn key(&self) -> String {
        match self {
            ConnectError::Refused { status, code, .. } => {
                format!("http_{status}_{}", code.as_deref().unwrap_or("?"))
            }
            ConnectError::Io(_) => "connect_io".to_owned(),
            ConnectError::Hello(_) => "hello_failed".to_owned(),
        }
    }

    /// Worth trying again (overload, draining, transient I/O).
    pub fn retryable(&self) -> bool {
        match self {
            ConnectError::Refused { status, .. } => *status == 503 || *status == 429,
            ConnectError::Io(_) => true,
            ConnectError::Hello(_) => false,
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused {
                status,
                code,
                retry_after,
            } => write!(
                f,
                "upgrade refused with HTTP {status} code={} retry_after={retry_after:?}",
                code.as_deref().unwrap_or("-")
            ),
            ConnectError::Io(e) => write!(f, "connect failed: {e}"),
            ConnectError::Hello(e) => write!(f, "hello failed: {e}"),
        }
    }
}

pub struct ConnectSpec<'a> {
    pub addr: SocketAddr,
    pub host: &'a str,
    pub path: &'a str,
    pub headers: &'a [(HeaderName, String)],
    pub source_ip: Option<IpAddr>,
    pub read_buffer: usize,
    pub timeout: Duration,
}

fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Opens a WebSocket (TCP + upgrade) within `spec.timeout`.
pub async fn connect(spec: &ConnectSpec<'_>) -> Result<Ws, ConnectError> {
    match tokio::time::timeout(spec.timeout, connect_inner(spec)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Io(format!(
            "no upgrade within {:?}",
            spec.timeout
        ))),
    }
}

async fn connect_inner(spec: &ConnectSpec<'_>) -> Result<Ws, ConnectError> {
    let sock = if spec.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| ConnectError::Io(format!("socket: {e}")))?;
    if let Some(ip) = spec.source_ip {
        sock.bind(SocketAddr::new(ip, 0))
            .map_err(|e| ConnectError::Io(format!("bind {ip}: {e}")))?;
    }
    let stream = sock
        .connect(spec.addr)
        .await
        .map_err(|e| ConnectError::Io(format!("tcp connect {}: {e}", spec.addr)))?;
    let _ = stream.set_nodelay(true);
    let url = format!("ws://{}{}", spec.host, spec.path);
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::Io(format!("request {url}: {e}")))?;
    for (name, value) in spec.headers {
        let v = HeaderValue::from_str(value)
            .map_err(|e| ConnectError::Io(format!("header {name}: {e}")))?;
        req.headers_mut().insert(name.clone(), v);
    }
    match tokio_tungstenite::client_async_with_config(
        req,
        stream,
        Some(ws_config(spec.read_buffer)),
    )
    .await
    {
        Ok((ws, _resp)) => Ok(ws),
        Err(WsError::Http(resp)) => {
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Duration::from_secs_f64(s.min(60.0)));
            let code = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .and_then(|v| {
                    v.get("error")
                        .and_then(|e| e.get("code"))
                        .and_then(|c| c.as_str())
                        .map(str::to_owned)
                });
            Err(ConnectError::Refused {
                status,
                code,
                retry_after,
            })
        }
        Err(e) => Err(ConnectError::Io(format!("upgrade: {e}"))),
    }
}

pub async fn send_frame(ws: &mut Ws, frame: &ClientFrame) -> Result<(), WsError> {
    let text = serde_json::to_string(frame).map_err(|e| {
        WsError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e.to_string(),
        ))
    })?;
    ws.send(Message::text(text)).await
}

/// What `welcome` told us.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub token: Option<String>,
    /// visitor_id or agent_id
    pub id: Option<String>,
    pub sends_per_sec: u32,
    pub send_burst: u32,
}

/// Sends `hello` and waits for `welcome` (answering pings meanwhile).
pub async fn hello(
    ws: &mut Ws,
    hello: &ClientFrame,
    timeout: Duration,
) -> Result<Welcome, ConnectError> {
    send_frame(ws, hello)
        .await
        .map_err(|e| ConnectError::Hello(format!("sending hello: {e}")))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| ConnectError::Hello(format!("no welcome within {timeout:?}")))?;
        match next {
            None => {
                return Err(ConnectError::Hello(
                    "connection ended before welcome".into(),
                ))
            }
            Some(Err(e)) => return Err(ConnectError::Hello(format!("before welcome: {e}"))),
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerFrame>(t.as_str()) {
                Ok(ServerFrame::Welcome {
                    token,
                    session,
                    limits,
                    ..
                }) => {
                    let id = match session {
                        SessionInfo::Visitor { visitor_id, .. } => Some(visitor_id),
                        SessionInfo::Agent { agent_id, .. } => Some(agent_id),
                    };
                    return Ok(Welcome {
                        token,
                        id,
                        sends_per_sec: limits.sends_per_sec,
                        send_burst: limits.send_burst,
                    });
                }
                Ok(ServerFrame::Ping) => {
                    let _ = send_frame(ws, &ClientFrame::Pong).await;
                }
                Ok(ServerFrame::Error(e)) => {
                    return Err(ConnectError::Hello(format!(
                        "error frame before welcome: {} ({})",
                        e.code.as_str(),
                        e.message
                    )))
                }
                Ok(other) => {
                    return Err(ConnectError::Hello(format!(
                        "unexpected frame before welcome: {}",
                        hark_protocol::abbreviate(&format!("{other:?}"), 200)
                    )))
                }
                Err(e) => {
                    return Err(ConnectError::Hello(format!(
                        "undecodable frame before welcome ({e}): {}",
                        hark_protocol::abbreviate(t.as_str(), 200)
                    )))
                }
            },
            Some(Ok(Message::Close(f))) => {
                return Err(ConnectError::Hello(format!(
                    "closed before welcome: {}",
                    close_key(f.as_ref())
                )))
            }
            Some(Ok(_)) => {}
        }
    }
}

pub fn close_key(f: Option<&tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    match f {
        Some(f) => format!("{} {}", u16::from(f.code), f.reason.as_str()),
        None => "no_close_frame".to_owned(),
    }
}
