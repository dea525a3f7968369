//! Domain types: the nouns of Hark (sites, agents, visitors, conversations, messages) and the
//! newtypes that make invalid values unrepresentable once parsed (ids, site keys, message text,
//! emails, client message ids). Everything past the edge works with these, never raw strings.

use std::fmt;
use std::str::FromStr;

use hark_protocol::{Author, ConversationStatus, ConversationView, MessageBody};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, unguessable, time-ordered id.
            pub fn new() -> Self {
                $name(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.as_hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map($name)
            }
        }
    };
}

id_type!(
    /// A site (tenant).
    SiteId
);
id_type!(
    /// An agent account.
    AgentId
);
id_type!(
    /// A visitor of one site.
    VisitorId
);
id_type!(
    /// A conversation between a visitor and a site's agents.
    ConversationId
);
id_type!(
    /// A stored message.
    MessageId
);
id_type!(
    /// The id a client gives a message so that retries are recognised.
    ClientMsgId
);

/// Position of a message in its conversation: 1, 2, 3, … with no gaps.
pub type Seq = u64;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Random bytes as URL-safe base64, for keys and tokens.
pub fn random_token(bytes: usize) -> String {
    use base64::Engine;
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// The public key a site's install snippet carries: `hk_` and 22 URL-safe characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SiteKey(String);

impl SiteKey {
    pub fn generate() -> SiteKey {
        SiteKey(format!("hk_{}", random_token(16)))
    }
    pub fn parse(raw: &str) -> Option<SiteKey> {
        let rest = raw.strip_prefix("hk_")?;
        let ok = (8..=64).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| SiteKey(raw.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An allowed origin: `scheme://host[:port]`, lower-cased, no path, compared exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Origin(String);

impl Origin {
    pub fn parse(raw: &str) -> Option<Origin> {
        let raw = raw.trim().to_ascii_lowercase();
        let (scheme, rest) = raw.split_once("://")?;
        if scheme != "http" && scheme != "https" {
            return None;
        }
        let ok = !rest.is_empty()
            && rest.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
            });
        ok.then_some(Origin(raw))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Message text: trimmed, 1..=4096 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageText(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextError {
    Empty,
    TooLong,
}

impl MessageText {
    pub fn parse(raw: &str) -> Result<MessageText, TextError> {
        let t = raw.trim();
        if t.is_empty() {
            Err(TextError::Empty)
        } else if t.len() > hark_protocol::MAX_TEXT_BYTES {
            Err(TextError::TooLong)
        } else {
            Ok(MessageText(t.to_owned()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn into_string(self) -> String {
        self.0
    }
}

/// A name shown to people (site, agent): trimmed, 1 to 200 characters (not bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub const MAX_CHARS: usize = 200;

    pub fn parse(raw: &str) -> Option<DisplayName> {
        let name = raw.trim();
        let chars = name.chars().count();
        (1..=Self::MAX_CHARS)
            .contains(&chars)
            .then(|| DisplayName(name.to_owned()))
    }
    pub fn into_string(self) -> String {
        self.0
    }
}

/// A normalised (trimmed, lower-cased) email address with one `@` and a dot in the domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Option<Email> {
        let e = raw.trim().to_ascii_lowercase();
        let (local, domain) = e.split_once('@')?;
        let ok = !local.is_empty()
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains('@')
            && e.len() <= 254
            && !e.chars().any(char::is_whitespace);
        ok.then_some(Email(e))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentRole {
    /// Manages every site and agent of the installation.
    Admin,
    /// Answers the chats of the sites it belongs to.
    Agent,
}

impl AgentRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentRole::Admin => "admin",
            AgentRole::Agent => "agent",
        }
    }
    pub fn parse(s: &str) -> Option<AgentRole> {
        match s {
            "admin" => Some(AgentRole::Admin),
            "agent" => Some(AgentRole::Agent),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub id: SiteId,
    pub name: String,
    pub key: SiteKey,
    pub allowed_origins: Vec<Origin>,
    /// Shared with the site's backend to sign visitor identities (HMAC); never sent to browsers.
    pub identity_secret: String,
    /// Widget look and behaviour, opaque JSON owned by the widget.
    pub widget_settings: serde_json::Value,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub id: AgentId,
    pub email: Email,
    pub name: String,
    pub role: AgentRole,
    pub site_ids: Vec<SiteId>,
    pub disabled: bool,
    pub created_at: i64,
}

impl Agent {
    /// Whether this agent may see the conversations of `site`.
    pub fn can_access(&self, site: SiteId) -> bool {
        !self.disabled && (self.role == AgentRole::Admin || self.site_ids.contains(&site))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visitor {
    pub id: VisitorId,
    pub site_id: SiteId,
    /// What the visitor told us (pre-chat form, identity); `None` until then.
    pub name: Option<String>,
    pub email: Option<Email>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    Closed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Closed => "closed",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "open" => Some(Status::Open),
            "closed" => Some(Status::Closed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: ConversationId,
    pub site_id: SiteId,
    pub visitor_id: VisitorId,
    pub status: Status,
    pub assignee_id: Option<AgentId>,
    pub last_seq: Seq,
    /// Messages below this seq are no longer stored (retention). 1 while nothing was removed.
    pub first_seq: Seq,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Conversation {
    pub fn view(&self) -> ConversationView {
        ConversationView {
            id: self.id.to_string(),
            site_id: self.site_id.to_string(),
            visitor_id: self.visitor_id.to_string(),
            status: match self.status {
                Status::Open => ConversationStatus::Open,
                Status::Closed => ConversationStatus::Closed,
            },
            assignee_id: self.assignee_id.map(|a| a.to_string()),
            last_seq: self.last_seq,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// Who wrote a message, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    Visitor(VisitorId),
    Agent { id: AgentId, name: String },
    System,
}

impl Sender {
    /// The id under which this sender's client message ids are unique.
    pub fn author_id(&self) -> Option<Uuid> {
        match self {
            Sender::Visitor(v) => Some(v.0),
            Sender::Agent { id, .. } => Some(id.0),
            Sender::System => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub seq: Seq,
    pub sender: Sender,
    pub text: String,
    pub created_at: i64,
    pub client_id: Option<ClientMsgId>,
}

impl Message {
    pub fn body(&self) -> MessageBody {
        MessageBody {
            conversation_id: self.conversation_id.to_string(),
            seq: self.seq,
            id: self.id.to_string(),
            author: match &self.sender {
                Sender::Visitor(v) => Author::Visitor { id: v.to_string() },
                Sender::Agent { id, name } => Author::Agent {
                    id: id.to_string(),
                    name: name.clone(),
                },
                Sender::System => Author::System,
            },
            text: self.text.clone(),
            created_at: self.created_at,
            client_id: self.client_id.map(|c| c.0.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_trimmed_and_bounded() {
        assert_eq!(
            MessageText::parse("  hi \n").map(|t| t.into_string()),
            Ok("hi".into())
        );
        assert_eq!(MessageText::parse(" \t\n"), Err(TextError::Empty));
        assert!(MessageText::parse(&"a".repeat(4096)).is_ok());
        assert_eq!(
            MessageText::parse(&"a".repeat(4097)),
            Err(TextError::TooLong)
        );
        // 4096 bytes of multi-byte characters is the limit, not 4096 characters.
        assert_eq!(
            MessageText::parse(&"é".repeat(2049)),
            Err(TextError::TooLong)
        );
    }

    #[test]
    fn origins_are_exact_and_normalised() {
        assert_eq!(
            Origin::parse("HTTPS://Shop.Example.com").map(|o| o.0),
            Some("https://shop.example.com".into())
        );
        assert!(Origin::parse("http://localhost:8000").is_some());
        assert!(Origin::parse("https://example.com/path").is_none());
        assert!(Origin::parse("ftp://example.com").is_none());
        assert!(Origin::parse("example.com").is_none());
        assert!(Origin::parse("https://").is_none());
    }

    #[test]
    fn display_names_count_characters_not_bytes() {
        assert_eq!(
            DisplayName::parse("  Ada ").map(DisplayName::into_string),
            Some("Ada".into())
        );
        assert!(DisplayName::parse(" \t ").is_none());
        assert!(
            DisplayName::parse(&"é".repeat(200)).is_some(),
            "400 bytes, 200 characters"
        );
        assert!(DisplayName::parse(&"é".repeat(201)).is_none());
    }

    #[test]
    fn site_keys_and_emails_parse() {
        let k = SiteKey::generate();
        assert_eq!(SiteKey::parse(k.as_str()), Some(k));
        assert!(SiteKey::parse("hk_12345678").is_some());
        assert!(SiteKey::parse("hk_short").is_none());
        assert!(SiteKey::parse("hk_bad key!").is_none());
        assert!(SiteKey::parse("nokey").is_none());
        assert_eq!(
            Email::parse(" Ada@Example.COM ").map(|e| e.0),
            Some("ada@example.com".into())
        );
        for bad in [
            "ada",
            "@example.com",
            "ada@example",
            "ada@.com",
            "a b@example.com",
            "a@b@c.com",
        ] {
            assert!(Email::parse(bad).is_none(), "{bad}");
        }
    }
}
