//! Presence over real sockets: tabs, connections that vanish, navigation, site isolation,
//! agent availability, typing and read receipts.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use hark::domain::AgentRole;
use hark_protocol::{
    AgentStatus, ClientFrame, GoneReason, ListMode, ListResume, PageView, Party, ServerFrame,
    SetStatus, VisitorPresence,
};

/// An agent's copy of one site's visitor list, kept from the frames it receives.
#[derive(Default, Debug)]
pub struct ListCopy {
    pub epoch: String,
    pub version: u64,
    pub visitors: BTreeMap<String, VisitorPresence>,
    pub agents: BTreeMap<String, AgentStatus>,
    pub gone: Vec<(String, GoneReason)>,
    pending: Option<BTreeMap<String, VisitorPresence>>,
}

impl ListCopy {
    /// Applies one frame; returns whether it was about this list.
    pub fn apply(&mut self, site: &str, f: &ServerFrame) -> bool {
        match f {
            ServerFrame::VisitorList {
                site_id,
                epoch,
                version,
                mode,
                visitors,
                gone,
                agents,
                done,
            } if site_id == site => {
                let target = self.pending.get_or_insert_with(|| match mode {
                    ListMode::Snapshot => BTreeMap::new(),
                    ListMode::Changes => self.visitors.clone(),
                });
                for g in gone {
                    target.remove(g);
                }
                for v in visitors {
                    target.insert(v.visitor_id.clone(), v.clone());
                }
                if *mode == ListMode::Snapshot && !agents.is_empty() {
                    self.agents.clear();
                }
                for a in agents {
                    self.agents.insert(a.agent_id.clone(), a.status);
                }
                if *done {
                    self.visitors = self.pending.take().unwrap_or_default();
                    self.epoch = epoch.clone();
                    self.version = *version;
                }
                true
            }
            ServerFrame::Visitor {
                site_id,
                version,
                visitor,
            } if site_id == site => {
                assert!(*version > self.version, "deltas arrive in version order");
                self.version = *version;
                self.visitors
                    .insert(visitor.visitor_id.clone(), visitor.clone());
                true
            }
            ServerFrame::VisitorGone {
                site_id,
                version,
                visitor_id,
                reason,
            } if site_id == site => {
                assert!(*version > self.version, "deltas arrive in version order");
                self.version = *version;
                self.visitors.remove(visitor_id);
                self.gone.push((visitor_id.clone(), *reason));
                true
            }
            ServerFrame::AgentStatus {
                site_id,
                version,
                agent,
            } if site_id == site => {
                assert!(*version > self.version, "deltas arrive in version order");
                self.version = *version;
                self.agents.insert(agent.agent_id.clone(), agent.status);
                true
            }
            _ => false,
        }
    }

    pub fn resume(&self, site: &str) -> ListResume {
        ListResume {
            site_id: site.to_owned(),
            epoch: self.epoch.clone(),
            version: self.version,
        }
    }
}

fn page(url: &str) -> Option<PageView> {
    Some(PageView {
        url: url.to_owned(),
        title: Some(format!("Title of {url}")),
        referrer: Some("https://search.test/?q=shoes".to_owned()),
    })
}

/// A visitor connection whose hello carries a page.
async fn visitor_on(
    server: &TestServer,
    key: &str,
    token: Option<String>,
    url: &str,
) -> (Client, String, String) {
    let mut v = Client::visitor(server, key).await;
    v.send(&ClientFrame::Hello {
        token,
        resume: vec![],
        page: page(url),
        presence: vec![],
    })
    .await;
    let welcome = v.next().await;
    let token = welcome_token(&welcome);
    let ServerFrame::Welcome {
        session: hark_protocol::SessionInfo::Visitor { visitor_id, .. },
        ..
    } = &welcome
    else {
        panic!("expected a visitor welcome: {welcome:?}")
    };
    let id = visitor_id.clone();
    v.until(|f| *f == ServerFrame::Ready).await;
    (v, token, id)
}

/// What a console received while loading a list.
pub struct Loaded {
    pub mode: Option<ListMode>,
    /// Visitor entries sent (a resume sends only the changed ones).
    pub entries: Vec<String>,
}

/// An agent console watching presence, its copy of `site`'s list loaded: from scratch, or
/// resumed from the copy it held.
async fn console(
    server: &TestServer,
    token: &str,
    site: &str,
    held: Option<ListCopy>,
) -> (Client, ListCopy, Loaded) {
    let mut a = Client::agent(server, token).await;
    a.presence = true;
    let resume = held.as_ref().map(|h| h.resume(site));
    a.send(&ClientFrame::Hello {
        token: None,
        resume: vec![],
        page: None,
        presence: resume.into_iter().collect(),
    })
    .await;
    let mut copy = held.unwrap_or_default();
    let mut loaded = Loaded {
        mode: None,
        entries: Vec::new(),
    };
    loop {
        let f = a.next().await;
        if f == ServerFrame::Ready {
            break;
        }
        if let ServerFrame::VisitorList {
            site_id,
            mode,
            visitors,
            ..
        } = &f
        {
            if site_id == site {
                loaded.mode = Some(*mode);
                loaded
                    .entries
                    .extend(visitors.iter().map(|v| v.visitor_id.clone()));
            }
        }
        copy.apply(site, &f);
    }
    (a, copy, loaded)
}

/// Reads frames into `copy` until `pred` holds, with a deadline.
async fn watch_until(
    agent: &mut Client,
    site: &str,
    copy: &mut ListCopy,
    within: Duration,
    mut pred: impl FnMut(&ListCopy) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !pred(copy) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match agent.next_within(left).await {
            Some(f) => {
                copy.apply(site, &f);
            }
            None => panic!("condition not reached within {within:?}; list is {copy:?}"),
        }
    }
}

async fn setup() -> (TestServer, String, String, String) {
    let server = TestServer::start().await;
    let site = server.create_site(&[ORIGIN]).await;
    let agent = server
        .agent("ann@shop.test", AgentRole::Agent, &[site.id])
        .await;
    (
        server,
        site.key.as_str().to_owned(),
        site.id.to_string(),
        agent,
    )
}

#[tokio::test]
async fn tabs_open_and_close_and_the_visitor_leaves_after_the_grace_period() {
    let (server, key, site, agent) = setup().await;
    let (mut a, mut list, _) = console(&server, &agent, &site, None).await;
    assert!(list.visitors.is_empty());

    let (mut tab1, token, vid) = visitor_on(&server, &key, None, "https://shop.test/").await;
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors.contains_key(&vid)
    })
    .await;
    let (mut tab2, _, vid2) =
        visitor_on(&server, &key, Some(token), "https://shop.test/shoes").await;
    assert_eq!(vid, vid2, "same visitor, second tab");
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors.get(&vid).is_some_and(|v| v.tabs == 2)
    })
    .await;
    let v = &list.visitors[&vid];
    assert_eq!(v.page.url, "https://shop.test/shoes");
    assert_eq!(
        v.page.title.as_deref(),
        Some("Title of https://shop.test/shoes")
    );
    assert_eq!(v.referrer.as_deref(), Some("https://search.test/?q=shoes"));
    assert_eq!(v.pages_viewed, 2);
    assert!(v.online_since > 0);

    tab1.ws.close(None).await.expect("close tab 1");
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors.get(&vid).is_some_and(|v| v.tabs == 1)
    })
    .await;
    let closed = Instant::now();
    tab2.ws.close(None).await.expect("close tab 2");
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        !l.visitors.contains_key(&vid)
    })
    .await;
    let took = closed.elapsed();
    assert!(
        took >= Duration::from_millis(2_500) && took < Duration::from_secs(10),
        "left after the grace period, within the bound: {took:?}"
    );
    assert_eq!(list.gone, vec![(vid, GoneReason::Left)]);
}

#[tokio::test]
async fn a_silent_connection_leaves_the_list_within_ten_seconds() {
    let (server, key, site, agent) = setup().await;
    let (mut a, mut list, _) = console(&server, &agent, &site, None).await;
    let (silent, _, vid) = visitor_on(&server, &key, None, "https://shop.test/").await;
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors.contains_key(&vid)
    })
    .await;
    // The visitor's network vanishes: the socket stays open but nothing is read or answered
    // (no close frame, no FIN), as with a half-open TCP connection.
    let went_silent = Instant::now();
    watch_until(&mut a, &site, &mut list, Duration::from_secs(15), |l| {
        !l.visitors.contains_key(&vid)
    })
    .await;
    let took = went_silent.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "gone within the bound: {took:?}"
    );
    assert_eq!(list.gone, vec![(vid, GoneReason::Expired)]);
    drop(silent);
}

#[tokio::test]
async fn a_dropped_socket_without_a_close_frame_leaves_the_list() {
    let (server, key, site, agent) = setup().await;
    let (mut a, mut list, _) = console(&server, &agent, &site, None).await;
    let (v, _, vid) = visitor_on(&server, &key, None, "https://shop.test/").await;
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors.contains_key(&vid)
    })
    .await;
    let dropped = Instant::now();
    drop(v); // TCP closes with no WebSocket close frame
    watch_until(&mut a, &site, &mut list, Duration::from_secs(15), |l| {
        !l.visitors.contains_key(&vid)
    })
    .await;
    assert!(dropped.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn moving_to_the_next_page_does_not_flap() {
    let (server, key, site, agent) = setup().await;
    let (mut a, mut list, _) = console(&server, &agent, &site, None).await;
    let (mut v, mut token, vid) = visitor_on(&server, &key, None, "https://shop.test/p/0").await;
    for i in 1..=4 {
        v.ws.close(None).await.expect("close");
        tokio::time::sleep(Duration::from_millis(400)).await; // the next page loads
        let (next, t, id) = visitor_on(
            &server,
            &key,
            Some(token),
            &format!("https://shop.test/p/{i}"),
        )
        .await;
        assert_eq!(id, vid);
        (v, token) = (next, t);
    }
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors
            .get(&vid)
            .is_some_and(|v| v.pages_viewed == 5 && v.tabs == 1)
    })
    .await;
    // Nothing flapped, and nothing does once the grace periods are over.
    let quiet = a.next_within(Duration::from_secs(4)).await;
    if let Some(f) = &quiet {
        list.apply(&site, f);
    }
    assert!(list.gone.is_empty(), "no gone delta: {:?}", list.gone);
    assert_eq!(list.visitors[&vid].page.url, "https://shop.test/p/4");
    drop(v);
}

#[tokio::test]
async fn page_frames_update_the_list_and_profiles_show_names() {
    let (server, key, site, agent) = setup().await;
    let (mut a, mut list, _) = console(&server, &agent, &site, None).await;
    let (mut v, _, vid) = visitor_on(&server, &key, None, "https://shop.test/").await;
    v.send(&ClientFrame::Page(PageView {
        url: "https://shop.test/checkout".into(),
        title: Some("Checkout".into()),
        referrer: None,
    }))
    .await;
    v.send(&ClientFrame::Identify {
        name: Some("  Grace Hopper ".into()),
        email: Some("Grace@Example.com".into()),
    })
    .await;
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors
            .get(&vid)
            .is_some_and(|v| v.page.url.ends_with("/checkout") && v.email.is_some())
    })
    .await;
    let entry = &list.visitors[&vid];
    assert_eq!(entry.name.as_deref(), Some("Grace Hopper"));
    assert_eq!(entry.email.as_deref(), Some("grace@example.com"));
    assert_eq!(entry.pages_viewed, 2);
    // Bad input gets an error and changes nothing.
    v.send(&ClientFrame::Identify {
        name: None,
        email: Some("not an address".into()),
    })
    .await;
    let (err, _) = v.until(|f| matches!(f, ServerFrame::Error(_))).await;
    let ServerFrame::Error(e) = err else {
        unreachable!()
    };
    assert_eq!(e.code, hark_protocol::ErrorCode::BadRequest);
    // The profile is stored: a new console sees it.
    let (_a2, list2, _) = console(&server, &agent, &site, None).await;
    assert_eq!(list2.visitors[&vid].name.as_deref(), Some("Grace Hopper"));
}

#[tokio::test]
async fn a_visitor_of_one_site_never_appears_in_another_sites_list() {
    let server = TestServer::start().await;
    let site_a = server.create_site(&[ORIGIN]).await;
    let site_b = server.create_site(&[ORIGIN]).await;
    let agent_b = server
        .agent("bob@shop.test", AgentRole::Agent, &[site_b.id])
        .await;
    let admin = server.agent("root@shop.test", AgentRole::Admin, &[]).await;
    let (sa, sb) = (site_a.id.to_string(), site_b.id.to_string());
    let (mut b, mut list_b, _) = console(&server, &agent_b, &sb, None).await;
    let (mut adm, mut list_admin_a, _) = console(&server, &admin, &sa, None).await;
    let (_va, _, vid_a) = visitor_on(&server, site_a.key.as_str(), None, "https://a.test/").await;
    let (_vb, _, vid_b) = visitor_on(&server, site_b.key.as_str(), None, "https://b.test/").await;
    watch_until(&mut b, &sb, &mut list_b, DEADLINE, |l| {
        l.visitors.contains_key(&vid_b)
    })
    .await;
    watch_until(&mut adm, &sa, &mut list_admin_a, DEADLINE, |l| {
        l.visitors.contains_key(&vid_a)
    })
    .await;
    // Site B's agent: nothing of site A, in deltas or in a fresh list.
    while let Some(f) = b.next_within(Duration::from_millis(500)).await {
        let text = serde_json::to_string(&f).expect("encode");
        assert!(
            !text.contains(&vid_a) && !text.contains(&sa),
            "leak: {text}"
        );
    }
    let (_b2, fresh, _) = console(&server, &agent_b, &sb, None).await;
    assert_eq!(fresh.visitors.keys().collect::<Vec<_>>(), vec![&vid_b]);
    assert!(!list_b.visitors.contains_key(&vid_a));
}

#[tokio::test]
async fn a_console_resumes_its_list_with_only_the_changes() {
    let (server, key, site, agent) = setup().await;
    let (mut a, mut list, loaded) = console(&server, &agent, &site, None).await;
    assert_eq!(loaded.mode, Some(ListMode::Snapshot));
    let (stay, _, vid_stay) = visitor_on(&server, &key, None, "https://shop.test/").await;
    let (leave, _, vid_leave) = visitor_on(&server, &key, None, "https://shop.test/").await;
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors.len() == 2
    })
    .await;
    drop(a); // the console's network drops
    drop(leave);
    let (new, _, vid_new) = visitor_on(&server, &key, None, "https://shop.test/new").await;
    tokio::time::sleep(Duration::from_millis(3_500)).await; // past the grace period
    let (_a2, resumed, loaded) = console(&server, &agent, &site, Some(list)).await;
    assert_eq!(loaded.mode, Some(ListMode::Changes));
    assert_eq!(
        loaded.entries,
        vec![vid_new.clone()],
        "only what changed is sent"
    );
    assert_eq!(
        resumed.visitors.keys().cloned().collect::<Vec<_>>(),
        {
            let mut truth = vec![vid_stay, vid_new];
            truth.sort();
            truth
        },
        "{vid_leave} is gone from the resumed copy"
    );
    // The resumed copy equals a fresh snapshot.
    let (_a3, fresh, _) = console(&server, &agent, &site, None).await;
    assert_eq!(
        fresh.visitors.keys().collect::<Vec<_>>(),
        resumed.visitors.keys().collect::<Vec<_>>()
    );
    drop((stay, new));
}

#[tokio::test]
async fn agent_availability_reaches_agents_and_the_widget() {
    let (server, key, site, agent) = setup().await;
    let mut v = Client::visitor(&server, &key).await;
    v.presence = true;
    let (_, between) = v.hello(None, vec![]).await;
    assert!(
        between.contains(&ServerFrame::Availability {
            agents_available: false
        }),
        "no agent yet: {between:?}"
    );
    let (mut a, list, _) = console(&server, &agent, &site, None).await;
    let me = list
        .agents
        .keys()
        .next()
        .cloned()
        .expect("the agent lists itself");
    assert_eq!(list.agents[&me], AgentStatus::Available);
    v.until(|f| {
        *f == ServerFrame::Availability {
            agents_available: true,
        }
    })
    .await;
    a.send(&ClientFrame::Status {
        status: SetStatus::Away,
    })
    .await;
    v.until(|f| {
        *f == ServerFrame::Availability {
            agents_available: false,
        }
    })
    .await;
    a.until(|f| matches!(f, ServerFrame::AgentStatus { agent, .. } if agent.status == AgentStatus::Away))
        .await;
    a.send(&ClientFrame::Status {
        status: SetStatus::Available,
    })
    .await;
    v.until(|f| {
        *f == ServerFrame::Availability {
            agents_available: true,
        }
    })
    .await;
    // The console closes: offline, and the widget knows.
    a.ws.close(None).await.expect("close");
    v.until(|f| {
        *f == ServerFrame::Availability {
            agents_available: false,
        }
    })
    .await;
}

#[tokio::test]
async fn visitors_cannot_set_a_status_and_agents_cannot_report_pages() {
    let (server, key, _site, agent) = setup().await;
    let mut v = Client::visitor(&server, &key).await;
    v.hello(None, vec![]).await;
    v.send(&ClientFrame::Status {
        status: SetStatus::Away,
    })
    .await;
    let (f, _) = v.until(|f| matches!(f, ServerFrame::Error(_))).await;
    assert!(matches!(f, ServerFrame::Error(e) if e.code == hark_protocol::ErrorCode::BadRequest));
    let mut a = Client::agent(&server, &agent).await;
    a.hello(None, vec![]).await;
    a.send(&ClientFrame::Page(PageView {
        url: "https://x.test/".into(),
        title: None,
        referrer: None,
    }))
    .await;
    let (f, _) = a.until(|f| matches!(f, ServerFrame::Error(_))).await;
    assert!(matches!(f, ServerFrame::Error(e) if e.code == hark_protocol::ErrorCode::BadRequest));
}

#[tokio::test]
async fn typing_previews_reach_agents_only_and_read_receipts_go_both_ways() {
    let (server, key, site, agent) = setup().await;
    let (mut a, mut list, _) = console(&server, &agent, &site, None).await;
    let (mut v, token, vid) = visitor_on(&server, &key, None, "https://shop.test/").await;
    // Typing before the first message: no conversation yet, the preview reaches the agent.
    v.send(&ClientFrame::Typing {
        conversation_id: None,
        typing: true,
        preview: Some("Do you ship to".into()),
    })
    .await;
    let (f, _) = a.until(|f| matches!(f, ServerFrame::Typing { .. })).await;
    assert_eq!(
        f,
        ServerFrame::Typing {
            visitor_id: vid.clone(),
            conversation_id: None,
            from: Party::Visitor,
            agent_id: None,
            typing: true,
            preview: Some("Do you ship to".into()),
        }
    );
    v.say(&uuid(), None, "Do you ship to Norway?").await;
    let (ack, _) = v.until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    let ServerFrame::Ack {
        conversation_id, ..
    } = ack
    else {
        unreachable!()
    };
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors.get(&vid).is_some_and(|v| {
            v.chat.state == hark_protocol::ChatState::Waiting && v.chat.unread == 1
        })
    })
    .await;
    // The agent types with a draft: the visitor sees that the agent types, never the draft.
    a.send(&ClientFrame::Typing {
        conversation_id: Some(conversation_id.clone()),
        typing: true,
        preview: Some("secret draft".into()),
    })
    .await;
    let (f, _) = v.until(|f| matches!(f, ServerFrame::Typing { .. })).await;
    let ServerFrame::Typing {
        from,
        preview,
        agent_id,
        ..
    } = &f
    else {
        unreachable!()
    };
    assert_eq!((*from, preview.as_deref()), (Party::Agent, None));
    assert!(agent_id.is_some());
    // Read receipts: the agent reads seq 1, the visitor is told, the unread count clears.
    a.send(&ClientFrame::Read {
        conversation_id: conversation_id.clone(),
        seq: 1,
    })
    .await;
    let (f, _) = v.until(|f| matches!(f, ServerFrame::Read { .. })).await;
    assert!(matches!(
        f,
        ServerFrame::Read {
            by: Party::Agent,
            seq: 1,
            ..
        }
    ));
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors.get(&vid).is_some_and(|v| v.chat.unread == 0)
    })
    .await;
    // The agent answers; the visitor reads it; the agent is told.
    a.say(&uuid(), Some(&conversation_id), "We do!").await;
    v.until(|f| matches!(f, ServerFrame::Message(m) if m.seq == 2))
        .await;
    v.send(&ClientFrame::Read {
        conversation_id: conversation_id.clone(),
        seq: 2,
    })
    .await;
    a.until(|f| {
        matches!(
            f,
            ServerFrame::Read {
                by: Party::Visitor,
                seq: 2,
                ..
            }
        )
    })
    .await;
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors
            .get(&vid)
            .is_some_and(|v| v.chat.state == hark_protocol::ChatState::Chatting)
    })
    .await;
    // A mark beyond the last message is stored as the last message; marks never go back.
    v.send(&ClientFrame::Read {
        conversation_id: conversation_id.clone(),
        seq: 99,
    })
    .await;
    a.until(|f| {
        matches!(
            f,
            ServerFrame::Read {
                by: Party::Visitor,
                seq: 2,
                ..
            }
        )
    })
    .await;
    // After a reconnect, the visitor learns the agent's mark again (1: the agent's own message
    // does not move its mark; clients count their own messages as read).
    drop(v);
    let mut v2 = Client::visitor(&server, &key).await;
    let (_, between) = v2
        .hello(Some(token), vec![(conversation_id.clone(), 2)])
        .await;
    assert!(
        between.iter().any(|f| matches!(
            f,
            ServerFrame::Read {
                by: Party::Agent,
                seq: 1,
                ..
            }
        )),
        "read marks after resume: {between:?}"
    );
    // Someone else's conversation: not found.
    let mut other = Client::visitor(&server, &key).await;
    other.hello(None, vec![]).await;
    other
        .send(&ClientFrame::Read {
            conversation_id: conversation_id.clone(),
            seq: 1,
        })
        .await;
    let (f, _) = other.until(|f| matches!(f, ServerFrame::Error(_))).await;
    assert!(matches!(f, ServerFrame::Error(e) if e.code == hark_protocol::ErrorCode::NotFound));
}

#[tokio::test]
async fn an_agent_starts_a_chat_with_a_browsing_visitor() {
    let (server, key, site, agent) = setup().await;
    let other_site = server.create_site(&[ORIGIN]).await;
    let outsider = server
        .agent("olga@shop.test", AgentRole::Agent, &[other_site.id])
        .await;
    let (mut a, mut list, _) = console(&server, &agent, &site, None).await;
    let (mut v, _, vid) = visitor_on(&server, &key, None, "https://shop.test/pricing").await;
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors
            .get(&vid)
            .is_some_and(|v| v.chat.state == hark_protocol::ChatState::Browsing)
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/visitors/{vid}/conversations", server.base_url());
    // An agent of another site cannot reach this visitor; a bad text is refused first.
    let r = http
        .post(&url)
        .bearer_auth(&outsider)
        .json(&serde_json::json!({"text": "hi"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
    let r = http
        .post(&url)
        .bearer_auth(&agent)
        .json(&serde_json::json!({"text": "   "}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "text_empty");

    let client_id = uuid();
    let r = http
        .post(&url)
        .bearer_auth(&agent)
        .json(&serde_json::json!({"text": "Hi! Questions about pricing?", "client_id": client_id}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.expect("json");
    let conv = body["conversation"]["id"].as_str().expect("id").to_owned();
    assert_eq!(body["message"]["seq"], 1);
    // The visitor's tab learns of the conversation and gets the message.
    v.until(
        |f| matches!(f, ServerFrame::Conversation { conversation, .. } if conversation.id == conv),
    )
    .await;
    let (m, _) = v
        .until(|f| matches!(f, ServerFrame::Message(m) if m.conversation_id == conv))
        .await;
    assert!(matches!(m, ServerFrame::Message(m) if m.text == "Hi! Questions about pricing?"));
    // The list shows the visitor chatting with the agent.
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors
            .get(&vid)
            .is_some_and(|v| v.chat.state == hark_protocol::ChatState::Chatting)
    })
    .await;
    // The same request again (a retry): the same conversation, the message stored once.
    let r = http
        .post(&url)
        .bearer_auth(&agent)
        .json(&serde_json::json!({"text": "Hi! Questions about pricing?", "client_id": client_id}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let again: serde_json::Value = r.json().await.expect("json");
    assert_eq!(again["conversation"]["id"], conv.as_str());
    assert_eq!(again["message"]["seq"], 1);
    assert_eq!(again["conversation"]["last_seq"], 1);
    // The visitor answers in the same conversation and reads; the marks are there over REST.
    v.say(&uuid(), None, "Yes, is there a discount?").await;
    v.until(|f| matches!(f, ServerFrame::Ack { conversation_id, seq: 2, .. } if *conversation_id == conv))
        .await;
    v.send(&ClientFrame::Read {
        conversation_id: conv.clone(),
        seq: 2,
    })
    .await;
    a.until(|f| {
        matches!(
            f,
            ServerFrame::Read {
                by: Party::Visitor,
                seq: 2,
                ..
            }
        )
    })
    .await;
    let marks: serde_json::Value = http
        .get(format!(
            "{}/api/conversations/{conv}/read",
            server.base_url()
        ))
        .bearer_auth(&agent)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(
        marks["marks"],
        serde_json::json!([{"reader": "visitor", "seq": 2}])
    );
    let r = http
        .get(format!(
            "{}/api/conversations/{conv}/read",
            server.base_url()
        ))
        .bearer_auth(&outsider)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn presence_metrics_are_exported() {
    let (server, key, site, agent) = setup().await;
    let (mut a, mut list, _) = console(&server, &agent, &site, None).await;
    let (v, _, vid) = visitor_on(&server, &key, None, "https://shop.test/").await;
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors.contains_key(&vid)
    })
    .await;
    let (v2, _, vid2) = visitor_on(&server, &key, None, "https://shop.test/").await;
    watch_until(&mut a, &site, &mut list, DEADLINE, |l| {
        l.visitors.contains_key(&vid2)
    })
    .await;
    drop(v2); // dropped without a close frame: leaves after the grace period
    watch_until(&mut a, &site, &mut list, Duration::from_secs(10), |l| {
        !l.visitors.contains_key(&vid2)
    })
    .await;
    let text = reqwest::get(format!("{}/metrics", server.base_url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix) && l.contains(&site))
            .unwrap_or_else(|| panic!("no {prefix} for the site in:\n{text}"))
            .to_owned()
    };
    assert!(line("hark_presence_visitors").ends_with(" 1"), "one online");
    assert!(line("hark_presence_agents").ends_with(" 1"), "one agent");
    assert!(
        text.lines()
            .any(|l| l.starts_with("hark_presence_removed_total{reason=\"left\"}")),
        "removals by reason"
    );
    assert!(text.contains("hark_presence_fanout_seconds"), "fan-out lag");
    drop(v);
}
