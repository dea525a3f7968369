//! `kill -9` of the server process in the middle of a stream of sends, and a restart on the same
//! data: every acknowledged message is there, every conversation's seqs are gap-free, and sends
//! that were in flight at the kill, retried after the restart with the same client id, exist
//! exactly once.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hark::domain::{ConversationId, VisitorId};
use hark::store::sqlite::SqliteStore;
use hark::store::{SeqRange, Store};
use hark_protocol::{ClientFrame, ServerFrame};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_hark");

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

async fn start(dir: &std::path::Path, port: u16) -> Child {
    let child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn hark");
    let url = format!("http://127.0.0.1:{port}/readyz");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(&url).await {
            if r.status().is_success() {
                return child;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hark did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create_site(dir: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .arg("admin")
        .arg("--data-dir")
        .arg(dir)
        .args(["create-site", "--name", "Crash", "--origin", ORIGIN])
        .output()
        .await
        .expect("admin runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("site key:")
                .map(|k| k.trim().to_owned())
        })
        .expect("site key printed")
}

/// What one visitor knows when the server dies.
#[derive(Default)]
struct VisitorState {
    token: Option<String>,
    acked: Vec<(String, u64, String)>,
    in_flight: Option<(String, String)>,
}

async fn visitor_until_killed(
    port: u16,
    key: String,
    n: usize,
    total: Arc<Mutex<usize>>,
) -> VisitorState {
    let mut st = VisitorState::default();
    let url = format!("ws://127.0.0.1:{port}/ws/visitor?site_key={key}");
    let mut c = match connect_raw(&url, &[("origin", ORIGIN)]).await {
        Upgrade::Ok(c) => c,
        Upgrade::Refused(s, b) => panic!("refused {s} {b}"),
    };
    let (w, _) = c.hello(None, vec![]).await;
    st.token = Some(welcome_token(&w));
    for i in 0.. {
        let cid = uuid();
        let text = format!("visitor {n} message {i}");
        let frame = serde_json::to_string(&ClientFrame::Send {
            client_id: cid.clone(),
            conversation_id: None,
            text: text.clone(),
        })
        .unwrap();
        st.in_flight = Some((cid.clone(), text));
        if c.ws.send(Message::text(frame)).await.is_err() {
            return st;
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(10), c.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    match serde_json::from_str::<ServerFrame>(t.as_str()) {
                        Ok(ServerFrame::Ack {
                            client_id,
                            conversation_id,
                            seq,
                            ..
                        }) if client_id == cid => {
                            st.acked.push((conversation_id, seq, cid.clone()));
                            st.in_flight = None;
                            *total.lock().unwrap() += 1;
                            break;
                        }
                        Ok(ServerFrame::Error(e)) if e.retry_after_ms.is_some() => {
                            // Rate limited: resend the same message after the hint.
                            tokio::time::sleep(Duration::from_millis(
                                e.retry_after_ms.unwrap_or(100),
                            ))
                            .await;
                            let again = serde_json::to_string(&ClientFrame::Send {
                                client_id: cid.clone(),
                                conversation_id: None,
                                text: st.in_flight.clone().unwrap().1,
                            })
                            .unwrap();
                            if c.ws.send(Message::text(again)).await.is_err() {
                                return st;
                            }
                        }
                        Ok(ServerFrame::Ping) => {
                            let _ = c.ws.send(Message::text(r#"{"type":"pong"}"#)).await;
                        }
                        _ => {}
                    }
                }
                Ok(Some(Ok(_))) => {}
                // The server died (reset, EOF) or stopped answering.
                _ => return st,
            }
        }
    }
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = start(dir.path(), port).await;
    let key = create_site(dir.path()).await;

    let total = Arc::new(Mutex::new(0usize));
    let tasks: Vec<_> = (0..16)
        .map(|n| tokio::spawn(visitor_until_killed(port, key.clone(), n, total.clone())))
        .collect();
    // Let a stream build up, then kill the process without warning.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while *total.lock().unwrap() < 400 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "too few acks before the kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.start_kill().expect("SIGKILL");
    let status = server.wait().await.expect("wait");
    assert!(!status.success(), "the server was killed, not stopped");
    let mut states = Vec::new();
    for t in tasks {
        states.push(t.await.expect("visitor task"));
    }
    let acked: usize = states.iter().map(|s| s.acked.len()).sum();
    assert!(acked >= 400, "acked {acked}");

    // Restart on the same data.
    let port2 = free_port();
    let mut server2 = start(dir.path(), port2).await;
    let store = SqliteStore::open(dir.path()).await.expect("open store");

    // Every acknowledged message is stored, at the seq its ack named, with its client id.
    for st in &states {
        for (conv, seq, cid) in &st.acked {
            let conv: ConversationId = conv.parse().unwrap();
            let (msgs, _) = store
                .messages(conv, SeqRange::After(seq - 1), 1)
                .await
                .unwrap();
            let m = msgs
                .first()
                .unwrap_or_else(|| panic!("acked {conv} #{seq} is missing"));
            assert_eq!(m.seq, *seq);
            assert_eq!(
                m.client_id.map(|c| c.0.to_string()).as_deref(),
                Some(cid.as_str())
            );
        }
    }

    // The sends in flight at the kill are retried with their client ids: each exists once.
    let mut retried = 0;
    for st in &states {
        let Some((cid, text)) = &st.in_flight else {
            continue;
        };
        let url = format!("ws://127.0.0.1:{port2}/ws/visitor?site_key={key}");
        let mut c = match connect_raw(&url, &[("origin", ORIGIN)]).await {
            Upgrade::Ok(c) => c,
            Upgrade::Refused(s, b) => panic!("refused {s} {b}"),
        };
        let (w, _) = c.hello(st.token.clone(), vec![]).await;
        let visitor: VisitorId = match &w {
            ServerFrame::Welcome {
                session: hark_protocol::SessionInfo::Visitor { visitor_id, .. },
                ..
            } => visitor_id.parse().unwrap(),
            other => panic!("{other:?}"),
        };
        c.say(cid, None, text).await;
        let (ack, _) = c
            .until(|f| matches!(f, ServerFrame::Ack { client_id, .. } if client_id == cid))
            .await;
        assert!(matches!(ack, ServerFrame::Ack { .. }));
        let m = store
            .message_by_client_id(visitor.0, hark::domain::ClientMsgId(cid.parse().unwrap()))
            .await
            .unwrap();
        assert!(m.is_some());
        retried += 1;
    }

    // Every conversation: seqs 1..=last_seq, no gap, no repeat, and no client id twice.
    let convs = store
        .list_conversations(&hark::store::ConversationFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(convs.len(), 16);
    let mut stored = 0;
    for conv in &convs {
        let (msgs, more) = store
            .messages(conv.id, SeqRange::After(0), 200)
            .await
            .unwrap();
        assert!(!more);
        let seqs: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=conv.last_seq).collect::<Vec<_>>(),
            "conversation {}",
            conv.id
        );
        let mut by_client: HashMap<String, usize> = HashMap::new();
        for m in &msgs {
            *by_client
                .entry(m.client_id.map(|c| c.0.to_string()).unwrap_or_default())
                .or_default() += 1;
        }
        assert!(
            by_client.values().all(|&n| n == 1),
            "a client id stored twice"
        );
        stored += msgs.len();
    }
    assert!(stored >= acked + retried);
    server2.start_kill().ok();
    let _ = server2.wait().await;
}
