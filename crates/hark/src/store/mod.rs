//! The system of record. `Store` is the one interface through which Hark reads and writes durable
//! state; nothing outside `store/` writes SQL. Two implementations pass the same suite
//! (`tests/store_suite.rs`): SQLite (`sqlite.rs`, embedded, one node) and PostgreSQL
//! (`postgres.rs`, shared by the nodes of a cluster).
//!
//! The contract that matters most is [`Store::append_batch`]: one transaction for many messages
//! (group commit), a gap-free per-conversation `seq` assigned inside that transaction, and
//! idempotency on `(author, client_id)`.

pub mod batch;
pub mod postgres;
pub mod sqlite;
mod sqlite_writer;

use async_trait::async_trait;

use crate::domain::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer or failed; the operation may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule was broken (an email already used, …).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Stored data could not be read back into domain types: a bug or a corrupted row.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone)]
pub struct NewSite {
    pub name: String,
    pub allowed_origins: Vec<Origin>,
}

#[derive(Debug, Clone, Default)]
pub struct SitePatch {
    pub name: Option<String>,
    pub allowed_origins: Option<Vec<Origin>>,
    pub widget_settings: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
pub struct NewAgent {
    pub email: Email,
    pub name: String,
    pub role: AgentRole,
    pub password_hash: String,
    pub site_ids: Vec<SiteId>,
}

#[derive(Debug, Clone, Default)]
pub struct AgentPatch {
    pub name: Option<String>,
    pub role: Option<AgentRole>,
    pub password_hash: Option<String>,
    pub site_ids: Option<Vec<SiteId>>,
    pub disabled: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct SessionRow {
    pub agent_id: AgentId,
    pub csrf_token: String,
    pub expires_at: i64,
}

/// One message to append. Authorisation (may this sender write here?) is the caller's job; the
/// store checks only that the conversation exists and is open.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub conversation_id: ConversationId,
    pub sender: Sender,
    pub text: String,
    pub client_id: Option<ClientMsgId>,
}

/// What became of one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Stored now, with its seq.
    Stored(Message),
    /// The sender had already sent this `client_id`: the message stored then.
    Duplicate(Message),
    NotFound,
    Closed,
}

/// What a batch append returns: each message's outcome in batch order, and the routes of the
/// conversations written (for fan-out).
pub type AppendResult = (Vec<Appended>, Vec<(ConversationId, Route)>);

/// Conversation plus the routing facts fan-out needs, returned with stored messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub site_id: SiteId,
    pub visitor_id: VisitorId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqRange {
    /// The latest `limit` messages.
    Latest,
    /// Messages with seq > n, oldest first.
    After(Seq),
    /// Messages with seq < n, the `limit` closest to n.
    Before(Seq),
}

#[derive(Debug, Clone, Default)]
pub struct ConversationFilter {
    /// Only these sites (`None`: every site, for admins).
    pub site_ids: Option<Vec<SiteId>>,
    pub status: Option<Status>,
    pub visitor_id: Option<VisitorId>,
    /// Only conversations with `updated_at >= updated_since` (ms, like `updated_at`).
    pub updated_since: Option<i64>,
    /// Keyset cursor: conversations updated strictly before (updated_at, id).
    pub before: Option<(i64, ConversationId)>,
    pub limit: u32,
}

/// The words of a search query that can match anything: those with a letter or digit. Both
/// stores search for all of them; a query with none matches nothing.
pub fn search_words(query: &str) -> Vec<&str> {
    query
        .split_whitespace()
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .collect()
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Answers when the store can serve reads and writes.
    async fn ping(&self) -> StoreResult<()>;

    /// A named installation secret, created with `fresh` on first use; every node gets the same.
    async fn secret(&self, name: &str, fresh: Vec<u8>) -> StoreResult<Vec<u8>>;

    async fn create_site(&self, new: NewSite) -> StoreResult<Site>;
    async fn site(&self, id: SiteId) -> StoreResult<Option<Site>>;
    async fn site_by_key(&self, key: &SiteKey) -> StoreResult<Option<Site>>;
    async fn list_sites(&self) -> StoreResult<Vec<Site>>;
    async fn update_site(&self, id: SiteId, patch: SitePatch) -> StoreResult<Option<Site>>;

    async fn create_agent(&self, new: NewAgent) -> StoreResult<Agent>;
    async fn agent(&self, id: AgentId) -> StoreResult<Option<Agent>>;
    /// The agent and its password hash, for login.
    async fn agent_login(&self, email: &Email) -> StoreResult<Option<(Agent, String)>>;
    async fn list_agents(&self) -> StoreResult<Vec<Agent>>;
    async fn update_agent(&self, id: AgentId, patch: AgentPatch) -> StoreResult<Option<Agent>>;
    async fn count_agents(&self) -> StoreResult<u64>;

    async fn create_session(&self, token_hash: &str, row: SessionRow) -> StoreResult<()>;
    async fn session(&self, token_hash: &str) -> StoreResult<Option<SessionRow>>;
    async fn delete_session(&self, token_hash: &str) -> StoreResult<()>;

    async fn create_visitor(&self, site_id: SiteId) -> StoreResult<Visitor>;
    async fn visitor(&self, id: VisitorId) -> StoreResult<Option<Visitor>>;
    /// Replaces the visitor's name and email (`None` clears). `None` if there is no such visitor.
    async fn set_visitor_profile(
        &self,
        id: VisitorId,
        name: Option<String>,
        email: Option<Email>,
    ) -> StoreResult<Option<Visitor>>;

    /// The visitor's open conversation, opening one if there is none. `true` when it was opened now.
    async fn open_conversation(
        &self,
        site_id: SiteId,
        visitor_id: VisitorId,
    ) -> StoreResult<(Conversation, bool)>;
    async fn conversation(&self, id: ConversationId) -> StoreResult<Option<Conversation>>;
    async fn list_conversations(
        &self,
        filter: &ConversationFilter,
    ) -> StoreResult<Vec<Conversation>>;
    /// Sets the status; `None` if there is no such conversation. Fails with `Conflict` when
    /// reopening would give the visitor two open conversations.
    async fn set_status(
        &self,
        id: ConversationId,
        status: Status,
    ) -> StoreResult<Option<Conversation>>;
    async fn assign(
        &self,
        id: ConversationId,
        assignee: Option<AgentId>,
    ) -> StoreResult<Option<Conversation>>;

    /// Appends many messages in one transaction. Each gets the next seq of its conversation, in
    /// batch order; a `(author, client_id)` already stored yields `Duplicate` of the stored
    /// message, and one repeated within the batch gets the first occurrence's outcome
    /// (`Duplicate` of it if it was stored). Either the whole batch commits or nothing does (`Err`). The routes of the
    /// conversations written are returned alongside, for fan-out.
    async fn append_batch(&self, batch: &[NewMessage]) -> StoreResult<AppendResult>;

    /// A message already stored under this sender's client id.
    async fn message_by_client_id(
        &self,
        author_id: uuid::Uuid,
        client_id: ClientMsgId,
    ) -> StoreResult<Option<Message>>;

    /// Messages of one conversation, oldest first, at most `limit`; and whether more exist in the
    /// direction asked.
    async fn messages(
        &self,
        conversation_id: ConversationId,
        range: SeqRange,
        limit: u32,
    ) -> StoreResult<(Vec<Message>, bool)>;

    /// Messages whose text holds every word of `query` (whole words, case-insensitive), newest
    /// first: by `created_at`, then conversation id and seq, descending. At most `limit`; only in
    /// the conversations of `site_ids` when given (`Some(&[])`: none). A query without any
    /// letter or digit matches nothing. Input is words, never query syntax.
    async fn search_messages(
        &self,
        site_ids: Option<&[SiteId]>,
        query: &str,
        limit: u32,
    ) -> StoreResult<Vec<Message>>;

    /// Raises `reader_id`'s read mark in a conversation to `seq` (never lowers it) and returns the
    /// mark now stored. `reader_id` is a visitor id or an agent id. `None` if there is no such conversation.
    /// A `seq` past the conversation's last message is stored as its `last_seq`.
    async fn mark_read(
        &self,
        conversation_id: ConversationId,
        reader_id: uuid::Uuid,
        seq: Seq,
    ) -> StoreResult<Option<Seq>>;
    /// Every reader's mark in one conversation.
    async fn read_marks(
        &self,
        conversation_id: ConversationId,
    ) -> StoreResult<Vec<(uuid::Uuid, Seq)>>;
}
