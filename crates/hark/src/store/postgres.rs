//! The cluster store: PostgreSQL through sqlx, shared by every node of a cluster.
//!
//! The rules are the SQLite store's (the same suite, `tests/store_suite.rs`, checks both); what
//! changes is that many nodes write at once:
//!
//! - **seq.** `append_batch` reserves each conversation's seq range with one
//!   `UPDATE conversations SET last_seq = last_seq + n … RETURNING` inside the committing
//!   transaction. The row lock that UPDATE takes is held until commit, so two nodes' ranges for
//!   one conversation are disjoint and commit in seq order: a reader never sees seq n+1 before n.
//!   Rows are locked in conversation-id order, so two batches touching the same conversations in
//!   a different order wait for each other instead of deadlocking.
//! - **Idempotency.** The unique index on `(client_id, author_id)` is the arbiter. A retry racing
//!   its original on another node loses at the insert (unique violation); the whole batch then
//!   rolls back, seqs included, and runs again, this time finding the original (`Duplicate`).
//! - **Migrations.** Applied under a PostgreSQL advisory lock, so nodes starting together take
//!   turns: the first migrates, the others find the schema up to date.
//! - **Failures.** Anything that goes wrong talking to the server (refused, reset, restarted,
//!   pool exhausted) is `StoreError::Unavailable`, which callers treat as retryable.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::batch::{key, Plan};
use super::*;

/// The columns of a message, qualified by `m.`: never `m.*`, which would also ship the search
/// vector (`text_search`) with every message read.
const MESSAGE_COLUMNS: &str = "m.conversation_id, m.seq, m.id, m.author_kind, m.author_id, \
     m.author_name, m.text, m.client_id, m.created_at";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The advisory lock held while migrating ("harkmigr" in ASCII). One key per database server is
/// enough: migrations are rare and short. Public for the test that watches nodes queue on it.
pub const MIGRATION_LOCK: i64 = 0x6861_726b_6d69_6772;

/// How often `append_batch` runs a batch again after losing a race (a duplicate client id sent
/// to two nodes at once, a deadlock or serialization failure reported by the server).
const APPEND_ATTEMPTS: u32 = 8;

/// Pool and timeout settings. `Default` suits a node of the reference machine.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connections per node. The committer uses one per batch in flight; REST and WebSocket
    /// reads share the rest. Mind the server's `max_connections` (100 by default) times nodes.
    pub max_connections: u32,
    /// How long a query waits for a free connection (or a new one) before `Unavailable`.
    pub acquire_timeout: Duration,
    /// Server-side bound on one statement, so a stuck lock wait becomes an error, not a hang.
    pub statement_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

/// Checks that `url` is a PostgreSQL URL sqlx can use, without connecting. The error names what
/// is wrong, never the password.
pub fn check_url(url: &str) -> Result<(), String> {
    PgConnectOptions::from_str(url)
        .map(|_| ())
        .map_err(|e| format!("not a valid PostgreSQL URL: {e}"))
}

fn db_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(db.message().to_owned())
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// Errors after which running the same transaction again can succeed: a unique violation (a
/// racing duplicate, now committed, that the next attempt will find), a deadlock, a
/// serialization failure.
fn is_race(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("23505" | "40P01" | "40001"))
        }
        _ => false,
    }
}

/// Why one attempt at a batch failed: lost a race (run it again) or failed for good.
enum AttemptError {
    Race(sqlx::Error),
    Fail(StoreError),
}

impl From<sqlx::Error> for AttemptError {
    fn from(e: sqlx::Error) -> Self {
        if is_race(&e) {
            AttemptError::Race(e)
        } else {
            AttemptError::Fail(db_err(e))
        }
    }
}

impl From<StoreError> for AttemptError {
    fn from(e: StoreError) -> Self {
        AttemptError::Fail(e)
    }
}

fn get<'r, T>(row: &'r PgRow, name: &str) -> StoreResult<T>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(name).map_err(db_err)
}

fn seq_col(row: &PgRow, name: &str) -> StoreResult<Seq> {
    let v: i64 = get(row, name)?;
    Seq::try_from(v).map_err(|_| StoreError::Corrupt(format!("{name}={v}")))
}

/// A seq as PostgreSQL's `bigint`; seqs never get near `i64::MAX`, and a caller's larger value
/// (a read mark from the future) means "everything".
fn seq_arg(seq: Seq) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn email_col(row: &PgRow, name: &str) -> StoreResult<Option<Email>> {
    let raw: Option<String> = get(row, name)?;
    raw.map(|e| Email::parse(&e).ok_or_else(|| StoreError::Corrupt(format!("{name}={e:?}"))))
        .transpose()
}

fn site_row(r: &PgRow) -> StoreResult<Site> {
    let origins: serde_json::Value = get(r, "allowed_origins")?;
    let origins: Vec<String> = serde_json::from_value(origins)
        .map_err(|_| StoreError::Corrupt("allowed_origins".into()))?;
    let key: String = get(r, "site_key")?;
    Ok(Site {
        id: SiteId(get(r, "id")?),
        name: get(r, "name")?,
        key: SiteKey::parse(&key)
            .ok_or_else(|| StoreError::Corrupt(format!("site_key={key:?}")))?,
        allowed_origins: origins.iter().filter_map(|o| Origin::parse(o)).collect(),
        identity_secret: get(r, "identity_secret")?,
        widget_settings: get(r, "widget_settings")?,
        created_at: get(r, "created_at")?,
    })
}

/// An `agents` row with its sites aggregated as `site_ids` (see [`AGENT_SELECT`]).
fn agent_row(r: &PgRow) -> StoreResult<(Agent, String)> {
    let role: String = get(r, "role")?;
    let email: String = get(r, "email")?;
    let site_ids: Vec<Uuid> = get(r, "site_ids")?;
    Ok((
        Agent {
            id: AgentId(get(r, "id")?),
            email: Email::parse(&email)
                .ok_or_else(|| StoreError::Corrupt(format!("email={email:?}")))?,
            name: get(r, "name")?,
            role: AgentRole::parse(&role)
                .ok_or_else(|| StoreError::Corrupt(format!("role={role:?}")))?,
            site_ids: site_ids.into_iter().map(SiteId).collect(),
            disabled: get(r, "disabled")?,
            created_at: get(r, "created_at")?,
        },
        get(r, "password_hash")?,
    ))
}

/// Which agents [`PostgresStore::agents_where`] reads.
enum Which<'a> {
    All,
    Id(AgentId),
    Email(&'a Email),
}

/// Agents with their sites in one query (sites in id order, as the SQLite store returns them).
const AGENT_SELECT: &str = "SELECT a.*, \
     COALESCE(ARRAY(SELECT s.site_id FROM agent_sites s WHERE s.agent_id = a.id ORDER BY s.site_id), \
     '{}') AS site_ids FROM agents a";

fn visitor_row(r: &PgRow) -> StoreResult<Visitor> {
    Ok(Visitor {
        id: VisitorId(get(r, "id")?),
        site_id: SiteId(get(r, "site_id")?),
        name: get(r, "name")?,
        email: email_col(r, "email")?,
        created_at: get(r, "created_at")?,
    })
}

fn conversation_row(r: &PgRow) -> StoreResult<Conversation> {
    let status: String = get(r, "status")?;
    let assignee: Option<Uuid> = get(r, "assignee_id")?;
    Ok(Conversation {
        id: ConversationId(get(r, "id")?),
        site_id: SiteId(get(r, "site_id")?),
        visitor_id: VisitorId(get(r, "visitor_id")?),
        status: Status::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("status={status:?}")))?,
        assignee_id: assignee.map(AgentId),
        last_seq: seq_col(r, "last_seq")?,
        first_seq: seq_col(r, "first_seq")?,
        created_at: get(r, "created_at")?,
        updated_at: get(r, "updated_at")?,
    })
}

fn message_row(r: &PgRow) -> StoreResult<Message> {
    let kind: String = get(r, "author_kind")?;
    let author: Option<Uuid> = get(r, "author_id")?;
    let author = || author.ok_or_else(|| StoreError::Corrupt("author_id is null".into()));
    let sender = match kind.as_str() {
        "visitor" => Sender::Visitor(VisitorId(author()?)),
        "agent" => Sender::Agent {
            id: AgentId(author()?),
            name: get::<Option<String>>(r, "author_name")?.unwrap_or_default(),
        },
        "system" => Sender::System,
        other => return Err(StoreError::Corrupt(format!("author_kind={other:?}"))),
    };
    let client_id: Option<Uuid> = get(r, "client_id")?;
    Ok(Message {
        id: MessageId(get(r, "id")?),
        conversation_id: ConversationId(get(r, "conversation_id")?),
        seq: seq_col(r, "seq")?,
        sender,
        text: get(r, "text")?,
        created_at: get(r, "created_at")?,
        client_id: client_id.map(ClientMsgId),
    })
}

impl PostgresStore {
    /// Connects to `url`, brings the schema up to date (one node at a time) and opens the pool.
    pub async fn open(url: &str, options: PostgresOptions) -> StoreResult<PostgresStore> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("not a valid PostgreSQL URL: {e}")))?
            .application_name("hark");
        Self::migrate(&connect, options.acquire_timeout).await?;
        let timeout_ms = options.statement_timeout.as_millis().to_string();
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(0)
            .acquire_timeout(options.acquire_timeout)
            // Connections are checked when taken from the pool, so after a server restart the
            // dead ones are replaced instead of failing one request each.
            .test_before_acquire(true)
            .idle_timeout(Some(Duration::from_secs(600)))
            .max_lifetime(Some(Duration::from_secs(1800)))
            .connect_lazy_with(connect.options([("statement_timeout", timeout_ms.as_str())]));
        let store = PostgresStore { pool };
        store.ping().await?;
        Ok(store)
    }

    /// Applies pending migrations on a dedicated connection holding [`MIGRATION_LOCK`]. A
    /// session-level lock on a connection of its own: closing that connection (or losing it)
    /// releases the lock, so a node that dies while migrating cannot leave the others waiting.
    /// (sqlx's migrator takes a lock of its own too; Hark's does not depend on it.)
    async fn migrate(connect: &PgConnectOptions, timeout: Duration) -> StoreResult<()> {
        let mut conn = tokio::time::timeout(timeout, PgConnection::connect_with(connect))
            .await
            .map_err(|_| StoreError::Unavailable("connecting to PostgreSQL timed out".into()))?
            .map_err(db_err)?;
        let result = async {
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut conn)
                .await
                .map_err(db_err)?;
            // `run_direct` on the connection itself: `run` goes through `Acquire`, whose
            // lifetimes make the future not provably `Send` (sqlx's own workaround).
            MIGRATOR
                .run_direct(&mut conn)
                .await
                .map_err(|e| StoreError::Unavailable(format!("migrating: {e}")))?;
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut conn)
                .await
                .map_err(db_err)?;
            Ok(())
        }
        .await;
        // Closing also releases the lock if an error skipped the unlock.
        let _ = conn.close().await;
        result
    }

    /// Closes the pool; later calls fail with `Unavailable`.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn agents_where(&self, which: Which<'_>) -> StoreResult<Vec<(Agent, String)>> {
        let order = "ORDER BY a.created_at, a.id";
        let rows = match which {
            Which::All => {
                sqlx::query(&format!("{AGENT_SELECT} {order}"))
                    .fetch_all(&self.pool)
                    .await
            }
            Which::Id(id) => {
                sqlx::query(&format!("{AGENT_SELECT} WHERE a.id = $1 {order}"))
                    .bind(id.0)
                    .fetch_all(&self.pool)
                    .await
            }
            Which::Email(e) => {
                sqlx::query(&format!("{AGENT_SELECT} WHERE a.email = $1 {order}"))
                    .bind(e.as_str())
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(db_err)?;
        rows.iter().map(agent_row).collect()
    }

    async fn set_agent_sites(
        tx: &mut sqlx::Transaction<'_, Postgres>,
        agent: AgentId,
        sites: &[SiteId],
    ) -> StoreResult<()> {
        sqlx::query("DELETE FROM agent_sites WHERE agent_id = $1")
            .bind(agent.0)
            .execute(&mut **tx)
            .await
            .map_err(db_err)?;
        let ids: Vec<Uuid> = sites.iter().map(|s| s.0).collect();
        sqlx::query(
            "INSERT INTO agent_sites (agent_id, site_id) SELECT $1, s FROM UNNEST($2::uuid[]) AS s \
             ON CONFLICT DO NOTHING",
        )
        .bind(agent.0)
        .bind(ids)
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// One attempt at a batch, in one transaction: find earlier sends of its client ids, reserve
    /// seqs, insert the new messages (one multi-row statement each), commit.
    async fn append_once(&self, batch: &[NewMessage]) -> Result<AppendResult, AttemptError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;

        // 1. Idempotency: what this batch's senders already stored under its client ids.
        let mut earlier: HashMap<(Uuid, ClientMsgId), Message> = HashMap::new();
        let (authors, clients): (Vec<Uuid>, Vec<Uuid>) =
            batch.iter().filter_map(key).map(|(a, c)| (a, c.0)).unzip();
        if !authors.is_empty() {
            let rows = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages m \
                 JOIN UNNEST($1::uuid[], $2::uuid[]) AS k(author_id, client_id) \
                 ON m.client_id = k.client_id AND m.author_id = k.author_id"
            ))
            .bind(&authors)
            .bind(&clients)
            .fetch_all(&mut *tx)
            .await?;
            for r in &rows {
                let m = message_row(r)?;
                if let Some(k) = m.sender.author_id().zip(m.client_id) {
                    earlier.insert(k, m);
                }
            }
        }

        // 2. Reserve each open conversation's seqs. The CTE locks the rows in id order (the
        // lock is taken after the sort), so concurrent batches over overlapping conversations
        // queue instead of deadlocking; NO KEY UPDATE is the lock the UPDATE itself takes, and
        // leaves inserts that reference the row (foreign keys) unblocked.
        let plan = Plan::new(batch, &earlier);
        let mut granted: HashMap<ConversationId, (Seq, Route)> = HashMap::new();
        let mut closed: HashSet<ConversationId> = HashSet::new();
        if !plan.needs.is_empty() {
            let mut needs = plan.needs.clone();
            needs.sort_by_key(|(c, _)| *c);
            let ids: Vec<Uuid> = needs.iter().map(|(c, _)| c.0).collect();
            let counts: Vec<i64> = needs.iter().map(|(_, n)| seq_arg(*n)).collect();
            let rows = sqlx::query(
                "WITH locked AS ( \
                     SELECT id FROM conversations WHERE id = ANY($1::uuid[]) AND status = 'open' \
                     ORDER BY id FOR NO KEY UPDATE \
                 ) \
                 UPDATE conversations c SET last_seq = c.last_seq + n.n, updated_at = $3 \
                 FROM locked JOIN UNNEST($1::uuid[], $2::bigint[]) AS n(id, n) ON n.id = locked.id \
                 WHERE c.id = locked.id \
                 RETURNING c.id, c.last_seq, c.site_id, c.visitor_id",
            )
            .bind(&ids)
            .bind(&counts)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            let wanted: HashMap<ConversationId, u64> = needs.iter().copied().collect();
            for r in &rows {
                let conv = ConversationId(get(r, "id")?);
                let last = seq_col(r, "last_seq")?;
                let n = wanted.get(&conv).copied().ok_or_else(|| {
                    StoreError::Corrupt(format!("reserved seqs for {conv}, not asked"))
                })?;
                let route = Route {
                    site_id: SiteId(get(r, "site_id")?),
                    visitor_id: VisitorId(get(r, "visitor_id")?),
                };
                // `last` includes the `n` just added; anything else is a corrupt row, not a panic.
                let base = last.checked_sub(n).ok_or_else(|| {
                    StoreError::Corrupt(format!("last_seq {last} below the {n} reserved"))
                })?;
                granted.insert(conv, (base, route));
            }
            // Not granted: closed, or no such conversation. Usually none, so usually no query.
            let missing: Vec<Uuid> = ids
                .iter()
                .copied()
                .filter(|id| !granted.contains_key(&ConversationId(*id)))
                .collect();
            if !missing.is_empty() {
                let rows = sqlx::query("SELECT id FROM conversations WHERE id = ANY($1::uuid[])")
                    .bind(&missing)
                    .fetch_all(&mut *tx)
                    .await?;
                for r in &rows {
                    closed.insert(ConversationId(get(r, "id")?));
                }
            }
        }

        // 3. Insert the new messages in one statement.
        let routes: Vec<(ConversationId, Route)> =
            granted.iter().map(|(c, (_, r))| (*c, *r)).collect();
        let (results, new) = plan.settle(batch, &granted, &closed, now);
        if !new.is_empty() {
            let n = new.len();
            let mut conv = Vec::with_capacity(n);
            let mut seq = Vec::with_capacity(n);
            let mut id = Vec::with_capacity(n);
            let mut kind = Vec::with_capacity(n);
            let mut author_id: Vec<Option<Uuid>> = Vec::with_capacity(n);
            let mut author_name: Vec<Option<String>> = Vec::with_capacity(n);
            let mut text = Vec::with_capacity(n);
            let mut client_id: Vec<Option<Uuid>> = Vec::with_capacity(n);
            let mut created_at = Vec::with_capacity(n);
            for m in &new {
                let (k, a, name) = match &m.sender {
                    Sender::Visitor(v) => ("visitor", Some(v.0), None),
                    Sender::Agent { id, name } => ("agent", Some(id.0), Some(name.clone())),
                    Sender::System => ("system", None, None),
                };
                conv.push(m.conversation_id.0);
                seq.push(seq_arg(m.seq));
                id.push(m.id.0);
                kind.push(k);
                author_id.push(a);
                author_name.push(name);
                text.push(m.text.as_str());
                client_id.push(m.client_id.map(|c| c.0));
                created_at.push(m.created_at);
            }
            sqlx::query(
                "INSERT INTO messages (conversation_id, seq, id, author_kind, author_id, \
                 author_name, text, client_id, created_at) \
                 SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], \
                 $5::uuid[], $6::text[], $7::text[], $8::uuid[], $9::bigint[])",
            )
            .bind(&conv)
            .bind(&seq)
            .bind(&id)
            .bind(&kind)
            .bind(&author_id)
            .bind(&author_name)
            .bind(&text)
            .bind(&client_id)
            .bind(&created_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok((results, routes))
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn secret(&self, name: &str, fresh: Vec<u8>) -> StoreResult<Vec<u8>> {
        // Two statements, not one: under READ COMMITTED the SELECT must start after a racing
        // node's INSERT committed to see its value (one statement would use one snapshot).
        sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(name)
            .bind(fresh)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        let row = sqlx::query("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        get(&row, "value")
    }

    async fn create_site(&self, new: NewSite) -> StoreResult<Site> {
        let site = Site {
            id: SiteId::new(),
            name: new.name,
            key: SiteKey::generate(),
            allowed_origins: new.allowed_origins,
            identity_secret: random_token(32),
            widget_settings: serde_json::json!({}),
            created_at: now_ms(),
        };
        let origins: Vec<&str> = site.allowed_origins.iter().map(|o| o.as_str()).collect();
        sqlx::query(
            "INSERT INTO sites (id, name, site_key, allowed_origins, identity_secret, widget_settings, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(site.id.0)
        .bind(&site.name)
        .bind(site.key.as_str())
        .bind(serde_json::json!(origins))
        .bind(&site.identity_secret)
        .bind(&site.widget_settings)
        .bind(site.created_at)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(site)
    }

    async fn site(&self, id: SiteId) -> StoreResult<Option<Site>> {
        let row = sqlx::query("SELECT * FROM sites WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.map(|r| site_row(&r)).transpose()
    }

    async fn site_by_key(&self, key: &SiteKey) -> StoreResult<Option<Site>> {
        let row = sqlx::query("SELECT * FROM sites WHERE site_key = $1")
            .bind(key.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.map(|r| site_row(&r)).transpose()
    }

    async fn list_sites(&self) -> StoreResult<Vec<Site>> {
        let rows = sqlx::query("SELECT * FROM sites ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(site_row).collect()
    }

    async fn update_site(&self, id: SiteId, patch: SitePatch) -> StoreResult<Option<Site>> {
        let origins = patch
            .allowed_origins
            .map(|o| serde_json::json!(o.iter().map(|o| o.as_str()).collect::<Vec<_>>()));
        let row = sqlx::query(
            "UPDATE sites SET name = COALESCE($1, name), \
             allowed_origins = COALESCE($2, allowed_origins), \
             widget_settings = COALESCE($3, widget_settings) \
             WHERE id = $4 RETURNING *",
        )
        .bind(patch.name)
        .bind(origins)
        .bind(patch.widget_settings)
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        row.map(|r| site_row(&r)).transpose()
    }

    async fn create_agent(&self, new: NewAgent) -> StoreResult<Agent> {
        let agent = Agent {
            id: AgentId::new(),
            email: new.email,
            name: new.name,
            role: new.role,
            site_ids: new.site_ids,
            disabled: false,
            created_at: now_ms(),
        };
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        sqlx::query(
            "INSERT INTO agents (id, email, name, role, password_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(agent.id.0)
        .bind(agent.email.as_str())
        .bind(&agent.name)
        .bind(agent.role.as_str())
        .bind(&new.password_hash)
        .bind(agent.created_at)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        Self::set_agent_sites(&mut tx, agent.id, &agent.site_ids).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(agent)
    }

    async fn agent(&self, id: AgentId) -> StoreResult<Option<Agent>> {
        Ok(self
            .agents_where(Which::Id(id))
            .await?
            .pop()
            .map(|(a, _)| a))
    }

    async fn agent_login(&self, email: &Email) -> StoreResult<Option<(Agent, String)>> {
        Ok(self.agents_where(Which::Email(email)).await?.pop())
    }

    async fn list_agents(&self) -> StoreResult<Vec<Agent>> {
        Ok(self
            .agents_where(Which::All)
            .await?
            .into_iter()
            .map(|(a, _)| a)
            .collect())
    }

    async fn update_agent(&self, id: AgentId, patch: AgentPatch) -> StoreResult<Option<Agent>> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let found = sqlx::query(
            "UPDATE agents SET name = COALESCE($1, name), role = COALESCE($2, role), \
             password_hash = COALESCE($3, password_hash), disabled = COALESCE($4, disabled) \
             WHERE id = $5 RETURNING id",
        )
        .bind(&patch.name)
        .bind(patch.role.map(AgentRole::as_str))
        .bind(&patch.password_hash)
        .bind(patch.disabled)
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        if found.is_none() {
            return Ok(None);
        }
        // A new password, or being disabled, ends every existing session.
        if patch.password_hash.is_some() || patch.disabled == Some(true) {
            sqlx::query("DELETE FROM sessions WHERE agent_id = $1")
                .bind(id.0)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        if let Some(sites) = &patch.site_ids {
            Self::set_agent_sites(&mut tx, id, sites).await?;
        }
        tx.commit().await.map_err(db_err)?;
        self.agent(id).await
    }

    async fn count_agents(&self) -> StoreResult<u64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM agents")
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        let n: i64 = get(&row, "n")?;
        Ok(n.max(0) as u64)
    }

    async fn create_session(&self, token_hash: &str, row: SessionRow) -> StoreResult<()> {
        let now = now_ms();
        sqlx::query("DELETE FROM sessions WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        sqlx::query(
            "INSERT INTO sessions (token_hash, agent_id, csrf_token, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash)
        .bind(row.agent_id.0)
        .bind(&row.csrf_token)
        .bind(now)
        .bind(row.expires_at)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn session(&self, token_hash: &str) -> StoreResult<Option<SessionRow>> {
        let row = sqlx::query("SELECT * FROM sessions WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.map(|r| {
            Ok(SessionRow {
                agent_id: AgentId(get(&r, "agent_id")?),
                csrf_token: get(&r, "csrf_token")?,
                expires_at: get(&r, "expires_at")?,
            })
        })
        .transpose()
    }

    async fn delete_session(&self, token_hash: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn create_visitor(&self, site_id: SiteId) -> StoreResult<Visitor> {
        let v = Visitor {
            id: VisitorId::new(),
            site_id,
            name: None,
            email: None,
            created_at: now_ms(),
        };
        sqlx::query("INSERT INTO visitors (id, site_id, created_at) VALUES ($1, $2, $3)")
            .bind(v.id.0)
            .bind(site_id.0)
            .bind(v.created_at)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(v)
    }

    async fn visitor(&self, id: VisitorId) -> StoreResult<Option<Visitor>> {
        let row = sqlx::query("SELECT * FROM visitors WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.map(|r| visitor_row(&r)).transpose()
    }

    async fn set_visitor_profile(
        &self,
        id: VisitorId,
        name: Option<String>,
        email: Option<Email>,
    ) -> StoreResult<Option<Visitor>> {
        let row =
            sqlx::query("UPDATE visitors SET name = $1, email = $2 WHERE id = $3 RETURNING *")
                .bind(name)
                .bind(email.as_ref().map(Email::as_str))
                .bind(id.0)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
        row.map(|r| visitor_row(&r)).transpose()
    }

    async fn open_conversation(
        &self,
        site_id: SiteId,
        visitor_id: VisitorId,
    ) -> StoreResult<(Conversation, bool)> {
        // The partial unique index makes the insert a no-op when an open conversation exists,
        // whichever node created it. Each statement sees what committed before it started, so
        // the SELECT finds a racing node's conversation; it can only miss one closed in between,
        // and then the next round opens a new one.
        for _ in 0..3 {
            let now = now_ms();
            let inserted = sqlx::query(
                "INSERT INTO conversations (id, site_id, visitor_id, status, created_at, updated_at) \
                 VALUES ($1, $2, $3, 'open', $4, $4) ON CONFLICT DO NOTHING RETURNING *",
            )
            .bind(ConversationId::new().0)
            .bind(site_id.0)
            .bind(visitor_id.0)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
            if let Some(r) = inserted {
                return Ok((conversation_row(&r)?, true));
            }
            let row = sqlx::query(
                "SELECT * FROM conversations WHERE visitor_id = $1 AND site_id = $2 AND status = 'open'",
            )
            .bind(visitor_id.0)
            .bind(site_id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
            if let Some(r) = row {
                return Ok((conversation_row(&r)?, false));
            }
        }
        Err(StoreError::Unavailable(
            "the open conversation kept closing while being opened".into(),
        ))
    }

    async fn conversation(&self, id: ConversationId) -> StoreResult<Option<Conversation>> {
        let row = sqlx::query("SELECT * FROM conversations WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.map(|r| conversation_row(&r)).transpose()
    }

    async fn list_conversations(&self, f: &ConversationFilter) -> StoreResult<Vec<Conversation>> {
        let mut q = QueryBuilder::<Postgres>::new("SELECT * FROM conversations WHERE true");
        if let Some(sites) = &f.site_ids {
            if sites.is_empty() {
                return Ok(Vec::new());
            }
            let ids: Vec<Uuid> = sites.iter().map(|s| s.0).collect();
            q.push(" AND site_id = ANY(").push_bind(ids).push(")");
        }
        if let Some(st) = f.status {
            q.push(" AND status = ").push_bind(st.as_str());
        }
        if let Some(v) = f.visitor_id {
            q.push(" AND visitor_id = ").push_bind(v.0);
        }
        if let Some(since) = f.updated_since {
            q.push(" AND updated_at >= ").push_bind(since);
        }
        if let Some((at, id)) = f.before {
            q.push(" AND (updated_at, id) < (")
                .push_bind(at)
                .push(", ")
                .push_bind(id.0)
                .push(")");
        }
        q.push(" ORDER BY updated_at DESC, id DESC LIMIT ")
            .push_bind(i64::from(f.limit));
        let rows = q.build().fetch_all(&self.pool).await.map_err(db_err)?;
        rows.iter().map(conversation_row).collect()
    }

    async fn set_status(
        &self,
        id: ConversationId,
        status: Status,
    ) -> StoreResult<Option<Conversation>> {
        let row = sqlx::query(
            "UPDATE conversations SET status = $1, updated_at = $2 WHERE id = $3 RETURNING *",
        )
        .bind(status.as_str())
        .bind(now_ms())
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        row.map(|r| conversation_row(&r)).transpose()
    }

    async fn assign(
        &self,
        id: ConversationId,
        assignee: Option<AgentId>,
    ) -> StoreResult<Option<Conversation>> {
        let row = sqlx::query(
            "UPDATE conversations SET assignee_id = $1, updated_at = $2 WHERE id = $3 RETURNING *",
        )
        .bind(assignee.map(|a| a.0))
        .bind(now_ms())
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        row.map(|r| conversation_row(&r)).transpose()
    }

    async fn append_batch(&self, batch: &[NewMessage]) -> StoreResult<AppendResult> {
        if batch.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut last = None;
        for _ in 0..APPEND_ATTEMPTS {
            match self.append_once(batch).await {
                Ok(done) => return Ok(done),
                Err(AttemptError::Fail(e)) => return Err(e),
                // Rolled back whole; the next attempt sees what the winner committed.
                Err(AttemptError::Race(e)) => last = Some(e),
            }
        }
        Err(StoreError::Unavailable(format!(
            "append lost {APPEND_ATTEMPTS} races in a row: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    async fn message_by_client_id(
        &self,
        author_id: Uuid,
        client_id: ClientMsgId,
    ) -> StoreResult<Option<Message>> {
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.client_id = $1 AND m.author_id = $2"
        ))
        .bind(client_id.0)
        .bind(author_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        row.map(|r| message_row(&r)).transpose()
    }

    async fn messages(
        &self,
        conversation_id: ConversationId,
        range: SeqRange,
        limit: u32,
    ) -> StoreResult<(Vec<Message>, bool)> {
        let fetch = i64::from(limit) + 1;
        // (seq bound, order): After reads upwards from the bound; Before and Latest read the
        // newest first and are reversed below.
        let (bound, newest_first) = match range {
            SeqRange::After(n) => (Some(("m.seq >", n)), false),
            SeqRange::Before(n) => (Some(("m.seq <", n)), true),
            SeqRange::Latest => (None, true),
        };
        let mut q = QueryBuilder::<Postgres>::new(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.conversation_id = "
        ));
        q.push_bind(conversation_id.0);
        if let Some((op, n)) = bound {
            q.push(format!(" AND {op} ")).push_bind(seq_arg(n));
        }
        q.push(if newest_first {
            " ORDER BY m.seq DESC LIMIT "
        } else {
            " ORDER BY m.seq LIMIT "
        })
        .push_bind(fetch);
        let rows = q.build().fetch_all(&self.pool).await.map_err(db_err)?;
        let has_more = rows.len() > limit as usize;
        let mut out = rows
            .iter()
            .take(limit as usize)
            .map(message_row)
            .collect::<StoreResult<Vec<_>>>()?;
        if newest_first {
            out.reverse();
        }
        Ok((out, has_more))
    }

    async fn mark_read(
        &self,
        conversation_id: ConversationId,
        reader_id: Uuid,
        seq: Seq,
    ) -> StoreResult<Option<Seq>> {
        // One statement, atomic across nodes: the clamp reads the conversation, GREATEST keeps a
        // late lower mark from lowering it; no conversation, no row, nothing returned.
        let row = sqlx::query(
            "INSERT INTO read_marks (conversation_id, reader_id, seq, updated_at) \
             SELECT id, $2, LEAST($3, last_seq), $4 FROM conversations WHERE id = $1 \
             ON CONFLICT (conversation_id, reader_id) \
             DO UPDATE SET seq = GREATEST(read_marks.seq, EXCLUDED.seq), updated_at = EXCLUDED.updated_at \
             RETURNING seq",
        )
        .bind(conversation_id.0)
        .bind(reader_id)
        .bind(seq_arg(seq))
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        row.map(|r| seq_col(&r, "seq")).transpose()
    }

    async fn read_marks(&self, conversation_id: ConversationId) -> StoreResult<Vec<(Uuid, Seq)>> {
        let rows = sqlx::query(
            "SELECT reader_id, seq FROM read_marks WHERE conversation_id = $1 ORDER BY reader_id",
        )
        .bind(conversation_id.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter()
            .map(|r| Ok((get(r, "reader_id")?, seq_col(r, "seq")?)))
            .collect()
    }

    async fn search_messages(
        &self,
        site_ids: Option<&[SiteId]>,
        query: &str,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        // plainto_tsquery: the words, all required, never query syntax. Only the words that can
        // match are sent, so a query of punctuation costs no round trip (and no server notice).
        let words = search_words(query);
        if words.is_empty() || limit == 0 || site_ids.is_some_and(|s| s.is_empty()) {
            return Ok(Vec::new());
        }
        let mut q =
            QueryBuilder::<Postgres>::new(format!("SELECT {MESSAGE_COLUMNS} FROM messages m "));
        if let Some(sites) = site_ids {
            let ids: Vec<Uuid> = sites.iter().map(|s| s.0).collect();
            q.push("JOIN conversations c ON c.id = m.conversation_id AND c.site_id = ANY(")
                .push_bind(ids)
                .push(") ");
        }
        q.push("WHERE m.text_search @@ plainto_tsquery('simple', ")
            .push_bind(words.join(" "))
            .push(") ORDER BY m.created_at DESC, m.conversation_id DESC, m.seq DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&self.pool).await.map_err(db_err)?;
        rows.iter().map(message_row).collect()
    }
}
