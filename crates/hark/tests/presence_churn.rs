//! 5,000 simulated visitors arrive, move between pages, open second tabs, leave cleanly or
//! vanish, for a minute, while an agent console watches (and reconnects twice mid-churn). At the
//! end the console's list equals the truth exactly: no visitor stuck, none missing.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hark::domain::AgentRole;
use hark_protocol::{ClientFrame, ListMode, ListResume, PageView, ServerFrame};
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

const VISITORS: usize = 5_000;
const CHURN: Duration = Duration::from_secs(60);

/// Open connections per visitor id, as the simulated browsers know them.
type Truth = Arc<Mutex<HashMap<String, u32>>>;

fn page(i: u32) -> Option<PageView> {
    Some(PageView {
        url: format!("https://shop.test/p/{i}"),
        title: Some(format!("Page {i}")),
        referrer: None,
    })
}

/// Opens a visitor connection; returns it with its token and visitor id once `ready`. None if
/// the node refused it (admission control), which the browser retries.
async fn open(
    addr: &str,
    key: &str,
    token: Option<String>,
    n: u32,
) -> Option<(Client, String, String)> {
    let url = format!("ws://{addr}/ws/visitor?site_key={key}");
    let mut c = match connect_raw(&url, &[("origin", ORIGIN)]).await {
        Upgrade::Ok(c) => *c,
        Upgrade::Refused(..) => return None,
    };
    c.send(&ClientFrame::Hello {
        token,
        resume: vec![],
        page: page(n),
        presence: vec![],
    })
    .await;
    let welcome = c.next().await;
    let token = welcome_token(&welcome);
    let ServerFrame::Welcome {
        session: hark_protocol::SessionInfo::Visitor { visitor_id, .. },
        ..
    } = welcome
    else {
        panic!("expected a welcome")
    };
    c.until(|f| *f == ServerFrame::Ready).await;
    Some((c, token, visitor_id))
}

/// Keeps a connection alive (answering pings) for `d`. Returns false if the server closed it
/// meanwhile (on a loaded machine a browser may miss its heartbeats; it then reconnects, as the
/// widget does).
async fn live_for(c: &mut Client, d: Duration) -> bool {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, c.ws.next()).await {
            Err(_) => return true,
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.as_str() == r#"{"type":"ping"}"# {
                    let _ = c.ws.send(Message::text(r#"{"type":"pong"}"#)).await;
                }
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => return false,
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn add(truth: &Truth, id: &str, n: i32) {
    let mut t = truth.lock().expect("truth");
    let e = t.entry(id.to_owned()).or_insert(0);
    *e = (*e as i32 + n) as u32;
    if *e == 0 {
        t.remove(id);
    }
}

/// One simulated browser: comes and goes until `stop`, then stays as it is (online or not)
/// until `end`, then closes everything.
async fn browser(
    addr: String,
    key: String,
    truth: Truth,
    stop: CancellationToken,
    end: CancellationToken,
) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut token: Option<String> = None;
    let mut pages = 0u32;
    // Spread the first arrivals over 5 s.
    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..5_000))).await;
    let mut current: Option<(Client, String)> = None;
    while !stop.is_cancelled() {
        if current.is_none() {
            pages += 1;
            match open(&addr, &key, token.clone(), pages).await {
                Some((c, t, id)) => {
                    add(&truth, &id, 1);
                    token = Some(t);
                    current = Some((c, id));
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(100..1_000))).await;
                    continue;
                }
            }
        }
        let Some((c, id)) = current.as_mut() else {
            continue;
        };
        if !live_for(c, Duration::from_millis(rng.gen_range(1_000..12_000))).await {
            // Closed by the server (missed heartbeats): gone from its view; reconnect.
            let (_, id) = current.take().expect("open");
            add(&truth, &id, -1);
            continue;
        }
        if stop.is_cancelled() {
            break;
        }
        let roll: u32 = rng.gen_range(0..100);
        if roll < 45 {
            // Next page: close, reconnect shortly after with the same token.
            let (mut c, id) = current.take().expect("open");
            let _ = c.ws.close(None).await;
            add(&truth, &id, -1);
            tokio::time::sleep(Duration::from_millis(rng.gen_range(50..800))).await;
        } else if roll < 60 {
            // A second tab for a while.
            pages += 1;
            if let Some((mut tab, _, tab_id)) = open(&addr, &key, token.clone(), pages).await {
                assert_eq!(&tab_id, id, "same visitor in the second tab");
                add(&truth, &tab_id, 1);
                let d = Duration::from_millis(rng.gen_range(500..4_000));
                let (_, main_alive) = tokio::join!(live_for(&mut tab, d), live_for(c, d));
                let _ = tab.ws.close(None).await;
                add(&truth, &tab_id, -1);
                if !main_alive {
                    let (_, id) = current.take().expect("open");
                    add(&truth, &id, -1);
                }
            }
        } else if roll < 85 {
            // Leaves; comes back later (same visitor) or as someone new.
            let (mut c, id) = current.take().expect("open");
            let _ = c.ws.close(None).await;
            add(&truth, &id, -1);
            if rng.gen_bool(0.3) {
                token = None;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(rng.gen_range(1_000..10_000))) => {}
                _ = stop.cancelled() => {}
            }
        } else {
            // The socket drops with no close frame (a crash, a lost network).
            let (c, id) = current.take().expect("open");
            drop(c);
            add(&truth, &id, -1);
            tokio::time::sleep(Duration::from_millis(rng.gen_range(200..3_000))).await;
        }
    }
    // Hold the final state until the checks are done.
    if let Some((mut c, id)) = current {
        tokio::select! {
            _ = live_for(&mut c, Duration::from_secs(600)) => {}
            _ = end.cancelled() => {}
        }
        let _ = c.ws.close(None).await;
        add(&truth, &id, -1);
    }
}

/// An agent's copy of the list (visitor ids only).
#[derive(Default)]
struct Copy {
    epoch: String,
    version: u64,
    visitors: BTreeSet<String>,
    pending: Option<BTreeSet<String>>,
}

impl Copy {
    fn apply(&mut self, site: &str, f: &ServerFrame) {
        match f {
            ServerFrame::VisitorList {
                site_id,
                epoch,
                version,
                mode,
                visitors,
                gone,
                done,
                ..
            } if site_id == site => {
                let target = self.pending.get_or_insert_with(|| match mode {
                    ListMode::Snapshot => BTreeSet::new(),
                    ListMode::Changes => self.visitors.clone(),
                });
                for g in gone {
                    target.remove(g);
                }
                for v in visitors {
                    target.insert(v.visitor_id.clone());
                }
                if *done {
                    self.visitors = self.pending.take().unwrap_or_default();
                    self.epoch = epoch.clone();
                    self.version = *version;
                }
            }
            ServerFrame::Visitor {
                site_id,
                version,
                visitor,
            } if site_id == site => {
                assert!(*version > self.version, "deltas in version order");
                self.version = *version;
                self.visitors.insert(visitor.visitor_id.clone());
            }
            ServerFrame::VisitorGone {
                site_id,
                version,
                visitor_id,
                ..
            } if site_id == site => {
                assert!(*version > self.version, "deltas in version order");
                self.version = *version;
                self.visitors.remove(visitor_id);
            }
            ServerFrame::AgentStatus {
                site_id, version, ..
            } if site_id == site => {
                self.version = *version;
            }
            _ => {}
        }
    }
}

async fn console(
    server: &TestServer,
    token: &str,
    site: &str,
    copy: &mut Copy,
    resume: bool,
) -> (Client, Option<ListMode>) {
    let mut a = Client::agent(server, token).await;
    a.presence = true;
    let held = resume.then(|| ListResume {
        site_id: site.to_owned(),
        epoch: copy.epoch.clone(),
        version: copy.version,
    });
    a.send(&ClientFrame::Hello {
        token: None,
        resume: vec![],
        page: None,
        presence: held.into_iter().collect(),
    })
    .await;
    let mut mode = None;
    loop {
        let f = a.next().await;
        if f == ServerFrame::Ready {
            return (a, mode);
        }
        if let ServerFrame::VisitorList { mode: m, .. } = &f {
            mode = Some(*m);
        }
        copy.apply(site, &f);
    }
}

/// Reads the console's frames into `copy` for `d`.
async fn follow(a: &mut Client, site: &str, copy: &mut Copy, d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match a.next_within(left).await {
            Some(f) => copy.apply(site, &f),
            None => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_visitors_churn_for_a_minute_and_the_agents_list_is_the_truth() {
    let server = TestServer::start_with(|c| {
        c.limits.accepts_per_sec = 5_000;
        // 5,000 browsers and the server share this process and two cores: slower beats keep
        // their cost down. The 10 s bound for silent connections is tested in presence.rs.
        c.limits.visitor_heartbeat_ms = 5_000;
        c.limits.visitor_lease_ms = 15_000;
    })
    .await;
    let site = server.create_site(&[ORIGIN]).await;
    let (key, site_id) = (site.key.as_str().to_owned(), site.id.to_string());
    let token = server
        .agent("ann@shop.test", AgentRole::Agent, &[site.id])
        .await;
    let addr = server.addr.to_string();
    let truth: Truth = Arc::default();
    let (stop, end) = (CancellationToken::new(), CancellationToken::new());

    let mut copy = Copy::default();
    let (mut a, mode) = console(&server, &token, &site_id, &mut copy, false).await;
    assert_eq!(mode, Some(ListMode::Snapshot));

    let browsers: Vec<_> = (0..VISITORS)
        .map(|_| {
            tokio::spawn(browser(
                addr.clone(),
                key.clone(),
                truth.clone(),
                stop.clone(),
                end.clone(),
            ))
        })
        .collect();

    // The console follows the churn, dropping and resuming its connection twice.
    let third = CHURN / 3;
    follow(&mut a, &site_id, &mut copy, third).await;
    drop(a);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut a, mode) = console(&server, &token, &site_id, &mut copy, true).await;
    assert_eq!(mode, Some(ListMode::Changes), "resumed from its version");
    follow(&mut a, &site_id, &mut copy, third).await;
    drop(a);
    let (mut a, _) = console(&server, &token, &site_id, &mut copy, true).await;
    follow(&mut a, &site_id, &mut copy, third).await;

    // Churn stops; every browser keeps its last state. Past the grace period and a sweep, the
    // console's copy must equal the truth exactly.
    stop.cancel();
    follow(&mut a, &site_id, &mut copy, Duration::from_secs(6)).await;
    let expected: BTreeSet<String> = truth.lock().expect("truth").keys().cloned().collect();
    let stuck: Vec<_> = copy.visitors.difference(&expected).collect();
    let missing: Vec<_> = expected.difference(&copy.visitors).collect();
    assert!(
        stuck.is_empty() && missing.is_empty(),
        "{} stuck, {} missing (of {} online)",
        stuck.len(),
        missing.len(),
        expected.len()
    );
    assert!(
        expected.len() > VISITORS / 4,
        "a real population is online: {}",
        expected.len()
    );
    // A console that connects now sees the same.
    let mut fresh = Copy::default();
    let (_f, _) = console(&server, &token, &site_id, &mut fresh, false).await;
    assert_eq!(fresh.visitors, expected);

    // Everyone leaves: within the bound, nobody is left.
    end.cancel();
    for b in browsers {
        b.await.expect("browser");
    }
    assert!(truth.lock().expect("truth").is_empty());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !copy.visitors.is_empty() && tokio::time::Instant::now() < deadline {
        follow(&mut a, &site_id, &mut copy, Duration::from_millis(250)).await;
    }
    let left: BTreeMap<_, _> = copy.visitors.iter().take(5).map(|v| (v, ())).collect();
    assert!(
        copy.visitors.is_empty(),
        "stuck after everyone left: {left:?}"
    );
}
