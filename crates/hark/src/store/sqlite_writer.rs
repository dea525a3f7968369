//! The SQLite message writer: one OS thread owning one connection, with prepared statements
//! cached, that appends whole batches; and a second thread that checkpoints the WAL.
//!
//! Why not sqlx for this path: sqlx runs each SQLite connection on a worker thread and crosses to
//! it for every statement and every row, so a batch of a few messages cost about a dozen thread
//! wake-ups; at 1,000 messages/s that was most of the node's CPU (`docs/architecture.md`). Here a
//! batch crosses threads once. Checkpoints (which fsync the database file) run on their own thread,
//! off the commit path, instead of inside whichever commit crossed the WAL threshold.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::batch::{key, Plan};
use super::{AppendResult, NewMessage, Route, StoreError, StoreResult};
use crate::domain::*;

type Reply = oneshot::Sender<StoreResult<AppendResult>>;

struct Job {
    batch: Vec<NewMessage>,
    reply: Reply,
}

/// Handle to the writer thread. Dropping the last handle stops both threads.
pub struct Writer {
    tx: std_mpsc::Sender<Job>,
    /// Dropped with the writer; the checkpointer stops when it sees the channel closed.
    _stop_checkpoints: std_mpsc::Sender<()>,
}

fn sql_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict(e.to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

fn parse<T: FromStr>(raw: String, what: &str) -> StoreResult<T> {
    raw.parse()
        .map_err(|_| StoreError::Corrupt(format!("{what}={raw:?}")))
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.pragma_update(None, "synchronous", "full")?;
    conn.pragma_update(None, "foreign_keys", "on")?;
    // Checkpoints are the checkpointer thread's job, never a commit's.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // The writer touches index pages all over the database; keeping them in its own cache
    // (and mapping the file) saves a read syscall per page it revisits.
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "mmap_size", 268_435_456i64)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

impl Writer {
    pub fn start(db: &Path) -> StoreResult<Writer> {
        let conn = open(db).map_err(sql_err)?;
        let (tx, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("hark-sqlite-writer".into())
            .spawn(move || {
                let mut conn = conn;
                while let Ok(job) = rx.recv() {
                    let result = append(&mut conn, &job.batch);
                    let _ = job.reply.send(result);
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("starting the writer thread: {e}")))?;
        let (stop, stopped) = std_mpsc::channel::<()>();
        let path: PathBuf = db.to_owned();
        std::thread::Builder::new()
            .name("hark-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(&path, stopped))
            .map_err(|e| StoreError::Unavailable(format!("starting the checkpointer: {e}")))?;
        Ok(Writer {
            tx,
            _stop_checkpoints: stop,
        })
    }

    pub async fn append(&self, batch: Vec<NewMessage>) -> StoreResult<AppendResult> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { batch, reply })
            .map_err(|_| StoreError::Unavailable("the writer thread stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the writer thread stopped".into()))?
    }
}

/// Copies committed WAL frames into the database regularly (PASSIVE: never blocks writers or
/// readers), so the WAL stays small without any commit paying for it.
fn checkpoint_loop(path: &Path, stop: std_mpsc::Receiver<()>) {
    let conn = match open(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "checkpointer cannot open the database");
            return;
        }
    };
    // Runs until the writer is dropped (the channel then reports disconnection).
    while let Err(std_mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(Duration::from_millis(250))
    {
        let started = std::time::Instant::now();
        let r = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match r {
            Ok((wal_frames, done)) => {
                metrics::histogram!("hark_store_checkpoint_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::gauge!("hark_store_wal_frames").set((wal_frames - done).max(0) as f64);
            }
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
    }
    // A last full checkpoint so a clean shutdown leaves a small WAL.
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

const MESSAGE_COLUMNS: &str =
    "conversation_id, seq, id, author_kind, author_id, author_name, text, client_id, created_at";

fn author(id: Option<String>) -> StoreResult<String> {
    id.ok_or_else(|| StoreError::Corrupt("author_id is null".into()))
}

/// Reads a `messages` row selected with [`MESSAGE_COLUMNS`].
fn read_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoreResult<Message>> {
    let conv: String = r.get(0)?;
    let seq: i64 = r.get(1)?;
    let id: String = r.get(2)?;
    let kind: String = r.get(3)?;
    let author_id: Option<String> = r.get(4)?;
    let author_name: Option<String> = r.get(5)?;
    let text: String = r.get(6)?;
    let client_id: Option<String> = r.get(7)?;
    let created_at: i64 = r.get(8)?;
    let build = || -> StoreResult<Message> {
        let sender = match kind.as_str() {
            "visitor" => Sender::Visitor(parse(author(author_id)?, "author_id")?),
            "agent" => Sender::Agent {
                id: parse(author(author_id)?, "author_id")?,
                name: author_name.unwrap_or_default(),
            },
            "system" => Sender::System,
            other => return Err(StoreError::Corrupt(format!("author_kind={other:?}"))),
        };
        Ok(Message {
            id: parse(id, "id")?,
            conversation_id: parse(conv, "conversation_id")?,
            seq: seq as u64,
            sender,
            text,
            created_at,
            client_id: client_id.map(|c| parse(c, "client_id")).transpose()?,
        })
    };
    Ok(build())
}

fn append(conn: &mut Connection, batch: &[NewMessage]) -> StoreResult<AppendResult> {
    if batch.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let now = now_ms();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)?;

    // 1. Idempotency: what this batch's senders already stored under its client ids.
    let mut earlier: HashMap<(Uuid, ClientMsgId), Message> = HashMap::new();
    {
        let mut find = tx
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE client_id = ?1 AND author_id = ?2"
            ))
            .map_err(sql_err)?;
        for m in batch {
            let Some((author, client)) = key(m) else {
                continue;
            };
            let found = find
                .query_row(
                    params![client.to_string(), author.to_string()],
                    read_message,
                )
                .optional()
                .map_err(sql_err)?
                .transpose()?;
            if let Some(m) = found {
                earlier.insert((author, client), m);
            }
        }
    }

    // 2. Reserve each conversation's seqs: only open conversations advance.
    let plan = Plan::new(batch, &earlier);
    let mut granted: HashMap<ConversationId, (Seq, Route)> = HashMap::new();
    let mut closed: HashSet<ConversationId> = HashSet::new();
    {
        let mut reserve = tx
            .prepare_cached(
                "UPDATE conversations SET last_seq = last_seq + ?1, updated_at = ?2 \
                 WHERE id = ?3 AND status = 'open' RETURNING last_seq, site_id, visitor_id",
            )
            .map_err(sql_err)?;
        let mut exists = tx
            .prepare_cached("SELECT 1 FROM conversations WHERE id = ?1")
            .map_err(sql_err)?;
        for (conv, n) in &plan.needs {
            let row = reserve
                .query_row(params![*n as i64, now, conv.to_string()], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .optional()
                .map_err(sql_err)?;
            match row {
                Some((last, site, visitor)) => {
                    let route = Route {
                        site_id: parse(site, "site_id")?,
                        visitor_id: parse(visitor, "visitor_id")?,
                    };
                    // `last` includes the `n` just added; anything else is a corrupt row.
                    let base = u64::try_from(last)
                        .ok()
                        .and_then(|l| l.checked_sub(*n))
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!("last_seq {last} below the {n} reserved"))
                        })?;
                    granted.insert(*conv, (base, route));
                }
                None => {
                    if exists.exists(params![conv.to_string()]).map_err(sql_err)? {
                        closed.insert(*conv);
                    }
                }
            }
        }
    }

    // 3. Insert the new messages.
    let routes: Vec<(ConversationId, Route)> = granted.iter().map(|(c, (_, r))| (*c, *r)).collect();
    let (results, new) = plan.settle(batch, &granted, &closed, now);
    {
        let mut insert = tx
            .prepare_cached(&format!(
                "INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ))
            .map_err(sql_err)?;
        for m in &new {
            let (kind, author_id, author_name) = match &m.sender {
                Sender::Visitor(v) => ("visitor", Some(v.to_string()), None),
                Sender::Agent { id, name } => ("agent", Some(id.to_string()), Some(name.as_str())),
                Sender::System => ("system", None, None),
            };
            insert
                .execute(params![
                    m.conversation_id.to_string(),
                    m.seq as i64,
                    m.id.to_string(),
                    kind,
                    author_id,
                    author_name,
                    m.text,
                    m.client_id.map(|c| c.to_string()),
                    m.created_at,
                ])
                .map_err(sql_err)?;
        }
    }
    tx.commit().map_err(sql_err)?;
    Ok((results, routes))
}
