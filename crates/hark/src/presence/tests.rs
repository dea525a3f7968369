//! The presence table driven directly, with tokio's clock paused: leases, grace, tabs, agent
//! availability, resumable lists, and a property test that an agent applying the deltas always
//! holds exactly the table's list.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hark_protocol::{
    AgentStatus, ChatState, GoneReason, ListMode, ListResume, PageView, ServerFrame,
};
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::delivery::event::{Audience, MessageEvent};
use crate::delivery::hub::{Interest, Registration, Subscriber};
use crate::delivery::outbox::{outbox, Inbox};
use crate::domain::AgentRole;

fn config() -> PresenceConfig {
    PresenceConfig {
        visitor_lease: Duration::from_secs(6),
        agent_lease: Duration::from_secs(25),
        grace: Duration::from_secs(3),
        away_after: Duration::from_secs(60),
        sweep_every: Duration::from_millis(250),
    }
}

struct Watcher {
    rx: Inbox,
    _reg: Registration,
}

impl Watcher {
    fn agents(hub: &Hub, site: SiteId) -> Watcher {
        Self::with(hub, Interest::Agent { sites: vec![site] })
    }

    fn visitor(hub: &Hub, site: SiteId, visitor: VisitorId) -> Watcher {
        Self::with(hub, Interest::Visitor { site, visitor })
    }

    fn with(hub: &Hub, interest: Interest) -> Watcher {
        let (tx, rx) = outbox(1 << 16);
        let reg = hub.register(
            Subscriber {
                conn: hub.next_conn_id(),
                tx,
                kick: CancellationToken::new(),
            },
            interest,
        );
        Watcher { rx, _reg: reg }
    }

    /// Every frame queued so far.
    fn frames(&mut self) -> Vec<ServerFrame> {
        let mut out = Vec::new();
        while let Some(ev) = self.rx.try_pop() {
            let frame = match ev {
                Event::Presence(p) => p.frame.clone(),
                _ => continue,
            };
            out.push(serde_json::from_str(frame.as_str()).expect("frames decode"));
        }
        out
    }
}

fn join(p: &Presence, site: SiteId, visitor: VisitorId, conn: u64, url: &str) -> VisitorLease {
    p.visitor_join(VisitorJoin {
        site,
        visitor,
        conn: ConnId(conn),
        kick: CancellationToken::new(),
        page: Some(PageView {
            url: url.into(),
            title: Some("T".into()),
            referrer: Some("https://search.test/".into()),
        }),
        user_agent: Some(
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36".into(),
        ),
        ip: None,
        name: None,
        email: None,
        chat: ChatSeed::default(),
    })
}

fn agent(sites: Vec<SiteId>) -> Agent {
    Agent {
        id: AgentId::new(),
        email: crate::domain::Email::parse("a@shop.test").expect("email"),
        name: "Ann".into(),
        role: AgentRole::Agent,
        site_ids: sites,
        disabled: false,
        created_at: 0,
    }
}

fn gone_of(frames: &[ServerFrame]) -> Vec<(String, GoneReason)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::VisitorGone {
                visitor_id, reason, ..
            } => Some((visitor_id.clone(), *reason)),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn tabs_keep_a_visitor_listed_until_the_last_closes_and_the_grace_ends() {
    let hub = Hub::new();
    let p = Presence::new(hub.clone(), config(), None);
    let site = SiteId::new();
    let v = VisitorId::new();
    let mut agents = Watcher::agents(&hub, site);

    let t1 = join(&p, site, v, 1, "https://shop.test/");
    let t2 = join(&p, site, v, 2, "https://shop.test/cart");
    assert_eq!(p.online_visitors(site), 1);
    let frames = agents.frames();
    let last = frames.last().expect("deltas");
    let ServerFrame::Visitor { visitor, .. } = last else {
        panic!("expected a visitor delta, got {last:?}")
    };
    assert_eq!(visitor.tabs, 2);
    assert_eq!(visitor.pages_viewed, 2);
    assert_eq!(visitor.page.url, "https://shop.test/cart");
    assert_eq!(visitor.browser.as_deref(), Some("Chrome 131"));

    drop(t1);
    p.sweep();
    assert_eq!(p.online_visitors(site), 1, "one tab is still open");
    drop(t2);
    p.sweep();
    assert_eq!(p.online_visitors(site), 1, "listed during the grace period");
    tokio::time::advance(Duration::from_millis(2_900)).await;
    p.sweep();
    assert_eq!(p.online_visitors(site), 1);
    tokio::time::advance(Duration::from_millis(200)).await;
    p.sweep();
    assert_eq!(p.online_visitors(site), 0);
    assert_eq!(
        gone_of(&agents.frames()),
        vec![(v.to_string(), GoneReason::Left)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_connection_loses_its_lease_and_the_entry_goes_at_once() {
    let hub = Hub::new();
    let p = Presence::new(hub.clone(), config(), None);
    let site = SiteId::new();
    let v = VisitorId::new();
    let mut agents = Watcher::agents(&hub, site);
    let kick = CancellationToken::new();
    let lease = p.visitor_join(VisitorJoin {
        kick: kick.clone(),
        ..VisitorJoin {
            site,
            visitor: v,
            conn: ConnId(1),
            kick: CancellationToken::new(),
            page: None,
            user_agent: None,
            ip: None,
            name: None,
            email: None,
            chat: ChatSeed::default(),
        }
    });
    // Heard from every 2.5 s for a minute: stays.
    for _ in 0..24 {
        tokio::time::advance(Duration::from_millis(2_500)).await;
        lease.touch();
        p.sweep();
    }
    assert_eq!(p.online_visitors(site), 1);
    assert!(!kick.is_cancelled());
    // Then silence (half-open TCP): gone once the lease runs out, without a grace period.
    tokio::time::advance(Duration::from_millis(5_900)).await;
    p.sweep();
    assert_eq!(p.online_visitors(site), 1);
    tokio::time::advance(Duration::from_millis(200)).await;
    p.sweep();
    assert_eq!(p.online_visitors(site), 0);
    assert!(kick.is_cancelled(), "the connection is told to close");
    assert!(lease.is_expired());
    // The connection task ends later; its guard must not remove anything twice.
    drop(lease);
    assert_eq!(
        gone_of(&agents.frames()),
        vec![(v.to_string(), GoneReason::Expired)]
    );
}

#[tokio::test(start_paused = true)]
async fn moving_to_the_next_page_does_not_flap() {
    let hub = Hub::new();
    let p = Presence::new(hub.clone(), config(), None);
    let site = SiteId::new();
    let v = VisitorId::new();
    let mut agents = Watcher::agents(&hub, site);
    let mut lease = join(&p, site, v, 1, "https://shop.test/a");
    for (i, page) in ["b", "c", "d"].iter().enumerate() {
        drop(lease);
        tokio::time::advance(Duration::from_millis(800)).await;
        p.sweep();
        lease = join(
            &p,
            site,
            v,
            10 + i as u64,
            &format!("https://shop.test/{page}"),
        );
        p.sweep();
    }
    let frames = agents.frames();
    assert!(gone_of(&frames).is_empty(), "no gone delta: {frames:?}");
    let ServerFrame::Visitor { visitor, .. } = frames.last().expect("deltas") else {
        panic!("expected a visitor delta")
    };
    assert_eq!(visitor.pages_viewed, 4);
    assert_eq!(visitor.page.url, "https://shop.test/d");
    assert_eq!(visitor.referrer.as_deref(), Some("https://search.test/"));
    drop(lease);
}

#[tokio::test(start_paused = true)]
async fn agents_resume_a_list_from_its_version_or_get_a_snapshot() {
    let hub = Hub::new();
    let p = Presence::new(hub.clone(), config(), None);
    let site = SiteId::new();
    let (v1, v2, v3) = (VisitorId::new(), VisitorId::new(), VisitorId::new());
    let l1 = join(&p, site, v1, 1, "https://shop.test/1");
    let l2 = join(&p, site, v2, 2, "https://shop.test/2");
    let (version, frames) = p.list(site, None);
    assert_eq!(frames.len(), 1);
    let ServerFrame::VisitorList {
        mode,
        visitors,
        epoch,
        done,
        ..
    } = &frames[0]
    else {
        panic!("expected a list")
    };
    assert_eq!(
        (*mode, visitors.len(), *done),
        (ListMode::Snapshot, 2, true)
    );
    let held = ListResume {
        site_id: site.to_string(),
        epoch: epoch.clone(),
        version,
    };
    // While the console is away: v1 leaves for good, v3 arrives.
    drop(l1);
    tokio::time::advance(Duration::from_secs(4)).await;
    p.sweep();
    let l3 = join(&p, site, v3, 3, "https://shop.test/3");
    let (_, frames) = p.list(site, Some(&held));
    let ServerFrame::VisitorList {
        mode,
        visitors,
        gone,
        ..
    } = &frames[0]
    else {
        panic!("expected a list")
    };
    assert_eq!(*mode, ListMode::Changes);
    assert_eq!(
        visitors
            .iter()
            .map(|v| v.visitor_id.clone())
            .collect::<Vec<_>>(),
        vec![v3.to_string()]
    );
    assert_eq!(gone, &vec![v1.to_string()]);
    // Another node's (or an earlier run's) epoch: a snapshot.
    let other = ListResume {
        epoch: "elsewhere".into(),
        ..held
    };
    let (_, frames) = p.list(site, Some(&other));
    assert!(matches!(
        &frames[0],
        ServerFrame::VisitorList { mode: ListMode::Snapshot, visitors, .. } if visitors.len() == 2
    ));
    drop((l2, l3));
}

#[tokio::test(start_paused = true)]
async fn long_lists_come_in_chunks() {
    let hub = Hub::new();
    let p = Presence::new(hub.clone(), config(), None);
    let site = SiteId::new();
    let leases: Vec<_> = (0..1_234)
        .map(|i| join(&p, site, VisitorId::new(), i, "https://shop.test/"))
        .collect();
    let (_, frames) = p.list(site, None);
    assert_eq!(frames.len(), 3);
    let total: usize = frames
        .iter()
        .map(|f| match f {
            ServerFrame::VisitorList { visitors, .. } => visitors.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(total, 1_234);
    assert!(matches!(
        frames.last(),
        Some(ServerFrame::VisitorList { done: true, .. })
    ));
    drop(leases);
}

#[tokio::test(start_paused = true)]
async fn agent_availability_follows_connections_choice_and_idleness() {
    let hub = Hub::new();
    let p = Presence::new(hub.clone(), config(), None);
    let site = SiteId::new();
    let visitor = VisitorId::new();
    let mut agents = Watcher::agents(&hub, site);
    let mut widget = Watcher::visitor(&hub, site, visitor);
    let ann = agent(vec![site]);
    let status = |frames: &[ServerFrame]| {
        frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::AgentStatus { agent, .. } => Some(agent.status),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let availability = |frames: &[ServerFrame]| {
        frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Availability { agents_available } => Some(*agents_available),
                _ => None,
            })
            .collect::<Vec<_>>()
    };

    let tab1 = p.agent_join(&ann, ConnId(1), CancellationToken::new());
    let tab2 = p.agent_join(&ann, ConnId(2), CancellationToken::new());
    assert!(p.agents_available(site));
    assert_eq!(status(&agents.frames()), vec![AgentStatus::Available]);
    assert_eq!(availability(&widget.frames()), vec![true]);

    p.set_status(ann.id, SetStatus::Away);
    assert!(!p.agents_available(site));
    p.set_status(ann.id, SetStatus::Available);
    // Idle past away_after (the consoles keep their leases with heartbeats).
    for _ in 0..7 {
        tokio::time::advance(Duration::from_secs(10)).await;
        tab1.touch();
        tab2.touch();
        p.sweep();
    }
    assert!(!p.agents_available(site), "idle agents show as away");
    p.agent_active(ann.id);
    assert!(p.agents_available(site));
    drop(tab1);
    assert!(p.agents_available(site), "one console is still open");
    drop(tab2);
    assert!(!p.agents_available(site));
    assert_eq!(
        status(&agents.frames()),
        vec![
            AgentStatus::Away,
            AgentStatus::Available,
            AgentStatus::Away,
            AgentStatus::Available,
            AgentStatus::Offline
        ]
    );
    assert_eq!(
        availability(&widget.frames()),
        vec![false, true, false, true, false]
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_console_goes_offline() {
    let hub = Hub::new();
    let p = Presence::new(hub.clone(), config(), None);
    let site = SiteId::new();
    let ann = agent(vec![site]);
    let kick = CancellationToken::new();
    let lease = p.agent_join(&ann, ConnId(1), kick.clone());
    tokio::time::advance(Duration::from_secs(26)).await;
    p.sweep();
    assert!(!p.agents_available(site));
    assert!(kick.is_cancelled() && lease.is_expired());
}

#[tokio::test(start_paused = true)]
async fn chat_state_and_unread_follow_messages_and_read_marks() {
    let hub = Hub::new();
    let p = Presence::new(hub.clone(), config(), None);
    let site = SiteId::new();
    let v = VisitorId::new();
    let conv = ConversationId::new();
    let ann = AgentId::new();
    let _lease = join(&p, site, v, 1, "https://shop.test/");
    let mut agents = Watcher::agents(&hub, site);
    let audience = Audience {
        site_id: site,
        visitor_id: v,
    };
    let message = |seq, writer| {
        Event::Message(Arc::new(MessageEvent {
            audience,
            conversation_id: conv,
            seq,
            writer,
            committed_at: std::time::Instant::now(),
            frame: "{}".into(),
        }))
    };
    let chat = |agents: &mut Watcher| {
        agents
            .frames()
            .into_iter()
            .filter_map(|f| match f {
                ServerFrame::Visitor { visitor, .. } => Some(visitor.chat),
                _ => None,
            })
            .next_back()
    };
    hub.dispatch(&message(1, Writer::Visitor));
    hub.dispatch(&message(2, Writer::Visitor));
    p.sweep();
    let c = chat(&mut agents).expect("a delta");
    assert_eq!((c.state, c.unread), (ChatState::Waiting, 2));
    assert_eq!(c.conversation_id, Some(conv.to_string()));
    hub.dispatch(&message(3, Writer::Agent(ann)));
    hub.dispatch(&message(4, Writer::Visitor));
    p.sweep();
    let c = chat(&mut agents).expect("a delta");
    assert_eq!((c.state, c.unread), (ChatState::Chatting, 1));
    assert_eq!(c.agent_ids, vec![ann.to_string()]);
    hub.dispatch(&Event::Signal(Arc::new(crate::delivery::event::Signal {
        audience,
        targets: crate::delivery::event::Targets::AgentsAndVisitor,
        kind: SignalKind::Read {
            conversation_id: conv,
            by_agent: true,
            seq: 4,
        },
        frame: "{}".into(),
    })));
    p.sweep();
    assert_eq!(chat(&mut agents).expect("a delta").unread, 0);
    // Many messages between two sweeps make one delta, not one each.
    for seq in 5..50 {
        hub.dispatch(&message(seq, Writer::Visitor));
    }
    p.sweep();
    let deltas = agents.frames();
    assert_eq!(deltas.len(), 1, "coalesced: {deltas:?}");
}

/// An agent's copy of a list, built from a snapshot and the deltas that follow it.
#[derive(Default)]
struct Copy {
    version: u64,
    visitors: BTreeMap<String, u32>,
}

impl Copy {
    fn apply(&mut self, f: &ServerFrame) {
        match f {
            ServerFrame::VisitorList {
                version,
                mode,
                visitors,
                gone,
                ..
            } => {
                if *mode == ListMode::Snapshot {
                    self.visitors.clear();
                }
                for g in gone {
                    self.visitors.remove(g);
                }
                for v in visitors {
                    self.visitors.insert(v.visitor_id.clone(), v.tabs);
                }
                self.version = *version;
            }
            ServerFrame::Visitor {
                version, visitor, ..
            } if *version > self.version => {
                self.visitors
                    .insert(visitor.visitor_id.clone(), visitor.tabs);
                self.version = *version;
            }
            ServerFrame::VisitorGone {
                version,
                visitor_id,
                ..
            } if *version > self.version => {
                self.visitors.remove(visitor_id);
                self.version = *version;
            }
            _ => {}
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Visitor `v` opens a tab.
    Open(u8),
    /// Tab `i` (of those open, modulo) closes cleanly.
    Close(u8),
    /// Tab `i` goes silent (half-open).
    Silence(u8),
    /// Time passes (ms), with the sweeper running and the non-silent tabs heard from.
    Wait(u16),
    /// The console reconnects, resuming from the version it holds.
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..12).prop_map(Op::Open),
        3 => any::<u8>().prop_map(Op::Close),
        1 => any::<u8>().prop_map(Op::Silence),
        3 => (0u16..4_000).prop_map(Op::Wait),
        1 => Just(Op::Reconnect),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the order of tabs opening, closing, going silent, time passing and the console
    /// reconnecting: the agent's copy equals the table, the table lists exactly the visitors
    /// with a live tab or within their grace period, and once everything is closed and the
    /// bound has passed, nobody is left.
    #[test]
    fn the_agents_copy_is_always_the_truth(ops in proptest::collection::vec(op(), 1..120)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let hub = Hub::new();
            let p = Presence::new(hub.clone(), config(), None);
            let site = SiteId::new();
            let visitors: Vec<VisitorId> = (0..12).map(|_| VisitorId::new()).collect();
            let mut agents = Watcher::agents(&hub, site);
            let mut copy = Copy::default();
            let (_, frames) = p.list(site, None);
            frames.iter().for_each(|f| copy.apply(f));
            let mut open: Vec<(usize, VisitorLease, bool)> = Vec::new();
            let mut next_conn = 1;
            for op in ops {
                match op {
                    Op::Open(v) => {
                        let v = v as usize;
                        open.push((v, join(&p, site, visitors[v], next_conn, "https://shop.test/"), false));
                        next_conn += 1;
                    }
                    Op::Close(i) if !open.is_empty() => {
                        let i = i as usize % open.len();
                        open.remove(i);
                    }
                    Op::Silence(i) if !open.is_empty() => {
                        let i = i as usize % open.len();
                        open[i].2 = true;
                    }
                    Op::Wait(ms) => {
                        let mut left = ms as u64;
                        while left > 0 {
                            let step = left.min(250);
                            tokio::time::advance(Duration::from_millis(step)).await;
                            left -= step;
                            for (_, lease, silent) in &open {
                                if !*silent {
                                    lease.touch();
                                }
                            }
                            p.sweep();
                        }
                        // Expired tabs' tasks end.
                        open.retain(|(_, lease, _)| !lease.is_expired());
                    }
                    Op::Reconnect => {
                        agents.frames().iter().for_each(|f| copy.apply(f));
                        let held = ListResume {
                            site_id: site.to_string(),
                            epoch: p.epoch().to_owned(),
                            version: copy.version,
                        };
                        agents = Watcher::agents(&hub, site);
                        let (_, frames) = p.list(site, Some(&held));
                        frames.iter().for_each(|f| copy.apply(f));
                    }
                    _ => {}
                }
                agents.frames().iter().for_each(|f| copy.apply(f));
                let (_, snap) = p.list(site, None);
                let mut truth = Copy::default();
                snap.iter().for_each(|f| truth.apply(f));
                prop_assert_eq!(&copy.visitors, &truth.visitors);
                // Every visitor with a live tab is listed.
                let live: BTreeSet<String> = open.iter().map(|(v, _, _)| visitors[*v].to_string()).collect();
                for v in &live {
                    prop_assert!(truth.visitors.contains_key(v), "visitor with a live tab missing");
                }
            }
            // Everything closes; within grace (clean) or lease (silent) plus a sweep, all gone.
            drop(open);
            for _ in 0..40 {
                tokio::time::advance(Duration::from_millis(250)).await;
                p.sweep();
            }
            agents.frames().iter().for_each(|f| copy.apply(f));
            prop_assert_eq!(p.online_visitors(site), 0);
            prop_assert!(copy.visitors.is_empty(), "stuck in the agent's copy: {:?}", copy.visitors);
            Ok(())
        })?;
    }
}

/// Applies one table's announcements to another, as the cluster link does over NATS.
struct Direct {
    node: NodeId,
    to: Presence,
}

impl Replicator for Direct {
    fn visitor(&self, site: SiteId, visitor: VisitorId, holding: Option<Holding>) {
        self.to.apply_visitor(self.node, site, visitor, holding);
    }
    fn agent(&self, agent: AgentId, holding: Option<AgentHolding>) {
        self.to.apply_agent(self.node, agent, holding);
    }
}

#[tokio::test(start_paused = true)]
async fn holdings_of_two_nodes_merge_into_one_entry() {
    let (hub_a, hub_b) = (Hub::new(), Hub::new());
    let a = Presence::new(hub_a.clone(), config(), None);
    let b = Presence::new(hub_b.clone(), config(), None);
    let node_a = NodeId::now_v7();
    a.set_replicator(Arc::new(Direct {
        node: node_a,
        to: b.clone(),
    }));
    let site = SiteId::new();
    let v = VisitorId::new();
    let mut on_b = Watcher::agents(&hub_b, site);
    let tab_a = join(&a, site, v, 1, "https://shop.test/a");
    tokio::time::advance(Duration::from_millis(10)).await;
    let tab_b = join(&b, site, v, 2, "https://shop.test/b");
    let last = |w: &mut Watcher| {
        w.frames()
            .into_iter()
            .filter_map(|f| match f {
                ServerFrame::Visitor { visitor, .. } => Some(visitor),
                _ => None,
            })
            .next_back()
    };
    let entry = last(&mut on_b).expect("deltas on B");
    assert_eq!((entry.tabs, entry.pages_viewed), (2, 2));
    assert_eq!(
        entry.page.url, "https://shop.test/b",
        "the latest page wins"
    );
    // A's tab closes and its grace ends: B still lists the visitor, with B's tab only.
    drop(tab_a);
    tokio::time::advance(Duration::from_secs(4)).await;
    a.sweep();
    let entry = last(&mut on_b).expect("a delta");
    assert_eq!(entry.tabs, 1);
    assert_eq!(b.online_visitors(site), 1);
    // A comes back with a tab; then A is declared down: B keeps its own tab's entry.
    let _tab_a2 = join(&a, site, v, 3, "https://shop.test/c");
    assert_eq!(last(&mut on_b).expect("a delta").tabs, 2);
    b.drop_node(node_a);
    assert_eq!(last(&mut on_b).expect("a delta").tabs, 1);
    // B's own tab closes: gone.
    drop(tab_b);
    tokio::time::advance(Duration::from_secs(4)).await;
    b.sweep();
    assert_eq!(b.online_visitors(site), 0);
    // A visitor held only by A disappears from B when A is declared down, as expired.
    let w = VisitorId::new();
    let _only_a = join(&a, site, w, 4, "https://shop.test/");
    assert!(b.is_listed(site, w));
    b.drop_node(node_a);
    assert!(!b.is_listed(site, w));
    assert_eq!(
        gone_of(&on_b.frames()),
        vec![
            (v.to_string(), GoneReason::Left),
            (w.to_string(), GoneReason::Expired)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_agent_available_on_any_node_is_available() {
    let (hub_a, hub_b) = (Hub::new(), Hub::new());
    let a = Presence::new(hub_a.clone(), config(), None);
    let b = Presence::new(hub_b.clone(), config(), None);
    let node_a = NodeId::now_v7();
    a.set_replicator(Arc::new(Direct {
        node: node_a,
        to: b.clone(),
    }));
    let site = SiteId::new();
    let ann = agent(vec![site]);
    let on_a = a.agent_join(&ann, ConnId(1), CancellationToken::new());
    assert!(b.agents_available(site), "B learns A's console");
    a.set_status(ann.id, SetStatus::Away);
    assert!(!b.agents_available(site));
    let on_b = b.agent_join(&ann, ConnId(2), CancellationToken::new());
    assert!(b.agents_available(site), "available on B's console");
    drop(on_b);
    assert!(!b.agents_available(site), "away on A's");
    drop(on_a);
    b.drop_node(node_a);
    assert!(!b.agents_available(site));
}
