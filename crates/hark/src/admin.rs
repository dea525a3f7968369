//! `hark admin …`: bootstrap and manage sites and agents against the same store as the server, so
//! an operator can set Hark up without the web UI. Output is plain text for people.

use std::io::Write;

use crate::auth::{hash_password, MIN_PASSWORD_LEN};
use crate::domain::*;
use crate::store::{AgentPatch, NewAgent, NewSite, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("hashing the password: {0}")]
    Hash(String),
}

pub async fn create_site(
    store: &dyn Store,
    name: &str,
    origins: &[String],
    out: &mut dyn Write,
) -> Result<Site, AdminError> {
    let name = display_name(name)?;
    let mut allowed = Vec::new();
    for o in origins {
        allowed.push(Origin::parse(o).ok_or_else(|| {
            AdminError::Invalid(format!(
                "--origin {o:?} is not an origin like https://www.example.com or http://localhost:8000"
            ))
        })?);
    }
    let site = store
        .create_site(NewSite {
            name,
            allowed_origins: allowed,
        })
        .await?;
    let _ = writeln!(
        out,
        "site created\n  id:       {}\n  name:     {}\n  site key: {}",
        site.id,
        site.name,
        site.key.as_str()
    );
    let _ = writeln!(
        out,
        "  origins:  {}",
        if site.allowed_origins.is_empty() {
            "(none: no page can open the chat until you add one)".to_owned()
        } else {
            site.allowed_origins
                .iter()
                .map(|o| o.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    Ok(site)
}

pub async fn list_sites(store: &dyn Store, out: &mut dyn Write) -> Result<(), AdminError> {
    for s in store.list_sites().await? {
        let origins: Vec<&str> = s.allowed_origins.iter().map(|o| o.as_str()).collect();
        let _ = writeln!(
            out,
            "{}  {}  {}  [{}]",
            s.id,
            s.key.as_str(),
            s.name,
            origins.join(", ")
        );
    }
    Ok(())
}

pub async fn create_agent(
    store: &dyn Store,
    email: &str,
    name: &str,
    role: AgentRole,
    sites: &[String],
    password: String,
    out: &mut dyn Write,
) -> Result<Agent, AdminError> {
    let email = Email::parse(email)
        .ok_or_else(|| AdminError::Invalid(format!("--email {email:?} is not an email address")))?;
    let name = display_name(name)?;
    let mut site_ids = Vec::new();
    for s in sites {
        let id: SiteId = s
            .parse()
            .map_err(|_| AdminError::Invalid(format!("--site {s:?} is not a site id")))?;
        if store.site(id).await?.is_none() {
            return Err(AdminError::Invalid(format!("no site has id {s}")));
        }
        site_ids.push(id);
    }
    let hash = hash(password).await?;
    let agent = store
        .create_agent(NewAgent {
            email,
            name,
            role,
            password_hash: hash,
            site_ids,
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => {
                AdminError::Invalid("an agent with this email exists already".into())
            }
            other => other.into(),
        })?;
    let _ = writeln!(
        out,
        "agent created\n  id:    {}\n  email: {}\n  role:  {}",
        agent.id,
        agent.email.as_str(),
        agent.role.as_str()
    );
    Ok(agent)
}

pub async fn list_agents(store: &dyn Store, out: &mut dyn Write) -> Result<(), AdminError> {
    for a in store.list_agents().await? {
        let sites: Vec<String> = a.site_ids.iter().map(|s| s.to_string()).collect();
        let _ = writeln!(
            out,
            "{}  {}  {}  {}{}  [{}]",
            a.id,
            a.email.as_str(),
            a.name,
            a.role.as_str(),
            if a.disabled { " (disabled)" } else { "" },
            sites.join(", ")
        );
    }
    Ok(())
}

pub async fn set_password(
    store: &dyn Store,
    email: &str,
    password: String,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    let email = Email::parse(email)
        .ok_or_else(|| AdminError::Invalid(format!("--email {email:?} is not an email address")))?;
    let (agent, _) = store
        .agent_login(&email)
        .await?
        .ok_or_else(|| AdminError::Invalid(format!("no agent has email {}", email.as_str())))?;
    let hash = hash(password).await?;
    store
        .update_agent(
            agent.id,
            AgentPatch {
                password_hash: Some(hash),
                ..Default::default()
            },
        )
        .await?;
    let _ = writeln!(
        out,
        "password changed; existing sessions of {} ended",
        email.as_str()
    );
    Ok(())
}

fn display_name(raw: &str) -> Result<String, AdminError> {
    DisplayName::parse(raw)
        .map(DisplayName::into_string)
        .ok_or_else(|| {
            AdminError::Invalid(format!(
                "--name must be 1 to {} characters",
                DisplayName::MAX_CHARS
            ))
        })
}

async fn hash(password: String) -> Result<String, AdminError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(AdminError::Invalid(format!(
            "the password must have at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| AdminError::Hash(e.to_string()))?
        .map_err(AdminError::Hash)
}
