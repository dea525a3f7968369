//! The realtime protocol over real sockets against a real node: conversations end to end,
//! resume, idempotent sends, every bad input of the protocol, tenant isolation, slow consumers,
//! heartbeats and the drain.

mod common;

use std::time::Duration;

use common::*;
use hark::domain::{AgentRole, ConversationId, SiteId};
use hark::store::SeqRange;
use hark_protocol::{
    Author, ClientFrame, ConversationEvent, ErrorCode, ReconnectReason, ServerFrame,
};

fn ack_of(f: &ServerFrame) -> (String, u64, bool) {
    match f {
        ServerFrame::Ack {
            conversation_id,
            seq,
            duplicate,
            ..
        } => (conversation_id.clone(), *seq, *duplicate),
        other => panic!("expected ack, got {other:?}"),
    }
}

fn error_code(f: &ServerFrame) -> ErrorCode {
    match f {
        ServerFrame::Error(e) => e.code,
        other => panic!("expected error, got {other:?}"),
    }
}

fn is_message(f: &ServerFrame) -> bool {
    matches!(f, ServerFrame::Message(_))
}

async fn site_with_agent(s: &TestServer) -> (hark::domain::Site, String) {
    let site = s.create_site(&[ORIGIN]).await;
    let token = s
        .agent(
            &format!("agent-{}@example.com", &uuid()[..8]),
            AgentRole::Agent,
            &[site.id],
        )
        .await;
    (site, token)
}

#[tokio::test]
async fn a_conversation_end_to_end() {
    let s = TestServer::start().await;
    let (site, agent_token) = site_with_agent(&s).await;
    let mut agent = Client::agent(&s, &agent_token).await;
    let (welcome, _) = agent.hello(None, vec![]).await;
    assert!(
        matches!(welcome, ServerFrame::Welcome { ref conversations, .. } if conversations.is_empty())
    );

    let mut visitor = Client::visitor(&s, site.key.as_str()).await;
    let (welcome, _) = visitor.hello(None, vec![]).await;
    let visitor_id = match &welcome {
        ServerFrame::Welcome {
            session: hark_protocol::SessionInfo::Visitor { visitor_id, .. },
            token: Some(_),
            ..
        } => visitor_id.clone(),
        other => panic!("{other:?}"),
    };

    let cid = uuid();
    visitor
        .say(&cid, None, "  Hello, do you ship to Norway?  ")
        .await;
    let (ack, _) = visitor
        .until(|f| matches!(f, ServerFrame::Ack { .. }))
        .await;
    let (conv, seq, dup) = ack_of(&ack);
    assert_eq!((seq, dup), (1, false));

    // The agent learns of the new conversation, then receives the message, trimmed.
    let (opened, _) = agent
        .until(|f| matches!(f, ServerFrame::Conversation { .. }))
        .await;
    assert!(
        matches!(opened, ServerFrame::Conversation { event: ConversationEvent::Opened, ref conversation } if conversation.id == conv)
    );
    let (msg, _) = agent.until(is_message).await;
    match msg {
        ServerFrame::Message(m) => {
            assert_eq!(
                (m.conversation_id.as_str(), m.seq, m.text.as_str()),
                (conv.as_str(), 1, "Hello, do you ship to Norway?")
            );
            assert_eq!(m.author, Author::Visitor { id: visitor_id });
            assert_eq!(m.client_id.as_deref(), Some(cid.as_str()));
        }
        _ => unreachable!(),
    }

    // The agent answers; the visitor receives it with seq 2.
    agent.say(&uuid(), Some(&conv), "Yes, we do!").await;
    let (ack, _) = agent.until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    assert_eq!(ack_of(&ack).1, 2);
    // The visitor's own message comes back to it too (matched by client_id), then the answer.
    let (own, _) = visitor.until(is_message).await;
    assert!(
        matches!(own, ServerFrame::Message(ref m) if m.seq == 1 && m.client_id.as_deref() == Some(cid.as_str()))
    );
    let (msg, _) = visitor.until(is_message).await;
    match msg {
        ServerFrame::Message(m) => {
            assert_eq!((m.seq, m.text.as_str()), (2, "Yes, we do!"));
            assert!(
                matches!(m.author, Author::Agent { ref name, .. } if name.starts_with("agent-"))
            );
        }
        _ => unreachable!(),
    }

    // History pages over the same messages.
    visitor
        .send(&ClientFrame::History {
            req_id: "h1".into(),
            conversation_id: conv.clone(),
            before_seq: None,
            after_seq: Some(0),
            limit: Some(1),
        })
        .await;
    let (h, _) = visitor
        .until(|f| matches!(f, ServerFrame::History { .. }))
        .await;
    assert!(
        matches!(h, ServerFrame::History { ref messages, has_more: true, ref req_id, .. } if messages.len() == 1 && messages[0].seq == 1 && req_id == "h1")
    );
    s.shutdown().await;
}

#[tokio::test]
async fn resume_after_a_disconnect_delivers_exactly_what_was_missed() {
    let s = TestServer::start().await;
    let (site, agent_token) = site_with_agent(&s).await;
    let mut visitor = Client::visitor(&s, site.key.as_str()).await;
    let (welcome, _) = visitor.hello(None, vec![]).await;
    let token = welcome_token(&welcome);
    visitor.say(&uuid(), None, "first").await;
    let (ack, _) = visitor
        .until(|f| matches!(f, ServerFrame::Ack { .. }))
        .await;
    let (conv, _, _) = ack_of(&ack);
    drop(visitor);

    let mut agent = Client::agent(&s, &agent_token).await;
    agent.hello(None, vec![]).await;
    for i in 0..3 {
        agent.say(&uuid(), Some(&conv), &format!("reply {i}")).await;
        agent.until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    }

    let mut visitor = Client::visitor(&s, site.key.as_str()).await;
    let (welcome, missed) = visitor.hello(Some(token), vec![(conv.clone(), 1)]).await;
    assert!(
        matches!(welcome, ServerFrame::Welcome { ref conversations, .. } if conversations.len() == 1 && conversations[0].last_seq == 4)
    );
    let seqs: Vec<u64> = missed
        .iter()
        .map(|f| match f {
            ServerFrame::Message(m) => m.seq,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(seqs, vec![2, 3, 4]);

    // Live messages follow the resume.
    agent.say(&uuid(), Some(&conv), "live").await;
    let (m, _) = visitor.until(is_message).await;
    assert!(matches!(m, ServerFrame::Message(ref m) if m.seq == 5));

    // An agent resuming from 0 gets the whole conversation in order.
    let mut agent2 = Client::agent(&s, &agent_token).await;
    let (_, missed) = agent2.hello(None, vec![(conv.clone(), 0)]).await;
    let seqs: Vec<u64> = missed
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message(m) => Some(m.seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);

    // A client claiming more than exists is told so.
    let mut agent3 = Client::agent(&s, &agent_token).await;
    let (_, between) = agent3.hello(None, vec![(conv.clone(), 99)]).await;
    assert!(
        matches!(&between[..], [ServerFrame::Error(e)] if e.code == ErrorCode::SeqAhead && e.last_seq == Some(5))
    );
    s.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_send_is_acked_again_and_stored_once() {
    let s = TestServer::start().await;
    let (site, agent_token) = site_with_agent(&s).await;
    let mut agent = Client::agent(&s, &agent_token).await;
    agent.hello(None, vec![]).await;
    let mut visitor = Client::visitor(&s, site.key.as_str()).await;
    visitor.hello(None, vec![]).await;

    let cid = uuid();
    visitor.say(&cid, None, "once").await;
    let (a1, _) = visitor
        .until(|f| matches!(f, ServerFrame::Ack { .. }))
        .await;
    visitor.say(&cid, None, "once").await;
    let (a2, _) = visitor
        .until(|f| matches!(f, ServerFrame::Ack { .. }))
        .await;
    let (c1, s1, d1) = ack_of(&a1);
    let (c2, s2, d2) = ack_of(&a2);
    assert_eq!((c1.clone(), s1, d1), (c2, s2, false));
    assert!(d2, "the retry is flagged as a duplicate");

    // Retrying with the conversation named explicitly is the same message too.
    visitor.say(&cid, Some(&c1), "once").await;
    let (a3, _) = visitor
        .until(|f| matches!(f, ServerFrame::Ack { .. }))
        .await;
    assert_eq!(ack_of(&a3), (c1.clone(), 1, true));

    // The agent sees the message once: the next message after it is the marker.
    visitor.say(&uuid(), None, "marker").await;
    let (m1, _) = agent.until(is_message).await;
    let (m2, _) = agent.until(is_message).await;
    assert!(
        matches!((&m1, &m2), (ServerFrame::Message(a), ServerFrame::Message(b)) if a.text == "once" && b.text == "marker" && b.seq == 2)
    );
    let conv: ConversationId = c1.parse().unwrap();
    let (msgs, _) = s
        .store()
        .messages(conv, SeqRange::After(0), 10)
        .await
        .unwrap();
    assert_eq!(msgs.len(), 2);
    s.shutdown().await;
}

#[tokio::test]
async fn a_send_in_flight_when_the_connection_drops_is_stored_once_after_the_retry() {
    let s = TestServer::start().await;
    let (site, _) = site_with_agent(&s).await;
    let mut visitor = Client::visitor(&s, site.key.as_str()).await;
    let (welcome, _) = visitor.hello(None, vec![]).await;
    let token = welcome_token(&welcome);
    // Open the conversation first so the retry can name it.
    visitor.say(&uuid(), None, "hello").await;
    let (ack, _) = visitor
        .until(|f| matches!(f, ServerFrame::Ack { .. }))
        .await;
    let (conv, _, _) = ack_of(&ack);

    // Send and drop the socket without waiting for the ack.
    let cid = uuid();
    visitor.say(&cid, Some(&conv), "did this arrive?").await;
    drop(visitor);

    let mut visitor = Client::visitor(&s, site.key.as_str()).await;
    visitor.hello(Some(token), vec![(conv.clone(), 1)]).await;
    visitor.say(&cid, Some(&conv), "did this arrive?").await;
    let (ack, _) = visitor
        .until(|f| matches!(f, ServerFrame::Ack { ref client_id, .. } if *client_id == cid))
        .await;
    assert_eq!(ack_of(&ack).1, 2);

    let (msgs, _) = s
        .store()
        .messages(conv.parse().unwrap(), SeqRange::After(0), 10)
        .await
        .unwrap();
    let copies = msgs
        .iter()
        .filter(|m| m.client_id.map(|c| c.0.to_string()) == Some(cid.clone()))
        .count();
    assert_eq!(copies, 1);
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
    s.shutdown().await;
}

#[tokio::test]
async fn handshake_refusals_have_stable_codes() {
    let s = TestServer::start().await;
    let site = s.create_site(&[ORIGIN]).await;
    let base = format!("ws://{}", s.addr);
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            format!("{base}/ws/visitor"),
            vec![("origin", ORIGIN)],
            400,
            "bad_request",
        ),
        (
            format!("{base}/ws/visitor?site_key=hk_unknownkey123"),
            vec![("origin", ORIGIN)],
            404,
            "site_not_found",
        ),
        (
            format!("{base}/ws/visitor?site_key={}", site.key.as_str()),
            vec![("origin", "http://evil.test")],
            403,
            "origin_not_allowed",
        ),
        (
            format!("{base}/ws/visitor?site_key={}", site.key.as_str()),
            vec![],
            403,
            "origin_not_allowed",
        ),
        (
            format!("{base}/ws/visitor?site_key={}", site.key.as_str()),
            vec![("origin", "http://shop.test:8080")],
            403,
            "origin_not_allowed",
        ),
        (format!("{base}/ws/agent"), vec![], 401, "unauthenticated"),
        (
            format!("{base}/ws/agent"),
            vec![("authorization", "Bearer forged")],
            401,
            "unauthenticated",
        ),
    ];
    for (url, headers, status, code) in cases {
        match connect_raw(&url, &headers).await {
            Upgrade::Refused(st, body) => {
                assert_eq!(st, status, "{url}");
                let v: serde_json::Value = serde_json::from_str(&body).expect("json error body");
                assert_eq!(v["error"]["code"], code, "{url}");
            }
            Upgrade::Ok(_) => panic!("{url} should be refused"),
        }
    }
    // An agent socket opened from another site's page is refused even with a valid session.
    let token = s.agent("a@example.com", AgentRole::Agent, &[site.id]).await;
    let auth = format!("Bearer {token}");
    match connect_raw(
        &format!("{base}/ws/agent"),
        &[("authorization", &auth), ("origin", "http://evil.test")],
    )
    .await
    {
        Upgrade::Refused(403, _) => {}
        _ => panic!("cross-site agent socket must be refused"),
    }
    s.shutdown().await;
}

#[tokio::test]
async fn malformed_frames_get_errors_and_the_connection_survives() {
    let s = TestServer::start().await;
    let (site, _) = site_with_agent(&s).await;
    let mut v = Client::visitor(&s, site.key.as_str()).await;
    // Before hello.
    v.say(&uuid(), None, "too early").await;
    assert_eq!(error_code(&v.next().await), ErrorCode::HelloRequired);
    v.hello(None, vec![]).await;

    let cases: Vec<(&str, ErrorCode)> = vec![
        ("not json", ErrorCode::BadFrame),
        ("[1,2]", ErrorCode::BadFrame),
        (r#"{"type":"send","text":5}"#, ErrorCode::BadFrame),
        (r#"{"type":"teleport"}"#, ErrorCode::UnknownType),
        (r#"{"type":"hello"}"#, ErrorCode::AlreadyHello),
        (
            r#"{"type":"send","client_id":"not-a-uuid","text":"x"}"#,
            ErrorCode::InvalidClientId,
        ),
    ];
    for (text, code) in cases {
        v.send_text(text).await;
        assert_eq!(error_code(&v.next().await), code, "{text}");
    }
    let too_long = "a".repeat(4097);
    v.say(&uuid(), None, &too_long).await;
    assert_eq!(error_code(&v.next().await), ErrorCode::TextTooLong);
    v.say(&uuid(), None, " \n ").await;
    assert_eq!(error_code(&v.next().await), ErrorCode::TextEmpty);
    v.say(&uuid(), Some(&ConversationId::new().to_string()), "x")
        .await;
    assert_eq!(error_code(&v.next().await), ErrorCode::NotFound);
    v.say(&uuid(), Some("garbage"), "x").await;
    assert_eq!(error_code(&v.next().await), ErrorCode::NotFound);
    v.send(&ClientFrame::History {
        req_id: "r".into(),
        conversation_id: ConversationId::new().to_string(),
        before_seq: Some(3),
        after_seq: Some(1),
        limit: None,
    })
    .await;
    assert_eq!(error_code(&v.next().await), ErrorCode::BadRequest);
    v.ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![
        1u8, 2, 3,
    ]))
    .await
    .unwrap();
    assert_eq!(error_code(&v.next().await), ErrorCode::BadFrame);

    // Still usable: a real send goes through.
    v.say(&uuid(), None, "still here").await;
    let (ack, _) = v.until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    assert_eq!(ack_of(&ack).1, 1);
    s.shutdown().await;
}

use futures_util::SinkExt;

#[tokio::test]
async fn a_frame_over_64_kib_closes_with_1009() {
    let s = TestServer::start().await;
    let (site, _) = site_with_agent(&s).await;
    let mut v = Client::visitor(&s, site.key.as_str()).await;
    v.hello(None, vec![]).await;
    let big = format!(
        r#"{{"type":"send","client_id":"{}","text":"{}"}}"#,
        uuid(),
        "x".repeat(70_000)
    );
    let _ =
        v.ws.send(tokio_tungstenite::tungstenite::Message::text(big))
            .await;
    let (code, reason, _) = v.closed().await;
    assert_eq!((code, reason.as_str()), (1009, "frame_too_large"));
    s.shutdown().await;
}

#[tokio::test]
async fn ten_bad_frames_in_a_row_close_the_connection() {
    let s = TestServer::start().await;
    let (site, _) = site_with_agent(&s).await;
    let mut v = Client::visitor(&s, site.key.as_str()).await;
    v.hello(None, vec![]).await;
    for _ in 0..10 {
        v.send_text("{").await;
    }
    let (code, reason, frames) = v.closed().await;
    assert_eq!((code, reason.as_str()), (4004, "protocol_violation"));
    assert_eq!(
        frames
            .iter()
            .filter(|f| error_code(f) == ErrorCode::BadFrame)
            .count(),
        10
    );
    s.shutdown().await;
}

#[tokio::test]
async fn floods_are_rate_limited_then_cut() {
    let s = TestServer::start_with(|c| {
        c.limits.visitor_sends_per_sec = 2;
        c.limits.visitor_send_burst = 3;
        c.limits.frames_per_sec = 20;
        c.limits.frame_burst = 30;
    })
    .await;
    let (site, _) = site_with_agent(&s).await;
    let mut v = Client::visitor(&s, site.key.as_str()).await;
    v.hello(None, vec![]).await;
    for i in 0..5 {
        v.say(&uuid(), None, &format!("m{i}")).await;
    }
    let mut acks = 0;
    let mut limited = 0;
    while acks + limited < 5 {
        match v.next().await {
            ServerFrame::Ack { .. } => acks += 1,
            ServerFrame::Error(e) if e.code == ErrorCode::RateLimited => {
                assert!(e.retry_after_ms.is_some_and(|ms| ms > 0));
                assert!(e.client_id.is_some());
                limited += 1;
            }
            ServerFrame::Conversation { .. } | ServerFrame::Message(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((acks, limited), (3, 2));
    // Far past the frame rate: the connection is closed as a flood.
    for _ in 0..200 {
        if v.ws
            .send(tokio_tungstenite::tungstenite::Message::text(
                r#"{"type":"ping"}"#,
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    let (code, reason, _) = v.closed().await;
    assert_eq!((code, reason.as_str()), (4008, "flood"));
    s.shutdown().await;
}

#[tokio::test]
async fn forged_expired_and_foreign_visitor_tokens_are_refused() {
    let s = TestServer::start().await;
    let (site, _) = site_with_agent(&s).await;
    let other = s.create_site(&[ORIGIN]).await;
    let key = s.store().secret("visitor_token_key", vec![]).await.unwrap();
    let tokens = hark::auth::VisitorTokens::new(key);
    let visitor = s.store().create_visitor(site.id).await.unwrap();
    let expired = tokens.issue_until(site.id, visitor.id, hark::domain::now_ms() - 1000);
    let forged = hark::auth::VisitorTokens::new(b"not the key".to_vec()).issue(site.id, visitor.id);
    let foreign = tokens.issue(other.id, visitor.id);
    let unknown_visitor = tokens.issue(site.id, hark::domain::VisitorId::new());
    for bad in [
        expired,
        forged,
        foreign,
        unknown_visitor,
        "v1.garbage".to_owned(),
    ] {
        let mut v = Client::visitor(&s, site.key.as_str()).await;
        v.send(&ClientFrame::Hello {
            token: Some(bad.clone()),
            resume: vec![],
            page: None,
            presence: Vec::new(),
        })
        .await;
        let (code, reason, frames) = v.closed().await;
        assert_eq!((code, reason.as_str()), (4003, "unauthorized"), "{bad}");
        assert!(
            matches!(&frames[..], [ServerFrame::Error(e)] if e.code == ErrorCode::Unauthorized)
        );
    }
    // The genuine token works and names the same visitor.
    let mut v = Client::visitor(&s, site.key.as_str()).await;
    let (w, _) = v
        .hello(Some(tokens.issue(site.id, visitor.id)), vec![])
        .await;
    assert!(
        matches!(w, ServerFrame::Welcome { session: hark_protocol::SessionInfo::Visitor { ref visitor_id, .. }, .. } if *visitor_id == visitor.id.to_string())
    );
    s.shutdown().await;
}

#[tokio::test]
async fn a_visitor_cannot_touch_another_visitors_conversation() {
    let s = TestServer::start().await;
    let (site, _) = site_with_agent(&s).await;
    let mut alice = Client::visitor(&s, site.key.as_str()).await;
    alice.hello(None, vec![]).await;
    alice.say(&uuid(), None, "alice's secret").await;
    let (ack, _) = alice.until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    let (conv, _, _) = ack_of(&ack);

    let mut mallory = Client::visitor(&s, site.key.as_str()).await;
    let (_, between) = mallory.hello(None, vec![(conv.clone(), 0)]).await;
    assert!(
        matches!(&between[..], [ServerFrame::Error(e)] if e.code == ErrorCode::NotFound),
        "{between:?}"
    );
    mallory.say(&uuid(), Some(&conv), "let me in").await;
    assert_eq!(error_code(&mallory.next().await), ErrorCode::NotFound);
    mallory
        .send(&ClientFrame::History {
            req_id: "x".into(),
            conversation_id: conv.clone(),
            before_seq: None,
            after_seq: None,
            limit: None,
        })
        .await;
    assert_eq!(error_code(&mallory.next().await), ErrorCode::NotFound);
    // And Alice's next message does not reach Mallory.
    alice.say(&uuid(), None, "second").await;
    alice.until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    mallory.send(&ClientFrame::Ping).await;
    assert_eq!(mallory.next().await, ServerFrame::Pong);
    let (msgs, _) = s
        .store()
        .messages(conv.parse().unwrap(), SeqRange::After(0), 10)
        .await
        .unwrap();
    assert_eq!(msgs.len(), 2, "nothing of mallory's was stored");
    s.shutdown().await;
}

#[tokio::test]
async fn an_agent_of_site_a_cannot_reach_site_b() {
    let s = TestServer::start().await;
    let (site_a, token_a) = site_with_agent(&s).await;
    let site_b = s.create_site(&[ORIGIN]).await;
    let mut agent_a = Client::agent(&s, &token_a).await;
    agent_a.hello(None, vec![]).await;

    let mut vb = Client::visitor(&s, site_b.key.as_str()).await;
    vb.hello(None, vec![]).await;
    vb.say(&uuid(), None, "for site B only").await;
    let (ack, _) = vb.until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    let (conv_b, _, _) = ack_of(&ack);

    agent_a.say(&uuid(), Some(&conv_b), "intrusion").await;
    assert_eq!(
        error_code(&agent_a.next().await),
        ErrorCode::NotFound,
        "no B message or event reached A"
    );
    agent_a
        .send(&ClientFrame::History {
            req_id: "h".into(),
            conversation_id: conv_b.clone(),
            before_seq: None,
            after_seq: None,
            limit: None,
        })
        .await;
    assert_eq!(error_code(&agent_a.next().await), ErrorCode::NotFound);
    let mut agent_a2 = Client::agent(&s, &token_a).await;
    let (w, between) = agent_a2.hello(None, vec![(conv_b.clone(), 0)]).await;
    assert!(
        matches!(w, ServerFrame::Welcome { ref conversations, .. } if conversations.is_empty())
    );
    assert!(matches!(&between[..], [ServerFrame::Error(e)] if e.code == ErrorCode::NotFound));

    // A's own visitor still reaches A.
    let mut va = Client::visitor(&s, site_a.key.as_str()).await;
    va.hello(None, vec![]).await;
    va.say(&uuid(), None, "for A").await;
    let (m, skipped) = agent_a.until(is_message).await;
    assert!(matches!(m, ServerFrame::Message(ref m) if m.text == "for A"));
    assert!(skipped
        .iter()
        .all(|f| !matches!(f, ServerFrame::Message(_))));
    // An admin sees both sites.
    let admin = s.agent("root@example.com", AgentRole::Admin, &[]).await;
    let mut root = Client::agent(&s, &admin).await;
    let (w, _) = root.hello(None, vec![]).await;
    assert!(
        matches!(w, ServerFrame::Welcome { ref conversations, .. } if conversations.len() == 2)
    );
    let _ = SiteId::new();
    s.shutdown().await;
}

#[tokio::test]
async fn a_visitor_sees_its_messages_in_every_tab() {
    let s = TestServer::start().await;
    let (site, _) = site_with_agent(&s).await;
    let mut tab1 = Client::visitor(&s, site.key.as_str()).await;
    let (w, _) = tab1.hello(None, vec![]).await;
    let token = welcome_token(&w);
    let mut tab2 = Client::visitor(&s, site.key.as_str()).await;
    tab2.hello(Some(token), vec![]).await;
    tab1.say(&uuid(), None, "from tab 1").await;
    let (m, _) = tab2.until(is_message).await;
    assert!(matches!(m, ServerFrame::Message(ref m) if m.text == "from tab 1" && m.seq == 1));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_is_cut_loose_and_others_are_unaffected() {
    let s = TestServer::start_with(|c| {
        c.limits.outbound_queue = 64;
        c.limits.agent_outbound_queue = 64;
        c.limits.commit_batch = 32;
        c.limits.visitor_sends_per_sec = 100_000;
        c.limits.visitor_send_burst = 100_000;
        c.limits.frames_per_sec = 100_000;
        c.limits.frame_burst = 100_000;
    })
    .await;
    let (site, token) = site_with_agent(&s).await;
    let mut slow = Client::agent(&s, &token).await;
    slow.hello(None, vec![]).await;
    let mut fast = Client::agent(&s, &token).await;
    fast.hello(None, vec![]).await;
    let n = 5000usize;
    // The fast agent reads all along, in its own task.
    let reader = tokio::spawn(async move {
        let mut seen = 0;
        while seen < n {
            if let Some(ServerFrame::Message(_)) = fast.next_within(Duration::from_secs(30)).await {
                seen += 1;
            }
        }
        seen
    });
    let mut v = Client::visitor(&s, site.key.as_str()).await;
    v.hello(None, vec![]).await;
    let text = "y".repeat(4000);
    // Send in chunks, reading the acks (and echoes) of each chunk before the next.
    for _ in 0..(n / 100) {
        for _ in 0..100 {
            v.say(&uuid(), None, &text).await;
        }
        let mut acked = 0;
        while acked < 100 {
            if let ServerFrame::Ack { .. } = v.next().await {
                acked += 1;
            }
        }
    }
    let seen = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("fast agent in time")
        .expect("reader");
    assert_eq!(seen, n, "the fast agent received everything");
    // The slow agent read nothing all along: it was closed with slow_consumer.
    let (code, reason, _) = slow.closed().await;
    assert_eq!((code, reason.as_str()), (4000, "slow_consumer"));
    s.shutdown().await;
}

#[tokio::test]
async fn a_silent_client_is_closed_by_the_heartbeat() {
    let s = TestServer::start_with(|c| {
        c.limits.visitor_heartbeat_ms = 1_000;
        c.limits.visitor_lease_ms = 2_000;
    })
    .await;
    let (site, _) = site_with_agent(&s).await;
    let mut v = Client::visitor(&s, site.key.as_str()).await;
    v.hello(None, vec![]).await;
    // Read without answering pings.
    let started = std::time::Instant::now();
    let (code, reason, frames) = v.closed().await;
    assert_eq!((code, reason.as_str()), (4001, "heartbeat_timeout"));
    assert!(frames.contains(&ServerFrame::Ping));
    assert!(started.elapsed() < Duration::from_secs(5));
    s.shutdown().await;
}

#[tokio::test]
async fn no_hello_in_time_closes_the_connection() {
    let s = TestServer::start_with(|c| c.limits.hello_timeout_secs = 1).await;
    let (site, _) = site_with_agent(&s).await;
    let mut v = Client::visitor(&s, site.key.as_str()).await;
    let (code, reason, _) = v.closed().await;
    assert_eq!((code, reason.as_str()), (4002, "hello_timeout"));
    s.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_acks_in_flight_and_asks_clients_to_reconnect() {
    let s = TestServer::start().await;
    let (site, token) = site_with_agent(&s).await;
    let mut agent = Client::agent(&s, &token).await;
    agent.hello(None, vec![]).await;
    let mut v = Client::visitor(&s, site.key.as_str()).await;
    v.hello(None, vec![]).await;
    let ids: Vec<String> = (0..5).map(|_| uuid()).collect();
    for id in &ids {
        v.say(id, None, "before the drain").await;
    }
    // Wait until the sends are being read (the first ack), then drain.
    let (first, _) = v.until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    s.shutdown.cancel();
    let (code, reason, frames) = v.closed().await;
    assert_eq!((code, reason.as_str()), (1001, "draining"));
    assert!(frames.iter().any(|f| matches!(f, ServerFrame::Reconnect { reason: ReconnectReason::Draining, after_ms } if *after_ms < 5000)));
    let (code, _, _) = agent.closed().await;
    assert_eq!(code, 1001);
    // Every ack the client got names a stored message.
    let store = s.store.clone();
    let acks: Vec<(String, u64, bool)> = std::iter::once(&first)
        .chain(
            frames
                .iter()
                .filter(|f| matches!(f, ServerFrame::Ack { .. })),
        )
        .map(ack_of)
        .collect();
    for (conv, seq, _) in &acks {
        let (msgs, _) = store
            .messages(conv.parse().unwrap(), SeqRange::After(seq - 1), 1)
            .await
            .unwrap();
        assert_eq!(msgs.first().map(|m| m.seq), Some(*seq));
    }
    s.shutdown().await;
}

#[tokio::test]
async fn logging_out_closes_the_agents_sockets() {
    let s = TestServer::start().await;
    let (_site, token) = site_with_agent(&s).await;
    let mut agent = Client::agent(&s, &token).await;
    agent.hello(None, vec![]).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/api/logout", s.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let (code, reason, frames) = agent.closed().await;
    assert_eq!((code, reason.as_str()), (4003, "unauthorized"));
    assert!(matches!(&frames[..], [ServerFrame::Error(e)] if e.code == ErrorCode::Unauthorized));
    // And the token no longer opens a socket.
    let url = format!("ws://{}/ws/agent", s.addr);
    let auth = format!("Bearer {token}");
    assert!(matches!(
        connect_raw(&url, &[("authorization", &auth)]).await,
        Upgrade::Refused(401, _)
    ));
    s.shutdown().await;
}

#[tokio::test]
async fn a_client_initiated_close_is_answered() {
    let s = TestServer::start().await;
    let (site, _) = site_with_agent(&s).await;
    let mut v = Client::visitor(&s, site.key.as_str()).await;
    v.hello(None, vec![]).await;
    v.ws.send(tokio_tungstenite::tungstenite::Message::Close(None))
        .await
        .unwrap();
    // The server echoes the close frame (RFC 6455 closing handshake) and the stream ends.
    let (code, _, frames) = v.closed().await;
    assert_ne!(
        code, 1006,
        "the server answered with a close frame: {frames:?}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn operations_endpoints_answer() {
    let s = TestServer::start().await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", s.base_url())).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    // Produce some traffic, then the metrics show it.
    let (site, _) = site_with_agent(&s).await;
    let mut v = Client::visitor(&s, site.key.as_str()).await;
    v.hello(None, vec![]).await;
    v.say(&uuid(), None, "count me").await;
    v.until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    for name in [
        "hark_messages_stored_total",
        "hark_store_commit_seconds_bucket",
        "hark_store_batch_size_bucket",
        "hark_connections_opened_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    drop(v);
    // Draining: readiness goes away while the process still runs.
    s.shutdown.cancel();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match get("/readyz").await {
            Ok(r) if r.status() == 503 => break,
            Err(_) => break, // the listener already closed: not ready either
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed 200 while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.shutdown().await;
}
