//! The `Store` contract suite: every rule the trait's docs promise, written once against
//! `Arc<dyn Store>` so that each implementation (SQLite and PostgreSQL) runs the same checks.
//!
//! Each `check_*` function exercises one rule on a fresh, empty store. `store_suite!` expands to
//! one `#[tokio::test]` per check for one backend; a new implementation adds a [`Backend`] (how
//! to open a fresh store, and how to reopen it) and one `store_suite!` line at the bottom.
//!
//! PostgreSQL runs against the server named by `HARK_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`; `scripts/test` starts one): every test creates
//! a database with a random name and drops it at the end. No server is a failure, not a skip.
//! The `postgres_cluster` module adds what only a shared server has: several nodes (separate
//! pools) writing the same conversations at once, nodes migrating one database at once, and
//! connections dying under load.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hark::domain::*;
use hark::store::postgres::{PostgresOptions, PostgresStore};
use hark::store::sqlite::SqliteStore;
use hark::store::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::Connection;

// ---------------------------------------------------------------------------------------------
// Backends and the suite macro.

/// Where a suite's stores come from. One backend value per test; it owns one empty database.
#[async_trait]
pub trait Backend: Send + Sync {
    /// A store over this backend's database.
    async fn open(&self) -> Arc<dyn Store>;
    /// Drops `store`, closes every store opened so far, and opens the same database again, as a
    /// restarted process would.
    async fn reopen(&self, store: Arc<dyn Store>) -> Arc<dyn Store>;
}

/// SQLite in a temporary directory, removed when the backend is dropped.
pub struct SqliteBackend {
    dir: tempfile::TempDir,
    /// Handles on the stores opened, so that `reopen` can close their pools. Locked briefly,
    /// never across an `.await`.
    opened: Mutex<Vec<SqliteStore>>,
}

impl SqliteBackend {
    pub async fn fresh() -> SqliteBackend {
        SqliteBackend {
            dir: tempfile::tempdir().expect("tempdir"),
            opened: Mutex::default(),
        }
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn open(&self) -> Arc<dyn Store> {
        let store = SqliteStore::open(self.dir.path())
            .await
            .expect("open the SQLite store");
        self.opened.lock().expect("lock").push(store.clone());
        Arc::new(store)
    }

    async fn reopen(&self, store: Arc<dyn Store>) -> Arc<dyn Store> {
        drop(store);
        let opened = std::mem::take(&mut *self.opened.lock().expect("lock"));
        for s in opened {
            s.close().await;
        }
        self.open().await
    }
}

/// A fresh PostgreSQL database with a random name, dropped (with `FORCE`, closing whatever is
/// still connected) when the backend is dropped, also when the test panicked.
pub struct PostgresBackend {
    server: String,
    name: String,
    url: String,
    /// As for SQLite: locked briefly, never across an `.await`.
    opened: Mutex<Vec<PostgresStore>>,
    /// Bounds how many PostgreSQL tests run at once (see [`PG_SLOTS`]).
    _slot: tokio::sync::SemaphorePermit<'static>,
}

/// At most this many PostgreSQL tests at once, whatever the number of test threads: each holds
/// pools of up to [`PG_POOL`] connections, and the server allows 100 in all by default.
static PG_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
const PG_POOL: u32 = 8;

use common::pg::{server_url as pg_server, with_database};

async fn pg_admin(server: &str) -> sqlx::PgConnection {
    match tokio::time::timeout(DEADLINE, sqlx::PgConnection::connect(server)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "PostgreSQL at {server} is needed for the PostgreSQL store tests (set \
             HARK_TEST_POSTGRES, or run scripts/test, which starts one): {e}"
        ),
        Err(_) => panic!("PostgreSQL at {server} did not answer within {DEADLINE:?}"),
    }
}

impl PostgresBackend {
    pub async fn fresh() -> PostgresBackend {
        let slot = PG_SLOTS
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let server = pg_server();
        let name = format!("hark_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = pg_admin(&server).await;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create a test database");
        let _ = admin.close().await;
        PostgresBackend {
            url: with_database(&server, &name),
            server,
            name,
            opened: Mutex::default(),
            _slot: slot,
        }
    }

    fn options() -> PostgresOptions {
        PostgresOptions {
            max_connections: PG_POOL,
            ..PostgresOptions::default()
        }
    }

    /// A store of its own, like another node's: a separate pool on the same database.
    pub async fn node(&self) -> PostgresStore {
        let store = PostgresStore::open(&self.url, Self::options())
            .await
            .expect("open the PostgreSQL store");
        self.opened.lock().expect("lock").push(store.clone());
        store
    }
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop is not async and runs inside the test's runtime: a thread with a runtime of its
        // own does the dropping, and the test waits for it so no database outlives its test.
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&server)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = admin.close().await;
                Ok(())
            })
        })
        .join();
        // Never panic here: this may run while a failed test unwinds.
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

#[async_trait]
impl Backend for PostgresBackend {
    async fn open(&self) -> Arc<dyn Store> {
        Arc::new(self.node().await)
    }

    async fn reopen(&self, store: Arc<dyn Store>) -> Arc<dyn Store> {
        drop(store);
        let opened = std::mem::take(&mut *self.opened.lock().expect("lock"));
        for s in opened {
            s.close().await;
        }
        self.open().await
    }
}

/// `store_suite!(name, || async { backend })` expands to `mod name` holding one `#[tokio::test]`
/// per check, each on a fresh backend.
macro_rules! store_suite {
    ($name:ident, $backend:expr) => {
        mod $name {
            use super::*;

            store_suite!(@store $backend;
                check_append_assigns_gap_free_seqs,
                check_concurrent_appends_one_conversation,
                check_concurrent_appends_three_conversations,
                check_concurrent_duplicates_store_once,
                check_client_ids_are_idempotent,
                check_closed_and_unknown_conversations,
                check_message_ranges,
                check_open_conversation_lifecycle,
                check_concurrent_open_conversation,
                check_list_conversations,
                check_sites,
                check_agents,
                check_agent_changes_end_sessions,
                check_sessions,
                check_secrets,
                check_visitors_and_client_id_lookup,
                check_random_batches_match_model,
                check_read_marks,
                check_concurrent_read_marks,
                check_visitor_profile,
                check_search_messages,
            );

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn check_durable_across_reopen() {
                let backend = ($backend)().await;
                super::check_durable_across_reopen(&backend).await;
            }
        }
    };
    (@store $backend:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let backend = ($backend)().await;
                let store = backend.open().await;
                super::$check(store).await;
            }
        )+
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Every wait in this suite ends by this deadline.
const DEADLINE: Duration = Duration::from_secs(10);

async fn new_site(store: &dyn Store, name: &str) -> Site {
    store
        .create_site(NewSite {
            name: name.into(),
            allowed_origins: vec![Origin::parse("https://shop.test").expect("origin")],
        })
        .await
        .expect("create_site")
}

/// A new visitor of `site` and its (new) open conversation.
async fn new_conversation(store: &dyn Store, site: &Site) -> Conversation {
    let visitor = store.create_visitor(site.id).await.expect("create_visitor");
    let (conv, created) = store
        .open_conversation(site.id, visitor.id)
        .await
        .expect("open_conversation");
    assert!(created, "a new visitor's conversation is new");
    conv
}

fn email(raw: &str) -> Email {
    Email::parse(raw).expect("email")
}

async fn new_agent(store: &dyn Store, mail: &str, site_ids: Vec<SiteId>) -> Agent {
    store
        .create_agent(NewAgent {
            email: email(mail),
            name: format!("Agent {mail}"),
            role: AgentRole::Agent,
            password_hash: format!("hash-of-{mail}"),
            site_ids,
        })
        .await
        .expect("create_agent")
}

fn msg(
    conv: ConversationId,
    sender: Sender,
    text: &str,
    client_id: Option<ClientMsgId>,
) -> NewMessage {
    NewMessage {
        conversation_id: conv,
        sender,
        text: text.into(),
        client_id,
    }
}

/// A message from the conversation's visitor.
fn from_visitor(conv: &Conversation, text: &str, client_id: Option<ClientMsgId>) -> NewMessage {
    msg(conv.id, Sender::Visitor(conv.visitor_id), text, client_id)
}

async fn append(store: &dyn Store, batch: &[NewMessage]) -> Vec<Appended> {
    let (out, _) = store.append_batch(batch).await.expect("append_batch");
    assert_eq!(out.len(), batch.len(), "one outcome per message");
    out
}

fn stored(outcome: &Appended) -> Message {
    match outcome {
        Appended::Stored(m) => m.clone(),
        other => panic!("expected Stored, got {other:?}"),
    }
}

/// Appends one message and returns it as stored.
async fn append_one(store: &dyn Store, m: NewMessage) -> Message {
    stored(&append(store, &[m]).await[0])
}

/// Every message of a conversation, oldest first.
async fn all_messages(store: &dyn Store, conv: ConversationId) -> Vec<Message> {
    let (ms, more) = store
        .messages(conv, SeqRange::After(0), 1_000_000)
        .await
        .expect("messages");
    assert!(!more, "nothing beyond a million messages");
    ms
}

async fn conversation(store: &dyn Store, id: ConversationId) -> Conversation {
    store
        .conversation(id)
        .await
        .expect("conversation")
        .expect("conversation exists")
}

fn seqs(ms: &[Message]) -> Vec<Seq> {
    ms.iter().map(|m| m.seq).collect()
}

/// Asserts the message was stored from `m` (its conversation, sender, text and client id).
fn assert_stored_from(got: &Message, m: &NewMessage) {
    assert_eq!(got.conversation_id, m.conversation_id);
    assert_eq!(got.sender, m.sender);
    assert_eq!(got.text, m.text);
    assert_eq!(got.client_id, m.client_id);
}

/// Waits until the wall clock has moved past `t` (ms), so the next write gets a later time.
async fn tick_past(t: i64) {
    let deadline = Instant::now() + DEADLINE;
    while now_ms() <= t {
        assert!(Instant::now() < deadline, "the clock did not move past {t}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn sorted_sites(mut ids: Vec<SiteId>) -> Vec<SiteId> {
    ids.sort();
    ids
}

fn filter(limit: u32) -> ConversationFilter {
    ConversationFilter {
        limit,
        ..ConversationFilter::default()
    }
}

async fn list(store: &dyn Store, f: &ConversationFilter) -> Vec<Conversation> {
    let out = store
        .list_conversations(f)
        .await
        .expect("list_conversations");
    assert!(out.len() <= f.limit as usize, "at most `limit`");
    assert_newest_first(&out);
    out
}

fn assert_newest_first(convs: &[Conversation]) {
    for w in convs.windows(2) {
        assert!(
            (w[0].updated_at, w[0].id) > (w[1].updated_at, w[1].id),
            "ordered by (updated_at, id) descending: {:?} then {:?}",
            (w[0].updated_at, w[0].id),
            (w[1].updated_at, w[1].id)
        );
    }
}

fn ids(convs: &[Conversation]) -> Vec<ConversationId> {
    convs.iter().map(|c| c.id).collect()
}

/// Walks every page of `f` with the keyset cursor, `page` at a time.
async fn paginate(store: &dyn Store, f: &ConversationFilter, page: u32) -> Vec<Conversation> {
    let mut all: Vec<Conversation> = Vec::new();
    let mut f = ConversationFilter {
        limit: page,
        before: None,
        ..f.clone()
    };
    loop {
        let got = list(store, &f).await;
        let Some(last) = got.last() else { break };
        f.before = Some((last.updated_at, last.id));
        let short = got.len() < page as usize;
        all.extend(got);
        assert!(all.len() < 10_000, "pagination does not end");
        if short {
            break;
        }
    }
    all
}

// ---------------------------------------------------------------------------------------------
// 1. Seqs are gap-free per conversation, in batch order, across batches.

pub async fn check_append_assigns_gap_free_seqs(store: Arc<dyn Store>) {
    let store = &*store;
    let site = new_site(store, "seqs").await;
    let a = new_conversation(store, &site).await;
    let b = new_conversation(store, &site).await;
    assert_eq!(
        (a.last_seq, a.first_seq),
        (0, 1),
        "a new conversation is empty"
    );

    // An empty batch is fine and writes nothing.
    let (out, routes) = store.append_batch(&[]).await.expect("empty batch");
    assert!(out.is_empty() && routes.is_empty());

    let mut next: HashMap<ConversationId, Seq> = HashMap::from([(a.id, 1), (b.id, 1)]);
    let mut texts: HashMap<ConversationId, Vec<String>> = HashMap::new();
    let mut k = 0;
    for batch_no in 0..20 {
        // Mostly small batches, and one large group commit.
        let size = if batch_no == 10 {
            300
        } else {
            1 + batch_no % 7
        };
        let batch: Vec<NewMessage> = (0..size)
            .map(|_| {
                k += 1;
                let conv = if k % 3 == 0 { &b } else { &a };
                let cid = (k % 2 == 0).then(ClientMsgId::new);
                from_visitor(conv, &format!("message {k}"), cid)
            })
            .collect();
        let (out, routes) = store.append_batch(&batch).await.expect("append_batch");
        assert_eq!(out.len(), batch.len());
        let mut written = HashSet::new();
        for (m, o) in batch.iter().zip(&out) {
            let got = stored(o);
            assert_stored_from(&got, m);
            let want = next
                .get_mut(&m.conversation_id)
                .expect("known conversation");
            assert_eq!(got.seq, *want, "batch {batch_no}: seqs follow batch order");
            *want += 1;
            texts
                .entry(m.conversation_id)
                .or_default()
                .push(m.text.clone());
            written.insert(m.conversation_id);
        }
        // The routes name exactly the conversations written, with their site and visitor.
        let routed: HashSet<ConversationId> = routes.iter().map(|(c, _)| *c).collect();
        assert_eq!(routed, written, "one route per conversation written");
        assert_eq!(routes.len(), routed.len(), "no conversation routed twice");
        for (c, route) in &routes {
            let conv = if *c == a.id { &a } else { &b };
            assert_eq!(
                *route,
                Route {
                    site_id: site.id,
                    visitor_id: conv.visitor_id
                }
            );
        }
    }

    for conv in [&a, &b] {
        let n = next[&conv.id] - 1;
        let ms = all_messages(store, conv.id).await;
        assert_eq!(seqs(&ms), (1..=n).collect::<Vec<_>>(), "gap-free from 1");
        let got_texts: Vec<String> = ms.iter().map(|m| m.text.clone()).collect();
        assert_eq!(got_texts, texts[&conv.id], "stored in batch order");
        let c = conversation(store, conv.id).await;
        assert_eq!(c.last_seq, n, "last_seq is the last message's seq");
        assert_eq!(c.first_seq, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Concurrent writers still get gap-free, duplicate-free seqs.

/// `tasks` tasks each append `per_task` single-message batches, task `t`'s `i`-th message going
/// to `convs[(t + i) % len]`; then checks every conversation holds exactly seqs 1..=N.
async fn hammer(store: Arc<dyn Store>, convs: Vec<Conversation>, tasks: usize, per_task: usize) {
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let convs = convs.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut mine = Vec::new();
            for i in 0..per_task {
                let conv = &convs[(t + i) % convs.len()];
                let m = from_visitor(conv, &format!("t{t} m{i}"), Some(ClientMsgId::new()));
                let got = append_one(&*store, m.clone()).await;
                assert_stored_from(&got, &m);
                mine.push(got);
            }
            mine
        }));
    }
    let mut returned: HashMap<ConversationId, Vec<Message>> = HashMap::new();
    for h in handles {
        let mine = tokio::time::timeout(DEADLINE * 6, h)
            .await
            .expect("writers finish")
            .expect("writer task");
        // One task's messages to one conversation are acknowledged in order.
        let mut last: HashMap<ConversationId, Seq> = HashMap::new();
        for m in mine {
            let prev = last.insert(m.conversation_id, m.seq).unwrap_or(0);
            assert!(m.seq > prev, "a task's later message has a later seq");
            returned.entry(m.conversation_id).or_default().push(m);
        }
    }
    let mut total = 0;
    for conv in &convs {
        let mut acked = returned.remove(&conv.id).unwrap_or_default();
        acked.sort_by_key(|m| m.seq);
        let n = acked.len() as Seq;
        total += acked.len();
        assert_eq!(
            seqs(&acked),
            (1..=n).collect::<Vec<_>>(),
            "no gap, no duplicate"
        );
        assert_eq!(
            all_messages(&*store, conv.id).await,
            acked,
            "stored as acked"
        );
        assert_eq!(conversation(&*store, conv.id).await.last_seq, n);
    }
    assert_eq!(total, tasks * per_task, "every message stored once");
}

pub async fn check_concurrent_appends_one_conversation(store: Arc<dyn Store>) {
    let site = new_site(&*store, "one").await;
    let conv = new_conversation(&*store, &site).await;
    hammer(store, vec![conv], 8, 50).await;
}

pub async fn check_concurrent_appends_three_conversations(store: Arc<dyn Store>) {
    let site = new_site(&*store, "three").await;
    let mut convs = Vec::new();
    for _ in 0..3 {
        convs.push(new_conversation(&*store, &site).await);
    }
    hammer(store, convs, 8, 50).await;
}

/// The same `(author, client_id)` sent by many writers at once is stored exactly once.
pub async fn check_concurrent_duplicates_store_once(store: Arc<dyn Store>) {
    let site = new_site(&*store, "dups").await;
    let conv = new_conversation(&*store, &site).await;
    for round in 0..5 {
        let cid = ClientMsgId::new();
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let mut handles = Vec::new();
        for t in 0..8 {
            let store = store.clone();
            let barrier = barrier.clone();
            let m = from_visitor(&conv, &format!("round {round} from {t}"), Some(cid));
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                append(&*store, &[m]).await.remove(0)
            }));
        }
        let mut outcomes = Vec::new();
        for h in handles {
            outcomes.push(h.await.expect("writer task"));
        }
        let firsts: Vec<&Message> = outcomes
            .iter()
            .filter_map(|o| match o {
                Appended::Stored(m) => Some(m),
                _ => None,
            })
            .collect();
        assert_eq!(firsts.len(), 1, "round {round}: stored once: {outcomes:?}");
        let first = firsts[0].clone();
        assert_eq!(first.seq, round + 1);
        for o in &outcomes {
            assert!(
                *o == Appended::Stored(first.clone()) || *o == Appended::Duplicate(first.clone()),
                "round {round}: every other writer sees the stored message: {o:?}"
            );
        }
    }
    assert_eq!(
        seqs(&all_messages(&*store, conv.id).await),
        vec![1, 2, 3, 4, 5]
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Idempotency on (author, client_id).

pub async fn check_client_ids_are_idempotent(store: Arc<dyn Store>) {
    let store = &*store;
    let site = new_site(store, "idem").await;
    let conv = new_conversation(store, &site).await;
    let x = ClientMsgId::new();

    let original = append_one(store, from_visitor(&conv, "hello", Some(x))).await;
    assert_eq!(original.seq, 1);
    append_one(
        store,
        from_visitor(&conv, "second", Some(ClientMsgId::new())),
    )
    .await;

    // A retry in a later batch (even with other text) is the original message.
    let out = append(store, &[from_visitor(&conv, "hello again", Some(x))]).await;
    assert_eq!(out, vec![Appended::Duplicate(original.clone())]);
    assert_eq!(
        conversation(store, conv.id).await.last_seq,
        2,
        "no seq used"
    );

    // Twice in one batch: the first is stored, the second is a duplicate of it, and only one
    // seq is used even with another message between them.
    let y = ClientMsgId::new();
    let batch = [
        from_visitor(&conv, "y", Some(y)),
        from_visitor(&conv, "between", None),
        from_visitor(&conv, "y retried", Some(y)),
    ];
    let out = append(store, &batch).await;
    let y_msg = stored(&out[0]);
    assert_eq!(y_msg.seq, 3);
    assert_eq!(stored(&out[1]).seq, 4);
    assert_eq!(out[2], Appended::Duplicate(y_msg.clone()));
    assert_eq!(conversation(store, conv.id).await.last_seq, 4);

    // The same client id from other authors is another message: an agent in the same
    // conversation, and another visitor elsewhere.
    let agent = AgentId::new();
    let from_agent = msg(
        conv.id,
        Sender::Agent {
            id: agent,
            name: "Ada".into(),
        },
        "agent reuses x",
        Some(x),
    );
    let agent_msg = append_one(store, from_agent.clone()).await;
    assert_stored_from(&agent_msg, &from_agent);
    assert_eq!(agent_msg.seq, 5);
    assert_ne!(agent_msg.id, original.id);
    let other = new_conversation(store, &site).await;
    let other_msg = append_one(store, from_visitor(&other, "other visitor", Some(x))).await;
    assert_eq!((other_msg.conversation_id, other_msg.seq), (other.id, 1));

    // Each author's retry finds its own message.
    let out = append(
        store,
        &[from_agent.clone(), from_visitor(&conv, "x", Some(x))],
    )
    .await;
    assert_eq!(
        out,
        vec![
            Appended::Duplicate(agent_msg.clone()),
            Appended::Duplicate(original.clone())
        ]
    );

    // Without an author key nothing is deduplicated: visitor messages without a client id, and
    // system messages (which have no author, whatever client id they carry).
    let z = ClientMsgId::new();
    let batch = [
        from_visitor(&conv, "no id", None),
        from_visitor(&conv, "no id", None),
        msg(conv.id, Sender::System, "note", None),
        msg(conv.id, Sender::System, "note", None),
        msg(conv.id, Sender::System, "note z", Some(z)),
        msg(conv.id, Sender::System, "note z", Some(z)),
    ];
    let out = append(store, &batch).await;
    let got: Vec<Seq> = out.iter().map(|o| stored(o).seq).collect();
    assert_eq!(got, vec![6, 7, 8, 9, 10, 11]);
    let out = append(store, &batch[2..]).await;
    let got: Vec<Seq> = out.iter().map(|o| stored(o).seq).collect();
    assert_eq!(got, vec![12, 13, 14, 15]);

    let ms = all_messages(store, conv.id).await;
    assert_eq!(seqs(&ms), (1..=15).collect::<Vec<_>>());
    assert_eq!(ms[0], original, "the original is unchanged");
    assert_eq!(ms[2], y_msg);
    assert_eq!(ms[4], agent_msg);
}

// ---------------------------------------------------------------------------------------------
// 4. Closed and unknown conversations.

pub async fn check_closed_and_unknown_conversations(store: Arc<dyn Store>) {
    let store = &*store;
    let site = new_site(store, "closed").await;
    let a = new_conversation(store, &site).await;
    let mut before_close = Vec::new();
    for i in 0..3 {
        let cid = Some(ClientMsgId::new());
        before_close.push(append_one(store, from_visitor(&a, &format!("a{i}"), cid)).await);
    }

    let closed = store
        .set_status(a.id, Status::Closed)
        .await
        .expect("set_status")
        .expect("conversation exists");
    assert_eq!((closed.id, closed.status), (a.id, Status::Closed));
    let (out, routes) = store
        .append_batch(&[
            from_visitor(&a, "late", Some(ClientMsgId::new())),
            from_visitor(&a, "late again", None),
        ])
        .await
        .expect("append_batch");
    assert_eq!(out, vec![Appended::Closed, Appended::Closed]);
    assert!(routes.is_empty(), "nothing written, nothing routed");
    assert_eq!(
        conversation(store, a.id).await.last_seq,
        3,
        "no seq consumed"
    );

    // A retry of a message stored before the close still learns what was stored.
    let retry = from_visitor(&a, "retry", before_close[1].client_id);
    assert_eq!(
        append(store, &[retry]).await,
        vec![Appended::Duplicate(before_close[1].clone())]
    );

    // Reopened, the next message follows the last one.
    let reopened = store
        .set_status(a.id, Status::Open)
        .await
        .expect("set_status")
        .expect("conversation exists");
    assert_eq!(reopened.status, Status::Open);
    let next = append_one(store, from_visitor(&a, "after reopen", None)).await;
    assert_eq!(next.seq, 4);

    // An unknown conversation.
    let unknown = ConversationId::new();
    let (out, routes) = store
        .append_batch(&[msg(unknown, Sender::System, "nobody", None)])
        .await
        .expect("append_batch");
    assert_eq!(out, vec![Appended::NotFound]);
    assert!(routes.is_empty());

    // A mixed batch: each message gets its own outcome and the good ones are stored.
    let b = new_conversation(store, &site).await;
    let k = ClientMsgId::new();
    let b1 = append_one(store, from_visitor(&b, "b1", Some(k))).await;
    let c = new_conversation(store, &site).await;
    store
        .set_status(c.id, Status::Closed)
        .await
        .expect("set_status")
        .expect("conversation exists");
    let batch = [
        from_visitor(&b, "good 1", Some(ClientMsgId::new())),
        from_visitor(&c, "to closed", Some(ClientMsgId::new())),
        msg(unknown, Sender::System, "to unknown", None),
        from_visitor(&b, "b1 retried", Some(k)),
        from_visitor(&b, "good 2", None),
        from_visitor(&a, "good 3", None),
    ];
    let (out, routes) = store.append_batch(&batch).await.expect("append_batch");
    assert_eq!(out.len(), batch.len());
    let g1 = stored(&out[0]);
    assert_stored_from(&g1, &batch[0]);
    assert_eq!(g1.seq, 2);
    assert_eq!(out[1], Appended::Closed);
    assert_eq!(out[2], Appended::NotFound);
    assert_eq!(out[3], Appended::Duplicate(b1.clone()));
    let g2 = stored(&out[4]);
    assert_stored_from(&g2, &batch[4]);
    assert_eq!(g2.seq, 3);
    let g3 = stored(&out[5]);
    assert_stored_from(&g3, &batch[5]);
    assert_eq!(g3.seq, 5);
    let routed: HashMap<ConversationId, Route> = routes.into_iter().collect();
    let want: HashMap<ConversationId, Route> = [&a, &b]
        .iter()
        .map(|conv| {
            let route = Route {
                site_id: site.id,
                visitor_id: conv.visitor_id,
            };
            (conv.id, route)
        })
        .collect();
    assert_eq!(routed, want, "routes for the conversations written only");

    assert_eq!(all_messages(store, b.id).await, vec![b1, g1, g2]);
    assert!(all_messages(store, c.id).await.is_empty());
    assert_eq!(conversation(store, c.id).await.last_seq, 0);
    assert_eq!(conversation(store, b.id).await.last_seq, 3);
    assert_eq!(conversation(store, a.id).await.last_seq, 5);
}

// ---------------------------------------------------------------------------------------------
// 5. Reading ranges of messages.

pub async fn check_message_ranges(store: Arc<dyn Store>) {
    let store = &*store;
    let site = new_site(store, "ranges").await;
    let conv = new_conversation(store, &site).await;
    let other = new_conversation(store, &site).await;
    let mut all = Vec::new();
    for i in 1..=10 {
        // Interleave another conversation's messages; they must never show up.
        let batch = [
            from_visitor(&conv, &format!("m{i}"), None),
            from_visitor(&other, &format!("o{i}"), None),
        ];
        all.push(stored(&append(store, &batch).await[0]));
    }
    let range = |lo: Seq, hi: Seq| -> Vec<Message> {
        all.iter()
            .filter(|m| (lo..=hi).contains(&m.seq))
            .cloned()
            .collect()
    };

    let cases: Vec<(SeqRange, u32, Vec<Message>, bool)> = vec![
        (SeqRange::Latest, 3, range(8, 10), true),
        (SeqRange::Latest, 10, range(1, 10), false),
        (SeqRange::Latest, 50, range(1, 10), false),
        (SeqRange::Latest, 1, range(10, 10), true),
        (SeqRange::After(0), 4, range(1, 4), true),
        (SeqRange::After(4), 4, range(5, 8), true),
        (SeqRange::After(6), 4, range(7, 10), false),
        (SeqRange::After(8), 4, range(9, 10), false),
        (SeqRange::After(10), 4, vec![], false),
        (SeqRange::After(99), 4, vec![], false),
        (SeqRange::Before(11), 3, range(8, 10), true),
        (SeqRange::Before(99), 20, range(1, 10), false),
        (SeqRange::Before(5), 2, range(3, 4), true),
        (SeqRange::Before(5), 4, range(1, 4), false),
        (SeqRange::Before(3), 2, range(1, 2), false),
        (SeqRange::Before(2), 5, range(1, 1), false),
        (SeqRange::Before(1), 5, vec![], false),
    ];
    for (range, limit, want, more) in cases {
        let got = store
            .messages(conv.id, range, limit)
            .await
            .expect("messages");
        assert_eq!(got, (want, more), "{range:?} limit {limit}");
    }

    // An empty or unknown conversation has nothing, and nothing more.
    let empty = new_conversation(store, &site).await;
    for id in [empty.id, ConversationId::new()] {
        for range in [SeqRange::Latest, SeqRange::After(0), SeqRange::Before(5)] {
            let got = store.messages(id, range, 10).await.expect("messages");
            assert_eq!(got, (vec![], false), "{range:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Opening, closing, reopening and assigning conversations.

pub async fn check_open_conversation_lifecycle(store: Arc<dyn Store>) {
    let store = &*store;
    let site = new_site(store, "lifecycle").await;
    let visitor = store.create_visitor(site.id).await.expect("create_visitor");

    let (c1, created) = store
        .open_conversation(site.id, visitor.id)
        .await
        .expect("open_conversation");
    assert!(created);
    assert_eq!(
        (c1.site_id, c1.visitor_id, c1.status, c1.assignee_id),
        (site.id, visitor.id, Status::Open, None)
    );
    assert_eq!((c1.last_seq, c1.first_seq), (0, 1));
    assert_eq!(conversation(store, c1.id).await, c1);

    // Opening again is the same conversation.
    let (again, created) = store
        .open_conversation(site.id, visitor.id)
        .await
        .expect("open_conversation");
    assert!(!created, "the open conversation is reused");
    assert_eq!(again, c1);

    // Another visitor has its own.
    let v2 = store.create_visitor(site.id).await.expect("create_visitor");
    let (other, created) = store
        .open_conversation(site.id, v2.id)
        .await
        .expect("open_conversation");
    assert!(created);
    assert_ne!(other.id, c1.id);

    // Closed, the next open starts a new conversation.
    append_one(store, from_visitor(&c1, "hi", None)).await;
    let closed = store
        .set_status(c1.id, Status::Closed)
        .await
        .expect("set_status")
        .expect("exists");
    assert_eq!((closed.status, closed.last_seq), (Status::Closed, 1));
    let (c2, created) = store
        .open_conversation(site.id, visitor.id)
        .await
        .expect("open_conversation");
    assert!(created, "a closed conversation is not reused");
    assert_ne!(c2.id, c1.id);
    assert_eq!((c2.status, c2.last_seq), (Status::Open, 0));

    // Reopening c1 would give the visitor two open conversations.
    let err = store.set_status(c1.id, Status::Open).await;
    assert!(
        matches!(err, Err(StoreError::Conflict(_))),
        "reopening beside another open conversation: {err:?}"
    );
    assert_eq!(conversation(store, c1.id).await.status, Status::Closed);
    assert_eq!(conversation(store, c2.id).await.status, Status::Open);

    // Once c2 is closed, c1 can be reopened, and is the one open_conversation returns.
    store
        .set_status(c2.id, Status::Closed)
        .await
        .expect("set_status")
        .expect("exists");
    let reopened = store
        .set_status(c1.id, Status::Open)
        .await
        .expect("set_status")
        .expect("exists");
    assert_eq!((reopened.id, reopened.status), (c1.id, Status::Open));
    let (open, created) = store
        .open_conversation(site.id, visitor.id)
        .await
        .expect("open_conversation");
    assert!(!created);
    assert_eq!(open.id, c1.id);
    // Setting the status it already has is fine.
    let same = store
        .set_status(c1.id, Status::Open)
        .await
        .expect("set_status")
        .expect("exists");
    assert_eq!(same.status, Status::Open);

    // Unknown conversations.
    let unknown = ConversationId::new();
    assert!(store.conversation(unknown).await.expect("get").is_none());
    for status in [Status::Open, Status::Closed] {
        assert!(store
            .set_status(unknown, status)
            .await
            .expect("set_status")
            .is_none());
    }

    // Assigning.
    let agent = new_agent(store, "assignee@example.com", vec![site.id]).await;
    let assigned = store
        .assign(c1.id, Some(agent.id))
        .await
        .expect("assign")
        .expect("exists");
    assert_eq!(assigned.assignee_id, Some(agent.id));
    assert_eq!(conversation(store, c1.id).await.assignee_id, Some(agent.id));
    let unassigned = store
        .assign(c1.id, None)
        .await
        .expect("assign")
        .expect("exists");
    assert_eq!(unassigned.assignee_id, None);
    assert_eq!(conversation(store, c1.id).await.assignee_id, None);
    assert!(store
        .assign(unknown, Some(agent.id))
        .await
        .expect("assign")
        .is_none());
}

/// Many tabs of one visitor opening at once share one conversation.
pub async fn check_concurrent_open_conversation(store: Arc<dyn Store>) {
    let site = new_site(&*store, "race").await;
    for round in 0..5 {
        let visitor = store.create_visitor(site.id).await.expect("create_visitor");
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let mut handles = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            let barrier = barrier.clone();
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                store
                    .open_conversation(site.id, visitor.id)
                    .await
                    .expect("open_conversation")
            }));
        }
        let mut opened = Vec::new();
        for h in handles {
            opened.push(h.await.expect("task"));
        }
        let created = opened.iter().filter(|(_, created)| *created).count();
        assert_eq!(created, 1, "round {round}: exactly one opened now");
        let id = opened[0].0.id;
        assert!(opened.iter().all(|(c, _)| c.id == id), "round {round}");
        let f = ConversationFilter {
            visitor_id: Some(visitor.id),
            ..filter(100)
        };
        assert_eq!(ids(&list(&*store, &f).await), vec![id]);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Listing conversations: filters, order, keyset pagination.

pub async fn check_list_conversations(store: Arc<dyn Store>) {
    let store = &*store;
    let s1 = new_site(store, "s1").await;
    let s2 = new_site(store, "s2").await;
    let s3 = new_site(store, "s3").await;
    let mut convs = Vec::new();
    for site in [&s1, &s1, &s1, &s2, &s2, &s3] {
        convs.push(new_conversation(store, site).await);
    }

    // Touch them in a scrambled order, each strictly later than the one before: the list is
    // the reverse of that order.
    let mut latest = convs.iter().map(|c| c.updated_at).max().unwrap_or(0);
    let mut touched = Vec::new();
    for i in [3, 0, 5, 1, 4, 2] {
        tick_past(latest).await;
        append_one(store, from_visitor(&convs[i], "touch", None)).await;
        latest = conversation(store, convs[i].id).await.updated_at;
        touched.push(i);
    }
    let want: Vec<ConversationId> = touched.iter().rev().map(|&i| convs[i].id).collect();
    assert_eq!(
        ids(&list(store, &filter(100)).await),
        want,
        "latest activity first"
    );
    assert_eq!(
        ids(&list(store, &filter(2)).await),
        want[..2].to_vec(),
        "limit"
    );

    // Close two; a visitor of s1 gets a second conversation; a burst of new conversations
    // (likely sharing a millisecond) tests the id tie-break.
    for i in [1, 4] {
        store
            .set_status(convs[i].id, Status::Closed)
            .await
            .expect("set_status")
            .expect("exists");
    }
    let (second, created) = store
        .open_conversation(s1.id, convs[1].visitor_id)
        .await
        .expect("open_conversation");
    assert!(created);
    convs.push(second.clone());
    for _ in 0..5 {
        convs.push(new_conversation(store, &s3).await);
    }

    // Everything, in (updated_at, id) descending order.
    let mut everything = Vec::new();
    for c in &convs {
        everything.push(conversation(store, c.id).await);
    }
    everything.sort_by_key(|c| std::cmp::Reverse((c.updated_at, c.id)));
    let all = list(store, &filter(100)).await;
    assert_eq!(all, everything);

    let expect = |pred: &dyn Fn(&Conversation) -> bool| -> Vec<Conversation> {
        everything.iter().filter(|c| pred(c)).cloned().collect()
    };
    // A threshold inside the list (several conversations share the burst's millisecond, so `>=`
    // must include every one of them), and one past everything.
    let since = everything[everything.len() / 2].updated_at;
    let future = everything[0].updated_at + 60_000;
    let cases: Vec<(ConversationFilter, Vec<Conversation>)> = vec![
        (
            ConversationFilter {
                site_ids: Some(vec![]),
                ..filter(100)
            },
            vec![],
        ),
        (
            ConversationFilter {
                site_ids: Some(vec![s1.id]),
                ..filter(100)
            },
            expect(&|c| c.site_id == s1.id),
        ),
        (
            ConversationFilter {
                site_ids: Some(vec![s1.id, s2.id]),
                ..filter(100)
            },
            expect(&|c| c.site_id != s3.id),
        ),
        (
            ConversationFilter {
                site_ids: Some(vec![SiteId::new()]),
                ..filter(100)
            },
            vec![],
        ),
        (
            ConversationFilter {
                status: Some(Status::Open),
                ..filter(100)
            },
            expect(&|c| c.status == Status::Open),
        ),
        (
            ConversationFilter {
                status: Some(Status::Closed),
                ..filter(100)
            },
            expect(&|c| c.status == Status::Closed),
        ),
        (
            ConversationFilter {
                visitor_id: Some(convs[1].visitor_id),
                ..filter(100)
            },
            expect(&|c| c.visitor_id == convs[1].visitor_id),
        ),
        (
            ConversationFilter {
                site_ids: Some(vec![s1.id, s3.id]),
                status: Some(Status::Open),
                ..filter(100)
            },
            expect(&|c| c.site_id != s2.id && c.status == Status::Open),
        ),
        (
            ConversationFilter {
                site_ids: Some(vec![s2.id]),
                status: Some(Status::Closed),
                visitor_id: Some(convs[4].visitor_id),
                ..filter(100)
            },
            expect(&|c| c.id == convs[4].id),
        ),
        (
            ConversationFilter {
                updated_since: Some(since),
                ..filter(100)
            },
            expect(&|c| c.updated_at >= since),
        ),
        (
            ConversationFilter {
                updated_since: Some(since),
                site_ids: Some(vec![s3.id]),
                status: Some(Status::Open),
                ..filter(100)
            },
            expect(&|c| c.updated_at >= since && c.site_id == s3.id && c.status == Status::Open),
        ),
        (
            ConversationFilter {
                updated_since: Some(future),
                ..filter(100)
            },
            vec![],
        ),
        (
            ConversationFilter {
                updated_since: Some(0),
                ..filter(100)
            },
            everything.clone(),
        ),
    ];
    assert_eq!(cases[1].1.len(), 4, "s1 has four conversations");
    assert_eq!(cases[5].1.len(), 2, "two are closed");
    assert_eq!(cases[6].1.len(), 2, "the visitor has two");
    let recent = cases[9].1.len();
    assert!(
        recent > 0 && recent < everything.len(),
        "updated_since splits the list: {recent} of {}",
        everything.len()
    );
    for (f, want) in &cases {
        assert_eq!(&list(store, f).await, want, "{f:?}");
        // Every page size walks the same list, each conversation exactly once.
        for page in [1, 2, 3, 100] {
            assert_eq!(&paginate(store, f, page).await, want, "page {page}: {f:?}");
        }
    }

    // The cursor excludes its own conversation and everything newer.
    let mid = &everything[4];
    let after_mid = list(
        store,
        &ConversationFilter {
            before: Some((mid.updated_at, mid.id)),
            ..filter(100)
        },
    )
    .await;
    assert_eq!(after_mid, everything[5..].to_vec());
}

// ---------------------------------------------------------------------------------------------
// 8. Sites and agents.

pub async fn check_sites(store: Arc<dyn Store>) {
    let store = &*store;
    assert!(store.list_sites().await.expect("list_sites").is_empty());
    let origins = vec![
        Origin::parse("https://a.test").expect("origin"),
        Origin::parse("http://localhost:8000").expect("origin"),
    ];
    let s1 = store
        .create_site(NewSite {
            name: "Shop".into(),
            allowed_origins: origins.clone(),
        })
        .await
        .expect("create_site");
    assert_eq!((s1.name.as_str(), &s1.allowed_origins), ("Shop", &origins));
    assert_eq!(SiteKey::parse(s1.key.as_str()), Some(s1.key.clone()));
    assert!(!s1.identity_secret.is_empty());
    let s2 = new_site(store, "Blog").await;
    assert_ne!(s1.id, s2.id);
    assert_ne!(s1.key, s2.key, "keys are unique");
    assert_ne!(s1.identity_secret, s2.identity_secret);

    assert_eq!(store.site(s1.id).await.expect("site"), Some(s1.clone()));
    assert_eq!(
        store.site_by_key(&s1.key).await.expect("by key"),
        Some(s1.clone())
    );
    assert_eq!(
        store.site_by_key(&s2.key).await.expect("by key"),
        Some(s2.clone())
    );
    assert_eq!(store.site(SiteId::new()).await.expect("site"), None);
    let stranger = SiteKey::generate();
    assert_eq!(store.site_by_key(&stranger).await.expect("by key"), None);
    let mut listed = store.list_sites().await.expect("list_sites");
    listed.sort_by_key(|s| s.id);
    let mut want = vec![s1.clone(), s2.clone()];
    want.sort_by_key(|s| s.id);
    assert_eq!(listed, want);

    // Patches change what they name and nothing else.
    let mut expected = s1.clone();
    let got = store
        .update_site(s1.id, SitePatch::default())
        .await
        .expect("update_site");
    assert_eq!(
        got,
        Some(expected.clone()),
        "an empty patch changes nothing"
    );
    expected.name = "Shop & Co".into();
    let got = store
        .update_site(
            s1.id,
            SitePatch {
                name: Some(expected.name.clone()),
                ..SitePatch::default()
            },
        )
        .await
        .expect("update_site");
    assert_eq!(got, Some(expected.clone()));
    expected.allowed_origins = vec![Origin::parse("https://b.test").expect("origin")];
    expected.widget_settings = serde_json::json!({"color": "#336699", "greeting": "Hi!"});
    let got = store
        .update_site(
            s1.id,
            SitePatch {
                allowed_origins: Some(expected.allowed_origins.clone()),
                widget_settings: Some(expected.widget_settings.clone()),
                ..SitePatch::default()
            },
        )
        .await
        .expect("update_site");
    assert_eq!(got, Some(expected.clone()));
    expected.allowed_origins = vec![];
    let got = store
        .update_site(
            s1.id,
            SitePatch {
                allowed_origins: Some(vec![]),
                ..SitePatch::default()
            },
        )
        .await
        .expect("update_site");
    assert_eq!(got, Some(expected.clone()));
    assert_eq!(
        store.site(s1.id).await.expect("site"),
        Some(expected.clone())
    );
    assert_eq!(
        store.site_by_key(&s1.key).await.expect("by key"),
        Some(expected)
    );
    assert_eq!(
        store.site(s2.id).await.expect("site"),
        Some(s2),
        "untouched"
    );
    let nobody = store
        .update_site(
            SiteId::new(),
            SitePatch {
                name: Some("ghost".into()),
                ..SitePatch::default()
            },
        )
        .await
        .expect("update_site");
    assert_eq!(nobody, None);
    assert_eq!(store.list_sites().await.expect("list").len(), 2);
}

pub async fn check_agents(store: Arc<dyn Store>) {
    let store = &*store;
    let s1 = new_site(store, "s1").await;
    let s2 = new_site(store, "s2").await;
    let s3 = new_site(store, "s3").await;
    assert_eq!(store.count_agents().await.expect("count"), 0);

    let admin = store
        .create_agent(NewAgent {
            email: email("Root@Example.com"),
            name: "Root".into(),
            role: AgentRole::Admin,
            password_hash: "root-hash".into(),
            site_ids: vec![],
        })
        .await
        .expect("create_agent");
    assert_eq!(
        (admin.email.as_str(), admin.role, admin.disabled),
        ("root@example.com", AgentRole::Admin, false)
    );
    let ada = new_agent(store, "ada@example.com", vec![s1.id]).await;
    assert_eq!(ada.site_ids, vec![s1.id]);
    assert_eq!(store.count_agents().await.expect("count"), 2);
    assert_eq!(
        store.agent(admin.id).await.expect("agent"),
        Some(admin.clone())
    );
    assert_eq!(store.agent(ada.id).await.expect("agent"), Some(ada.clone()));
    assert_eq!(store.agent(AgentId::new()).await.expect("agent"), None);
    let mut listed = store.list_agents().await.expect("list_agents");
    listed.sort_by_key(|a| a.id);
    let mut want = vec![admin.clone(), ada.clone()];
    want.sort_by_key(|a| a.id);
    assert_eq!(listed, want);

    // Emails are unique (they are normalised, so case does not make another address).
    let dup = store
        .create_agent(NewAgent {
            email: email("ADA@example.com"),
            name: "Impostor".into(),
            role: AgentRole::Admin,
            password_hash: "x".into(),
            site_ids: vec![s2.id],
        })
        .await;
    assert!(
        matches!(dup, Err(StoreError::Conflict(_))),
        "a used email: {dup:?}"
    );
    assert_eq!(store.count_agents().await.expect("count"), 2);
    assert_eq!(store.agent(ada.id).await.expect("agent"), Some(ada.clone()));

    // Login finds the agent and its hash.
    let (who, hash) = store
        .agent_login(&email("ada@example.com"))
        .await
        .expect("agent_login")
        .expect("known email");
    assert_eq!(
        (who, hash.as_str()),
        (ada.clone(), "hash-of-ada@example.com")
    );
    assert!(store
        .agent_login(&email("nobody@example.com"))
        .await
        .expect("agent_login")
        .is_none());

    // Site membership is replaced, not merged.
    let mut expected = ada.clone();
    for sites in [
        vec![s2.id, s3.id],
        vec![s3.id, s1.id, s2.id],
        vec![s1.id],
        vec![],
    ] {
        let got = store
            .update_agent(
                ada.id,
                AgentPatch {
                    site_ids: Some(sites.clone()),
                    ..AgentPatch::default()
                },
            )
            .await
            .expect("update_agent")
            .expect("exists");
        expected.site_ids = sorted_sites(sites);
        let read = store.agent(ada.id).await.expect("agent").expect("exists");
        for a in [got, read] {
            assert_eq!(
                Agent {
                    site_ids: sorted_sites(a.site_ids.clone()),
                    ..a
                },
                expected
            );
        }
    }

    // Name, role, password and the disabled flag; each patch leaves the rest alone.
    let got = store
        .update_agent(
            ada.id,
            AgentPatch {
                name: Some("Ada L.".into()),
                role: Some(AgentRole::Admin),
                ..AgentPatch::default()
            },
        )
        .await
        .expect("update_agent")
        .expect("exists");
    expected.name = "Ada L.".into();
    expected.role = AgentRole::Admin;
    assert_eq!(got, expected);
    store
        .update_agent(
            ada.id,
            AgentPatch {
                password_hash: Some("new-hash".into()),
                ..AgentPatch::default()
            },
        )
        .await
        .expect("update_agent")
        .expect("exists");
    let (who, hash) = store
        .agent_login(&ada.email)
        .await
        .expect("agent_login")
        .expect("known");
    assert_eq!((who, hash.as_str()), (expected.clone(), "new-hash"));
    for disabled in [true, false] {
        let got = store
            .update_agent(
                ada.id,
                AgentPatch {
                    disabled: Some(disabled),
                    ..AgentPatch::default()
                },
            )
            .await
            .expect("update_agent")
            .expect("exists");
        expected.disabled = disabled;
        assert_eq!(got, expected);
        assert_eq!(
            store.agent(ada.id).await.expect("agent"),
            Some(expected.clone())
        );
    }
    assert_eq!(
        store.agent(admin.id).await.expect("agent"),
        Some(admin),
        "untouched"
    );
    let nobody = store
        .update_agent(
            AgentId::new(),
            AgentPatch {
                name: Some("ghost".into()),
                ..AgentPatch::default()
            },
        )
        .await
        .expect("update_agent");
    assert_eq!(nobody, None);
    assert_eq!(store.count_agents().await.expect("count"), 2);
}

fn session_row(agent: AgentId, csrf: &str) -> SessionRow {
    SessionRow {
        agent_id: agent,
        csrf_token: csrf.into(),
        expires_at: now_ms() + 3_600_000,
    }
}

async fn has_session(store: &dyn Store, token_hash: &str) -> bool {
    store.session(token_hash).await.expect("session").is_some()
}

pub async fn check_agent_changes_end_sessions(store: Arc<dyn Store>) {
    let store = &*store;
    let a = new_agent(store, "a@example.com", vec![]).await;
    let b = new_agent(store, "b@example.com", vec![]).await;
    for (token, agent) in [("a1", a.id), ("a2", a.id), ("b1", b.id)] {
        store
            .create_session(token, session_row(agent, token))
            .await
            .expect("create_session");
    }

    // Other changes keep the sessions.
    store
        .update_agent(
            a.id,
            AgentPatch {
                name: Some("A".into()),
                role: Some(AgentRole::Admin),
                disabled: Some(false),
                ..AgentPatch::default()
            },
        )
        .await
        .expect("update_agent")
        .expect("exists");
    assert!(has_session(store, "a1").await && has_session(store, "a2").await);

    // A new password ends that agent's sessions, and only those.
    store
        .update_agent(
            a.id,
            AgentPatch {
                password_hash: Some("changed".into()),
                ..AgentPatch::default()
            },
        )
        .await
        .expect("update_agent")
        .expect("exists");
    assert!(!has_session(store, "a1").await && !has_session(store, "a2").await);
    assert!(has_session(store, "b1").await);

    // So does disabling.
    store
        .create_session("a3", session_row(a.id, "a3"))
        .await
        .expect("create_session");
    store
        .update_agent(
            a.id,
            AgentPatch {
                disabled: Some(true),
                ..AgentPatch::default()
            },
        )
        .await
        .expect("update_agent")
        .expect("exists");
    assert!(!has_session(store, "a3").await);
    assert!(has_session(store, "b1").await);
}

// ---------------------------------------------------------------------------------------------
// 9. Sessions and installation secrets.

pub async fn check_sessions(store: Arc<dyn Store>) {
    let store = &*store;
    let agent = new_agent(store, "s@example.com", vec![]).await;
    let row = session_row(agent.id, "csrf-1");
    store
        .create_session("hash-1", row.clone())
        .await
        .expect("create_session");
    store
        .create_session("hash-2", session_row(agent.id, "csrf-2"))
        .await
        .expect("create_session");
    let got = store
        .session("hash-1")
        .await
        .expect("session")
        .expect("exists");
    assert_eq!(
        (got.agent_id, got.csrf_token.as_str(), got.expires_at),
        (row.agent_id, "csrf-1", row.expires_at)
    );
    assert!(store.session("hash-3").await.expect("session").is_none());

    store
        .delete_session("hash-1")
        .await
        .expect("delete_session");
    assert!(!has_session(store, "hash-1").await);
    assert!(has_session(store, "hash-2").await, "only that session");
    store
        .delete_session("hash-1")
        .await
        .expect("deleting twice is fine");
    store
        .delete_session("never")
        .await
        .expect("deleting an unknown session is fine");
}

pub async fn check_secrets(store: Arc<dyn Store>) {
    assert_eq!(
        store
            .secret("cookie", b"first".to_vec())
            .await
            .expect("secret"),
        b"first"
    );
    assert_eq!(
        store
            .secret("cookie", b"second".to_vec())
            .await
            .expect("secret"),
        b"first",
        "the first value forever"
    );
    assert_eq!(
        store
            .secret("other", b"second".to_vec())
            .await
            .expect("secret"),
        b"second",
        "names are independent"
    );

    // Nodes racing to create a secret all get the same one.
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut handles = Vec::new();
    for t in 0..8u8 {
        let store = store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            store.secret("raced", vec![t; 32]).await.expect("secret")
        }));
    }
    let mut values = BTreeSet::new();
    for h in handles {
        values.insert(h.await.expect("task"));
    }
    assert_eq!(values.len(), 1, "one winner: {values:?}");
    let winner = values.into_iter().next().expect("one value");
    assert!((0..8u8).any(|t| winner == vec![t; 32]));
    assert_eq!(
        store.secret("raced", vec![99; 32]).await.expect("secret"),
        winner
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Visitors, and finding a message by its client id.

pub async fn check_visitors_and_client_id_lookup(store: Arc<dyn Store>) {
    let store = &*store;
    let site = new_site(store, "visitors").await;
    let v = store.create_visitor(site.id).await.expect("create_visitor");
    assert_eq!(v.site_id, site.id);
    assert_eq!(store.visitor(v.id).await.expect("visitor"), Some(v.clone()));
    assert_eq!(
        store.visitor(VisitorId::new()).await.expect("visitor"),
        None
    );
    let v2 = store.create_visitor(site.id).await.expect("create_visitor");
    assert_ne!(v.id, v2.id);

    let (conv, _) = store
        .open_conversation(site.id, v.id)
        .await
        .expect("open_conversation");
    let (conv2, _) = store
        .open_conversation(site.id, v2.id)
        .await
        .expect("open_conversation");
    let x = ClientMsgId::new();
    let agent = AgentId::new();
    let mine = append_one(store, from_visitor(&conv, "mine", Some(x))).await;
    let theirs = append_one(store, from_visitor(&conv2, "theirs", Some(x))).await;
    let agents = append_one(
        store,
        msg(
            conv.id,
            Sender::Agent {
                id: agent,
                name: "Ada".into(),
            },
            "agent's",
            Some(x),
        ),
    )
    .await;
    append_one(store, msg(conv.id, Sender::System, "system", Some(x))).await;

    let find = |author: uuid::Uuid, cid: ClientMsgId| async move {
        store
            .message_by_client_id(author, cid)
            .await
            .expect("message_by_client_id")
    };
    assert_eq!(find(v.id.0, x).await, Some(mine.clone()));
    assert_eq!(find(v2.id.0, x).await, Some(theirs));
    assert_eq!(find(agent.0, x).await, Some(agents));
    assert_eq!(find(v.id.0, ClientMsgId::new()).await, None);
    assert_eq!(find(uuid::Uuid::now_v7(), x).await, None);
    // Not by the message's own id, nor by its conversation.
    assert_eq!(find(v.id.0, ClientMsgId(mine.id.0)).await, None);
    assert_eq!(find(conv.id.0, x).await, None);

    // Found whatever became of the conversation since.
    store
        .set_status(conv.id, Status::Closed)
        .await
        .expect("set_status")
        .expect("exists");
    assert_eq!(find(v.id.0, x).await, Some(mine));
}

// ---------------------------------------------------------------------------------------------
// 11. Durability across a reopen.

pub async fn check_durable_across_reopen(backend: &dyn Backend) {
    let store = backend.open().await;
    let secret = store
        .secret("install", b"original".to_vec())
        .await
        .expect("secret");
    let site = new_site(&*store, "durable").await;
    let agent = new_agent(&*store, "keep@example.com", vec![site.id]).await;
    store
        .create_session("token", session_row(agent.id, "csrf"))
        .await
        .expect("create_session");
    let conv = new_conversation(&*store, &site).await;
    let visitor = store
        .set_visitor_profile(
            conv.visitor_id,
            Some("Grace".into()),
            Some(email("grace@example.com")),
        )
        .await
        .expect("set_visitor_profile")
        .expect("exists");
    let cid = ClientMsgId::new();
    let mut batch = vec![from_visitor(&conv, "first", Some(cid))];
    for i in 0..4 {
        batch.push(from_visitor(&conv, &format!("more {i}"), None));
    }
    append(&*store, &batch).await;
    store
        .mark_read(conv.id, agent.id.0, 4)
        .await
        .expect("mark_read");
    let closed = new_conversation(&*store, &site).await;
    append_one(&*store, from_visitor(&closed, "bye", None)).await;
    store
        .set_status(closed.id, Status::Closed)
        .await
        .expect("set_status")
        .expect("exists");

    let conv_before = conversation(&*store, conv.id).await;
    let closed_before = conversation(&*store, closed.id).await;
    let messages_before = all_messages(&*store, conv.id).await;
    let closed_messages = all_messages(&*store, closed.id).await;
    let site_before = store.site(site.id).await.expect("site");
    let session_before = store.session("token").await.expect("session").expect("ok");

    let store = backend.reopen(store).await;
    store.ping().await.expect("ping");
    assert_eq!(
        store
            .secret("install", b"other".to_vec())
            .await
            .expect("secret"),
        secret
    );
    assert_eq!(store.site(site.id).await.expect("site"), site_before);
    assert_eq!(
        store.site_by_key(&site.key).await.expect("by key"),
        site_before
    );
    assert_eq!(
        store.agent(agent.id).await.expect("agent"),
        Some(agent.clone())
    );
    let (_, hash) = store
        .agent_login(&agent.email)
        .await
        .expect("login")
        .expect("known");
    assert_eq!(hash, "hash-of-keep@example.com");
    let session = store
        .session("token")
        .await
        .expect("session")
        .expect("kept");
    assert_eq!(
        (session.agent_id, session.csrf_token, session.expires_at),
        (
            session_before.agent_id,
            session_before.csrf_token,
            session_before.expires_at
        )
    );
    assert_eq!(
        store.visitor(visitor.id).await.expect("visitor"),
        Some(visitor.clone())
    );
    assert_eq!(conversation(&*store, conv.id).await, conv_before);
    assert_eq!(conversation(&*store, closed.id).await, closed_before);
    assert_eq!(all_messages(&*store, conv.id).await, messages_before);
    assert_eq!(all_messages(&*store, closed.id).await, closed_messages);
    assert_eq!(
        store.read_marks(conv.id).await.expect("read_marks"),
        vec![(agent.id.0, 4)]
    );
    assert_eq!(
        store
            .search_messages(None, "first", 10)
            .await
            .expect("search"),
        vec![messages_before[0].clone()],
        "the search index survives too"
    );
    assert_eq!(
        store
            .message_by_client_id(visitor.id.0, cid)
            .await
            .expect("lookup"),
        Some(messages_before[0].clone())
    );

    // Writing goes on where it stopped: idempotency, closed state and seqs survived.
    let out = append(
        &*store,
        &[
            from_visitor(&conv, "first, retried", Some(cid)),
            from_visitor(&closed, "late", None),
            from_visitor(&conv, "after restart", None),
        ],
    )
    .await;
    assert_eq!(out[0], Appended::Duplicate(messages_before[0].clone()));
    assert_eq!(out[1], Appended::Closed);
    assert_eq!(stored(&out[2]).seq, 6);
    let (again, created) = store
        .open_conversation(site.id, visitor.id)
        .await
        .expect("open_conversation");
    assert_eq!((again.id, created), (conv.id, false));
}

// ---------------------------------------------------------------------------------------------
// Randomised: batches against a model.

/// What the model expects of one message.
#[derive(Debug)]
enum Expect {
    Stored { seq: Seq },
    Same(Appended),
}

struct ModelConv {
    conv: Conversation,
    open: bool,
    messages: Vec<Message>,
}

/// One case: three conversations (one visitor each) and an unknown one; random batches with
/// retries of earlier client ids (stored or not), and random closes and reopens. Every outcome,
/// every route set, and at the end every conversation's messages and some ranges of them, must
/// be what the model says. Adds to `seen` how many outcomes of each kind the case produced.
async fn random_case(store: &dyn Store, seed: u64, seen: &mut HashMap<&'static str, usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let site = new_site(store, &format!("case {seed}")).await;
    let mut model = Vec::new();
    for _ in 0..3 {
        let conv = new_conversation(store, &site).await;
        model.push(ModelConv {
            conv,
            open: true,
            messages: Vec::new(),
        });
    }
    let unknown = ConversationId::new();
    let agent = Sender::Agent {
        id: AgentId::new(),
        name: "Ada".into(),
    };
    // Client ids sent so far (stored or not): target conversation index (3: unknown), sender, id.
    let mut sent: Vec<(usize, Sender, ClientMsgId)> = Vec::new();
    let mut by_key: HashMap<(uuid::Uuid, ClientMsgId), Message> = HashMap::new();

    for step in 0..12 {
        let ctx = format!("seed {seed} step {step}");
        if rng.gen_bool(0.2) {
            let i = rng.gen_range(0..3);
            let to = if model[i].open {
                Status::Closed
            } else {
                Status::Open
            };
            let got = store
                .set_status(model[i].conv.id, to)
                .await
                .expect("set_status")
                .expect("exists");
            assert_eq!(got.status, to, "{ctx}");
            *seen.entry("status change").or_default() += 1;
            model[i].open = to == Status::Open;
            continue;
        }

        // Generate a batch.
        let mut batch: Vec<(usize, NewMessage)> = Vec::new();
        for k in 0..rng.gen_range(1..=8) {
            let text = format!("{ctx} msg {k}");
            if !sent.is_empty() && rng.gen_bool(0.3) {
                // A retry: same conversation, same sender, same client id.
                let (t, sender, cid) = sent[rng.gen_range(0..sent.len())].clone();
                let id = if t == 3 { unknown } else { model[t].conv.id };
                batch.push((t, msg(id, sender, &text, Some(cid))));
                continue;
            }
            let t = if rng.gen_bool(0.1) {
                3
            } else {
                rng.gen_range(0..3)
            };
            let (id, visitor) = if t == 3 {
                (unknown, VisitorId::new())
            } else {
                (model[t].conv.id, model[t].conv.visitor_id)
            };
            let sender = match rng.gen_range(0..5) {
                0 => Sender::System,
                1 => agent.clone(),
                _ => Sender::Visitor(visitor),
            };
            let cid = rng.gen_bool(0.8).then(ClientMsgId::new);
            if let (Some(cid), Some(_)) = (cid, sender.author_id()) {
                sent.push((t, sender.clone(), cid));
            }
            batch.push((t, msg(id, sender, &text, cid)));
        }

        // What the model expects, in batch order (an earlier message of the batch counts as
        // stored for the ones after it).
        let news: Vec<NewMessage> = batch.iter().map(|(_, m)| m.clone()).collect();
        let (out, routes) = store.append_batch(&news).await.expect("append_batch");
        assert_eq!(out.len(), news.len(), "{ctx}");
        let mut written = HashSet::new();
        for (k, ((t, m), got)) in batch.iter().zip(&out).enumerate() {
            let key = m.sender.author_id().zip(m.client_id);
            let expect = match key.and_then(|k| by_key.get(&k)) {
                Some(prev) => Expect::Same(Appended::Duplicate(prev.clone())),
                None if *t == 3 => Expect::Same(Appended::NotFound),
                None if !model[*t].open => Expect::Same(Appended::Closed),
                None => Expect::Stored {
                    seq: model[*t].messages.len() as Seq + 1,
                },
            };
            let kind = match got {
                Appended::Stored(_) => "stored",
                Appended::Duplicate(_) => "duplicate",
                Appended::Closed => "closed",
                Appended::NotFound => "not found",
            };
            *seen.entry(kind).or_default() += 1;
            match expect {
                Expect::Same(want) => assert_eq!(got, &want, "{ctx} message {k}"),
                Expect::Stored { seq } => {
                    let Appended::Stored(s) = got else {
                        panic!("{ctx} message {k}: expected Stored seq {seq}, got {got:?}");
                    };
                    assert_eq!(s.seq, seq, "{ctx} message {k}");
                    assert_stored_from(s, m);
                    model[*t].messages.push(s.clone());
                    if let Some(key) = key {
                        by_key.insert(key, s.clone());
                    }
                    written.insert(m.conversation_id);
                }
            }
        }
        let routed: HashSet<ConversationId> = routes.iter().map(|(c, _)| *c).collect();
        assert_eq!(routed, written, "{ctx}: routes");
    }

    for (i, mc) in model.iter().enumerate() {
        let ctx = format!("seed {seed} conversation {i}");
        let ms = &mc.messages;
        assert_eq!(&all_messages(store, mc.conv.id).await, ms, "{ctx}");
        let c = conversation(store, mc.conv.id).await;
        assert_eq!(c.last_seq, ms.len() as Seq, "{ctx}");
        let status = if mc.open {
            Status::Open
        } else {
            Status::Closed
        };
        assert_eq!(c.status, status, "{ctx}");
        // Random ranges, against the model's slices.
        for _ in 0..10 {
            let n = ms.len() as Seq;
            let limit = rng.gen_range(1..=n as u32 + 2);
            let at = rng.gen_range(0..=n + 2);
            let (range, want): (SeqRange, Vec<Message>) = match rng.gen_range(0..3) {
                0 => (SeqRange::Latest, ms.clone()),
                1 => (
                    SeqRange::After(at),
                    ms.iter().filter(|m| m.seq > at).cloned().collect(),
                ),
                _ => (
                    SeqRange::Before(at),
                    ms.iter().filter(|m| m.seq < at).cloned().collect(),
                ),
            };
            let more = want.len() > limit as usize;
            let want = match range {
                SeqRange::After(_) => want[..want.len().min(limit as usize)].to_vec(),
                _ => want[want.len().saturating_sub(limit as usize)..].to_vec(),
            };
            let got = store
                .messages(mc.conv.id, range, limit)
                .await
                .expect("messages");
            assert_eq!(got, (want, more), "{ctx}: {range:?} limit {limit}");
        }
    }
}

pub async fn check_random_batches_match_model(store: Arc<dyn Store>) {
    let mut seen = HashMap::new();
    for seed in 0..50 {
        random_case(&*store, seed, &mut seen).await;
    }
    // The generator does reach every rule.
    for kind in [
        "stored",
        "duplicate",
        "closed",
        "not found",
        "status change",
    ] {
        let n = seen.get(kind).copied().unwrap_or(0);
        assert!(n >= 20, "only {n} {kind} in 50 cases: {seen:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 13. Read marks: raised, never lowered, clamped to the last message, per reader and conversation.

async fn marks(store: &dyn Store, conv: ConversationId) -> HashMap<uuid::Uuid, Seq> {
    let all = store.read_marks(conv).await.expect("read_marks");
    let n = all.len();
    let map: HashMap<uuid::Uuid, Seq> = all.into_iter().collect();
    assert_eq!(map.len(), n, "one mark per reader");
    map
}

pub async fn check_read_marks(store: Arc<dyn Store>) {
    let store = &*store;
    let site = new_site(store, "marks").await;
    let conv = new_conversation(store, &site).await;
    let other = new_conversation(store, &site).await;
    let visitor = conv.visitor_id.0;
    let agent = new_agent(store, "reader@example.com", vec![site.id])
        .await
        .id
        .0;
    let mark = |c: ConversationId, reader: uuid::Uuid, seq: Seq| async move {
        store.mark_read(c, reader, seq).await.expect("mark_read")
    };

    assert!(marks(store, conv.id).await.is_empty(), "no marks at first");
    // An empty conversation: any mark is clamped to 0.
    assert_eq!(mark(conv.id, visitor, 3).await, Some(0));

    let batch: Vec<NewMessage> = (0..5)
        .map(|i| from_visitor(&conv, &format!("m{i}"), None))
        .collect();
    append(store, &batch).await;

    assert_eq!(mark(conv.id, visitor, 3).await, Some(3), "raised");
    assert_eq!(mark(conv.id, visitor, 2).await, Some(3), "never lowered");
    assert_eq!(mark(conv.id, visitor, 3).await, Some(3), "same mark again");
    assert_eq!(
        mark(conv.id, agent, 100).await,
        Some(5),
        "clamped to last_seq"
    );
    assert_eq!(
        mark(conv.id, agent, u64::MAX).await,
        Some(5),
        "even from the top of the range"
    );
    assert_eq!(
        marks(store, conv.id).await,
        HashMap::from([(visitor, 3), (agent, 5)])
    );

    // Unknown conversations store nothing.
    let nowhere = ConversationId::new();
    assert_eq!(mark(nowhere, visitor, 1).await, None);
    assert!(marks(store, nowhere).await.is_empty());
    // Marks belong to one conversation.
    assert!(marks(store, other.id).await.is_empty());
    append_one(store, from_visitor(&other, "elsewhere", None)).await;
    assert_eq!(mark(other.id, agent, 1).await, Some(1));
    assert_eq!(marks(store, other.id).await, HashMap::from([(agent, 1)]));
    assert_eq!(marks(store, conv.id).await[&agent], 5, "unchanged");

    // New messages lift the clamp; a closed conversation can still be read.
    append(store, &batch).await;
    assert_eq!(mark(conv.id, agent, 100).await, Some(10));
    store
        .set_status(conv.id, Status::Closed)
        .await
        .expect("set_status")
        .expect("exists");
    assert_eq!(mark(conv.id, visitor, 9).await, Some(9));
    assert_eq!(
        marks(store, conv.id).await,
        HashMap::from([(visitor, 9), (agent, 10)])
    );
}

/// Many marks for the same reader at once (several tabs, several nodes): the highest wins.
pub async fn check_concurrent_read_marks(store: Arc<dyn Store>) {
    let site = new_site(&*store, "marks race").await;
    let conv = new_conversation(&*store, &site).await;
    let batch: Vec<NewMessage> = (0..40)
        .map(|i| from_visitor(&conv, &format!("m{i}"), None))
        .collect();
    append(&*store, &batch).await;
    let reader = conv.visitor_id.0;
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut handles = Vec::new();
    for t in 0..8u64 {
        let store = store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut returned = Vec::new();
            // Interleaved seqs: task t marks t+1, t+9, t+17, … so every task both raises and
            // arrives late.
            for i in 0..5 {
                let seq = t + 1 + 8 * i;
                let got = store
                    .mark_read(conv.id, reader, seq)
                    .await
                    .expect("mark_read")
                    .expect("conversation exists");
                assert!(got >= seq, "the stored mark is at least the one just set");
                returned.push(got);
            }
            returned
        }));
    }
    for h in handles {
        let returned = h.await.expect("task");
        assert!(
            returned.windows(2).all(|w| w[0] <= w[1]),
            "one reader's mark never goes down: {returned:?}"
        );
    }
    assert_eq!(marks(&*store, conv.id).await, HashMap::from([(reader, 40)]));
}

// ---------------------------------------------------------------------------------------------
// 14. Visitor profile.

pub async fn check_visitor_profile(store: Arc<dyn Store>) {
    let store = &*store;
    let site = new_site(store, "profiles").await;
    let v = store.create_visitor(site.id).await.expect("create_visitor");
    let bystander = store.create_visitor(site.id).await.expect("create_visitor");
    assert_eq!(
        (v.name.clone(), v.email.clone()),
        (None, None),
        "anonymous at first"
    );
    assert_eq!(store.visitor(v.id).await.expect("visitor"), Some(v.clone()));

    let set = |name: Option<&str>, mail: Option<&str>| {
        let (name, mail) = (name.map(str::to_owned), mail.map(email));
        async move {
            store
                .set_visitor_profile(v.id, name, mail)
                .await
                .expect("set_visitor_profile")
                .expect("visitor exists")
        }
    };
    let full = set(Some("Zoë Ω"), Some("Zoe@Example.com")).await;
    assert_eq!(
        full,
        Visitor {
            name: Some("Zoë Ω".into()),
            email: Some(email("zoe@example.com")),
            ..v.clone()
        }
    );
    assert_eq!(store.visitor(v.id).await.expect("visitor"), Some(full));

    let no_name = set(None, Some("zoe@example.com")).await;
    assert_eq!(
        (
            no_name.name.as_deref(),
            no_name.email.as_ref().map(Email::as_str)
        ),
        (None, Some("zoe@example.com")),
        "None clears the name"
    );
    let cleared = set(None, None).await;
    assert_eq!(cleared, v, "both cleared: as created");
    assert_eq!(store.visitor(v.id).await.expect("visitor"), Some(v.clone()));
    let named = set(Some("Ada"), None).await;
    assert_eq!((named.name.as_deref(), named.email), (Some("Ada"), None));

    assert_eq!(
        store
            .set_visitor_profile(VisitorId::new(), Some("Nobody".into()), None)
            .await
            .expect("set_visitor_profile"),
        None,
        "unknown visitor"
    );
    assert_eq!(
        store.visitor(bystander.id).await.expect("visitor"),
        Some(bystander),
        "other visitors untouched"
    );
}

// ---------------------------------------------------------------------------------------------
// 15. Full-text search.

/// The lower-cased words of a text, as the search defines them (runs of letters and digits).
fn words_of(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The model: every message holding all the words of `query`, newest first.
fn expected_search(all: &[Message], sites: Option<&[ConversationId]>, query: &str) -> Vec<Message> {
    let want = words_of(query);
    let mut hits: Vec<Message> = all
        .iter()
        .filter(|m| sites.is_none_or(|c| c.contains(&m.conversation_id)))
        .filter(|m| {
            let have = words_of(&m.text);
            !want.is_empty() && want.iter().all(|w| have.contains(w))
        })
        .cloned()
        .collect();
    hits.sort_by_key(|m| std::cmp::Reverse((m.created_at, m.conversation_id, m.seq)));
    hits
}

pub async fn check_search_messages(store: Arc<dyn Store>) {
    let store = &*store;
    let s1 = new_site(store, "search one").await;
    let s2 = new_site(store, "search two").await;
    let a = new_conversation(store, &s1).await;
    let b = new_conversation(store, &s1).await;
    let c = new_conversation(store, &s2).await;
    let agent = Sender::Agent {
        id: AgentId::new(),
        name: "Ada".into(),
    };
    let search = |sites: Option<Vec<SiteId>>, q: &'static str, limit: u32| async move {
        store
            .search_messages(sites.as_deref(), q, limit)
            .await
            .unwrap_or_else(|e| panic!("search {q:?}: {e:?}"))
    };
    assert!(
        search(None, "order", 10).await.is_empty(),
        "nothing stored yet"
    );

    let mut all = Vec::new();
    let batches: Vec<Vec<NewMessage>> = vec![
        vec![
            from_visitor(&a, "Where is my order?", Some(ClientMsgId::new())),
            from_visitor(&b, "Order number 42, please", None),
        ],
        vec![msg(a.id, agent.clone(), "Your ORDER shipped today", None)],
        vec![
            from_visitor(&c, "An order on the other site", None),
            from_visitor(&a, "Zoë's café order arrived", None),
            from_visitor(&b, "refund please", None),
        ],
    ];
    for batch in &batches {
        let mut t = 0;
        for o in append(store, batch).await {
            let m = stored(&o);
            t = m.created_at;
            all.push(m);
        }
        tick_past(t).await;
    }
    let s1_convs = [a.id, b.id];
    let s2_convs = [c.id];

    let order = search(None, "order", 100).await;
    assert_eq!(order, expected_search(&all, None, "order"));
    assert_eq!(order.len(), 5, "whole words, any case, every site");
    assert_eq!(order[0].text, "An order on the other site", "newest first");
    assert_eq!(search(None, "ORDER", 100).await, order, "case-insensitive");
    assert_eq!(
        search(Some(vec![s1.id]), "order", 100).await,
        expected_search(&all, Some(&s1_convs), "order")
    );
    assert_eq!(
        search(Some(vec![s2.id]), "order", 100).await,
        expected_search(&all, Some(&s2_convs), "order")
    );
    assert_eq!(search(Some(vec![s1.id, s2.id]), "order", 100).await, order);
    assert!(search(Some(vec![]), "order", 100).await.is_empty());
    assert!(search(Some(vec![SiteId::new()]), "order", 100)
        .await
        .is_empty());
    assert_eq!(search(None, "order", 2).await, order[..2].to_vec(), "limit");
    assert!(search(None, "order", 0).await.is_empty());

    // Every word must match; a prefix is not a word; diacritics are kept.
    assert_eq!(
        search(None, "arrived order", 100).await,
        expected_search(&all, None, "arrived order")
    );
    assert_eq!(search(None, "arrived order", 100).await.len(), 1);
    assert!(search(None, "ord", 100).await.is_empty());
    assert!(search(None, "order refund", 100).await.is_empty());
    assert_eq!(search(None, "café", 100).await.len(), 1);
    assert_eq!(search(None, "zoë", 100).await.len(), 1);
    assert_eq!(search(None, "42", 100).await.len(), 1);

    // What looks like query syntax is text: no error, and no operator takes effect.
    for q in [
        "!!! ???",
        "   ",
        "*",
        "\"",
        "NEAR(order",
        "order OR refund",
        "-order",
    ] {
        let got = store.search_messages(None, q, 100).await;
        assert!(got.is_ok(), "{q:?}: {got:?}");
    }
    assert!(search(None, "!!! ???", 100).await.is_empty(), "no words");
    assert!(
        search(None, "order OR refund", 100).await.is_empty(),
        "OR is a word"
    );
    assert_eq!(
        search(None, "\"order\"", 100).await,
        order,
        "quotes are not syntax"
    );
    assert_eq!(
        search(None, "order*", 100).await,
        order,
        "* is not a prefix operator"
    );

    // Closed conversations stay searchable; a group commit is indexed with its transaction.
    store
        .set_status(a.id, Status::Closed)
        .await
        .expect("set_status")
        .expect("exists");
    let bulk: Vec<NewMessage> = (0..300)
        .map(|i| from_visitor(&b, &format!("bulk message {i}"), None))
        .collect();
    for o in append(store, &bulk).await {
        all.push(stored(&o));
    }
    let got = search(None, "bulk", 1000).await;
    assert_eq!(got, expected_search(&all, None, "bulk"));
    assert_eq!(got.len(), 300);
    assert_eq!(got[0].seq, conversation(store, b.id).await.last_seq);
    assert_eq!(search(None, "order", 100).await, order);
    assert_eq!(search(None, "bulk 299", 10).await.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// The backends.

store_suite!(sqlite, || async { SqliteBackend::fresh().await });
store_suite!(postgres, || async { PostgresBackend::fresh().await });

// ---------------------------------------------------------------------------------------------
// PostgreSQL as a cluster's store: what one process cannot show.

mod postgres_cluster {
    use super::*;

    /// Several nodes (separate pools) append to the same conversations at once, in batches that
    /// mix conversations in different orders, while every message is also retried on another
    /// node at the same moment. Per conversation the seqs come out 1..=N with no gap and no
    /// repeat, every client id is stored exactly once, and both sends of a pair see that one
    /// message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn nodes_append_concurrently_gap_free() {
        const NODES: usize = 3;
        const TASKS_PER_NODE: usize = 3;
        const BATCHES: usize = 25;
        let backend = PostgresBackend::fresh().await;
        let mut nodes: Vec<Arc<dyn Store>> = Vec::new();
        for _ in 0..NODES {
            nodes.push(Arc::new(backend.node().await));
        }
        let site = new_site(&*nodes[0], "cluster").await;
        let mut convs = Vec::new();
        for _ in 0..4 {
            convs.push(new_conversation(&*nodes[0], &site).await);
        }
        let tasks = NODES * TASKS_PER_NODE;
        let barrier = Arc::new(tokio::sync::Barrier::new(tasks));
        let mut handles = Vec::new();
        for t in 0..tasks {
            let home = nodes[t % NODES].clone();
            let other = nodes[(t + 1) % NODES].clone();
            let convs = convs.clone();
            let barrier = barrier.clone();
            handles.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(t as u64);
                let mut sent: Vec<Message> = Vec::new();
                barrier.wait().await;
                for b in 0..BATCHES {
                    let size = rng.gen_range(1..=6);
                    let batch: Vec<NewMessage> = (0..size)
                        .map(|i| {
                            let conv = &convs[rng.gen_range(0..convs.len())];
                            from_visitor(conv, &format!("t{t} b{b} m{i}"), Some(ClientMsgId::new()))
                        })
                        .collect();
                    // The same batch on two nodes at once: a client retrying on another node
                    // while its first attempt is still in flight.
                    let (a, b2) =
                        tokio::join!(home.append_batch(&batch), other.append_batch(&batch));
                    let (a, _) = a.expect("append on the home node");
                    let (b2, _) = b2.expect("append on the other node");
                    for ((m, x), y) in batch.iter().zip(&a).zip(&b2) {
                        let stored = match (x, y) {
                            (Appended::Stored(s), Appended::Duplicate(d))
                            | (Appended::Duplicate(d), Appended::Stored(s)) => {
                                assert_eq!(s, d, "both nodes name the same message");
                                s.clone()
                            }
                            other => panic!("exactly one node stores a message: {other:?}"),
                        };
                        assert_stored_from(&stored, m);
                        sent.push(stored);
                    }
                }
                sent
            }));
        }
        let mut acked: HashMap<ConversationId, Vec<Message>> = HashMap::new();
        let mut total = 0;
        for h in handles {
            let sent = tokio::time::timeout(DEADLINE * 6, h)
                .await
                .expect("writers finish")
                .expect("writer task");
            total += sent.len();
            for m in sent {
                acked.entry(m.conversation_id).or_default().push(m);
            }
        }
        let mut stored_total = 0;
        for conv in &convs {
            let mut mine = acked.remove(&conv.id).unwrap_or_default();
            mine.sort_by_key(|m| m.seq);
            let n = mine.len() as Seq;
            assert!(n > 0, "every conversation got messages");
            assert_eq!(
                seqs(&mine),
                (1..=n).collect::<Vec<_>>(),
                "gap-free and unique"
            );
            // Every node reads the same, complete history.
            for node in &nodes {
                assert_eq!(
                    all_messages(&**node, conv.id).await,
                    mine,
                    "stored as acked"
                );
                assert_eq!(conversation(&**node, conv.id).await.last_seq, n);
            }
            stored_total += mine.len();
        }
        assert_eq!(stored_total, total, "every acknowledged message is stored");
    }

    /// Nodes starting together on an empty database: all of them open, the schema is applied
    /// once, and each node sees the others' writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn nodes_migrate_a_fresh_database_at_once() {
        let backend = PostgresBackend::fresh().await;
        let url = backend.url.clone();
        let barrier = Arc::new(tokio::sync::Barrier::new(6));
        let mut handles = Vec::new();
        for _ in 0..6 {
            let url = url.clone();
            let barrier = barrier.clone();
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                PostgresStore::open(&url, PostgresBackend::options()).await
            }));
        }
        let mut nodes = Vec::new();
        for h in handles {
            let store = h.await.expect("task").expect("every node opens");
            backend.opened.lock().expect("lock").push(store.clone());
            nodes.push(store);
        }
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
            .expect("migrations dir")
            .filter(|e| {
                e.as_ref()
                    .map(|e| e.path().extension().is_some_and(|x| x == "sql"))
                    .unwrap_or(false)
            })
            .count();
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        let (applied, failed): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE NOT success) FROM _sqlx_migrations",
        )
        .fetch_one(&mut conn)
        .await
        .expect("read the migrations table");
        assert_eq!(
            (applied, failed),
            (files as i64, 0),
            "each migration applied once"
        );
        let _ = conn.close().await;

        let site = new_site(&nodes[0], "shared").await;
        for node in &nodes {
            assert_eq!(node.site(site.id).await.expect("site"), Some(site.clone()));
        }
    }

    /// A node that finds the migration lock taken waits for it (and for nothing else), then
    /// opens normally once it is released.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn opening_waits_for_the_migration_lock() {
        let backend = PostgresBackend::fresh().await;
        let mut holder = sqlx::PgConnection::connect(&backend.url)
            .await
            .expect("connect");
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(hark::store::postgres::MIGRATION_LOCK)
            .execute(&mut holder)
            .await
            .expect("take the lock");
        let url = backend.url.clone();
        let opening =
            tokio::spawn(
                async move { PostgresStore::open(&url, PostgresBackend::options()).await },
            );
        // pg_locks shows a 64-bit advisory key as classid (high half) and objid (low half).
        let key = hark::store::postgres::MIGRATION_LOCK;
        let (hi, lo) = ((key >> 32) as u32 as i64, key as u32 as i64);
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (waiting,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND classid::bigint = $1 AND objid::bigint = $2 AND database = \
                 (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .bind(hi)
            .bind(lo)
            .fetch_one(&mut holder)
            .await
            .expect("read pg_locks");
            if waiting == 1 {
                break;
            }
            assert!(
                !opening.is_finished(),
                "opened while the migration lock was held"
            );
            assert!(
                Instant::now() < deadline,
                "the opening node never queued on the lock"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!opening.is_finished(), "still waiting for the lock");
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .execute(&mut holder)
            .await
            .expect("release the lock");
        let store = tokio::time::timeout(DEADLINE, opening)
            .await
            .expect("opens once the lock is free")
            .expect("task")
            .expect("open");
        backend.opened.lock().expect("lock").push(store.clone());
        store.ping().await.expect("ping");
        let _ = holder.close().await;
    }

    /// A server that cannot be reached, or whose connections are killed under load, or whose
    /// database disappears: every failure is `Unavailable` (retryable), never a panic, and a
    /// client retrying with its client ids ends with each message stored exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lost_connections_are_unavailable_and_retryable() {
        // Nothing listens on port 1.
        let refused = PostgresStore::open(
            "postgres://postgres@127.0.0.1:1/hark",
            PostgresBackend::options(),
        )
        .await;
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "unreachable server: {:?}",
            refused.err()
        );

        let backend = PostgresBackend::fresh().await;
        let store: Arc<dyn Store> = Arc::new(backend.node().await);
        let site = new_site(&*store, "flaky").await;
        let conv = new_conversation(&*store, &site).await;

        // Writers retry each message with its client id until it is acknowledged, while the
        // test kills every connection the store has, again and again. Each kill waits for some
        // progress since the last one (so the writers cannot be starved on a slow machine), and
        // the writers keep going until the last kill (so every kill meets them at work).
        const KILLS: usize = 12;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut writers = Vec::new();
        for t in 0..4 {
            let store = store.clone();
            let conv = conv.clone();
            let stop = stop.clone();
            let progress = progress.clone();
            writers.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut failures = 0;
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    i += 1;
                    let m = from_visitor(&conv, &format!("w{t} m{i}"), Some(ClientMsgId::new()));
                    let deadline = Instant::now() + DEADLINE;
                    loop {
                        match store.append_batch(std::slice::from_ref(&m)).await {
                            Ok((out, _)) => {
                                match &out[0] {
                                    Appended::Stored(s) | Appended::Duplicate(s) => {
                                        assert_stored_from(s, &m);
                                        acked.push(s.clone());
                                    }
                                    other => panic!("unexpected outcome {other:?}"),
                                }
                                break;
                            }
                            Err(StoreError::Unavailable(_)) => failures += 1,
                            Err(e) => panic!("a lost connection must be Unavailable: {e:?}"),
                        }
                        assert!(Instant::now() < deadline, "the store never came back");
                    }
                    progress.fetch_add(1, std::sync::atomic::Ordering::Release);
                }
                (acked, failures)
            }));
        }
        let mut admin = pg_admin(&backend.server).await;
        let mut kills = 0i64;
        for _ in 0..KILLS {
            let seen = progress.load(std::sync::atomic::Ordering::Acquire);
            let deadline = Instant::now() + DEADLINE;
            while progress.load(std::sync::atomic::Ordering::Acquire) < seen + 4 {
                assert!(
                    Instant::now() < deadline,
                    "the writers stopped making progress"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let (n,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()) t",
            )
            .bind(&backend.name)
            .fetch_one(&mut admin)
            .await
            .expect("terminate backends");
            kills += n;
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        let mut acked = Vec::new();
        let mut failures = 0;
        for w in writers {
            let (mine, failed) = tokio::time::timeout(DEADLINE * 3, w)
                .await
                .expect("writers finish")
                .expect("writer task");
            acked.extend(mine);
            failures += failed;
        }
        assert!(kills > 0, "the test did kill connections");
        assert!(
            failures > 0,
            "some calls met a killed connection (and retried)"
        );

        acked.sort_by_key(|m| m.seq);
        let n = acked.len() as Seq;
        assert!(n >= 4 * KILLS as Seq, "progress between kills: {n}");
        assert_eq!(
            all_messages(&*store, conv.id).await,
            acked,
            "each message stored once, gap-free, as acknowledged"
        );
        assert_eq!(seqs(&acked), (1..=n).collect::<Vec<_>>());

        // The database vanishes: every call is Unavailable, none panics.
        sqlx::query(&format!("DROP DATABASE \"{}\" WITH (FORCE)", backend.name))
            .execute(&mut admin)
            .await
            .expect("drop the database");
        let _ = admin.close().await;
        let m = from_visitor(&conv, "into the void", Some(ClientMsgId::new()));
        assert!(matches!(
            store.append_batch(&[m]).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.conversation(conv.id).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.list_conversations(&filter(10)).await,
            Err(StoreError::Unavailable(_))
        ));
    }
}
