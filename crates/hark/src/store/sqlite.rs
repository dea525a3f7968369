//! The embedded store: SQLite in WAL mode through sqlx.
//!
//! One writer connection (SQLite has one writer at a time anyway; a pool of one avoids lock
//! contention between our own writers) and a small pool of readers, which WAL lets run beside the
//! writer. `synchronous=FULL`: a commit is on disk before it returns, so an ack survives power loss,
//! not only a process crash; group commit (`append_batch`) spreads that fsync over many messages.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::sqlite_writer::Writer;
use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone)]
pub struct SqliteStore {
    /// Messages: the dedicated writer thread (`sqlite_writer`).
    appender: Arc<Writer>,
    /// Everything else that writes.
    writer: SqlitePool,
    reader: SqlitePool,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(db.message().to_owned())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

fn col<T: FromStr>(row: &SqliteRow, name: &str) -> StoreResult<T> {
    let raw: String = row.try_get(name).map_err(unavailable)?;
    raw.parse()
        .map_err(|_| StoreError::Corrupt(format!("{name}={raw:?}")))
}

fn opt_col<T: FromStr>(row: &SqliteRow, name: &str) -> StoreResult<Option<T>> {
    let raw: Option<String> = row.try_get(name).map_err(unavailable)?;
    raw.map(|r| {
        r.parse()
            .map_err(|_| StoreError::Corrupt(format!("{name}={r:?}")))
    })
    .transpose()
}

fn int(row: &SqliteRow, name: &str) -> StoreResult<i64> {
    row.try_get(name).map_err(unavailable)
}

impl SqliteStore {
    /// Opens (creating if needed) the database `hark.db` in `dir` and brings its schema up to date.
    pub async fn open(dir: &Path) -> StoreResult<SqliteStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
        let opts = SqliteConnectOptions::new()
            .filename(dir.join("hark.db"))
            .create_if_missing(true)
            // Small pages: a commit rewrites every page it touched into the WAL, and messages
            // land on pages all over the indexes (one conversation's range, the client-id index);
            // 1 KiB pages cut that write volume and gave +25 % messages/s over 4 KiB
            // (docs/benchmarks.md). Applies when the database is created.
            .page_size(1024)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true)
            .pragma("cache_size", "-32000")
            .pragma("temp_store", "memory")
            // Checkpoints run on the checkpointer thread, never inside a commit.
            .pragma("wal_autocheckpoint", "0");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts.clone())
            .await
            .map_err(unavailable)?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrating: {e}")))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(unavailable)?;
        let appender = Arc::new(Writer::start(&dir.join("hark.db"))?);
        Ok(SqliteStore {
            appender,
            writer,
            reader,
        })
    }

    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    async fn site_where(&self, clause: &str, arg: String) -> StoreResult<Option<Site>> {
        let sql = format!("SELECT * FROM sites WHERE {clause}");
        let row = sqlx::query(&sql)
            .bind(arg)
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        row.map(|r| site_row(&r)).transpose()
    }

    async fn agent_sites(&self, ids: &[AgentId]) -> StoreResult<HashMap<AgentId, Vec<SiteId>>> {
        let mut out: HashMap<AgentId, Vec<SiteId>> = HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT agent_id, site_id FROM agent_sites WHERE agent_id IN (",
        );
        let mut sep = q.separated(", ");
        for id in ids {
            sep.push_bind(id.to_string());
        }
        q.push(") ORDER BY site_id");
        for row in q
            .build()
            .fetch_all(&self.reader)
            .await
            .map_err(unavailable)?
        {
            out.entry(col(&row, "agent_id")?)
                .or_default()
                .push(col(&row, "site_id")?);
        }
        Ok(out)
    }

    async fn agents_where(
        &self,
        clause: &str,
        arg: Option<String>,
    ) -> StoreResult<Vec<(Agent, String)>> {
        let sql = format!("SELECT * FROM agents {clause} ORDER BY created_at, id");
        let mut q = sqlx::query(&sql);
        if let Some(a) = arg {
            q = q.bind(a);
        }
        let rows = q.fetch_all(&self.reader).await.map_err(unavailable)?;
        let mut agents = Vec::with_capacity(rows.len());
        for r in &rows {
            let role: String = r.try_get("role").map_err(unavailable)?;
            let email: String = r.try_get("email").map_err(unavailable)?;
            agents.push((
                Agent {
                    id: col(r, "id")?,
                    email: Email::parse(&email)
                        .ok_or_else(|| StoreError::Corrupt(format!("email={email:?}")))?,
                    name: r.try_get("name").map_err(unavailable)?,
                    role: AgentRole::parse(&role)
                        .ok_or_else(|| StoreError::Corrupt(format!("role={role:?}")))?,
                    site_ids: Vec::new(),
                    disabled: int(r, "disabled")? != 0,
                    created_at: int(r, "created_at")?,
                },
                r.try_get::<String, _>("password_hash")
                    .map_err(unavailable)?,
            ));
        }
        let ids: Vec<AgentId> = agents.iter().map(|(a, _)| a.id).collect();
        let mut sites = self.agent_sites(&ids).await?;
        for (a, _) in &mut agents {
            a.site_ids = sites.remove(&a.id).unwrap_or_default();
        }
        Ok(agents)
    }

    async fn set_agent_sites(
        tx: &mut sqlx::Transaction<'_, Sqlite>,
        agent: AgentId,
        sites: &[SiteId],
    ) -> StoreResult<()> {
        sqlx::query("DELETE FROM agent_sites WHERE agent_id = ?")
            .bind(agent.to_string())
            .execute(&mut **tx)
            .await
            .map_err(unavailable)?;
        for s in sites {
            sqlx::query("INSERT OR IGNORE INTO agent_sites (agent_id, site_id) VALUES (?, ?)")
                .bind(agent.to_string())
                .bind(s.to_string())
                .execute(&mut **tx)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

fn site_row(r: &SqliteRow) -> StoreResult<Site> {
    let origins: String = r.try_get("allowed_origins").map_err(unavailable)?;
    let origins: Vec<String> = serde_json::from_str(&origins)
        .map_err(|_| StoreError::Corrupt(format!("allowed_origins={origins:?}")))?;
    let key: String = r.try_get("site_key").map_err(unavailable)?;
    let settings: String = r.try_get("widget_settings").map_err(unavailable)?;
    Ok(Site {
        id: col(r, "id")?,
        name: r.try_get("name").map_err(unavailable)?,
        key: SiteKey::parse(&key)
            .ok_or_else(|| StoreError::Corrupt(format!("site_key={key:?}")))?,
        allowed_origins: origins.iter().filter_map(|o| Origin::parse(o)).collect(),
        identity_secret: r.try_get("identity_secret").map_err(unavailable)?,
        widget_settings: serde_json::from_str(&settings)
            .map_err(|_| StoreError::Corrupt("widget_settings".into()))?,
        created_at: int(r, "created_at")?,
    })
}

fn visitor_row(r: &SqliteRow) -> StoreResult<Visitor> {
    let email: Option<String> = r.try_get("email").map_err(unavailable)?;
    Ok(Visitor {
        id: col(r, "id")?,
        site_id: col(r, "site_id")?,
        name: r.try_get("name").map_err(unavailable)?,
        email: email
            .map(|e| Email::parse(&e).ok_or_else(|| StoreError::Corrupt(format!("email={e:?}"))))
            .transpose()?,
        created_at: int(r, "created_at")?,
    })
}

fn conversation_row(r: &SqliteRow) -> StoreResult<Conversation> {
    let status: String = r.try_get("status").map_err(unavailable)?;
    Ok(Conversation {
        id: col(r, "id")?,
        site_id: col(r, "site_id")?,
        visitor_id: col(r, "visitor_id")?,
        status: Status::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("status={status:?}")))?,
        assignee_id: opt_col(r, "assignee_id")?,
        last_seq: int(r, "last_seq")? as u64,
        first_seq: int(r, "first_seq")? as u64,
        created_at: int(r, "created_at")?,
        updated_at: int(r, "updated_at")?,
    })
}

fn message_row(r: &SqliteRow) -> StoreResult<Message> {
    let kind: String = r.try_get("author_kind").map_err(unavailable)?;
    let sender = match kind.as_str() {
        "visitor" => Sender::Visitor(col(r, "author_id")?),
        "agent" => Sender::Agent {
            id: col(r, "author_id")?,
            name: r
                .try_get::<Option<String>, _>("author_name")
                .map_err(unavailable)?
                .unwrap_or_default(),
        },
        "system" => Sender::System,
        other => return Err(StoreError::Corrupt(format!("author_kind={other:?}"))),
    };
    Ok(Message {
        id: col(r, "id")?,
        conversation_id: col(r, "conversation_id")?,
        seq: int(r, "seq")? as u64,
        sender,
        text: r.try_get("text").map_err(unavailable)?,
        created_at: int(r, "created_at")?,
        client_id: opt_col(r, "client_id")?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(unavailable)?;
        // An empty batch is a round trip to the message writer thread: it must be alive too.
        self.appender.append(Vec::new()).await?;
        Ok(())
    }

    async fn secret(&self, name: &str, fresh: Vec<u8>) -> StoreResult<Vec<u8>> {
        sqlx::query("INSERT OR IGNORE INTO settings (name, value) VALUES (?, ?)")
            .bind(name)
            .bind(fresh)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
        let row = sqlx::query("SELECT value FROM settings WHERE name = ?")
            .bind(name)
            .fetch_one(&self.writer)
            .await
            .map_err(unavailable)?;
        row.try_get("value").map_err(unavailable)
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
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(site.id.to_string())
        .bind(&site.name)
        .bind(site.key.as_str())
        .bind(serde_json::to_string(&origins).unwrap_or_else(|_| "[]".into()))
        .bind(&site.identity_secret)
        .bind(site.widget_settings.to_string())
        .bind(site.created_at)
        .execute(&self.writer)
        .await
        .map_err(unavailable)?;
        Ok(site)
    }

    async fn site(&self, id: SiteId) -> StoreResult<Option<Site>> {
        self.site_where("id = ?", id.to_string()).await
    }

    async fn site_by_key(&self, key: &SiteKey) -> StoreResult<Option<Site>> {
        self.site_where("site_key = ?", key.as_str().to_owned())
            .await
    }

    async fn list_sites(&self) -> StoreResult<Vec<Site>> {
        let rows = sqlx::query("SELECT * FROM sites ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await
            .map_err(unavailable)?;
        rows.iter().map(site_row).collect()
    }

    async fn update_site(&self, id: SiteId, patch: SitePatch) -> StoreResult<Option<Site>> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        if let Some(name) = &patch.name {
            sqlx::query("UPDATE sites SET name = ? WHERE id = ?")
                .bind(name)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        if let Some(origins) = &patch.allowed_origins {
            let o: Vec<&str> = origins.iter().map(|o| o.as_str()).collect();
            sqlx::query("UPDATE sites SET allowed_origins = ? WHERE id = ?")
                .bind(serde_json::to_string(&o).unwrap_or_else(|_| "[]".into()))
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        if let Some(settings) = &patch.widget_settings {
            sqlx::query("UPDATE sites SET widget_settings = ? WHERE id = ?")
                .bind(settings.to_string())
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        let row = sqlx::query("SELECT * FROM sites WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.writer)
            .await
            .map_err(unavailable)?;
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
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO agents (id, email, name, role, password_hash, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(agent.id.to_string())
        .bind(agent.email.as_str())
        .bind(&agent.name)
        .bind(agent.role.as_str())
        .bind(&new.password_hash)
        .bind(agent.created_at)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        Self::set_agent_sites(&mut tx, agent.id, &agent.site_ids).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(agent)
    }

    async fn agent(&self, id: AgentId) -> StoreResult<Option<Agent>> {
        Ok(self
            .agents_where("WHERE id = ?", Some(id.to_string()))
            .await?
            .pop()
            .map(|(a, _)| a))
    }

    async fn agent_login(&self, email: &Email) -> StoreResult<Option<(Agent, String)>> {
        Ok(self
            .agents_where("WHERE email = ?", Some(email.as_str().to_owned()))
            .await?
            .pop())
    }

    async fn list_agents(&self) -> StoreResult<Vec<Agent>> {
        Ok(self
            .agents_where("", None)
            .await?
            .into_iter()
            .map(|(a, _)| a)
            .collect())
    }

    async fn update_agent(&self, id: AgentId, patch: AgentPatch) -> StoreResult<Option<Agent>> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let sid = id.to_string();
        if let Some(name) = &patch.name {
            sqlx::query("UPDATE agents SET name = ? WHERE id = ?")
                .bind(name)
                .bind(&sid)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        if let Some(role) = patch.role {
            sqlx::query("UPDATE agents SET role = ? WHERE id = ?")
                .bind(role.as_str())
                .bind(&sid)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        if let Some(hash) = &patch.password_hash {
            sqlx::query("UPDATE agents SET password_hash = ? WHERE id = ?")
                .bind(hash)
                .bind(&sid)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            // A new password ends every existing session.
            sqlx::query("DELETE FROM sessions WHERE agent_id = ?")
                .bind(&sid)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        if let Some(disabled) = patch.disabled {
            sqlx::query("UPDATE agents SET disabled = ? WHERE id = ?")
                .bind(disabled as i64)
                .bind(&sid)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            if disabled {
                sqlx::query("DELETE FROM sessions WHERE agent_id = ?")
                    .bind(&sid)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
        }
        if let Some(sites) = &patch.site_ids {
            Self::set_agent_sites(&mut tx, id, sites).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        self.agent(id).await
    }

    async fn count_agents(&self) -> StoreResult<u64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM agents")
            .fetch_one(&self.reader)
            .await
            .map_err(unavailable)?;
        Ok(int(&row, "n")? as u64)
    }

    async fn create_session(&self, token_hash: &str, row: SessionRow) -> StoreResult<()> {
        let now = now_ms();
        sqlx::query("DELETE FROM sessions WHERE expires_at < ?")
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO sessions (token_hash, agent_id, csrf_token, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(token_hash)
        .bind(row.agent_id.to_string())
        .bind(&row.csrf_token)
        .bind(now)
        .bind(row.expires_at)
        .execute(&self.writer)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn session(&self, token_hash: &str) -> StoreResult<Option<SessionRow>> {
        let row = sqlx::query("SELECT * FROM sessions WHERE token_hash = ?")
            .bind(token_hash)
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        row.map(|r| {
            Ok(SessionRow {
                agent_id: col(&r, "agent_id")?,
                csrf_token: r.try_get("csrf_token").map_err(unavailable)?,
                expires_at: int(&r, "expires_at")?,
            })
        })
        .transpose()
    }

    async fn delete_session(&self, token_hash: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = ?")
            .bind(token_hash)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
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
        sqlx::query("INSERT INTO visitors (id, site_id, created_at) VALUES (?, ?, ?)")
            .bind(v.id.to_string())
            .bind(site_id.to_string())
            .bind(v.created_at)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
        Ok(v)
    }

    async fn visitor(&self, id: VisitorId) -> StoreResult<Option<Visitor>> {
        let row = sqlx::query("SELECT * FROM visitors WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        row.map(|r| visitor_row(&r)).transpose()
    }

    async fn set_visitor_profile(
        &self,
        id: VisitorId,
        name: Option<String>,
        email: Option<Email>,
    ) -> StoreResult<Option<Visitor>> {
        let row = sqlx::query("UPDATE visitors SET name = ?, email = ? WHERE id = ? RETURNING *")
            .bind(name)
            .bind(email.as_ref().map(Email::as_str))
            .bind(id.to_string())
            .fetch_optional(&self.writer)
            .await
            .map_err(unavailable)?;
        row.map(|r| visitor_row(&r)).transpose()
    }

    async fn open_conversation(
        &self,
        site_id: SiteId,
        visitor_id: VisitorId,
    ) -> StoreResult<(Conversation, bool)> {
        let now = now_ms();
        let id = ConversationId::new();
        // The partial unique index makes this a no-op when an open conversation exists.
        let inserted = sqlx::query(
            "INSERT INTO conversations (id, site_id, visitor_id, status, created_at, updated_at) \
             VALUES (?, ?, ?, 'open', ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(id.to_string())
        .bind(site_id.to_string())
        .bind(visitor_id.to_string())
        .bind(now)
        .bind(now)
        .execute(&self.writer)
        .await
        .map_err(unavailable)?
        .rows_affected()
            == 1;
        let row = sqlx::query(
            "SELECT * FROM conversations WHERE visitor_id = ? AND site_id = ? AND status = 'open'",
        )
        .bind(visitor_id.to_string())
        .bind(site_id.to_string())
        .fetch_optional(&self.writer)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| StoreError::Corrupt("open conversation vanished".into()))?;
        Ok((conversation_row(&row)?, inserted))
    }

    async fn conversation(&self, id: ConversationId) -> StoreResult<Option<Conversation>> {
        let row = sqlx::query("SELECT * FROM conversations WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        row.map(|r| conversation_row(&r)).transpose()
    }

    async fn list_conversations(&self, f: &ConversationFilter) -> StoreResult<Vec<Conversation>> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM conversations WHERE 1 = 1");
        if let Some(sites) = &f.site_ids {
            if sites.is_empty() {
                return Ok(Vec::new());
            }
            q.push(" AND site_id IN (");
            let mut sep = q.separated(", ");
            for s in sites {
                sep.push_bind(s.to_string());
            }
            q.push(")");
        }
        if let Some(st) = f.status {
            q.push(" AND status = ").push_bind(st.as_str());
        }
        if let Some(v) = f.visitor_id {
            q.push(" AND visitor_id = ").push_bind(v.to_string());
        }
        if let Some(since) = f.updated_since {
            q.push(" AND updated_at >= ").push_bind(since);
        }
        if let Some((at, id)) = f.before {
            q.push(" AND (updated_at < ")
                .push_bind(at)
                .push(" OR (updated_at = ")
                .push_bind(at)
                .push(" AND id < ")
                .push_bind(id.to_string())
                .push("))");
        }
        q.push(" ORDER BY updated_at DESC, id DESC LIMIT ")
            .push_bind(f.limit as i64);
        let rows = q
            .build()
            .fetch_all(&self.reader)
            .await
            .map_err(unavailable)?;
        rows.iter().map(conversation_row).collect()
    }

    async fn set_status(
        &self,
        id: ConversationId,
        status: Status,
    ) -> StoreResult<Option<Conversation>> {
        let row = sqlx::query(
            "UPDATE conversations SET status = ?, updated_at = ? WHERE id = ? RETURNING *",
        )
        .bind(status.as_str())
        .bind(now_ms())
        .bind(id.to_string())
        .fetch_optional(&self.writer)
        .await
        .map_err(unavailable)?;
        row.map(|r| conversation_row(&r)).transpose()
    }

    async fn assign(
        &self,
        id: ConversationId,
        assignee: Option<AgentId>,
    ) -> StoreResult<Option<Conversation>> {
        let row = sqlx::query(
            "UPDATE conversations SET assignee_id = ?, updated_at = ? WHERE id = ? RETURNING *",
        )
        .bind(assignee.map(|a| a.to_string()))
        .bind(now_ms())
        .bind(id.to_string())
        .fetch_optional(&self.writer)
        .await
        .map_err(unavailable)?;
        row.map(|r| conversation_row(&r)).transpose()
    }

    async fn append_batch(&self, batch: &[NewMessage]) -> StoreResult<AppendResult> {
        self.appender.append(batch.to_vec()).await
    }

    async fn message_by_client_id(
        &self,
        author_id: Uuid,
        client_id: ClientMsgId,
    ) -> StoreResult<Option<Message>> {
        let row = sqlx::query("SELECT * FROM messages WHERE client_id = ? AND author_id = ?")
            .bind(client_id.to_string())
            .bind(author_id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        row.map(|r| message_row(&r)).transpose()
    }

    async fn messages(
        &self,
        conversation_id: ConversationId,
        range: SeqRange,
        limit: u32,
    ) -> StoreResult<(Vec<Message>, bool)> {
        let cid = conversation_id.to_string();
        let fetch = limit as i64 + 1;
        let (rows, newest_first) = match range {
            SeqRange::After(n) => (
                sqlx::query(
                    "SELECT * FROM messages WHERE conversation_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                )
                .bind(&cid)
                .bind(n as i64)
                .bind(fetch)
                .fetch_all(&self.reader)
                .await,
                false,
            ),
            SeqRange::Before(n) => (
                sqlx::query(
                    "SELECT * FROM messages WHERE conversation_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                )
                .bind(&cid)
                .bind(n as i64)
                .bind(fetch)
                .fetch_all(&self.reader)
                .await,
                true,
            ),
            SeqRange::Latest => (
                sqlx::query(
                    "SELECT * FROM messages WHERE conversation_id = ? ORDER BY seq DESC LIMIT ?",
                )
                .bind(&cid)
                .bind(fetch)
                .fetch_all(&self.reader)
                .await,
                true,
            ),
        };
        let rows = rows.map_err(unavailable)?;
        let has_more = rows.len() as i64 > limit as i64;
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
        // One statement: the clamp to last_seq reads the conversation row the insert depends on,
        // and the upsert's MAX keeps a late, lower mark (an old tab, a retry) from lowering it.
        // No conversation: the SELECT yields no row, nothing is written, nothing returned.
        let row = sqlx::query(
            "INSERT INTO read_marks (conversation_id, reader_id, seq, updated_at) \
             SELECT id, ?, MIN(?, last_seq), ? FROM conversations WHERE id = ? \
             ON CONFLICT (conversation_id, reader_id) \
             DO UPDATE SET seq = MAX(read_marks.seq, excluded.seq), updated_at = excluded.updated_at \
             RETURNING seq",
        )
        .bind(reader_id.to_string())
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .bind(now_ms())
        .bind(conversation_id.to_string())
        .fetch_optional(&self.writer)
        .await
        .map_err(unavailable)?;
        row.map(|r| Ok(int(&r, "seq")? as Seq)).transpose()
    }

    async fn read_marks(&self, conversation_id: ConversationId) -> StoreResult<Vec<(Uuid, Seq)>> {
        let rows = sqlx::query(
            "SELECT reader_id, seq FROM read_marks WHERE conversation_id = ? ORDER BY reader_id",
        )
        .bind(conversation_id.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| Ok((col(r, "reader_id")?, int(r, "seq")? as Seq)))
            .collect()
    }

    async fn search_messages(
        &self,
        site_ids: Option<&[SiteId]>,
        query: &str,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        // Each word as a quoted FTS5 string: quotes, operators (AND, NEAR, *) and column filters
        // typed by a user are then plain text, never query syntax or a syntax error.
        let words = search_words(query);
        if words.is_empty() || limit == 0 || site_ids.is_some_and(|s| s.is_empty()) {
            return Ok(Vec::new());
        }
        let fts: Vec<String> = words
            .iter()
            .map(|w| format!("\"{}\"", w.replace('"', "\"\"")))
            .collect();
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT m.* FROM message_text t \
             JOIN message_index i ON i.rowid = t.rowid \
             JOIN messages m ON m.conversation_id = i.conversation_id AND m.seq = i.seq ",
        );
        if let Some(sites) = site_ids {
            q.push("JOIN conversations c ON c.id = m.conversation_id AND c.site_id IN (");
            let mut sep = q.separated(", ");
            for s in sites {
                sep.push_bind(s.to_string());
            }
            q.push(") ");
        }
        q.push("WHERE message_text MATCH ")
            .push_bind(fts.join(" "))
            .push(" ORDER BY m.created_at DESC, m.conversation_id DESC, m.seq DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q
            .build()
            .fetch_all(&self.reader)
            .await
            .map_err(unavailable)?;
        rows.iter().map(message_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Migration 0003 indexes the messages stored before it, and messages written afterwards
    /// are indexed beside them.
    #[tokio::test]
    async fn search_migration_indexes_existing_messages() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The migrations up to 0002, byte for byte, so the store later sees them as applied.
        let early = tempfile::tempdir().expect("tempdir");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
        for f in ["0001_init.sql", "0002_read_marks_visitor_profile.sql"] {
            std::fs::copy(src.join(f), early.path().join(f)).expect("copy a migration");
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(dir.path().join("hark.db"))
                    .create_if_missing(true),
            )
            .await
            .expect("pool");
        sqlx::migrate::Migrator::new(early.path())
            .await
            .expect("migrator")
            .run(&pool)
            .await
            .expect("migrate to 0002");
        let (site, visitor, conv) = (SiteId::new(), VisitorId::new(), ConversationId::new());
        for sql in [
            format!("INSERT INTO sites (id, name, site_key, identity_secret, created_at) VALUES ('{site}', 's', 'hk_0123456789', 'x', 1)"),
            format!("INSERT INTO visitors (id, site_id, created_at) VALUES ('{visitor}', '{site}', 1)"),
            format!("INSERT INTO conversations (id, site_id, visitor_id, status, last_seq, created_at, updated_at) VALUES ('{conv}', '{site}', '{visitor}', 'open', 2, 1, 1)"),
            format!("INSERT INTO messages (conversation_id, seq, id, author_kind, author_id, text, created_at) VALUES ('{conv}', 1, '{}', 'visitor', '{visitor}', 'hello from before', 1)", MessageId::new()),
            format!("INSERT INTO messages (conversation_id, seq, id, author_kind, author_id, text, created_at) VALUES ('{conv}', 2, '{}', 'visitor', '{visitor}', 'hello again', 2)", MessageId::new()),
        ] {
            sqlx::query(&sql).execute(&pool).await.expect("seed a row");
        }
        pool.close().await;

        let store = SqliteStore::open(dir.path())
            .await
            .expect("open and migrate");
        let seqs = |ms: Vec<Message>| ms.iter().map(|m| m.seq).collect::<Vec<_>>();
        let hits = store
            .search_messages(None, "hello", 10)
            .await
            .expect("search");
        assert_eq!(seqs(hits), vec![2, 1], "both old messages, newest first");
        let hits = store
            .search_messages(None, "before", 10)
            .await
            .expect("search");
        assert_eq!(seqs(hits), vec![1]);

        let (out, _) = store
            .append_batch(&[NewMessage {
                conversation_id: conv,
                sender: Sender::Visitor(visitor),
                text: "hello after".into(),
                client_id: None,
            }])
            .await
            .expect("append");
        assert!(matches!(&out[0], Appended::Stored(m) if m.seq == 3));
        let hits = store
            .search_messages(None, "hello", 10)
            .await
            .expect("search");
        assert_eq!(seqs(hits), vec![3, 2, 1]);
        store.close().await;
    }
}
