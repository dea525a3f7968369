//! Presence: who is online, as leases held by live connections.
//!
//! Every entry of the visitor list is held by at least one live connection's *lease*. A lease
//! ends when its connection task ends (the guard is dropped on every path out of the task), or
//! when the connection has been silent past its lease time (half-open TCP, a stuck peer): the
//! sweeper then removes it and cuts the connection. Nothing else creates or keeps an entry, so
//! nothing can outlive its holder and nobody ever clears the list by hand.
//!
//! A visitor whose last tab closes cleanly stays listed for a short grace period, so that moving
//! to the next page (close, then reconnect within about a second) does not flap the entry out and
//! back in. A lease that expires skips the grace: the bound is grace or lease time plus one sweep,
//! both well under the 10 s promised.
//!
//! Agents see each site's list as a snapshot and then versioned deltas, which go to the hub while
//! the site's lock is held, so every connection receives them in version order. Each site keeps
//! tombstones of recent removals, so an agent reconnecting to the same node (same `epoch`) gets
//! only what changed since the version it holds.
//!
//! In a cluster each node holds the leases of its own connections and announces its *holding*
//! of each visitor and agent to the others (`cluster.rs`); every node merges the holdings into
//! the same lists. A node that falls silent is declared down and its holdings are dropped
//! everywhere.
//!
//! Agent availability lives here too: available or away as the agent sets it, away after a
//! configurable idle time, offline when the agent's last console connection ends. Visitors learn
//! only whether some agent of their site is available.

pub mod client_info;
pub mod cluster;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hark_protocol::{
    AgentPresence, AgentStatus, ChatInfo, ChatState, GoneReason, ListMode, ListResume, Location,
    PageView, ServerFrame, SetStatus, VisitorPresence, MAX_PAGE_FIELD_BYTES,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::delivery::event::{Event, PresenceEvent, PresenceTargets, SignalKind, Writer};
use crate::delivery::hub::{ConnId, Hub, Observer};
use crate::domain::{now_ms, Agent, AgentId, ConversationId, Seq, SiteId, VisitorId};
use client_info::{parse_user_agent, GeoIp};

/// Visitors per `visitor_list` frame.
const LIST_CHUNK: usize = 500;
/// Removals remembered per site for resuming agents; older resumes get a snapshot.
const MAX_TOMBSTONES: usize = 10_000;
/// Unread visitor messages counted per visitor (the list shows "99+" beyond).
const MAX_UNREAD: usize = 100;
/// Agents named in one visitor's chat info.
const MAX_CHAT_AGENTS: usize = 8;

/// Timings of presence.
#[derive(Debug, Clone, Copy)]
pub struct PresenceConfig {
    /// A visitor connection silent this long loses its lease.
    pub visitor_lease: Duration,
    /// An agent connection silent this long loses its lease.
    pub agent_lease: Duration,
    /// How long a visitor whose last tab closed stays listed (navigation).
    pub grace: Duration,
    /// An available agent idle this long becomes away.
    pub away_after: Duration,
    /// How often leases, grace periods and idle agents are checked.
    pub sweep_every: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            visitor_lease: Duration::from_secs(6),
            agent_lease: Duration::from_secs(25),
            grace: Duration::from_secs(3),
            away_after: Duration::from_secs(600),
            sweep_every: Duration::from_millis(250),
        }
    }
}

/// The liveness of one connection, shared by the connection (which touches it on every frame it
/// receives) and the sweeper (which expires it).
pub struct LeaseCell {
    /// Milliseconds since the table's origin when the connection was last heard from.
    heard: AtomicU64,
    /// Set by the sweeper when the lease ran out; the connection then closes as timed out.
    expired: AtomicBool,
    /// Cancelled to make the connection close.
    kick: CancellationToken,
}

impl LeaseCell {
    pub fn is_expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }
}

/// What is known about a visitor's chat, followed from the events this node dispatches.
#[derive(Debug, Clone, Default)]
pub struct ChatSeed {
    pub conversation: Option<ConversationId>,
    pub assignee: Option<AgentId>,
    /// Agents who wrote in the open conversation.
    pub writers: Vec<AgentId>,
    /// Seqs of visitor messages no agent has read.
    pub unread: Vec<Seq>,
}

/// A visitor connection's arrival.
pub struct VisitorJoin {
    pub site: SiteId,
    pub visitor: VisitorId,
    pub conn: ConnId,
    pub kick: CancellationToken,
    pub page: Option<PageView>,
    pub user_agent: Option<String>,
    pub ip: Option<IpAddr>,
    pub name: Option<String>,
    pub email: Option<String>,
    /// The chat state read from the store; used only if the visitor is not already listed.
    pub chat: ChatSeed,
}

struct VisitorConn {
    conn: ConnId,
    lease: Arc<LeaseCell>,
}

/// Identifies a node of the cluster (its incarnation: new at every start).
pub type NodeId = uuid::Uuid;

/// One node's part of a visitor's presence: what its connections of that visitor show. Nodes
/// exchange these; each node merges them into the visitor's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub tabs: u32,
    pub page: PageView,
    /// When `page` was shown (Unix ms): the merged entry shows the latest page of any node.
    pub page_at: i64,
    pub pages_viewed: u32,
    pub referrer: Option<String>,
    pub online_since: i64,
    pub browser: Option<String>,
    pub os: Option<String>,
    pub location: Option<Location>,
    pub name: Option<String>,
    pub email: Option<String>,
}

/// One node's part of an agent's availability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHolding {
    pub name: String,
    pub sites: Vec<SiteId>,
    pub status: AgentStatus,
}

struct VisitorEntry {
    /// This node's part; meaningful while `conns` is not empty or the grace period runs.
    local: Holding,
    conns: Vec<VisitorConn>,
    /// Set when the last connection closed cleanly: removed once the grace period is over.
    leaving_since: Option<Instant>,
    /// Other nodes' parts.
    remote: Vec<(NodeId, Holding)>,
    chat: ChatSeed,
    view: VisitorPresence,
    version: u64,
}

impl VisitorEntry {
    fn held_here(&self) -> bool {
        !self.conns.is_empty() || self.leaving_since.is_some()
    }

    fn held(&self) -> bool {
        self.held_here() || !self.remote.is_empty()
    }

    /// This node's holding as announced to the others.
    fn announced(&self) -> Option<Holding> {
        self.held_here().then(|| Holding {
            tabs: self.conns.len() as u32,
            ..self.local.clone()
        })
    }

    /// Rebuilds the entry as agents see it from every node's part and the chat state.
    fn render(&mut self) {
        let mut parts: Vec<&Holding> = self.remote.iter().map(|(_, h)| h).collect();
        if self.held_here() {
            parts.push(&self.local);
        }
        let tabs = self.conns.len() as u32 + self.remote.iter().map(|(_, h)| h.tabs).sum::<u32>();
        let Some(first) = parts.iter().min_by_key(|h| h.online_since).copied() else {
            return;
        };
        let latest = parts
            .iter()
            .max_by_key(|h| h.page_at)
            .copied()
            .unwrap_or(first);
        let known = |f: fn(&Holding) -> &Option<String>| {
            parts
                .iter()
                .filter(|h| f(h).is_some())
                .max_by_key(|h| h.page_at)
                .and_then(|h| f(h).clone())
        };
        let view = &mut self.view;
        view.page = latest.page.clone();
        view.referrer = first.referrer.clone();
        view.online_since = first.online_since;
        view.pages_viewed = parts.iter().map(|h| h.pages_viewed).sum();
        view.tabs = tabs;
        view.name = known(|h| &h.name);
        view.email = known(|h| &h.email);
        view.browser = latest.browser.clone().or_else(|| known(|h| &h.browser));
        view.os = latest.os.clone().or_else(|| known(|h| &h.os));
        view.location = latest
            .location
            .clone()
            .or_else(|| parts.iter().find_map(|h| h.location.clone()));
        let c = &self.chat;
        let mut agent_ids: Vec<String> = Vec::new();
        for a in c.assignee.iter().chain(c.writers.iter()) {
            let s = a.to_string();
            if !agent_ids.contains(&s) && agent_ids.len() < MAX_CHAT_AGENTS {
                agent_ids.push(s);
            }
        }
        let state = match c.conversation {
            None => ChatState::Browsing,
            Some(_) if agent_ids.is_empty() => ChatState::Waiting,
            Some(_) => ChatState::Chatting,
        };
        view.chat = ChatInfo {
            state,
            conversation_id: c.conversation.map(|c| c.to_string()),
            agent_ids,
            unread: c.unread.len() as u32,
        };
    }
}

fn empty_view(visitor: VisitorId) -> VisitorPresence {
    VisitorPresence {
        visitor_id: visitor.to_string(),
        name: None,
        email: None,
        page: PageView {
            url: String::new(),
            title: None,
            referrer: None,
        },
        referrer: None,
        pages_viewed: 0,
        tabs: 0,
        online_since: 0,
        browser: None,
        os: None,
        location: None,
        chat: ChatInfo {
            state: ChatState::Browsing,
            conversation_id: None,
            agent_ids: Vec::new(),
            unread: 0,
        },
    }
}

fn empty_holding() -> Holding {
    Holding {
        tabs: 0,
        page: PageView {
            url: String::new(),
            title: None,
            referrer: None,
        },
        page_at: 0,
        pages_viewed: 0,
        referrer: None,
        online_since: now_ms(),
        browser: None,
        os: None,
        location: None,
        name: None,
        email: None,
    }
}

/// Where a node announces what it holds (the cluster link). Called with presence locks held:
/// it must not block.
pub trait Replicator: Send + Sync + 'static {
    fn visitor(&self, site: SiteId, visitor: VisitorId, holding: Option<Holding>);
    fn agent(&self, agent: AgentId, holding: Option<AgentHolding>);
}

#[derive(Debug, Clone, Copy)]
enum Tomb {
    Visitor(VisitorId),
    Agent(AgentId),
}

/// One site as this node sees it.
#[derive(Default)]
struct SiteView {
    version: u64,
    visitors: HashMap<VisitorId, VisitorEntry>,
    /// Online agents of the site and the version of their last change.
    agents: HashMap<AgentId, (AgentPresence, u64)>,
    tombstones: VecDeque<(u64, Tomb)>,
    /// Changes since a version below this cannot be computed (tombstones were dropped).
    floor: u64,
    /// Visitors whose chat info changed since the last sweep (their deltas are coalesced).
    dirty: Vec<VisitorId>,
    /// The availability last announced to the site's visitors.
    available: bool,
}

impl SiteView {
    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn bury(&mut self, tomb: Tomb) -> u64 {
        let v = self.bump();
        self.tombstones.push_back((v, tomb));
        while self.tombstones.len() > MAX_TOMBSTONES {
            if let Some((old, _)) = self.tombstones.pop_front() {
                self.floor = old;
            }
        }
        v
    }

    fn any_available(&self) -> bool {
        self.agents
            .values()
            .any(|(a, _)| a.status == AgentStatus::Available)
    }
}

struct AgentConn {
    conn: ConnId,
    lease: Arc<LeaseCell>,
}

/// One agent's consoles on this node.
struct AgentState {
    name: String,
    sites: Vec<SiteId>,
    conns: Vec<AgentConn>,
    chosen: SetStatus,
    last_active: Instant,
    /// What this node last announced for the agent.
    announced: AgentStatus,
}

impl AgentState {
    fn status(&self, now: Instant, away_after: Duration) -> AgentStatus {
        if self.conns.is_empty() {
            AgentStatus::Offline
        } else if self.chosen == SetStatus::Away
            || now.saturating_duration_since(self.last_active) >= away_after
        {
            AgentStatus::Away
        } else {
            AgentStatus::Available
        }
    }
}

fn rank(s: AgentStatus) -> u8 {
    match s {
        AgentStatus::Offline => 0,
        AgentStatus::Away => 1,
        AgentStatus::Available => 2,
    }
}

#[derive(Default)]
struct Agents {
    local: HashMap<AgentId, AgentState>,
    remote: HashMap<AgentId, Vec<(NodeId, AgentHolding)>>,
    /// What the agent's sites were last told (absent: offline).
    shown: HashMap<AgentId, AgentStatus>,
}

struct Inner {
    hub: Hub,
    config: PresenceConfig,
    geo: Option<GeoIp>,
    /// Names this table's version space: a new one at every start.
    epoch: String,
    origin: Instant,
    /// Site views; the outer lock is held only to find or create one.
    sites: Mutex<HashMap<SiteId, Arc<Mutex<SiteView>>>>,
    /// Lock order: the agents lock may be taken before a site lock, never after.
    agents: Mutex<Agents>,
    replicator: std::sync::OnceLock<Arc<dyn Replicator>>,
    /// Visitors whose grace period runs, in deadline order (the grace is the same for all), so
    /// that a departure is announced when its grace ends rather than at the next sweep.
    departures: Mutex<VecDeque<(Instant, SiteId, VisitorId)>>,
    departures_added: tokio::sync::Notify,
    /// Cluster mode: when the presence link last ran (ms since `origin`; 0 = never).
    last_beat: AtomicU64,
    /// Cluster mode: the last moment before this node's latest stall (ms since `origin`).
    /// Connections not heard from since then are not vouched for to other nodes.
    stall_mark: AtomicU64,
}

/// A gap this long between the presence link's beats means this node was frozen or starved:
/// peers may have declared it down meanwhile.
const STALL_MS: u64 = 2_500;
/// The link beats every second: a stall noticed at a beat began at most this long after the
/// beat before it.
const BEAT_SLACK_MS: u64 = 1_250;

/// The presence table of this node. Cheap handle; clone freely.
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Cuts a page field to the size kept, on a character boundary.
fn clip(s: &str) -> String {
    hark_protocol::truncate(s.trim(), MAX_PAGE_FIELD_BYTES)
}

/// A page view as kept: fields clipped, empty optional ones dropped.
pub fn clean_page(p: PageView) -> PageView {
    let opt = |o: Option<String>| o.map(|s| clip(&s)).filter(|s| !s.is_empty());
    PageView {
        url: clip(&p.url),
        title: opt(p.title),
        referrer: opt(p.referrer),
    }
}

impl Presence {
    pub fn new(hub: Hub, config: PresenceConfig, geo: Option<GeoIp>) -> Presence {
        let presence = Presence {
            inner: Arc::new(Inner {
                hub: hub.clone(),
                config,
                geo,
                epoch: uuid::Uuid::now_v7().simple().to_string(),
                origin: Instant::now(),
                sites: Mutex::new(HashMap::new()),
                agents: Mutex::new(Agents::default()),
                replicator: std::sync::OnceLock::new(),
                departures: Mutex::new(VecDeque::new()),
                departures_added: tokio::sync::Notify::new(),
                last_beat: AtomicU64::new(0),
                stall_mark: AtomicU64::new(0),
            }),
        };
        hub.set_observer(Arc::new(presence.clone()));
        presence
    }

    /// Announces this node's holdings from now on (cluster mode); set once.
    pub fn set_replicator(&self, r: Arc<dyn Replicator>) {
        let _ = self.inner.replicator.set(r);
    }

    /// The presence link runs (once a second). Returns whether this node has just come back
    /// from a stall long enough for peers to have noticed.
    pub fn beat(&self) -> bool {
        let now = self.now_ms().max(1);
        let last = self.inner.last_beat.swap(now, Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) > STALL_MS {
            self.inner
                .stall_mark
                .store(last + BEAT_SLACK_MS, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Connections last heard at or before this moment (ms since `origin`) are not vouched for
    /// to other nodes: this node stalled since, and they may have gone unseen.
    fn unproven_until(&self) -> u64 {
        let now = self.now_ms();
        let last = self.inner.last_beat.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) > STALL_MS {
            // A stall that the link has not noticed yet (it runs after this).
            return last + BEAT_SLACK_MS;
        }
        self.inner.stall_mark.load(Ordering::Relaxed)
    }

    fn replicate_visitor(&self, site: SiteId, visitor: VisitorId, e: Option<&VisitorEntry>) {
        if let Some(r) = self.inner.replicator.get() {
            r.visitor(site, visitor, e.and_then(VisitorEntry::announced));
        }
    }

    pub fn config(&self) -> &PresenceConfig {
        &self.inner.config
    }

    /// Names this node's version space; resumes from another epoch get a snapshot.
    pub fn epoch(&self) -> &str {
        &self.inner.epoch
    }

    fn now_ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.inner.origin)
            .as_millis() as u64
    }

    fn new_lease(&self, kick: CancellationToken) -> Arc<LeaseCell> {
        Arc::new(LeaseCell {
            heard: AtomicU64::new(self.now_ms()),
            expired: AtomicBool::new(false),
            kick,
        })
    }

    fn site(&self, site: SiteId) -> Arc<Mutex<SiteView>> {
        lock(&self.inner.sites).entry(site).or_default().clone()
    }

    fn existing_site(&self, site: SiteId) -> Option<Arc<Mutex<SiteView>>> {
        lock(&self.inner.sites).get(&site).cloned()
    }

    /// Sites this node has a view of.
    pub fn sites(&self) -> Vec<SiteId> {
        lock(&self.inner.sites).keys().copied().collect()
    }

    /// Whether the visitor is listed now (its chat state need not be read from the store).
    pub fn is_listed(&self, site: SiteId, visitor: VisitorId) -> bool {
        self.existing_site(site)
            .is_some_and(|s| lock(&s).visitors.contains_key(&visitor))
    }

    /// Online visitors of a site on this node's view.
    pub fn online_visitors(&self, site: SiteId) -> usize {
        self.existing_site(site)
            .map(|s| lock(&s).visitors.len())
            .unwrap_or(0)
    }

    /// The ids of a site's online visitors on this node's view.
    pub fn visitor_ids(&self, site: SiteId) -> Vec<VisitorId> {
        self.existing_site(site)
            .map(|s| lock(&s).visitors.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Whether some agent of the site is available to chat.
    pub fn agents_available(&self, site: SiteId) -> bool {
        self.existing_site(site)
            .is_some_and(|s| lock(&s).any_available())
    }

    // --- visitors -------------------------------------------------------------------------

    /// Lists a visitor connection; the entry lives at least as long as the returned guard.
    pub fn visitor_join(&self, join: VisitorJoin) -> VisitorLease {
        let lease = self.new_lease(join.kick);
        let site = self.site(join.site);
        let mut g = lock(&site);
        let conn = VisitorConn {
            conn: join.conn,
            lease: lease.clone(),
        };
        let page = join.page.map(clean_page);
        let version = g.bump();
        let fresh = !g.visitors.contains_key(&join.visitor);
        let e = g
            .visitors
            .entry(join.visitor)
            .or_insert_with(|| VisitorEntry {
                local: empty_holding(),
                conns: Vec::new(),
                leaving_since: None,
                remote: Vec::new(),
                chat: ChatSeed::default(),
                view: empty_view(join.visitor),
                version,
            });
        if !e.held_here() {
            // A visit starts on this node: its facts come from this connection.
            let client = join.user_agent.as_deref().map(parse_user_agent);
            let location = match (&self.inner.geo, join.ip) {
                (Some(geo), Some(ip)) => geo.lookup(ip).map(|l| Location {
                    country_code: l.country_code,
                    country: l.country,
                    city: l.city,
                }),
                _ => None,
            };
            e.local = Holding {
                referrer: page.as_ref().and_then(|p| p.referrer.clone()),
                browser: client.as_ref().and_then(|c| c.browser.clone()),
                os: client.as_ref().and_then(|c| c.os.clone()),
                location,
                ..empty_holding()
            };
        }
        if fresh {
            let mut chat = join.chat;
            chat.unread.truncate(MAX_UNREAD);
            e.chat = chat;
        }
        e.conns.push(conn);
        e.leaving_since = None;
        if let Some(p) = page {
            e.local.page = p;
            e.local.page_at = now_ms();
            e.local.pages_viewed = e.local.pages_viewed.saturating_add(1);
        }
        if join.name.is_some() || join.email.is_some() {
            e.local.name = join.name;
            e.local.email = join.email;
        }
        e.version = version;
        e.render();
        let frame = delta_visitor(join.site, version, &e.view);
        self.replicate_visitor(join.site, join.visitor, Some(e));
        if fresh {
            metrics::gauge!("hark_presence_visitors", "site" => join.site.to_string())
                .set(g.visitors.len() as f64);
        }
        self.emit(join.site, version, PresenceTargets::Agents, frame);
        drop(g);
        VisitorLease {
            presence: self.clone(),
            site: join.site,
            visitor: join.visitor,
            conn: join.conn,
            cell: lease,
        }
    }

    /// Changes a visitor's entry and announces it; nothing happens for a visitor not listed.
    fn update_visitor(
        &self,
        site: SiteId,
        visitor: VisitorId,
        f: impl FnOnce(&mut VisitorEntry) -> bool,
    ) {
        let Some(site_view) = self.existing_site(site) else {
            return;
        };
        let mut g = lock(&site_view);
        let version = g.version + 1;
        let Some(e) = g.visitors.get_mut(&visitor) else {
            return;
        };
        if !f(e) {
            return;
        }
        e.version = version;
        e.render();
        let frame = delta_visitor(site, version, &e.view);
        self.replicate_visitor(site, visitor, Some(e));
        g.version = version;
        self.emit(site, version, PresenceTargets::Agents, frame);
    }

    /// A visitor's tab shows another page.
    fn page_view(&self, site: SiteId, visitor: VisitorId, page: PageView) {
        self.update_visitor(site, visitor, |e| {
            e.local.page = clean_page(page);
            e.local.page_at = now_ms();
            e.local.pages_viewed = e.local.pages_viewed.saturating_add(1);
            true
        });
    }

    /// A visitor told its name or email.
    pub fn set_profile(
        &self,
        site: SiteId,
        visitor: VisitorId,
        name: Option<String>,
        email: Option<String>,
    ) {
        self.update_visitor(site, visitor, |e| {
            e.local.name = name;
            e.local.email = email;
            // Other nodes' older copies must not win the merge.
            for (_, h) in e.remote.iter_mut() {
                h.name = None;
                h.email = None;
            }
            true
        });
    }

    /// A visitor connection ended. `expired`: its lease ran out (no grace).
    fn visitor_leave(&self, site: SiteId, visitor: VisitorId, conn: ConnId, expired: bool) {
        let Some(site_view) = self.existing_site(site) else {
            return;
        };
        let mut g = lock(&site_view);
        let Some(e) = g.visitors.get_mut(&visitor) else {
            return;
        };
        let before = e.conns.len();
        e.conns.retain(|c| c.conn != conn);
        if e.conns.len() == before {
            // Already expired by the sweeper.
            return;
        }
        let grace = self.inner.config.grace;
        if e.conns.is_empty() && !expired && !grace.is_zero() {
            let now = Instant::now();
            e.leaving_since = Some(now);
            lock(&self.inner.departures).push_back((now + grace, site, visitor));
            self.inner.departures_added.notify_one();
        }
        let reason = if expired {
            GoneReason::Expired
        } else {
            GoneReason::Left
        };
        self.settle(site, &mut g, visitor, reason);
    }

    /// Announces the departures whose grace period is over.
    fn depart_due(&self) {
        let now = Instant::now();
        let grace = self.inner.config.grace;
        loop {
            let due = {
                let mut d = lock(&self.inner.departures);
                match d.front() {
                    Some((at, _, _)) if *at <= now => d.pop_front(),
                    _ => None,
                }
            };
            let Some((_, site, visitor)) = due else {
                return;
            };
            let Some(view) = self.existing_site(site) else {
                continue;
            };
            let mut g = lock(&view);
            let Some(e) = g.visitors.get_mut(&visitor) else {
                continue;
            };
            // Back meanwhile, or a later departure of the same visitor is queued behind.
            let over = e
                .leaving_since
                .is_some_and(|t| now.saturating_duration_since(t) >= grace);
            if !e.conns.is_empty() || !over {
                continue;
            }
            e.leaving_since = None;
            self.settle(site, &mut g, visitor, GoneReason::Left);
        }
    }

    /// After a visitor's holdings changed: removes the entry if nothing holds it any more,
    /// otherwise announces it as it is now.
    fn settle(&self, site: SiteId, g: &mut SiteView, visitor: VisitorId, reason: GoneReason) {
        let Some(e) = g.visitors.get_mut(&visitor) else {
            return;
        };
        if !e.held() {
            self.replicate_visitor(site, visitor, None);
            self.remove_visitor(site, g, visitor, reason);
            return;
        }
        let version = g.version + 1;
        if let Some(e) = g.visitors.get_mut(&visitor) {
            e.version = version;
            e.render();
            let frame = delta_visitor(site, version, &e.view);
            self.replicate_visitor(site, visitor, Some(e));
            g.version = version;
            self.emit(site, version, PresenceTargets::Agents, frame);
        }
    }

    fn remove_visitor(
        &self,
        site: SiteId,
        g: &mut SiteView,
        visitor: VisitorId,
        reason: GoneReason,
    ) {
        if g.visitors.remove(&visitor).is_none() {
            return;
        }
        let version = g.bury(Tomb::Visitor(visitor));
        let label = match reason {
            GoneReason::Left => "left",
            GoneReason::Expired => "expired",
        };
        metrics::counter!("hark_presence_removed_total", "reason" => label).increment(1);
        metrics::gauge!("hark_presence_visitors", "site" => site.to_string())
            .set(g.visitors.len() as f64);
        let frame = ServerFrame::VisitorGone {
            site_id: site.to_string(),
            version,
            visitor_id: visitor.to_string(),
            reason,
        };
        self.emit(site, version, PresenceTargets::Agents, frame);
    }

    /// Hands a presence frame to the hub. Called with the site's lock held, so that frames reach
    /// every connection in version order.
    fn emit(&self, site: SiteId, version: u64, targets: PresenceTargets, frame: ServerFrame) {
        self.inner
            .hub
            .dispatch(&Event::Presence(Arc::new(PresenceEvent {
                site_id: site,
                targets,
                version,
                at: std::time::Instant::now(),
                frame: frame.encode().into(),
            })));
    }

    // --- other nodes ----------------------------------------------------------------------

    /// Another node's holding of a visitor changed (`None`: it holds the visitor no more).
    pub fn apply_visitor(
        &self,
        node: NodeId,
        site: SiteId,
        visitor: VisitorId,
        holding: Option<Holding>,
    ) {
        let site_view = self.site(site);
        let mut g = lock(&site_view);
        self.apply_visitor_locked(node, site, &mut g, visitor, holding);
    }

    fn apply_visitor_locked(
        &self,
        node: NodeId,
        site: SiteId,
        g: &mut SiteView,
        visitor: VisitorId,
        holding: Option<Holding>,
    ) {
        match holding {
            Some(h) => {
                let version = g.bump();
                let fresh = !g.visitors.contains_key(&visitor);
                let e = g.visitors.entry(visitor).or_insert_with(|| VisitorEntry {
                    local: empty_holding(),
                    conns: Vec::new(),
                    leaving_since: None,
                    remote: Vec::new(),
                    chat: ChatSeed::default(),
                    view: empty_view(visitor),
                    version,
                });
                match e.remote.iter_mut().find(|(n, _)| *n == node) {
                    Some((_, old)) if *old == h => {
                        // Nothing new (a full state repeating what is known).
                        return;
                    }
                    Some((_, old)) => *old = h,
                    None => e.remote.push((node, h)),
                }
                e.version = version;
                e.render();
                let frame = delta_visitor(site, version, &e.view);
                if fresh {
                    metrics::gauge!("hark_presence_visitors", "site" => site.to_string())
                        .set(g.visitors.len() as f64);
                }
                self.emit(site, version, PresenceTargets::Agents, frame);
            }
            None => {
                let Some(e) = g.visitors.get_mut(&visitor) else {
                    return;
                };
                let before = e.remote.len();
                e.remote.retain(|(n, _)| *n != node);
                if e.remote.len() == before {
                    return;
                }
                if e.held() {
                    let version = g.version + 1;
                    if let Some(e) = g.visitors.get_mut(&visitor) {
                        e.version = version;
                        e.render();
                        let frame = delta_visitor(site, version, &e.view);
                        g.version = version;
                        self.emit(site, version, PresenceTargets::Agents, frame);
                    }
                } else {
                    self.remove_visitor(site, g, visitor, GoneReason::Left);
                }
            }
        }
    }

    /// Replaces what `node` holds on one site by `visitors` (part of its full state).
    /// Removals count as expired: they mean the node's connections ended unseen.
    pub fn replace_node_site(
        &self,
        node: NodeId,
        site: SiteId,
        visitors: Vec<(VisitorId, Holding)>,
    ) {
        let view = self.site(site);
        let mut g = lock(&view);
        self.replace_in_site(node, site, &mut g, visitors.into_iter().collect());
    }

    fn replace_in_site(
        &self,
        node: NodeId,
        site: SiteId,
        g: &mut SiteView,
        mut wanted: HashMap<VisitorId, Holding>,
    ) {
        let held_before: Vec<VisitorId> = g
            .visitors
            .iter()
            .filter(|(_, e)| e.remote.iter().any(|(n, _)| *n == node))
            .map(|(v, _)| *v)
            .collect();
        for v in held_before {
            if !wanted.contains_key(&v) {
                let Some(e) = g.visitors.get_mut(&v) else {
                    continue;
                };
                e.remote.retain(|(n, _)| *n != node);
                self.settle(site, g, v, GoneReason::Expired);
            }
        }
        for (v, h) in wanted.drain() {
            self.apply_visitor_locked(node, site, g, v, Some(h));
        }
    }

    /// Replaces what `node` holds of agents (part of its full state).
    pub fn replace_node_agents(&self, node: NodeId, agents: Vec<(AgentId, AgentHolding)>) {
        let mut a = lock(&self.inner.agents);
        let now = Instant::now();
        let mut touched: Vec<AgentId> = Vec::new();
        for (id, holdings) in a.remote.iter_mut() {
            let before = holdings.len();
            holdings.retain(|(n, _)| *n != node);
            if holdings.len() != before {
                touched.push(*id);
            }
        }
        a.remote.retain(|_, h| !h.is_empty());
        for (id, h) in agents {
            a.remote.entry(id).or_default().push((node, h));
            touched.push(id);
        }
        touched.sort_unstable();
        touched.dedup();
        for id in touched {
            self.refresh_agent(&mut a, id, now);
        }
    }

    /// Drops everything `node` holds (it was declared down): visitors on every site, and
    /// agents.
    pub fn drop_node(&self, node: NodeId) {
        self.drop_node_sites(node, &[]);
        self.replace_node_agents(node, Vec::new());
    }

    /// Drops what `node` holds on every site but `except` (the sites of a full state just
    /// received: a site left out of a full state holds nothing).
    pub fn drop_node_sites(&self, node: NodeId, except: &[SiteId]) {
        let sites: Vec<(SiteId, Arc<Mutex<SiteView>>)> = lock(&self.inner.sites)
            .iter()
            .filter(|(k, _)| !except.contains(k))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (site, view) in sites {
            let mut g = lock(&view);
            self.replace_in_site(node, site, &mut g, HashMap::new());
        }
    }

    /// Another node's holding of an agent changed.
    pub fn apply_agent(&self, node: NodeId, agent: AgentId, holding: Option<AgentHolding>) {
        let mut a = lock(&self.inner.agents);
        let list = a.remote.entry(agent).or_default();
        list.retain(|(n, _)| *n != node);
        if let Some(h) = holding {
            list.push((node, h));
        }
        if list.is_empty() {
            a.remote.remove(&agent);
        }
        self.refresh_agent(&mut a, agent, Instant::now());
    }

    /// Hands what this node holds to `f`, one site at a time, *while that site is locked*, so
    /// that a full state sent through the same ordered channel as the updates is never older
    /// than an update sent before it. Every site this node has a view of is given, even with
    /// nothing held, so that receivers drop what they hold for this node there. Connections
    /// whose lease has run out are left out even if the sweeper has not removed them yet: a
    /// node waking from a long stall never announces stale visitors.
    pub fn each_local_site(&self, mut f: impl FnMut(SiteId, Vec<(VisitorId, Holding)>)) {
        let now_ms = self.now_ms();
        let lease = self.inner.config.visitor_lease.as_millis() as u64;
        let unproven = self.unproven_until();
        let sites: Vec<(SiteId, Arc<Mutex<SiteView>>)> = lock(&self.inner.sites)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (site, view) in sites {
            let g = lock(&view);
            let mut held = Vec::new();
            for (id, e) in &g.visitors {
                let live = e
                    .conns
                    .iter()
                    .filter(|vc| {
                        let heard = vc.lease.heard.load(Ordering::Relaxed);
                        (unproven == 0 || heard > unproven) && now_ms.saturating_sub(heard) < lease
                    })
                    .count() as u32;
                if live > 0 || (e.conns.is_empty() && e.leaving_since.is_some()) {
                    held.push((
                        *id,
                        Holding {
                            tabs: live,
                            ..e.local.clone()
                        },
                    ));
                }
            }
            f(site, held);
        }
    }

    /// Hands this node's agent holdings to `f`, with the agents lock held (see
    /// [`Presence::each_local_site`]).
    pub fn local_agents(&self, f: impl FnOnce(Vec<(AgentId, AgentHolding)>)) {
        let now_ms = self.now_ms();
        let c = self.inner.config;
        let lease = c.agent_lease.as_millis() as u64;
        let a = lock(&self.inner.agents);
        let now = Instant::now();
        let held = a
            .local
            .iter()
            .filter(|(_, st)| {
                st.conns
                    .iter()
                    .any(|ac| now_ms.saturating_sub(ac.lease.heard.load(Ordering::Relaxed)) < lease)
            })
            .map(|(id, st)| {
                (
                    *id,
                    AgentHolding {
                        name: st.name.clone(),
                        sites: st.sites.clone(),
                        status: st.status(now, c.away_after),
                    },
                )
            })
            .filter(|(_, h)| h.status != AgentStatus::Offline)
            .collect();
        f(held);
    }

    // --- agents ---------------------------------------------------------------------------

    /// Registers an agent console connection; the agent is online while any guard lives.
    pub fn agent_join(&self, agent: &Agent, conn: ConnId, kick: CancellationToken) -> AgentLease {
        let lease = self.new_lease(kick);
        {
            let mut a = lock(&self.inner.agents);
            let now = Instant::now();
            let st = a.local.entry(agent.id).or_insert_with(|| AgentState {
                name: agent.name.clone(),
                sites: agent.site_ids.clone(),
                conns: Vec::new(),
                chosen: SetStatus::Available,
                last_active: now,
                announced: AgentStatus::Offline,
            });
            st.name = agent.name.clone();
            st.sites = agent.site_ids.clone();
            st.conns.push(AgentConn {
                conn,
                lease: lease.clone(),
            });
            st.last_active = now;
            self.refresh_agent(&mut a, agent.id, now);
        }
        AgentLease {
            presence: self.clone(),
            agent: agent.id,
            conn,
            cell: lease,
        }
    }

    /// An agent sets its availability.
    pub fn set_status(&self, agent: AgentId, status: SetStatus) {
        let mut a = lock(&self.inner.agents);
        let now = Instant::now();
        if let Some(st) = a.local.get_mut(&agent) {
            st.chosen = status;
            st.last_active = now;
            self.refresh_agent(&mut a, agent, now);
        }
    }

    /// The person at an agent's console did something.
    pub fn agent_active(&self, agent: AgentId) {
        let mut a = lock(&self.inner.agents);
        let now = Instant::now();
        if let Some(st) = a.local.get_mut(&agent) {
            st.last_active = now;
            if st.announced == AgentStatus::Away {
                self.refresh_agent(&mut a, agent, now);
            }
        }
    }

    fn agent_leave(&self, agent: AgentId, conn: ConnId) {
        let mut a = lock(&self.inner.agents);
        let Some(st) = a.local.get_mut(&agent) else {
            return;
        };
        st.conns.retain(|c| c.conn != conn);
        self.refresh_agent(&mut a, agent, Instant::now());
    }

    /// Recomputes an agent's status from this node's consoles and the other nodes' holdings;
    /// announces this node's part if it changed and tells the agent's sites if the result did.
    /// Called with the agents lock held.
    fn refresh_agent(&self, a: &mut Agents, id: AgentId, now: Instant) {
        let away_after = self.inner.config.away_after;
        let mut best = AgentStatus::Offline;
        let mut name = String::new();
        let mut sites: Vec<SiteId> = Vec::new();
        if let Some(st) = a.local.get_mut(&id) {
            let mine = st.status(now, away_after);
            if mine != st.announced {
                st.announced = mine;
                if let Some(r) = self.inner.replicator.get() {
                    r.agent(
                        id,
                        (mine != AgentStatus::Offline).then(|| AgentHolding {
                            name: st.name.clone(),
                            sites: st.sites.clone(),
                            status: mine,
                        }),
                    );
                }
            }
            best = mine;
            name = st.name.clone();
            sites = st.sites.clone();
            if st.conns.is_empty() {
                a.local.remove(&id);
            }
        }
        for (_, h) in a.remote.get(&id).into_iter().flatten() {
            if rank(h.status) > rank(best) {
                best = h.status;
            }
            if name.is_empty() {
                name = h.name.clone();
            }
            for s in &h.sites {
                if !sites.contains(s) {
                    sites.push(*s);
                }
            }
        }
        let shown = a.shown.get(&id).copied().unwrap_or(AgentStatus::Offline);
        if shown == best {
            return;
        }
        if best == AgentStatus::Offline {
            a.shown.remove(&id);
        } else {
            a.shown.insert(id, best);
        }
        let view = AgentPresence {
            agent_id: id.to_string(),
            name,
            status: best,
        };
        for site in &sites {
            let site_view = self.site(*site);
            let mut g = lock(&site_view);
            let version = if best == AgentStatus::Offline {
                if g.agents.remove(&id).is_none() {
                    continue;
                }
                g.bury(Tomb::Agent(id))
            } else {
                let v = g.bump();
                g.agents.insert(id, (view.clone(), v));
                v
            };
            let frame = ServerFrame::AgentStatus {
                site_id: site.to_string(),
                version,
                agent: view.clone(),
            };
            self.emit(*site, version, PresenceTargets::Agents, frame);
            let available = g.any_available();
            if available != g.available {
                g.available = available;
                self.emit(
                    *site,
                    0,
                    PresenceTargets::Visitors,
                    ServerFrame::Availability {
                        agents_available: available,
                    },
                );
            }
            metrics::gauge!("hark_presence_agents", "site" => site.to_string())
                .set(g.agents.len() as f64);
        }
    }

    // --- lists ----------------------------------------------------------------------------

    /// The frames that bring an agent's copy of a site's list up to date: the changes since the
    /// version it holds when it can be computed, a snapshot otherwise. Returns the version the
    /// frames bring the copy to; later deltas carry greater versions.
    pub fn list(&self, site: SiteId, held: Option<&ListResume>) -> (u64, Vec<ServerFrame>) {
        let site_view = self.site(site);
        let (version, mode, visitors, gone, agents) = {
            let g = lock(&site_view);
            let since = held
                .filter(|h| h.epoch == self.inner.epoch && h.version >= g.floor)
                .filter(|h| h.version <= g.version)
                .map(|h| h.version);
            match since {
                Some(v) => (
                    g.version,
                    ListMode::Changes,
                    g.visitors
                        .values()
                        .filter(|e| e.version > v)
                        .map(|e| e.view.clone())
                        .collect::<Vec<_>>(),
                    g.tombstones
                        .iter()
                        .filter(|(tv, _)| *tv > v)
                        .map(|(_, t)| *t)
                        .collect::<Vec<_>>(),
                    g.agents
                        .values()
                        .filter(|(_, av)| *av > v)
                        .map(|(a, _)| a.clone())
                        .collect::<Vec<_>>(),
                ),
                None => (
                    g.version,
                    ListMode::Snapshot,
                    g.visitors.values().map(|e| e.view.clone()).collect(),
                    Vec::new(),
                    g.agents.values().map(|(a, _)| a.clone()).collect(),
                ),
            }
        };
        let mut gone_ids = Vec::new();
        let mut agents = agents;
        for t in gone {
            match t {
                Tomb::Visitor(v) => gone_ids.push(v.to_string()),
                Tomb::Agent(a) => {
                    let id = a.to_string();
                    if !agents.iter().any(|x| x.agent_id == id) {
                        agents.push(AgentPresence {
                            agent_id: id,
                            name: String::new(),
                            status: AgentStatus::Offline,
                        });
                    }
                }
            }
        }
        let mut frames = Vec::new();
        let mut chunks = visitors.chunks(LIST_CHUNK).peekable();
        let mut first = true;
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let done = chunks.peek().is_none();
            frames.push(ServerFrame::VisitorList {
                site_id: site.to_string(),
                epoch: self.inner.epoch.clone(),
                version,
                mode,
                visitors: chunk.to_vec(),
                gone: if first {
                    std::mem::take(&mut gone_ids)
                } else {
                    Vec::new()
                },
                agents: if first {
                    std::mem::take(&mut agents)
                } else {
                    Vec::new()
                },
                done,
            });
            first = false;
            if done {
                break;
            }
        }
        (version, frames)
    }

    // --- the sweeper ----------------------------------------------------------------------

    /// Runs the sweeper until `shutdown`: expires silent leases, ends grace periods, sends the
    /// coalesced chat changes and turns idle agents away.
    pub fn spawn_sweeper(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let departures = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let p = departures;
            loop {
                let next = lock(&p.inner.departures).front().map(|d| d.0);
                let until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = p.inner.departures_added.notified(), if next.is_none() => {}
                    _ = tokio::time::sleep_until(until) => p.depart_due(),
                }
            }
        });
        let presence = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(presence.inner.config.sweep_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => presence.sweep(),
                }
            }
        })
    }

    /// One pass of the sweeper (public for tests that drive time themselves).
    pub fn sweep(&self) {
        let now = Instant::now();
        let now_ms = self.now_ms();
        let c = self.inner.config;
        let visitor_lease = c.visitor_lease.as_millis() as u64;
        let sites: Vec<(SiteId, Arc<Mutex<SiteView>>)> = lock(&self.inner.sites)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (site, view) in sites {
            let mut g = lock(&view);
            let mut changed: Vec<(VisitorId, GoneReason)> = Vec::new();
            for (id, e) in g.visitors.iter_mut() {
                let before = e.conns.len();
                e.conns.retain(|vc| {
                    let heard = vc.lease.heard.load(Ordering::Relaxed);
                    let alive = now_ms.saturating_sub(heard) < visitor_lease;
                    if !alive {
                        vc.lease.expired.store(true, Ordering::Relaxed);
                        vc.lease.kick.cancel();
                    }
                    alive
                });
                if e.conns.len() != before {
                    changed.push((*id, GoneReason::Expired));
                } else if e.conns.is_empty()
                    && e.leaving_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= c.grace)
                {
                    e.leaving_since = None;
                    changed.push((*id, GoneReason::Left));
                }
            }
            for (id, reason) in changed {
                self.settle(site, &mut g, id, reason);
            }
            let mut dirty = std::mem::take(&mut g.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            for id in dirty {
                let version = g.version + 1;
                if let Some(e) = g.visitors.get_mut(&id) {
                    e.render();
                    e.version = version;
                    let frame = delta_visitor(site, version, &e.view);
                    g.version = version;
                    self.emit(site, version, PresenceTargets::Agents, frame);
                }
            }
        }
        // Agents: silent leases and idleness.
        let agent_lease = c.agent_lease.as_millis() as u64;
        let mut a = lock(&self.inner.agents);
        let ids: Vec<AgentId> = a.local.keys().copied().collect();
        for id in ids {
            if let Some(st) = a.local.get_mut(&id) {
                st.conns.retain(|ac| {
                    let heard = ac.lease.heard.load(Ordering::Relaxed);
                    let alive = now_ms.saturating_sub(heard) < agent_lease;
                    if !alive {
                        ac.lease.expired.store(true, Ordering::Relaxed);
                        ac.lease.kick.cancel();
                    }
                    alive
                });
            }
            self.refresh_agent(&mut a, id, now);
        }
    }

    fn observe_chat(
        &self,
        site: SiteId,
        visitor: VisitorId,
        f: impl FnOnce(&mut ChatSeed) -> bool,
    ) {
        let Some(view) = self.existing_site(site) else {
            return;
        };
        let mut g = lock(&view);
        let changed = match g.visitors.get_mut(&visitor) {
            Some(e) => f(&mut e.chat),
            None => false,
        };
        if changed {
            g.dirty.push(visitor);
        }
    }
}

impl Observer for Presence {
    fn observe(&self, event: &Event) {
        match event {
            Event::Message(m) => {
                let (conv, seq, writer) = (m.conversation_id, m.seq, m.writer);
                self.observe_chat(m.audience.site_id, m.audience.visitor_id, |c| {
                    if c.conversation != Some(conv) {
                        *c = ChatSeed {
                            conversation: Some(conv),
                            ..ChatSeed::default()
                        };
                    }
                    match writer {
                        Writer::Visitor => {
                            if c.unread.len() < MAX_UNREAD {
                                c.unread.push(seq);
                            }
                        }
                        Writer::Agent(a) => {
                            if !c.writers.contains(&a) {
                                c.writers.push(a);
                            }
                            c.unread.retain(|s| *s > seq);
                        }
                        Writer::System => return false,
                    }
                    true
                });
            }
            Event::Conversation(ch) => {
                let (conv, open, assignee) = (ch.conversation_id, ch.open, ch.assignee);
                self.observe_chat(ch.audience.site_id, ch.audience.visitor_id, |c| {
                    if open {
                        if c.conversation != Some(conv) {
                            *c = ChatSeed {
                                conversation: Some(conv),
                                ..ChatSeed::default()
                            };
                        }
                        c.assignee = assignee;
                    } else if c.conversation == Some(conv) {
                        *c = ChatSeed::default();
                    }
                    true
                });
            }
            Event::Signal(s) => {
                if let SignalKind::Read {
                    conversation_id,
                    by_agent: true,
                    seq,
                } = s.kind
                {
                    self.observe_chat(s.audience.site_id, s.audience.visitor_id, |c| {
                        if c.conversation != Some(conversation_id) {
                            return false;
                        }
                        let before = c.unread.len();
                        c.unread.retain(|x| *x > seq);
                        c.unread.len() != before
                    });
                }
            }
            Event::Presence(_) | Event::CatchUp(_) => {}
        }
    }
}

fn delta_visitor(site: SiteId, version: u64, view: &VisitorPresence) -> ServerFrame {
    ServerFrame::Visitor {
        site_id: site.to_string(),
        version,
        visitor: view.clone(),
    }
}

/// Holds a visitor connection's place in the list. Dropped when the connection task ends.
pub struct VisitorLease {
    presence: Presence,
    site: SiteId,
    visitor: VisitorId,
    conn: ConnId,
    cell: Arc<LeaseCell>,
}

impl VisitorLease {
    /// The connection was heard from.
    pub fn touch(&self) {
        self.cell
            .heard
            .store(self.presence.now_ms(), Ordering::Relaxed);
    }

    pub fn is_expired(&self) -> bool {
        self.cell.is_expired()
    }

    /// The tab shows another page.
    pub fn page_view(&self, page: PageView) {
        self.presence.page_view(self.site, self.visitor, page);
    }
}

impl Drop for VisitorLease {
    fn drop(&mut self) {
        // A connection silent past its lease that closes now (a node back from a stall reading
        // the close that came meanwhile) left long ago: no grace period.
        let heard = self.cell.heard.load(Ordering::Relaxed);
        let silent = self.presence.now_ms().saturating_sub(heard)
            >= self.presence.inner.config.visitor_lease.as_millis() as u64
            || {
                let unproven = self.presence.unproven_until();
                unproven > 0 && heard <= unproven
            };
        let expired = self.cell.is_expired() || silent;
        self.presence
            .visitor_leave(self.site, self.visitor, self.conn, expired);
    }
}

/// Holds an agent console connection's part of the agent's availability.
pub struct AgentLease {
    presence: Presence,
    agent: AgentId,
    conn: ConnId,
    cell: Arc<LeaseCell>,
}

impl AgentLease {
    pub fn touch(&self) {
        self.cell
            .heard
            .store(self.presence.now_ms(), Ordering::Relaxed);
    }

    pub fn is_expired(&self) -> bool {
        self.cell.is_expired()
    }
}

impl Drop for AgentLease {
    fn drop(&mut self) {
        self.presence.agent_leave(self.agent, self.conn);
    }
}

#[cfg(test)]
mod tests;
