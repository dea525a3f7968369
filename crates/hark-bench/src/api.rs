//! The few REST calls the bench needs to set a server up: login, sites, agents.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

pub struct Api {
    http: reqwest::Client,
    base: String,
}

/// A site created for the run.
#[derive(Debug, Clone)]
pub struct Site {
    pub id: String,
    pub site_key: String,
}

impl Api {
    pub fn new(base: &str) -> Result<Api> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// `GET /readyz` answered 200.
    pub async fn ready(&self) -> bool {
        match self
            .http
            .get(format!("{}/readyz", self.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        }
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.post(&url).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.with_context(|| format!("POST {path}"))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .with_context(|| format!("reading the answer to POST {path}"))?;
        if !status.is_success() {
            let shown: String = text.chars().take(500).collect();
            bail!("POST {path} answered {status}: {shown}");
        }
        serde_json::from_str(&text).with_context(|| {
            let shown: String = text.chars().take(300).collect();
            format!("POST {path} answered {status} with a body that is not JSON: {shown}")
        })
    }

    /// Logs in and returns the bearer token.
    pub async fn login(&self, email: &str, password: &str) -> Result<String> {
        let v = self
            .post(
                "/api/login",
                None,
                json!({"email": email, "password": password}),
            )
            .await?;
        v.get("token")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("POST /api/login answered without a `token`: {v}"))
    }

    pub async fn create_site(&self, token: &str, name: &str, origin: &str) -> Result<Site> {
        let v = self
            .post(
                "/api/sites",
                Some(token),
                json!({"name": name, "allowed_origins": [origin]}),
            )
            .await?;
        let id = v.get("id").and_then(Value::as_str);
        let key = v.get("site_key").and_then(Value::as_str);
        match (id, key) {
            (Some(id), Some(key)) => Ok(Site {
                id: id.to_owned(),
                site_key: key.to_owned(),
            }),
            _ => bail!("POST /api/sites answered without `id`/`site_key`: {v}"),
        }
    }

    pub async fn create_agent(
        &self,
        token: &str,
        email: &str,
        name: &str,
        password: &str,
        site_ids: &[String],
    ) -> Result<()> {
        self.post(
            "/api/agents",
            Some(token),
            json!({
                "email": email,
                "name": name,
                "password": password,
                "role": "agent",
                "site_ids": site_ids,
            }),
        )
        .await?;
        Ok(())
    }
}
