//! The REST API under `/api`: login and sessions, sites, agents, conversations and their
//! messages. It is what the agent console and integrations use besides the WebSocket.
//!
//! Every handler parses what arrives into domain types at once and answers failures with
//! [`ApiError`] (one JSON shape, stable codes). Tenancy is enforced here: an agent sees only the
//! sites it belongs to (admins see all), and anything of another site answers exactly like
//! something that does not exist (`404 not_found`), so ids cannot be probed across tenants.
//! Messages posted here go through the committer like WebSocket sends (group commit, ack after
//! durability, fan-out), and state changes of conversations are published on the bus.
//!
//! The OpenAPI document (`GET /api/openapi.json`) is generated from the `#[utoipa::path]`
//! annotations on these handlers (see [`super::openapi`]).

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, patch, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hark_protocol::{ConversationEvent, ConversationView, ErrorCode, MessageBody};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::session::{AuthedAgent, SESSION_COOKIE};
use crate::auth;
use crate::delivery::committer::{Outcome, Overloaded};
use crate::delivery::event::conversation_event;
use crate::domain::{
    now_ms, Agent, AgentId, AgentRole, ClientMsgId, Conversation, ConversationId, DisplayName,
    Email, MessageText, Origin, Sender, Site, SiteId, Status, TextError, VisitorId,
};
use crate::server::App;
use crate::store::{
    AgentPatch, Appended, ConversationFilter, NewAgent, NewMessage, NewSite, SeqRange, SessionRow,
    SitePatch, StoreError,
};

/// Largest request body the API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest page of conversations or messages.
pub const MAX_PAGE: u32 = 200;
/// Page size when a request names none.
pub const DEFAULT_PAGE: u32 = 50;
/// Longest site or agent name, in characters after trimming.
pub const MAX_NAME_CHARS: usize = DisplayName::MAX_CHARS;
/// Longest password accepted when one is set, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 1024;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/sites", get(list_sites).post(create_site))
        .route("/api/sites/{id}", get(get_site).patch(update_site))
        .route("/api/agents", get(list_agents).post(create_agent))
        .route("/api/agents/{id}", patch(update_agent))
        .route("/api/conversations", get(list_conversations))
        .route("/api/search", get(search_messages))
        .route("/api/conversations/{id}", get(get_conversation))
        .route(
            "/api/conversations/{id}/messages",
            get(list_messages).post(post_message),
        )
        .route("/api/conversations/{id}/close", post(close_conversation))
        .route("/api/conversations/{id}/reopen", post(reopen_conversation))
        .route("/api/conversations/{id}/assign", post(assign_conversation))
        .route(
            "/api/conversations/{id}/read",
            get(super::presence_api::read_marks),
        )
        .route(
            "/api/visitors/{id}/conversations",
            post(super::presence_api::start_chat),
        )
        .route("/api/openapi.json", get(openapi_json))
        .route("/api/{*rest}", any(no_such_endpoint))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// Unknown paths under `/api` answer in the API's error shape, not with an empty 404.
async fn no_such_endpoint() -> ApiError {
    ApiError::not_found("endpoint")
}

// ---------------------------------------------------------------------------------------------
// Extractors that answer in our error shape.

/// `axum::Json`, with rejections (malformed JSON, wrong shape, missing content type, body too
/// large) answered as [`ApiError`] instead of axum's plain text.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
        );
    }
    let message = match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "expected a JSON body with Content-Type: application/json".to_owned()
        }
        other => hark_protocol::abbreviate(&other.body_text(), 300),
    };
    ApiError::bad_request(message)
}

/// `axum::extract::Query`, with rejections answered as `400 bad_request` in our shape.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(query_rejection(&rejection)),
        }
    }
}

fn query_rejection(rejection: &QueryRejection) -> ApiError {
    ApiError::bad_request(hark_protocol::abbreviate(&rejection.body_text(), 300))
}

// ---------------------------------------------------------------------------------------------
// Views: what the API sends.

/// An agent account as the API shows it (never the password hash).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    pub id: String,
    pub email: String,
    pub name: String,
    pub role: AgentRole,
    /// Sites this agent belongs to (admins reach every site regardless).
    pub site_ids: Vec<String>,
    pub disabled: bool,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

impl From<&Agent> for AgentView {
    fn from(a: &Agent) -> AgentView {
        AgentView {
            id: a.id.to_string(),
            email: a.email.as_str().to_owned(),
            name: a.name.clone(),
            role: a.role,
            site_ids: a.site_ids.iter().map(ToString::to_string).collect(),
            disabled: a.disabled,
            created_at: a.created_at,
        }
    }
}

/// A site (tenant) as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SiteView {
    pub id: String,
    pub name: String,
    /// The public key the install snippet carries.
    pub site_key: String,
    /// Origins (`scheme://host[:port]`) whose pages may open the widget.
    pub allowed_origins: Vec<String>,
    /// Widget look and behaviour: a JSON object owned by the widget.
    #[schema(value_type = Object)]
    pub widget_settings: serde_json::Value,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// Secret for signing visitor identities (HMAC-SHA256). Shown to admins only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_secret: Option<String>,
    /// The HTML to paste into the site's pages.
    pub snippet: String,
}

impl SiteView {
    fn new(site: &Site, admin: bool, base: &str) -> SiteView {
        SiteView {
            id: site.id.to_string(),
            name: site.name.clone(),
            site_key: site.key.as_str().to_owned(),
            allowed_origins: site
                .allowed_origins
                .iter()
                .map(|o| o.as_str().to_owned())
                .collect(),
            widget_settings: site.widget_settings.clone(),
            created_at: site.created_at,
            identity_secret: admin.then(|| site.identity_secret.clone()),
            snippet: format!(
                r#"<script async src="{}/widget.js" data-site-key="{}"></script>"#,
                html_attr(base),
                html_attr(site.key.as_str())
            ),
        }
    }
}

fn html_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn forwarded_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// The base URL browsers reach this server at: the configured public URL, else the scheme and
/// `Host` the request came with.
fn public_base(app: &App, headers: &HeaderMap) -> String {
    if let Some(url) = app.config.public_url.as_deref().map(str::trim) {
        if !url.is_empty() {
            return url.trim_end_matches('/').to_owned();
        }
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                })
        })
        .map(str::to_owned)
        .unwrap_or_else(|| app.config.listen.to_string());
    let scheme = if forwarded_https(headers) {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{host}")
}

// ---------------------------------------------------------------------------------------------
// Small parsing helpers.

/// A path id; anything malformed answers like an unknown id.
pub(super) fn path_id<T: FromStr>(raw: &str, what: &str) -> Result<T, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found(what))
}

fn name_field(raw: &str, what: &str) -> Result<String, ApiError> {
    DisplayName::parse(raw)
        .map(DisplayName::into_string)
        .ok_or_else(|| {
            ApiError::bad_request(format!("{what} must be 1 to {MAX_NAME_CHARS} characters"))
        })
}

fn origins_field(raw: &[String]) -> Result<Vec<Origin>, ApiError> {
    if raw.len() > 100 {
        return Err(ApiError::bad_request("at most 100 allowed origins"));
    }
    raw.iter()
        .map(|o| {
            Origin::parse(o).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "invalid origin {:?}: expected scheme://host[:port] with http or https",
                    hark_protocol::abbreviate(o, 200)
                ))
            })
        })
        .collect()
}

fn password_field(raw: &str) -> Result<(), ApiError> {
    if raw.chars().count() < auth::MIN_PASSWORD_LEN {
        return Err(ApiError::bad_request(format!(
            "password must be at least {} characters",
            auth::MIN_PASSWORD_LEN
        )));
    }
    if raw.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::bad_request(format!(
            "password must be at most {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Parses site ids and checks that each names an existing site.
async fn site_ids_field(app: &App, raw: &[String]) -> Result<Vec<SiteId>, ApiError> {
    let mut out = Vec::with_capacity(raw.len());
    for r in raw {
        let unknown = || {
            ApiError::bad_request(format!(
                "unknown site id {:?}",
                hark_protocol::abbreviate(r, 64)
            ))
        };
        let id: SiteId = r.parse().map_err(|_| unknown())?;
        if app.store.site(id).await?.is_none() {
            return Err(unknown());
        }
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

/// Password hashing and checking are CPU-heavy (argon2): at most this many run at once, on the
/// blocking pool, so a burst of logins cannot starve the async workers.
static PASSWORD_WORK: Semaphore = Semaphore::const_new(4);
/// How long a request waits for a password slot before it is shed.
const PASSWORD_WAIT: Duration = Duration::from_secs(10);

async fn password_work<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = match tokio::time::timeout(PASSWORD_WAIT, PASSWORD_WORK.acquire()).await {
        Ok(Ok(p)) => p,
        _ => return Err(ApiError::overloaded(1)),
    };
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "password task failed");
        ApiError::internal()
    })
}

async fn hash_password(password: String) -> Result<String, ApiError> {
    password_work(move || auth::hash_password(&password))
        .await?
        .map_err(|e| {
            tracing::error!(error = %e, "hashing a password failed");
            ApiError::internal()
        })
}

/// A hash to verify against when the email is unknown, so that the answer takes as long as for
/// a known one (no account enumeration by timing).
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| auth::hash_password("hark-dummy-password").unwrap_or_default())
}

fn invalid_credentials() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
        "wrong email or password",
    )
}

// ---------------------------------------------------------------------------------------------
// Sessions.

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginResponse {
    /// Bearer token for `Authorization: Bearer …` (also set as the `hark_session` cookie).
    pub token: String,
    /// Send as `X-CSRF-Token` on state-changing requests authenticated by the cookie.
    pub csrf_token: String,
    pub agent: AgentView,
}

fn session_cookie(value: &str, max_age_secs: u64, secure: bool) -> Result<HeaderValue, ApiError> {
    let mut c = format!(
        "{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_secs}"
    );
    if secure {
        c.push_str("; Secure");
    }
    HeaderValue::from_str(&c).map_err(|_| ApiError::internal())
}

/// Logs an agent in.
///
/// Answers the session token and CSRF token and sets the `hark_session` cookie (HttpOnly,
/// SameSite=Strict, 30 days; `Secure` when the request came over HTTPS per
/// `X-Forwarded-Proto`). A wrong email, a wrong password and a disabled account get the same
/// answer.
#[utoipa::path(
    post,
    path = "/api/login",
    tag = "session",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in; the `hark_session` cookie is set", body = LoginResponse),
        (status = 400, description = "Malformed body (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Wrong email or password, or account disabled (`invalid_credentials`)", body = ErrorBody),
        (status = 503, description = "Too many logins at once (`overloaded`) or store down (`unavailable`)", body = ErrorBody),
    )
)]
pub async fn login(
    State(app): State<App>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    let found = match Email::parse(&req.email) {
        Some(email) => app.store.agent_login(&email).await?,
        None => None,
    };
    let (agent, hash) = match found {
        Some((agent, hash)) => (Some(agent), Some(hash)),
        None => (None, None),
    };
    let password = req.password;
    let verified = password_work(move || match hash {
        Some(h) => auth::verify_password(&password, &h),
        None => {
            let _ = auth::verify_password(&password, dummy_hash());
            false
        }
    })
    .await?;
    let agent = match agent {
        Some(a) if verified && !a.disabled => a,
        _ => return Err(invalid_credentials()),
    };
    let session = auth::new_session_token();
    app.store
        .create_session(
            &session.hash,
            SessionRow {
                agent_id: agent.id,
                csrf_token: session.csrf.clone(),
                expires_at: now_ms() + auth::SESSION_TTL.as_millis() as i64,
            },
        )
        .await?;
    let cookie = session_cookie(
        &session.token,
        auth::SESSION_TTL.as_secs(),
        forwarded_https(&headers),
    )?;
    let body = LoginResponse {
        token: session.token,
        csrf_token: session.csrf,
        agent: AgentView::from(&agent),
    };
    let mut resp = axum::Json(body).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(resp)
}

/// Ends the session the request is authenticated with and clears the cookie.
#[utoipa::path(
    post,
    path = "/api/logout",
    tag = "session",
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 204, description = "Logged out; the cookie is cleared"),
        (status = 401, description = "Not logged in (`unauthenticated`)", body = ErrorBody),
        (status = 403, description = "Cookie without the CSRF header (`csrf_failed`)", body = ErrorBody),
    )
)]
pub async fn logout(
    State(app): State<App>,
    headers: HeaderMap,
    me: AuthedAgent,
) -> Result<Response, ApiError> {
    app.store.delete_session(&me.token_hash).await?;
    app.live_sessions.revoke_session(&me.token_hash);
    let cookie = session_cookie("", 0, forwarded_https(&headers))?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(resp)
}

/// The agent the request is authenticated as.
#[utoipa::path(
    get,
    path = "/api/me",
    tag = "session",
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "The logged-in agent", body = AgentView),
        (status = 401, description = "Not logged in (`unauthenticated`)", body = ErrorBody),
    )
)]
pub async fn me(me: AuthedAgent) -> axum::Json<AgentView> {
    axum::Json(AgentView::from(&me.agent))
}

// ---------------------------------------------------------------------------------------------
// Sites.

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewSiteRequest {
    /// 1 to 200 characters.
    pub name: String,
    /// Origins (`scheme://host[:port]`) whose pages may open the widget.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SitePatchRequest {
    pub name: Option<String>,
    pub allowed_origins: Option<Vec<String>>,
    /// Replaces the widget settings; must be a JSON object.
    #[schema(value_type = Option<Object>)]
    pub widget_settings: Option<serde_json::Value>,
}

/// A site the agent may see, or `not_found` (unknown, malformed and foreign look the same).
async fn visible_site(app: &App, me: &Agent, raw_id: &str) -> Result<Site, ApiError> {
    let id: SiteId = path_id(raw_id, "site")?;
    if !me.can_access(id) {
        return Err(ApiError::not_found("site"));
    }
    app.store
        .site(id)
        .await?
        .ok_or_else(|| ApiError::not_found("site"))
}

/// The sites the agent can access (admins: every site).
#[utoipa::path(
    get,
    path = "/api/sites",
    tag = "sites",
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Sites, oldest first", body = [SiteView]),
        (status = 401, description = "Not logged in", body = ErrorBody),
    )
)]
pub async fn list_sites(
    State(app): State<App>,
    headers: HeaderMap,
    me: AuthedAgent,
) -> Result<axum::Json<Vec<SiteView>>, ApiError> {
    let admin = me.agent.role == AgentRole::Admin;
    let base = public_base(&app, &headers);
    let sites = app.store.list_sites().await?;
    Ok(axum::Json(
        sites
            .iter()
            .filter(|s| me.agent.can_access(s.id))
            .map(|s| SiteView::new(s, admin, &base))
            .collect(),
    ))
}

/// Creates a site (admins only).
#[utoipa::path(
    post,
    path = "/api/sites",
    tag = "sites",
    security(("bearer" = []), ("cookie" = [])),
    request_body = NewSiteRequest,
    responses(
        (status = 201, description = "Created", body = SiteView),
        (status = 400, description = "Bad name or origin (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Not an admin (`forbidden`) or CSRF header missing (`csrf_failed`)", body = ErrorBody),
    )
)]
pub async fn create_site(
    State(app): State<App>,
    headers: HeaderMap,
    me: AuthedAgent,
    ApiJson(req): ApiJson<NewSiteRequest>,
) -> Result<(StatusCode, axum::Json<SiteView>), ApiError> {
    me.require_admin()?;
    let name = name_field(&req.name, "name")?;
    let allowed_origins = origins_field(&req.allowed_origins)?;
    let site = app
        .store
        .create_site(NewSite {
            name,
            allowed_origins,
        })
        .await?;
    let base = public_base(&app, &headers);
    Ok((
        StatusCode::CREATED,
        axum::Json(SiteView::new(&site, true, &base)),
    ))
}

/// One site the agent can access.
#[utoipa::path(
    get,
    path = "/api/sites/{id}",
    tag = "sites",
    security(("bearer" = []), ("cookie" = [])),
    params(("id" = String, Path, description = "Site id")),
    responses(
        (status = 200, description = "The site", body = SiteView),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 404, description = "No such site, or not one of the agent's (`not_found`)", body = ErrorBody),
    )
)]
pub async fn get_site(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    me: AuthedAgent,
) -> Result<axum::Json<SiteView>, ApiError> {
    let site = visible_site(&app, &me.agent, &id).await?;
    let admin = me.agent.role == AgentRole::Admin;
    Ok(axum::Json(SiteView::new(
        &site,
        admin,
        &public_base(&app, &headers),
    )))
}

/// Changes a site's name, allowed origins or widget settings (admins only).
#[utoipa::path(
    patch,
    path = "/api/sites/{id}",
    tag = "sites",
    security(("bearer" = []), ("cookie" = [])),
    params(("id" = String, Path, description = "Site id")),
    request_body = SitePatchRequest,
    responses(
        (status = 200, description = "The updated site", body = SiteView),
        (status = 400, description = "Bad name, origin or settings (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Not an admin (`forbidden`) or CSRF header missing (`csrf_failed`)", body = ErrorBody),
        (status = 404, description = "No such site (`not_found`)", body = ErrorBody),
    )
)]
pub async fn update_site(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    me: AuthedAgent,
    ApiJson(req): ApiJson<SitePatchRequest>,
) -> Result<axum::Json<SiteView>, ApiError> {
    me.require_admin()?;
    let id: SiteId = path_id(&id, "site")?;
    if let Some(ws) = &req.widget_settings {
        if !ws.is_object() {
            return Err(ApiError::bad_request(
                "widget_settings must be a JSON object",
            ));
        }
    }
    let patch = SitePatch {
        name: req
            .name
            .as_deref()
            .map(|n| name_field(n, "name"))
            .transpose()?,
        allowed_origins: req
            .allowed_origins
            .as_deref()
            .map(origins_field)
            .transpose()?,
        widget_settings: req.widget_settings,
    };
    let site = app
        .store
        .update_site(id, patch)
        .await?
        .ok_or_else(|| ApiError::not_found("site"))?;
    Ok(axum::Json(SiteView::new(
        &site,
        true,
        &public_base(&app, &headers),
    )))
}

// ---------------------------------------------------------------------------------------------
// Agents.

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewAgentRequest {
    pub email: String,
    /// 1 to 200 characters.
    pub name: String,
    /// At least 8 characters.
    pub password: String,
    pub role: AgentRole,
    /// Sites the agent belongs to.
    #[serde(default)]
    pub site_ids: Vec<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct AgentPatchRequest {
    pub name: Option<String>,
    /// Admins only.
    pub role: Option<AgentRole>,
    /// Admins only.
    pub site_ids: Option<Vec<String>>,
    /// Admins only. A disabled agent cannot log in and its sessions stop working.
    pub disabled: Option<bool>,
    /// A new password (at least 8 characters). Ends every session of the agent, the
    /// caller's included when it changes its own.
    pub password: Option<String>,
    /// Required with `password` when agents change their own password.
    pub current_password: Option<String>,
}

/// Every agent (admins only).
#[utoipa::path(
    get,
    path = "/api/agents",
    tag = "agents",
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Agents", body = [AgentView]),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Not an admin (`forbidden`)", body = ErrorBody),
    )
)]
pub async fn list_agents(
    State(app): State<App>,
    me: AuthedAgent,
) -> Result<axum::Json<Vec<AgentView>>, ApiError> {
    me.require_admin()?;
    let agents = app.store.list_agents().await?;
    Ok(axum::Json(agents.iter().map(AgentView::from).collect()))
}

/// Creates an agent account (admins only).
#[utoipa::path(
    post,
    path = "/api/agents",
    tag = "agents",
    security(("bearer" = []), ("cookie" = [])),
    request_body = NewAgentRequest,
    responses(
        (status = 201, description = "Created", body = AgentView),
        (status = 400, description = "Bad email, name, password, role or unknown site id (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Not an admin (`forbidden`) or CSRF header missing (`csrf_failed`)", body = ErrorBody),
        (status = 409, description = "Email already used (`conflict`)", body = ErrorBody),
    )
)]
pub async fn create_agent(
    State(app): State<App>,
    me: AuthedAgent,
    ApiJson(req): ApiJson<NewAgentRequest>,
) -> Result<(StatusCode, axum::Json<AgentView>), ApiError> {
    me.require_admin()?;
    let email = Email::parse(&req.email)
        .ok_or_else(|| ApiError::bad_request("email is not a valid address"))?;
    let name = name_field(&req.name, "name")?;
    password_field(&req.password)?;
    let site_ids = site_ids_field(&app, &req.site_ids).await?;
    let password_hash = hash_password(req.password).await?;
    let agent = app
        .store
        .create_agent(NewAgent {
            email,
            name,
            role: req.role,
            password_hash,
            site_ids,
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => ApiError::conflict("an agent with this email exists"),
            other => other.into(),
        })?;
    Ok((StatusCode::CREATED, axum::Json(AgentView::from(&agent))))
}

/// Changes an agent.
///
/// Admins may change any agent's name, role, sites, disabled flag and password. Agents may
/// change only their own name and password. Changing one's own password requires
/// `current_password`. A new password or disabling ends every session of the agent. Admins
/// cannot disable themselves or drop their own admin role.
#[utoipa::path(
    patch,
    path = "/api/agents/{id}",
    tag = "agents",
    security(("bearer" = []), ("cookie" = [])),
    params(("id" = String, Path, description = "Agent id")),
    request_body = AgentPatchRequest,
    responses(
        (status = 200, description = "The updated agent", body = AgentView),
        (status = 400, description = "Bad field or unknown site id (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Not logged in, or wrong `current_password` (`invalid_credentials`)", body = ErrorBody),
        (status = 403, description = "Not allowed to change this agent or field (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such agent (`not_found`)", body = ErrorBody),
    )
)]
pub async fn update_agent(
    State(app): State<App>,
    Path(id): Path<String>,
    me: AuthedAgent,
    ApiJson(req): ApiJson<AgentPatchRequest>,
) -> Result<axum::Json<AgentView>, ApiError> {
    let admin = me.agent.role == AgentRole::Admin;
    let id: AgentId = path_id(&id, "agent")?;
    let own = id == me.agent.id;
    if !admin {
        if !own {
            return Err(ApiError::forbidden(
                "agents may change only their own account",
            ));
        }
        if req.role.is_some() || req.site_ids.is_some() || req.disabled.is_some() {
            return Err(ApiError::forbidden(
                "only admins may change roles, sites or the disabled flag",
            ));
        }
    }
    if own && (req.disabled == Some(true) || req.role.is_some_and(|r| r != me.agent.role)) {
        return Err(ApiError::bad_request(
            "you cannot disable yourself or change your own role; ask another admin",
        ));
    }
    if app.store.agent(id).await?.is_none() {
        return Err(ApiError::not_found("agent"));
    }
    let name = req
        .name
        .as_deref()
        .map(|n| name_field(n, "name"))
        .transpose()?;
    if let Some(p) = &req.password {
        password_field(p)?;
    }
    let site_ids = match &req.site_ids {
        Some(ids) => Some(site_ids_field(&app, ids).await?),
        None => None,
    };
    let password_hash = match req.password {
        Some(password) => {
            if own {
                let current = req.current_password.ok_or_else(|| {
                    ApiError::bad_request("current_password is required to change your password")
                })?;
                let hash = match app.store.agent_login(&me.agent.email).await? {
                    Some((_, hash)) => hash,
                    None => return Err(ApiError::not_found("agent")),
                };
                let ok = password_work(move || auth::verify_password(&current, &hash)).await?;
                if !ok {
                    return Err(invalid_credentials());
                }
            }
            Some(hash_password(password).await?)
        }
        None => None,
    };
    let ends_sessions = password_hash.is_some() || req.disabled == Some(true);
    let agent = app
        .store
        .update_agent(
            id,
            AgentPatch {
                name,
                role: req.role,
                password_hash,
                site_ids,
                disabled: req.disabled,
            },
        )
        .await?
        .ok_or_else(|| ApiError::not_found("agent"))?;
    if ends_sessions {
        // The store deleted the sessions; close their live sockets on this node too.
        app.live_sessions.revoke_agent(agent.id);
    }
    Ok(axum::Json(AgentView::from(&agent)))
}

// ---------------------------------------------------------------------------------------------
// Conversations.

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConversationQuery {
    /// Only this site's conversations.
    pub site_id: Option<String>,
    /// `open` or `closed`.
    pub status: Option<String>,
    /// Only this visitor's conversations.
    pub visitor_id: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1 to 200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// A page of conversations, most recently updated first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationPage {
    #[schema(value_type = Vec<super::openapi::wire::ConversationView>)]
    pub conversations: Vec<ConversationView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

fn encode_cursor(c: &Conversation) -> String {
    B64.encode(format!("{}:{}", c.updated_at, c.id))
}

fn decode_cursor(raw: &str) -> Option<(i64, ConversationId)> {
    let bytes = B64.decode(raw.trim()).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let (ms, id) = text.split_once(':')?;
    Some((ms.parse().ok()?, id.parse().ok()?))
}

fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    Ok(limit)
}

/// A conversation the agent may see, or `not_found` (unknown, malformed and foreign look the
/// same).
pub(super) async fn visible_conversation(
    app: &App,
    me: &Agent,
    raw_id: &str,
) -> Result<Conversation, ApiError> {
    let id: ConversationId = path_id(raw_id, "conversation")?;
    match app.store.conversation(id).await? {
        Some(c) if me.can_access(c.site_id) => Ok(c),
        _ => Err(ApiError::not_found("conversation")),
    }
}

/// Conversations of the sites the agent can access, most recently updated first.
#[utoipa::path(
    get,
    path = "/api/conversations",
    tag = "conversations",
    security(("bearer" = []), ("cookie" = [])),
    params(ConversationQuery),
    responses(
        (status = 200, description = "A page of conversations", body = ConversationPage),
        (status = 400, description = "Bad status, visitor id, cursor or limit (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 404, description = "`site_id` names no site the agent can access (`not_found`)", body = ErrorBody),
    )
)]
pub async fn list_conversations(
    State(app): State<App>,
    me: AuthedAgent,
    ApiQuery(q): ApiQuery<ConversationQuery>,
) -> Result<axum::Json<ConversationPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            Status::parse(s)
                .ok_or_else(|| ApiError::bad_request("status must be open or closed"))?,
        ),
    };
    let visitor_id = match q.visitor_id.as_deref() {
        None | Some("") => None,
        Some(v) => Some(
            VisitorId::from_str(v)
                .map_err(|_| ApiError::bad_request("visitor_id is not a valid id"))?,
        ),
    };
    let before = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| ApiError::bad_request("invalid cursor"))?),
    };
    let admin = me.agent.role == AgentRole::Admin;
    let site_ids = match q.site_id.as_deref() {
        None | Some("") => (!admin).then(|| me.agent.site_ids.clone()),
        Some(raw) => {
            let site = visible_site(&app, &me.agent, raw).await?;
            Some(vec![site.id])
        }
    };
    let filter = ConversationFilter {
        site_ids,
        status,
        visitor_id,
        updated_since: None,
        before,
        limit: limit + 1,
    };
    let mut convs = app.store.list_conversations(&filter).await?;
    let more = convs.len() > limit as usize;
    convs.truncate(limit as usize);
    let next_cursor = if more {
        convs.last().map(encode_cursor)
    } else {
        None
    };
    Ok(axum::Json(ConversationPage {
        conversations: convs.iter().map(Conversation::view).collect(),
        next_cursor,
    }))
}

/// Longest search query, in bytes after trimming.
pub const MAX_SEARCH_BYTES: usize = 256;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// The words to find (all of them, whole words, any case); 1 to 256 bytes. Plain words:
    /// quotes and operators are not query syntax.
    pub q: Option<String>,
    /// Only this site's messages.
    pub site_id: Option<String>,
    /// 1 to 200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// Messages found by a search, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResults {
    #[schema(value_type = Vec<super::openapi::wire::MessageBody>)]
    pub messages: Vec<MessageBody>,
}

/// Full-text search over the messages of the sites the agent can access (admins: every site),
/// newest first.
#[utoipa::path(
    get,
    path = "/api/search",
    tag = "conversations",
    security(("bearer" = []), ("cookie" = [])),
    params(SearchQuery),
    responses(
        (status = 200, description = "The matching messages, newest first", body = SearchResults),
        (status = 400, description = "`query_empty`, `query_too_long`, or a bad limit (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 404, description = "`site_id` names no site the agent can access (`not_found`)", body = ErrorBody),
    )
)]
pub async fn search_messages(
    State(app): State<App>,
    me: AuthedAgent,
    ApiQuery(q): ApiQuery<SearchQuery>,
) -> Result<axum::Json<SearchResults>, ApiError> {
    let limit = page_limit(q.limit)?;
    let text = q.q.as_deref().unwrap_or("").trim();
    if text.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "query_empty",
            "q: say what to search for",
        ));
    }
    if text.len() > MAX_SEARCH_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "query_too_long",
            format!("q: at most {MAX_SEARCH_BYTES} bytes"),
        ));
    }
    // The same tenancy rule as the conversation list.
    let admin = me.agent.role == AgentRole::Admin;
    let site_ids = match q.site_id.as_deref() {
        None | Some("") => (!admin).then(|| me.agent.site_ids.clone()),
        Some(raw) => Some(vec![visible_site(&app, &me.agent, raw).await?.id]),
    };
    let found = app
        .store
        .search_messages(site_ids.as_deref(), text, limit)
        .await?;
    Ok(axum::Json(SearchResults {
        messages: found.iter().map(|m| m.body()).collect(),
    }))
}

/// One conversation.
#[utoipa::path(
    get,
    path = "/api/conversations/{id}",
    tag = "conversations",
    security(("bearer" = []), ("cookie" = [])),
    params(("id" = String, Path, description = "Conversation id")),
    responses(
        (status = 200, description = "The conversation", body = super::openapi::wire::ConversationView),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 404, description = "No such conversation, or of a site the agent cannot access (`not_found`)", body = ErrorBody),
    )
)]
pub async fn get_conversation(
    State(app): State<App>,
    Path(id): Path<String>,
    me: AuthedAgent,
) -> Result<axum::Json<ConversationView>, ApiError> {
    let conv = visible_conversation(&app, &me.agent, &id).await?;
    Ok(axum::Json(conv.view()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessageQuery {
    /// Messages with a seq above this, oldest first.
    pub after_seq: Option<u64>,
    /// The messages just below this seq.
    pub before_seq: Option<u64>,
    /// 1 to 200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// A page of messages, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    #[schema(value_type = Vec<super::openapi::wire::MessageBody>)]
    pub messages: Vec<MessageBody>,
    /// Whether more messages exist in the direction asked (older for `before_seq` and the
    /// default, newer for `after_seq`).
    pub has_more: bool,
}

/// Messages of a conversation, oldest first: the latest page by default, or those after
/// `after_seq`, or those before `before_seq`.
#[utoipa::path(
    get,
    path = "/api/conversations/{id}/messages",
    tag = "conversations",
    security(("bearer" = []), ("cookie" = [])),
    params(("id" = String, Path, description = "Conversation id"), MessageQuery),
    responses(
        (status = 200, description = "A page of messages", body = MessagePage),
        (status = 400, description = "Both cursors, or bad limit (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 404, description = "No such conversation, or of a site the agent cannot access (`not_found`)", body = ErrorBody),
    )
)]
pub async fn list_messages(
    State(app): State<App>,
    Path(id): Path<String>,
    me: AuthedAgent,
    ApiQuery(q): ApiQuery<MessageQuery>,
) -> Result<axum::Json<MessagePage>, ApiError> {
    let conv = visible_conversation(&app, &me.agent, &id).await?;
    let limit = page_limit(q.limit)?;
    let range = match (q.after_seq, q.before_seq) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give after_seq or before_seq, not both",
            ));
        }
        (Some(a), None) => SeqRange::After(a),
        (None, Some(b)) => SeqRange::Before(b),
        (None, None) => SeqRange::Latest,
    };
    let (messages, has_more) = app.store.messages(conv.id, range, limit).await?;
    Ok(axum::Json(MessagePage {
        messages: messages.iter().map(|m| m.body()).collect(),
        has_more,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PostMessageRequest {
    /// A UUID the client generates per message; resending it never creates a second message.
    pub client_id: String,
    /// 1 to 4096 bytes after trimming.
    pub text: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PostedMessage {
    #[schema(value_type = super::openapi::wire::MessageBody)]
    pub message: MessageBody,
    /// `true` when this `client_id` had been sent before: `message` is the one stored then.
    pub duplicate: bool,
}

/// Sends a message into a conversation as the agent.
///
/// The message is committed (group commit, like WebSocket sends) before the answer, and
/// delivered to the conversation's live connections.
#[utoipa::path(
    post,
    path = "/api/conversations/{id}/messages",
    tag = "conversations",
    security(("bearer" = []), ("cookie" = [])),
    params(("id" = String, Path, description = "Conversation id")),
    request_body = PostMessageRequest,
    responses(
        (status = 201, description = "Stored", body = PostedMessage),
        (status = 200, description = "Already stored under this `client_id` (`duplicate: true`)", body = PostedMessage),
        (status = 400, description = "`text_empty`, `text_too_long`, `invalid_client_id` or `bad_request`", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Cookie without the CSRF header (`csrf_failed`)", body = ErrorBody),
        (status = 404, description = "No such conversation, or of a site the agent cannot access (`not_found`)", body = ErrorBody),
        (status = 409, description = "The conversation is closed (`conversation_closed`)", body = ErrorBody),
        (status = 503, description = "`overloaded` or `unavailable`: retry with the same `client_id` after `Retry-After`", body = ErrorBody),
    )
)]
pub async fn post_message(
    State(app): State<App>,
    Path(id): Path<String>,
    me: AuthedAgent,
    ApiJson(req): ApiJson<PostMessageRequest>,
) -> Result<Response, ApiError> {
    let conv = visible_conversation(&app, &me.agent, &id).await?;
    let client_id = hark_protocol::parse_client_id(req.client_id.trim()).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidClientId.as_str(),
            "client_id must be a UUID",
        )
    })?;
    let text = text_field(&req.text)?;
    let (message, duplicate) =
        append_as_agent(&app, conv.id, &me.agent, text, ClientMsgId(client_id)).await?;
    let status = if duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let body = PostedMessage {
        message: message.body(),
        duplicate,
    };
    Ok((status, axum::Json(body)).into_response())
}

/// Appends an agent's message through the committer (the path WebSocket sends take) and maps
/// every outcome to the API's answer: the stored message, and whether it had been sent before.
pub(super) async fn append_as_agent(
    app: &App,
    conversation_id: ConversationId,
    agent: &Agent,
    text: MessageText,
    client_id: ClientMsgId,
) -> Result<(crate::domain::Message, bool), ApiError> {
    let msg = NewMessage {
        conversation_id,
        sender: Sender::Agent {
            id: agent.id,
            name: agent.name.clone(),
        },
        text: text.into_string(),
        client_id: Some(client_id),
    };
    match app.committer.append(msg).await {
        Err(Overloaded) => Err(ApiError::overloaded(1)),
        Ok(Outcome::Unavailable) => Err(ApiError::unavailable(1)),
        Ok(Outcome::Appended(Appended::Stored(m))) => Ok((m, false)),
        Ok(Outcome::Appended(Appended::Duplicate(m))) => Ok((m, true)),
        Ok(Outcome::Appended(Appended::NotFound)) => Err(ApiError::not_found("conversation")),
        Ok(Outcome::Appended(Appended::Closed)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::ConversationClosed.as_str(),
            "the conversation is closed; reopen it first",
        )),
    }
}

/// Message text, or the error that says what is wrong with it.
pub(super) fn text_field(raw: &str) -> Result<MessageText, ApiError> {
    MessageText::parse(raw).map_err(|e| match e {
        TextError::Empty => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::TextEmpty.as_str(),
            "text is empty",
        ),
        TextError::TooLong => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::TextTooLong.as_str(),
            format!(
                "text is longer than {} bytes",
                hark_protocol::MAX_TEXT_BYTES
            ),
        ),
    })
}

/// Sets a visible conversation's status and tells live connections. Setting the status it
/// already has changes nothing and publishes nothing.
async fn set_status(
    app: &App,
    me: &Agent,
    raw_id: &str,
    status: Status,
) -> Result<axum::Json<ConversationView>, ApiError> {
    let conv = visible_conversation(app, me, raw_id).await?;
    if conv.status == status {
        return Ok(axum::Json(conv.view()));
    }
    let conv = app
        .store
        .set_status(conv.id, status)
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => {
                ApiError::conflict("the visitor already has another open conversation")
            }
            other => other.into(),
        })?
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    let event = match status {
        Status::Open => ConversationEvent::Reopened,
        Status::Closed => ConversationEvent::Closed,
    };
    app.bus.publish(conversation_event(&conv, event));
    Ok(axum::Json(conv.view()))
}

/// Closes a conversation.
#[utoipa::path(
    post,
    path = "/api/conversations/{id}/close",
    tag = "conversations",
    security(("bearer" = []), ("cookie" = [])),
    params(("id" = String, Path, description = "Conversation id")),
    responses(
        (status = 200, description = "The closed conversation", body = super::openapi::wire::ConversationView),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Cookie without the CSRF header (`csrf_failed`)", body = ErrorBody),
        (status = 404, description = "No such conversation, or of a site the agent cannot access (`not_found`)", body = ErrorBody),
    )
)]
pub async fn close_conversation(
    State(app): State<App>,
    Path(id): Path<String>,
    me: AuthedAgent,
) -> Result<axum::Json<ConversationView>, ApiError> {
    set_status(&app, &me.agent, &id, Status::Closed).await
}

/// Reopens a closed conversation.
#[utoipa::path(
    post,
    path = "/api/conversations/{id}/reopen",
    tag = "conversations",
    security(("bearer" = []), ("cookie" = [])),
    params(("id" = String, Path, description = "Conversation id")),
    responses(
        (status = 200, description = "The reopened conversation", body = super::openapi::wire::ConversationView),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Cookie without the CSRF header (`csrf_failed`)", body = ErrorBody),
        (status = 404, description = "No such conversation, or of a site the agent cannot access (`not_found`)", body = ErrorBody),
        (status = 409, description = "The visitor already has another open conversation (`conflict`)", body = ErrorBody),
    )
)]
pub async fn reopen_conversation(
    State(app): State<App>,
    Path(id): Path<String>,
    me: AuthedAgent,
) -> Result<axum::Json<ConversationView>, ApiError> {
    set_status(&app, &me.agent, &id, Status::Open).await
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct AssignRequest {
    /// The agent to assign, or `null` to unassign.
    pub agent_id: Option<String>,
}

/// Assigns a conversation to an agent of its site, or unassigns it.
#[utoipa::path(
    post,
    path = "/api/conversations/{id}/assign",
    tag = "conversations",
    security(("bearer" = []), ("cookie" = [])),
    params(("id" = String, Path, description = "Conversation id")),
    request_body = AssignRequest,
    responses(
        (status = 200, description = "The conversation", body = super::openapi::wire::ConversationView),
        (status = 400, description = "The agent does not exist or cannot access the site (`bad_request`)", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Cookie without the CSRF header (`csrf_failed`)", body = ErrorBody),
        (status = 404, description = "No such conversation, or of a site the agent cannot access (`not_found`)", body = ErrorBody),
    )
)]
pub async fn assign_conversation(
    State(app): State<App>,
    Path(id): Path<String>,
    me: AuthedAgent,
    ApiJson(req): ApiJson<AssignRequest>,
) -> Result<axum::Json<ConversationView>, ApiError> {
    let conv = visible_conversation(&app, &me.agent, &id).await?;
    let assignee = match req.agent_id.as_deref() {
        None => None,
        Some(raw) => {
            let unknown =
                || ApiError::bad_request("agent_id names no agent that can access this site");
            let aid: AgentId = raw.parse().map_err(|_| unknown())?;
            match app.store.agent(aid).await? {
                Some(a) if a.can_access(conv.site_id) => Some(a.id),
                _ => return Err(unknown()),
            }
        }
    };
    let conv = app
        .store
        .assign(conv.id, assignee)
        .await?
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    app.bus
        .publish(conversation_event(&conv, ConversationEvent::Assigned));
    Ok(axum::Json(conv.view()))
}

// ---------------------------------------------------------------------------------------------
// The OpenAPI document.

/// This API as an OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> Response {
    static DOC: OnceLock<String> = OnceLock::new();
    let doc = DOC.get_or_init(|| {
        use utoipa::OpenApi;
        super::openapi::ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|_| "{}".to_owned())
    });
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let c = Conversation {
            id: ConversationId::new(),
            site_id: SiteId::new(),
            visitor_id: VisitorId::new(),
            status: Status::Open,
            assignee_id: None,
            last_seq: 0,
            first_seq: 1,
            created_at: 1,
            updated_at: 1_700_000_000_123,
        };
        assert_eq!(
            decode_cursor(&encode_cursor(&c)),
            Some((c.updated_at, c.id))
        );
        for junk in ["", "!!!", "bm9jb2xvbg", "MTIzOm5vdC1hLXV1aWQ"] {
            assert_eq!(decode_cursor(junk), None, "{junk}");
        }
    }

    #[test]
    fn snippet_escapes_attribute_values() {
        assert_eq!(
            html_attr(r#"http://x"><b>&"#),
            "http://x&quot;&gt;&lt;b&gt;&amp;"
        );
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(name_field("  Shop ", "name").ok(), Some("Shop".to_owned()));
        assert!(name_field("   ", "name").is_err());
        assert!(name_field(&"é".repeat(200), "name").is_ok());
        assert!(name_field(&"é".repeat(201), "name").is_err());
    }
}
