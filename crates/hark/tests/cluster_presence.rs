//! Presence across the nodes of a cluster: real `hark serve` processes (so that one can be
//! killed with SIGKILL or frozen with SIGSTOP), PostgreSQL, and a real `nats-server`. A visitor
//! on one node is listed on every node; a dead node's visitors leave every list within 10 s; a
//! node that comes back after being declared down does not resurrect visitors that left
//! meanwhile; a node that starts late learns who is online.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::cluster::HarkNode;
use common::nats::NatsServer;
use common::pg::FreshDb;
use common::*;
use hark::domain::AgentRole;
use hark_protocol::{ClientFrame, GoneReason, ListMode, PageView, ServerFrame, VisitorPresence};

async fn visitor_at(port: u16, key: &str, url: &str) -> (Client, String) {
    let (c, id, _) = visitor_with(port, key, None, url).await;
    (c, id)
}

async fn visitor_with(
    port: u16,
    key: &str,
    token: Option<String>,
    url: &str,
) -> (Client, String, String) {
    let ws = format!("ws://127.0.0.1:{port}/ws/visitor?site_key={key}");
    let mut v = match connect_raw(&ws, &[("origin", ORIGIN)]).await {
        Upgrade::Ok(c) => *c,
        Upgrade::Refused(s, b) => panic!("visitor refused: {s} {b}"),
    };
    v.send(&ClientFrame::Hello {
        token,
        resume: vec![],
        page: Some(PageView {
            url: url.into(),
            title: None,
            referrer: None,
        }),
        presence: vec![],
    })
    .await;
    let welcome = v.next().await;
    let token = welcome_token(&welcome);
    let ServerFrame::Welcome {
        session: hark_protocol::SessionInfo::Visitor { visitor_id, .. },
        ..
    } = welcome
    else {
        panic!("expected a welcome")
    };
    v.until(|f| *f == ServerFrame::Ready).await;
    (v, visitor_id, token)
}

/// An agent console on a node, with its copy of one site's list.
struct Console {
    c: Client,
    site: String,
    visitors: BTreeMap<String, VisitorPresence>,
    gone: Vec<(String, GoneReason)>,
    version: u64,
}

impl Console {
    async fn open(port: u16, token: &str, site: &str) -> Console {
        let url = format!("ws://127.0.0.1:{port}/ws/agent");
        let auth = format!("Bearer {token}");
        let mut c = match connect_raw(&url, &[("authorization", &auth)]).await {
            Upgrade::Ok(c) => *c,
            Upgrade::Refused(s, b) => panic!("agent refused: {s} {b}"),
        };
        c.presence = true;
        c.send(&ClientFrame::Hello {
            token: None,
            resume: vec![],
            page: None,
            presence: vec![],
        })
        .await;
        let mut me = Console {
            c,
            site: site.to_owned(),
            visitors: BTreeMap::new(),
            gone: Vec::new(),
            version: 0,
        };
        loop {
            let f = me.c.next().await;
            if f == ServerFrame::Ready {
                return me;
            }
            me.apply(&f);
        }
    }

    fn apply(&mut self, f: &ServerFrame) {
        match f {
            ServerFrame::VisitorList {
                site_id,
                mode,
                visitors,
                version,
                ..
            } if *site_id == self.site => {
                assert_eq!(*mode, ListMode::Snapshot);
                self.visitors
                    .extend(visitors.iter().map(|v| (v.visitor_id.clone(), v.clone())));
                self.version = *version;
            }
            ServerFrame::Visitor {
                site_id,
                visitor,
                version,
            } if *site_id == self.site => {
                assert!(*version > self.version);
                self.version = *version;
                self.visitors
                    .insert(visitor.visitor_id.clone(), visitor.clone());
            }
            ServerFrame::VisitorGone {
                site_id,
                visitor_id,
                reason,
                version,
            } if *site_id == self.site => {
                assert!(*version > self.version);
                self.version = *version;
                self.visitors.remove(visitor_id);
                self.gone.push((visitor_id.clone(), *reason));
            }
            _ => {}
        }
    }

    /// Follows the list until `pred` holds; panics after `within`.
    async fn until(
        &mut self,
        within: Duration,
        pred: impl Fn(&BTreeMap<String, VisitorPresence>) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while !pred(&self.visitors) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.c.next_within(left).await {
                Some(f) => self.apply(&f),
                None => panic!(
                    "list condition not reached within {within:?}: {:?}",
                    self.visitors
                ),
            }
        }
    }

    /// Follows the list for `d`, returning every visitor id that appeared meanwhile.
    async fn watch(&mut self, d: Duration) -> BTreeSet<String> {
        let deadline = tokio::time::Instant::now() + d;
        let mut seen = BTreeSet::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.c.next_within(left).await {
                Some(f) => {
                    if let ServerFrame::Visitor { visitor, .. } = &f {
                        seen.insert(visitor.visitor_id.clone());
                    }
                    self.apply(&f);
                }
                None => return seen,
            }
        }
    }
}

/// A cluster of two nodes on one database and one NATS server, a site and an agent.
async fn cluster() -> (
    FreshDb,
    NatsServer,
    TestServer,
    HarkNode,
    String,
    String,
    String,
    tempfile::TempDir,
) {
    let db = FreshDb::create().await;
    let nats = NatsServer::start().await;
    // One node in this process (for the store and setup), one as a process to kill or freeze.
    let url = db.url.clone();
    let nats_url = nats.url();
    let b = TestServer::start_with(move |c| {
        c.database = Some(hark::config::Secret::new(url));
        c.nats = vec![nats_url];
    })
    .await;
    let site = b.create_site(&[ORIGIN]).await;
    let token = b.agent("ann@shop.test", AgentRole::Agent, &[site.id]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let a = HarkNode::start("a", dir.path(), &db.url, &[nats.url()]).await;
    (
        db,
        nats,
        b,
        a,
        site.key.as_str().to_owned(),
        site.id.to_string(),
        token,
        dir,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_on_one_node_is_listed_on_every_node_with_tabs_on_both() {
    let (_db, _nats, b, mut a, key, site, token, _dir) = cluster().await;
    let mut on_b = Console::open(b.addr.port(), &token, &site).await;
    let mut on_a = Console::open(a.port, &token, &site).await;
    let (tab_a, vid, visitor_token) = visitor_with(a.port, &key, None, "https://shop.test/a").await;
    on_b.until(DEADLINE, |l| l.contains_key(&vid)).await;
    on_a.until(DEADLINE, |l| l.contains_key(&vid)).await;
    // The same visitor opens a tab that lands on the other node: one entry, two tabs, the
    // latest page, on both nodes.
    let (tab_b, vid_b, _) = visitor_with(
        b.addr.port(),
        &key,
        Some(visitor_token),
        "https://shop.test/b",
    )
    .await;
    assert_eq!(vid_b, vid);
    for console in [&mut on_a, &mut on_b] {
        console
            .until(DEADLINE, |l| {
                l.get(&vid)
                    .is_some_and(|v| v.tabs == 2 && v.page.url == "https://shop.test/b")
            })
            .await;
    }
    // The tab on node A closes: still listed everywhere, with one tab.
    drop(tab_a);
    for console in [&mut on_a, &mut on_b] {
        console
            .until(DEADLINE, |l| l.get(&vid).is_some_and(|v| v.tabs == 1))
            .await;
    }
    // The last tab closes: gone everywhere after the grace period.
    drop(tab_b);
    for console in [&mut on_a, &mut on_b] {
        console
            .until(Duration::from_secs(10), |l| !l.contains_key(&vid))
            .await;
    }
    a.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_visitors_leave_every_list_within_ten_seconds() {
    let (_db, _nats, b, mut a, key, site, token, _dir) = cluster().await;
    let mut on_b = Console::open(b.addr.port(), &token, &site).await;
    let mut on_a_visitors = Vec::new();
    let mut ids = BTreeSet::new();
    for i in 0..5 {
        let (v, id) = visitor_at(a.port, &key, &format!("https://shop.test/{i}")).await;
        on_a_visitors.push(v);
        ids.insert(id);
    }
    let (_local, local_id) = {
        let mut v = Client::visitor(&b, &key).await;
        let (w, _) = v.hello(None, vec![]).await;
        let ServerFrame::Welcome {
            session: hark_protocol::SessionInfo::Visitor { visitor_id, .. },
            ..
        } = w
        else {
            panic!("welcome")
        };
        (v, visitor_id)
    };
    on_b.until(DEADLINE, |l| {
        ids.iter().all(|i| l.contains_key(i)) && l.contains_key(&local_id)
    })
    .await;
    let killed = Instant::now();
    a.kill9().await;
    on_b.until(Duration::from_secs(15), |l| {
        !ids.iter().any(|i| l.contains_key(i))
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "gone within the bound: {took:?}"
    );
    assert!(
        on_b.gone
            .iter()
            .filter(|(id, _)| ids.contains(id))
            .all(|(_, r)| *r == GoneReason::Expired),
        "a dead node's visitors expire: {:?}",
        on_b.gone
    );
    assert!(
        on_b.visitors.contains_key(&local_id),
        "the live node's visitor stays"
    );
    println!("dead node's visitors gone after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_from_a_freeze_does_not_resurrect_visitors_that_left() {
    let (_db, _nats, b, mut a, key, site, token, _dir) = cluster().await;
    let mut on_b = Console::open(b.addr.port(), &token, &site).await;
    let (v, vid) = visitor_at(a.port, &key, "https://shop.test/").await;
    on_b.until(DEADLINE, |l| l.contains_key(&vid)).await;
    // Node A freezes (a long GC-like pause, a VM stall); node B declares it down.
    a.send_signal(libc::SIGSTOP);
    on_b.until(Duration::from_secs(10), |l| !l.contains_key(&vid))
        .await;
    // Meanwhile the visitor leaves (its socket closes; node A will only see it later).
    drop(v);
    a.send_signal(libc::SIGCONT);
    // Node A comes back and announces what it holds: not this visitor.
    let reappeared = on_b.watch(Duration::from_secs(8)).await;
    assert!(
        !reappeared.contains(&vid),
        "a visitor that left while its node was frozen came back"
    );
    assert!(!on_b.visitors.contains_key(&vid));
    // Node A is a full member again: a new visitor on it is listed on B.
    let (_v2, vid2) = visitor_at(a.port, &key, "https://shop.test/again").await;
    on_b.until(DEADLINE, |l| l.contains_key(&vid2)).await;
    a.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_starts_late_learns_who_is_online() {
    let (db, nats, b, mut a, key, site, token, dir) = cluster().await;
    let mut ids = BTreeSet::new();
    let mut keep = Vec::new();
    for i in 0..3 {
        let (v, id) = visitor_at(a.port, &key, &format!("https://shop.test/{i}")).await;
        keep.push(v);
        ids.insert(id);
        let mut w = Client::visitor(&b, &key).await;
        let (welcome, _) = w.hello(None, vec![]).await;
        if let ServerFrame::Welcome {
            session: hark_protocol::SessionInfo::Visitor { visitor_id, .. },
            ..
        } = welcome
        {
            ids.insert(visitor_id);
        }
        keep.push(w);
    }
    let mut late = HarkNode::start("late", dir.path(), &db.url, &[nats.url()]).await;
    let mut on_late = Console::open(late.port, &token, &site).await;
    on_late
        .until(DEADLINE, |l| {
            l.keys().cloned().collect::<BTreeSet<_>>() == ids
        })
        .await;
    drop(keep);
    on_late
        .until(Duration::from_secs(10), |l| l.is_empty())
        .await;
    late.kill9().await;
    a.kill9().await;
}
