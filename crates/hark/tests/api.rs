//! The REST API against a real node over real sockets: sessions (cookie + CSRF, bearer),
//! admin-only operations, tenant isolation, pagination, idempotent sends, error shapes and the
//! OpenAPI document.

mod common;

use std::collections::BTreeSet;

use common::TestServer;
use hark::domain::{Conversation, SiteId, Visitor};
use hark_protocol::{ConversationEvent, ServerFrame};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ADMIN_EMAIL: &str = "admin@example.com";
const ADMIN_PASSWORD: &str = "admin password 1";

/// A REST client for one server.
struct Api {
    base: String,
    http: reqwest::Client,
}

struct Reply {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Api {
    /// A client that sends only what each call gives it (no cookie jar).
    fn new(server: &TestServer) -> Api {
        Api {
            base: server.base_url(),
            http: reqwest::Client::new(),
        }
    }

    /// A client that keeps cookies, like a browser.
    fn with_cookies(server: &TestServer) -> Api {
        Api {
            base: server.base_url(),
            http: reqwest::Client::builder()
                .cookie_store(true)
                .build()
                .unwrap(),
        }
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    async fn send(rb: reqwest::RequestBuilder) -> Reply {
        let resp = rb.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("non-JSON body ({status}): {e}: {bytes:?}"))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A request with a bearer token (or none) and an optional JSON body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut rb = self.req(method, path);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        Api::send(rb).await
    }

    async fn get(&self, path: &str, token: &str) -> Reply {
        self.call(Method::GET, path, Some(token), None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    async fn patch(&self, path: &str, token: &str, body: Value) -> Reply {
        self.call(Method::PATCH, path, Some(token), Some(body))
            .await
    }

    async fn login(&self, email: &str, password: &str) -> Reply {
        self.call(
            Method::POST,
            "/api/login",
            None,
            Some(json!({"email": email, "password": password})),
        )
        .await
    }

    /// Logs in and returns the bearer token.
    async fn token(&self, email: &str, password: &str) -> String {
        let r = self.login(email, password).await;
        assert_eq!(r.status, StatusCode::OK, "login {email}: {}", r.body);
        r.body["token"].as_str().unwrap().to_owned()
    }

    async fn create_site(&self, admin: &str, name: &str) -> Value {
        let r = self
            .post(
                "/api/sites",
                admin,
                json!({"name": name, "allowed_origins": ["https://shop.example.com"]}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        r.body
    }

    async fn create_agent(
        &self,
        admin: &str,
        email: &str,
        password: &str,
        sites: &[&str],
    ) -> Value {
        let r = self
            .post(
                "/api/agents",
                admin,
                json!({"email": email, "name": "Agent", "password": password, "role": "agent", "site_ids": sites}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        r.body
    }
}

async fn start() -> (TestServer, Api, String) {
    let server = TestServer::start().await;
    server.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let api = Api::new(&server);
    let admin = api.token(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    (server, api, admin)
}

fn site_id(site: &Value) -> SiteId {
    site["id"].as_str().unwrap().parse().unwrap()
}

async fn conversation(server: &TestServer, site: SiteId) -> (Visitor, Conversation) {
    let visitor = server.store.create_visitor(site).await.unwrap();
    let (conv, opened) = server
        .store
        .open_conversation(site, visitor.id)
        .await
        .unwrap();
    assert!(opened);
    (visitor, conv)
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn login_answers_alike_for_wrong_password_unknown_email_and_disabled_agent() {
    let server = TestServer::start().await;
    server.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let api = Api::new(&server);

    let ok = api.login(" Admin@Example.com ", ADMIN_PASSWORD).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    let token = ok.body["token"].as_str().unwrap();
    assert!(token.len() >= 32);
    assert!(ok.body["csrf_token"].as_str().unwrap().len() >= 16);
    assert_eq!(ok.body["agent"]["email"], ADMIN_EMAIL);
    assert_eq!(ok.body["agent"]["role"], "admin");
    assert!(
        !ok.body.to_string().contains("argon2"),
        "the hash leaked: {}",
        ok.body
    );
    let cookie = ok.headers["set-cookie"].to_str().unwrap();
    assert!(
        cookie.starts_with(&format!("hark_session={token};")),
        "{cookie}"
    );
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=2592000"] {
        assert!(cookie.contains(part), "{part} missing in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "{cookie}");

    let https = Api::send(
        api.req(Method::POST, "/api/login")
            .header("x-forwarded-proto", "https")
            .json(&json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})),
    )
    .await;
    assert_eq!(https.status, StatusCode::OK);
    assert!(https.headers["set-cookie"]
        .to_str()
        .unwrap()
        .ends_with("; Secure"));

    let wrong = api.login(ADMIN_EMAIL, "not the password").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.code(), "invalid_credentials");
    assert!(wrong.headers.get("set-cookie").is_none());
    let unknown = api.login("nobody@example.com", ADMIN_PASSWORD).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        unknown.body, wrong.body,
        "unknown email and wrong password must look alike"
    );
    let garbage = api.login("not an email", ADMIN_PASSWORD).await;
    assert_eq!(
        (garbage.status, &garbage.body),
        (StatusCode::UNAUTHORIZED, &wrong.body)
    );

    // A disabled agent cannot log in, and its existing sessions stop working.
    let admin = token.to_owned();
    let agent = api
        .create_agent(&admin, "ada@example.com", "ada password", &[])
        .await;
    let ada = api.token("ada@example.com", "ada password").await;
    assert_eq!(api.get("/api/me", &ada).await.status, StatusCode::OK);
    let r = api
        .patch(
            &format!("/api/agents/{}", agent["id"].as_str().unwrap()),
            &admin,
            json!({"disabled": true}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["disabled"], true);
    let refused = api.login("ada@example.com", "ada password").await;
    assert_eq!(
        (refused.status, &refused.body),
        (StatusCode::UNAUTHORIZED, &wrong.body)
    );
    assert_eq!(api.get("/api/me", &ada).await.code(), "unauthenticated");
    server.shutdown().await;
}

#[tokio::test]
async fn cookie_sessions_need_the_csrf_header_to_change_anything() {
    let server = TestServer::start().await;
    server.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let api = Api::with_cookies(&server);
    let login = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let csrf = login.body["csrf_token"].as_str().unwrap().to_owned();
    let token = login.body["token"].as_str().unwrap().to_owned();

    // Reads work with the cookie alone.
    let me = Api::send(api.req(Method::GET, "/api/me")).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert_eq!(me.body["email"], ADMIN_EMAIL);

    let site = json!({"name": "Shop", "allowed_origins": []});
    let without = Api::send(api.req(Method::POST, "/api/sites").json(&site)).await;
    assert_eq!(without.status, StatusCode::FORBIDDEN);
    assert_eq!(without.code(), "csrf_failed");
    let wrong = Api::send(
        api.req(Method::POST, "/api/sites")
            .header("x-csrf-token", "nope")
            .json(&site),
    )
    .await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::FORBIDDEN, "csrf_failed")
    );
    let with = Api::send(
        api.req(Method::POST, "/api/sites")
            .header("x-csrf-token", &csrf)
            .json(&site),
    )
    .await;
    assert_eq!(with.status, StatusCode::CREATED, "{}", with.body);
    // Nothing was created by the refused attempts.
    assert_eq!(
        api.get("/api/sites", &token)
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Logout needs the header too, then clears the cookie and ends the session.
    let refused = Api::send(api.req(Method::POST, "/api/logout")).await;
    assert_eq!(refused.code(), "csrf_failed");
    let out = Api::send(
        api.req(Method::POST, "/api/logout")
            .header("x-csrf-token", &csrf),
    )
    .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    let cleared = out.headers["set-cookie"].to_str().unwrap();
    assert!(
        cleared.starts_with("hark_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    let after = Api::send(api.req(Method::GET, "/api/me")).await;
    assert_eq!(
        (after.status, after.code()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    assert_eq!(
        api.get("/api/me", &token).await.status,
        StatusCode::UNAUTHORIZED
    );
    server.shutdown().await;
}

#[tokio::test]
async fn bearer_tokens_authenticate_without_csrf() {
    let (server, api, admin) = start().await;
    let none = api.call(Method::GET, "/api/me", None, None).await;
    assert_eq!(
        (none.status, none.code()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    let bogus = api.get("/api/me", "not-a-real-token").await;
    assert_eq!(
        (bogus.status, bogus.code()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );

    let me = api.get("/api/me", &admin).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(
        me.body
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>(),
        [
            "created_at",
            "disabled",
            "email",
            "id",
            "name",
            "role",
            "site_ids"
        ]
        .map(String::from)
        .into(),
    );
    let created = api
        .post(
            "/api/sites",
            &admin,
            json!({"name": "Shop", "allowed_origins": []}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let out = api
        .call(Method::POST, "/api/logout", Some(&admin), None)
        .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    assert_eq!(
        api.get("/api/me", &admin).await.status,
        StatusCode::UNAUTHORIZED
    );
    server.shutdown().await;
}

#[tokio::test]
async fn agents_are_refused_admin_operations() {
    let (server, api, admin) = start().await;
    let site = api.create_site(&admin, "Shop").await;
    let sid = site["id"].as_str().unwrap();
    let ada = api
        .create_agent(&admin, "ada@example.com", "ada password", &[sid])
        .await;
    let agent = api.token("ada@example.com", "ada password").await;

    let attempts = [
        api.get("/api/agents", &agent).await,
        api.post("/api/agents", &agent, json!({"email": "x@example.com", "name": "X", "password": "password!", "role": "admin", "site_ids": []})).await,
        api.post("/api/sites", &agent, json!({"name": "Mine", "allowed_origins": []})).await,
        api.patch(&format!("/api/sites/{sid}"), &agent, json!({"name": "Renamed"})).await,
        api.patch(&format!("/api/agents/{}", ada["id"].as_str().unwrap()), &agent, json!({"role": "admin"})).await,
    ];
    for r in &attempts {
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{}",
            r.body
        );
    }
    // Nothing changed.
    let sites = api.get("/api/sites", &admin).await.body;
    assert_eq!(sites.as_array().unwrap().len(), 1);
    assert_eq!(sites[0]["name"], "Shop");
    assert_eq!(
        api.get("/api/agents", &admin)
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(api.get("/api/me", &agent).await.body["role"], "agent");

    // The agent sees its site, without the identity secret; the admin sees the secret.
    let mine = api.get("/api/sites", &agent).await.body;
    assert_eq!(mine.as_array().unwrap().len(), 1);
    assert_eq!(mine[0]["id"], sid);
    assert!(mine[0].get("identity_secret").is_none(), "{mine}");
    let one = api.get(&format!("/api/sites/{sid}"), &agent).await;
    assert_eq!(one.status, StatusCode::OK);
    assert!(one.body.get("identity_secret").is_none());
    let as_admin = api.get(&format!("/api/sites/{sid}"), &admin).await;
    assert!(as_admin.body["identity_secret"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    server.shutdown().await;
}

#[tokio::test]
async fn sites_are_created_validated_and_patched() {
    let (server, api, admin) = start().await;
    let bad = api
        .post(
            "/api/sites",
            &admin,
            json!({"name": "Shop", "allowed_origins": ["https://ok.example", "ftp://bad.example"]}),
        )
        .await;
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    assert!(
        bad.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ftp://bad.example"),
        "{}",
        bad.body
    );
    let unnamed = api
        .post(
            "/api/sites",
            &admin,
            json!({"name": "   ", "allowed_origins": []}),
        )
        .await;
    assert_eq!(
        (unnamed.status, unnamed.code()),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    let long = api
        .post(
            "/api/sites",
            &admin,
            json!({"name": "x".repeat(201), "allowed_origins": []}),
        )
        .await;
    assert_eq!(long.status, StatusCode::BAD_REQUEST);

    let r = api
        .post(
            "/api/sites",
            &admin,
            json!({"name": "  Shop  ", "allowed_origins": ["HTTPS://Shop.Example.com"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let site = r.body;
    let key = site["site_key"].as_str().unwrap();
    assert!(key.starts_with("hk_"));
    assert_eq!(site["name"], "Shop");
    assert_eq!(site["allowed_origins"], json!(["https://shop.example.com"]));
    assert_eq!(site["widget_settings"], json!({}));
    assert_eq!(
        site["snippet"],
        format!(
            r#"<script async src="{}/widget.js" data-site-key="{key}"></script>"#,
            server.base_url()
        )
    );
    let sid = site["id"].as_str().unwrap();

    let patched = api
        .patch(
            &format!("/api/sites/{sid}"),
            &admin,
            json!({"name": "Shop 2", "widget_settings": {"color": "#336699"}, "allowed_origins": ["http://localhost:3000"]}),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    assert_eq!(patched.body["name"], "Shop 2");
    assert_eq!(patched.body["widget_settings"]["color"], "#336699");
    assert_eq!(
        patched.body["allowed_origins"],
        json!(["http://localhost:3000"])
    );
    assert_eq!(patched.body["site_key"], key, "the key survives edits");
    let again = api.get(&format!("/api/sites/{sid}"), &admin).await.body;
    assert_eq!(again["name"], "Shop 2");
    let not_object = api
        .patch(
            &format!("/api/sites/{sid}"),
            &admin,
            json!({"widget_settings": [1]}),
        )
        .await;
    assert_eq!(not_object.status, StatusCode::BAD_REQUEST);
    let bad_origin = api
        .patch(
            &format!("/api/sites/{sid}"),
            &admin,
            json!({"allowed_origins": ["nope"]}),
        )
        .await;
    assert_eq!(bad_origin.status, StatusCode::BAD_REQUEST);

    for missing in [uuid(), "not-an-id".to_owned()] {
        let r = api.get(&format!("/api/sites/{missing}"), &admin).await;
        assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
        let r = api
            .patch(
                &format!("/api/sites/{missing}"),
                &admin,
                json!({"name": "x"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }

    // A configured public URL wins over the Host header in the snippet.
    let proxied =
        TestServer::start_with(|c| c.public_url = Some("https://chat.example.com/".into())).await;
    proxied.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let papi = Api::new(&proxied);
    let ptoken = papi.token(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let psite = papi.create_site(&ptoken, "Proxied").await;
    assert!(
        psite["snippet"]
            .as_str()
            .unwrap()
            .starts_with(r#"<script async src="https://chat.example.com/widget.js""#),
        "{}",
        psite["snippet"]
    );
    proxied.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn agents_are_created_validated_and_edit_themselves() {
    let (server, api, admin) = start().await;
    let site = api.create_site(&admin, "Shop").await;
    let sid = site["id"].as_str().unwrap();

    let body = |email: &str, password: &str, role: &str, sites: Vec<String>| json!({"email": email, "name": "Ada", "password": password, "role": role, "site_ids": sites});
    let created = api
        .post(
            "/api/agents",
            &admin,
            body(
                " Ada@Example.com",
                "ada password",
                "agent",
                vec![sid.to_owned()],
            ),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let ada = created.body;
    assert_eq!(ada["email"], "ada@example.com");
    assert_eq!(ada["role"], "agent");
    assert_eq!(ada["site_ids"], json!([sid]));
    assert_eq!(ada["disabled"], false);
    assert!(ada.get("password_hash").is_none());

    let cases = [
        (
            body("ada@example.com", "other password", "agent", vec![]),
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            body("bob@example.com", "short", "agent", vec![]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            body("bob@example.com", "bob password", "agent", vec![uuid()]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            body(
                "bob@example.com",
                "bob password",
                "agent",
                vec!["junk".into()],
            ),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            body("bob@example.com", "bob password", "owner", vec![]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            body("bob", "bob password", "agent", vec![]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (b, status, code) in cases {
        let r = api.post("/api/agents", &admin, b.clone()).await;
        assert_eq!((r.status, r.code()), (status, code), "{b} → {}", r.body);
    }
    let all = api.get("/api/agents", &admin).await.body;
    let emails: BTreeSet<_> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["email"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        emails,
        [ADMIN_EMAIL, "ada@example.com"].map(String::from).into()
    );

    // Self-service: name and password (with the current one), nothing else.
    let ada_id = ada["id"].as_str().unwrap();
    let me = format!("/api/agents/{ada_id}");
    let token = api.token("ada@example.com", "ada password").await;
    let renamed = api.patch(&me, &token, json!({"name": " Ada L. "})).await;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.body);
    assert_eq!(renamed.body["name"], "Ada L.");
    let no_current = api
        .patch(&me, &token, json!({"password": "new password"}))
        .await;
    assert_eq!(no_current.status, StatusCode::BAD_REQUEST);
    let wrong_current = api
        .patch(
            &me,
            &token,
            json!({"password": "new password", "current_password": "guess"}),
        )
        .await;
    assert_eq!(
        (wrong_current.status, wrong_current.code()),
        (StatusCode::UNAUTHORIZED, "invalid_credentials")
    );
    let too_short = api
        .patch(
            &me,
            &token,
            json!({"password": "short", "current_password": "ada password"}),
        )
        .await;
    assert_eq!(too_short.status, StatusCode::BAD_REQUEST);
    let changed = api
        .patch(
            &me,
            &token,
            json!({"password": "new password", "current_password": "ada password"}),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    assert_eq!(
        api.login("ada@example.com", "ada password").await.status,
        StatusCode::UNAUTHORIZED
    );
    // A new password ends every session of the agent, this one included.
    assert_eq!(api.get("/api/me", &token).await.code(), "unauthenticated");
    let token = api.token("ada@example.com", "new password").await;
    let sites = api.patch(&me, &token, json!({"site_ids": []})).await;
    assert_eq!(sites.status, StatusCode::FORBIDDEN);
    let admin_id = api.get("/api/me", &admin).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = api
        .patch(
            &format!("/api/agents/{admin_id}"),
            &token,
            json!({"name": "Pwned"}),
        )
        .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    assert_eq!(api.get("/api/me", &admin).await.body["name"], "Admin");

    // Admins change anyone, without the current password, but cannot lock themselves out.
    let promoted = api
        .patch(
            &me,
            &admin,
            json!({"role": "admin", "site_ids": [], "password": "third password"}),
        )
        .await;
    assert_eq!(promoted.status, StatusCode::OK, "{}", promoted.body);
    assert_eq!(
        (
            promoted.body["role"].as_str(),
            promoted.body["site_ids"].clone()
        ),
        (Some("admin"), json!([]))
    );
    assert_eq!(
        api.login("ada@example.com", "third password").await.status,
        StatusCode::OK
    );
    let self_disable = api
        .patch(
            &format!("/api/agents/{admin_id}"),
            &admin,
            json!({"disabled": true}),
        )
        .await;
    assert_eq!(self_disable.status, StatusCode::BAD_REQUEST);
    let unknown = api
        .patch(
            &format!("/api/agents/{}", uuid()),
            &admin,
            json!({"name": "x"}),
        )
        .await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn agents_see_nothing_of_other_sites() {
    let (server, api, admin) = start().await;
    let a = api.create_site(&admin, "A").await;
    let b = api.create_site(&admin, "B").await;
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let (_, conv_a) = conversation(&server, site_id(&a)).await;
    let (_, conv_b) = conversation(&server, site_id(&b)).await;
    let ada = api
        .create_agent(&admin, "ada@example.com", "ada password", &[a_id])
        .await;
    let agent = api.token("ada@example.com", "ada password").await;

    let list = api.get("/api/conversations", &agent).await;
    assert_eq!(list.status, StatusCode::OK);
    let ids: Vec<_> = list.body["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!(conv_a.id.to_string())]);
    let all = api.get("/api/conversations", &admin).await.body;
    assert_eq!(all["conversations"].as_array().unwrap().len(), 2);

    // Foreign, unknown and malformed ids all get the very same answer.
    let not_found = api
        .get(&format!("/api/conversations/{}", uuid()), &agent)
        .await;
    assert_eq!(
        (not_found.status, not_found.code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let b_conv = format!("/api/conversations/{}", conv_b.id);
    let probes = [
        api.get(&b_conv, &agent).await,
        api.get("/api/conversations/not-a-uuid", &agent).await,
        api.get(&format!("{b_conv}/messages"), &agent).await,
        api.post(
            &format!("{b_conv}/messages"),
            &agent,
            json!({"client_id": uuid(), "text": "hi"}),
        )
        .await,
        api.call(Method::POST, &format!("{b_conv}/close"), Some(&agent), None)
            .await,
        api.post(
            &format!("{b_conv}/assign"),
            &agent,
            json!({"agent_id": null}),
        )
        .await,
    ];
    for p in &probes {
        assert_eq!(
            (p.status, &p.body),
            (StatusCode::NOT_FOUND, &not_found.body)
        );
    }
    let site_probe = api.get(&format!("/api/sites/{b_id}"), &agent).await;
    let no_site = api.get(&format!("/api/sites/{}", uuid()), &agent).await;
    assert_eq!(
        (site_probe.status, &site_probe.body),
        (StatusCode::NOT_FOUND, &no_site.body)
    );
    let filtered = api
        .get(&format!("/api/conversations?site_id={b_id}"), &agent)
        .await;
    assert_eq!(
        (filtered.status, filtered.code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let sites = api.get("/api/sites", &agent).await.body;
    assert_eq!(
        sites
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].clone())
            .collect::<Vec<_>>(),
        vec![json!(a_id)]
    );
    // Nothing happened to B's conversation.
    let untouched = api.get(&b_conv, &admin).await.body;
    assert_eq!(
        (untouched["status"].as_str(), untouched["last_seq"].as_u64()),
        (Some("open"), Some(0))
    );

    let own = api
        .get(&format!("/api/conversations?site_id={a_id}"), &agent)
        .await
        .body;
    assert_eq!(own["conversations"][0]["id"], conv_a.id.to_string());
    assert_eq!(
        api.get(&format!("/api/conversations/{}", conv_a.id), &agent)
            .await
            .status,
        StatusCode::OK
    );

    // Assignment only to agents who can access the conversation's site.
    let ada_id = ada["id"].as_str().unwrap();
    let assigned = api
        .post(
            &format!("/api/conversations/{}/assign", conv_a.id),
            &admin,
            json!({"agent_id": ada_id}),
        )
        .await;
    assert_eq!(assigned.status, StatusCode::OK, "{}", assigned.body);
    assert_eq!(assigned.body["assignee_id"], ada_id);
    let wrong_site = api
        .post(
            &format!("{b_conv}/assign"),
            &admin,
            json!({"agent_id": ada_id}),
        )
        .await;
    assert_eq!(
        (wrong_site.status, wrong_site.code()),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    let nobody = api
        .post(
            &format!("{b_conv}/assign"),
            &admin,
            json!({"agent_id": uuid()}),
        )
        .await;
    assert_eq!(nobody.status, StatusCode::BAD_REQUEST);
    let unassigned = api
        .post(
            &format!("/api/conversations/{}/assign", conv_a.id),
            &agent,
            json!({"agent_id": null}),
        )
        .await;
    assert_eq!(unassigned.status, StatusCode::OK);
    assert_eq!(unassigned.body["assignee_id"], Value::Null);
    server.shutdown().await;
}

#[tokio::test]
async fn search_finds_messages_of_visible_sites_only() {
    let (server, api, admin) = start().await;
    let a = api.create_site(&admin, "A").await;
    let b = api.create_site(&admin, "B").await;
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let (va, conv_a) = conversation(&server, site_id(&a)).await;
    let (vb, conv_b) = conversation(&server, site_id(&b)).await;
    api.create_agent(&admin, "ada@example.com", "ada password", &[a_id])
        .await;
    let agent = api.token("ada@example.com", "ada password").await;
    let send =
        |conv: hark::domain::ConversationId, visitor: hark::domain::VisitorId, text: &str| {
            hark::store::NewMessage {
                conversation_id: conv,
                sender: hark::domain::Sender::Visitor(visitor),
                text: text.into(),
                client_id: None,
            }
        };
    // Two commits, so B's message is strictly the newer one.
    server
        .store
        .append_batch(&[
            send(conv_a.id, va.id, "Refund for order 17"),
            send(conv_a.id, va.id, "unrelated"),
        ])
        .await
        .unwrap();
    let first = hark::domain::now_ms();
    while hark::domain::now_ms() <= first {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    server
        .store
        .append_batch(&[send(conv_b.id, vb.id, "An ORDER on site B")])
        .await
        .unwrap();

    let texts = |r: &Reply| -> Vec<String> {
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_owned())
            .collect()
    };
    // An agent finds only its sites' messages; an admin every site's, newest first.
    let mine = api.get("/api/search?q=order", &agent).await;
    assert_eq!(texts(&mine), vec!["Refund for order 17"]);
    let hit = &mine.body["messages"][0];
    assert_eq!(hit["conversation_id"], conv_a.id.to_string());
    assert_eq!(hit["seq"], 1);
    assert_eq!(hit["author"]["kind"], "visitor");
    assert_eq!(
        texts(&api.get("/api/search?q=order", &admin).await),
        vec!["An ORDER on site B", "Refund for order 17"]
    );
    assert_eq!(
        texts(&api.get("/api/search?q=ORDER%20refund", &admin).await),
        vec!["Refund for order 17"],
        "every word must match"
    );
    assert_eq!(
        texts(
            &api.get(&format!("/api/search?q=order&site_id={b_id}"), &admin)
                .await
        ),
        vec!["An ORDER on site B"]
    );
    assert_eq!(
        texts(&api.get("/api/search?q=order&limit=1", &admin).await),
        vec!["An ORDER on site B"]
    );
    assert!(texts(&api.get("/api/search?q=%22%20OR%20*", &admin).await).is_empty());

    // Another site's filter answers like an unknown site.
    let foreign = api
        .get(&format!("/api/search?q=order&site_id={b_id}"), &agent)
        .await;
    let unknown = api
        .get(&format!("/api/search?q=order&site_id={}", uuid()), &agent)
        .await;
    assert_eq!(
        (foreign.status, &foreign.body),
        (StatusCode::NOT_FOUND, &unknown.body)
    );

    // Bad queries: stable codes.
    let long = "a".repeat(257);
    for (path, status, code) in [
        (
            "/api/search".to_owned(),
            StatusCode::BAD_REQUEST,
            "query_empty",
        ),
        (
            "/api/search?q=".to_owned(),
            StatusCode::BAD_REQUEST,
            "query_empty",
        ),
        (
            "/api/search?q=%20%20".to_owned(),
            StatusCode::BAD_REQUEST,
            "query_empty",
        ),
        (
            format!("/api/search?q={long}"),
            StatusCode::BAD_REQUEST,
            "query_too_long",
        ),
        (
            "/api/search?q=order&limit=0".to_owned(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/api/search?q=order&limit=201".to_owned(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ] {
        let r = api.get(&path, &agent).await;
        assert_eq!((r.status, r.code()), (status, code), "{path}: {}", r.body);
    }
    let longest = api
        .get(&format!("/api/search?q={}", "a".repeat(256)), &agent)
        .await;
    assert_eq!(longest.status, StatusCode::OK, "256 bytes is allowed");
    let anonymous = api
        .call(Method::GET, "/api/search?q=order", None, None)
        .await;
    assert_eq!(
        (anonymous.status, anonymous.code()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn conversations_page_with_an_opaque_cursor() {
    let (server, api, admin) = start().await;
    let site = api.create_site(&admin, "Shop").await;
    let mut created = BTreeSet::new();
    let mut visitors = Vec::new();
    for _ in 0..7 {
        let (v, c) = conversation(&server, site_id(&site)).await;
        created.insert(c.id.to_string());
        visitors.push((v, c));
    }

    let mut seen = Vec::new();
    let mut path = "/api/conversations?limit=3".to_owned();
    let mut pages = 0;
    loop {
        let r = api.get(&path, &admin).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        pages += 1;
        let page = r.body["conversations"].as_array().unwrap().clone();
        assert!(page.len() <= 3);
        seen.extend(page);
        match r.body["next_cursor"].as_str() {
            Some(c) => path = format!("/api/conversations?limit=3&cursor={c}"),
            None => break,
        }
        assert!(pages < 10, "cursor does not advance");
    }
    assert_eq!(pages, 3);
    let ids: Vec<String> = seen
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        created,
        "every conversation once"
    );
    assert_eq!(ids.len(), 7);
    let keys: Vec<(i64, String)> = seen
        .iter()
        .map(|c| {
            (
                c["updated_at"].as_i64().unwrap(),
                c["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(keys, sorted, "most recently updated first");

    // Filters.
    for (_, c) in &visitors[..2] {
        let r = api
            .call(
                Method::POST,
                &format!("/api/conversations/{}/close", c.id),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let closed = api
        .get("/api/conversations?status=closed", &admin)
        .await
        .body;
    let closed_ids: BTreeSet<_> = closed["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        closed_ids,
        visitors[..2]
            .iter()
            .map(|(_, c)| c.id.to_string())
            .collect()
    );
    let open = api
        .get("/api/conversations?status=open&limit=200", &admin)
        .await
        .body;
    assert_eq!(open["conversations"].as_array().unwrap().len(), 5);
    assert_eq!(open["next_cursor"], Value::Null);
    let (v, c) = &visitors[4];
    let by_visitor = api
        .get(&format!("/api/conversations?visitor_id={}", v.id), &admin)
        .await
        .body;
    assert_eq!(by_visitor["conversations"].as_array().unwrap().len(), 1);
    assert_eq!(by_visitor["conversations"][0]["id"], c.id.to_string());

    for bad in [
        "cursor=garbage!",
        "cursor=MTIzOnh5eg",
        "limit=0",
        "limit=201",
        "limit=abc",
        "status=pending",
        "visitor_id=nope",
    ] {
        let r = api.get(&format!("/api/conversations?{bad}"), &admin).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{bad}: {}",
            r.body
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn messages_page_after_and_before_a_seq() {
    let (server, api, admin) = start().await;
    let site = api.create_site(&admin, "Shop").await;
    let (_, conv) = conversation(&server, site_id(&site)).await;
    let base = format!("/api/conversations/{}/messages", conv.id);
    for i in 1..=12u64 {
        let r = api
            .post(
                &base,
                &admin,
                json!({"client_id": uuid(), "text": format!("message {i}")}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(r.body["message"]["seq"], i);
    }
    let seqs = |r: &Reply| -> (Vec<u64>, bool) {
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        (
            r.body["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["seq"].as_u64().unwrap())
                .collect(),
            r.body["has_more"].as_bool().unwrap(),
        )
    };
    let all = api.get(&base, &admin).await;
    assert_eq!(seqs(&all), ((1..=12).collect(), false));
    assert_eq!(all.body["messages"][0]["text"], "message 1");
    assert_eq!(
        seqs(&api.get(&format!("{base}?limit=5"), &admin).await),
        ((8..=12).collect(), true)
    );
    assert_eq!(
        seqs(
            &api.get(&format!("{base}?before_seq=8&limit=5"), &admin)
                .await
        ),
        ((3..=7).collect(), true)
    );
    assert_eq!(
        seqs(
            &api.get(&format!("{base}?before_seq=3&limit=5"), &admin)
                .await
        ),
        (vec![1, 2], false)
    );
    assert_eq!(
        seqs(
            &api.get(&format!("{base}?after_seq=0&limit=5"), &admin)
                .await
        ),
        ((1..=5).collect(), true)
    );
    assert_eq!(
        seqs(
            &api.get(&format!("{base}?after_seq=10&limit=5"), &admin)
                .await
        ),
        (vec![11, 12], false)
    );
    assert_eq!(
        seqs(&api.get(&format!("{base}?after_seq=12"), &admin).await),
        (vec![], false)
    );
    let conv_view = api
        .get(&format!("/api/conversations/{}", conv.id), &admin)
        .await
        .body;
    assert_eq!(conv_view["last_seq"], 12);

    for bad in [
        "after_seq=1&before_seq=5",
        "limit=0",
        "limit=201",
        "after_seq=-1",
    ] {
        let r = api.get(&format!("{base}?{bad}"), &admin).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{bad}: {}",
            r.body
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_resent_client_id_stores_one_message() {
    let (server, api, admin) = start().await;
    let site = api.create_site(&admin, "Shop").await;
    let (_, conv) = conversation(&server, site_id(&site)).await;
    let path = format!("/api/conversations/{}/messages", conv.id);
    let client_id = uuid();

    let first = api
        .post(
            &path,
            &admin,
            json!({"client_id": client_id, "text": "  hello  "}),
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!(first.body["duplicate"], false);
    let m = &first.body["message"];
    assert_eq!(
        (m["seq"].as_u64(), m["text"].as_str()),
        (Some(1), Some("hello"))
    );
    assert_eq!(m["client_id"], client_id);
    assert_eq!(m["conversation_id"], conv.id.to_string());
    assert_eq!(m["author"]["kind"], "agent");
    assert_eq!(m["author"]["name"], "Admin");

    let again = api
        .post(
            &path,
            &admin,
            json!({"client_id": client_id, "text": "hello (retry)"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(again.body["message"], first.body["message"]);

    let stored = api.get(&path, &admin).await.body;
    assert_eq!(stored["messages"].as_array().unwrap().len(), 1);

    let cases = [
        (
            json!({"client_id": "not-a-uuid", "text": "x"}),
            "invalid_client_id",
        ),
        (json!({"client_id": uuid(), "text": "   "}), "text_empty"),
        (
            json!({"client_id": uuid(), "text": "a".repeat(4097)}),
            "text_too_long",
        ),
        (json!({"text": "no client id"}), "bad_request"),
    ];
    for (body, code) in cases {
        let r = api.post(&path, &admin, body).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, code),
            "{}",
            r.body
        );
    }
    assert_eq!(
        api.get(&path, &admin).await.body["messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_the_error_shape() {
    let (server, api, admin) = start().await;
    let raw = |path: &str, ct: &str, body: Vec<u8>| {
        api.req(Method::POST, path)
            .bearer_auth(&admin)
            .header("content-type", ct)
            .body(body)
    };
    let cases = [
        raw("/api/login", "application/json", b"{not json".to_vec()),
        raw(
            "/api/login",
            "application/json",
            br#"{"email": "a@example.com"}"#.to_vec(),
        ),
        raw(
            "/api/login",
            "text/plain",
            br#"{"email":"a@example.com","password":"x"}"#.to_vec(),
        ),
        raw("/api/sites", "application/json", b"[1,2,3]".to_vec()),
        raw("/api/sites", "application/json", br#"{"name": 5}"#.to_vec()),
    ];
    for rb in cases {
        let r = Api::send(rb).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{}",
            r.body
        );
        assert!(!r.body["error"]["message"].as_str().unwrap().is_empty());
    }
    let big = format!(
        r#"{{"name":"{}","allowed_origins":[]}}"#,
        "x".repeat(70 * 1024)
    );
    let r = Api::send(raw("/api/sites", "application/json", big.into_bytes())).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        "{}",
        r.body
    );
    assert_eq!(api.get("/api/sites", &admin).await.body, json!([]));
    let unknown = api.get("/api/no/such/thing", &admin).await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn state_changes_reach_live_agent_connections() {
    let (server, api, admin) = start().await;
    let site = api.create_site(&admin, "Shop").await;
    let (_, conv) = conversation(&server, site_id(&site)).await;
    let mut ws = common::Client::agent(&server, &admin).await;
    ws.hello(None, vec![]).await;

    let is_event = |want: ConversationEvent, id: String| {
        move |f: &ServerFrame| {
            matches!(f, ServerFrame::Conversation { event, conversation }
                if *event == want && conversation.id == id)
        }
    };
    let id = conv.id.to_string();
    let closed = api
        .call(
            Method::POST,
            &format!("/api/conversations/{id}/close"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(closed.status, StatusCode::OK);
    let (frame, _) = ws
        .until(is_event(ConversationEvent::Closed, id.clone()))
        .await;
    let ServerFrame::Conversation { conversation, .. } = frame else {
        unreachable!()
    };
    assert_eq!(
        conversation.status,
        hark_protocol::ConversationStatus::Closed
    );

    api.call(
        Method::POST,
        &format!("/api/conversations/{id}/reopen"),
        Some(&admin),
        None,
    )
    .await;
    ws.until(is_event(ConversationEvent::Reopened, id.clone()))
        .await;
    let me = api.get("/api/me", &admin).await.body["id"].clone();
    api.post(
        &format!("/api/conversations/{id}/assign"),
        &admin,
        json!({"agent_id": me}),
    )
    .await;
    let (frame, _) = ws
        .until(is_event(ConversationEvent::Assigned, id.clone()))
        .await;
    let ServerFrame::Conversation { conversation, .. } = frame else {
        unreachable!()
    };
    assert_eq!(
        conversation.assignee_id.as_ref(),
        me.as_str().map(str::to_owned).as_ref()
    );

    // A message posted over REST is delivered like one sent over the socket.
    let posted = api
        .post(
            &format!("/api/conversations/{id}/messages"),
            &admin,
            json!({"client_id": uuid(), "text": "from REST"}),
        )
        .await;
    assert_eq!(posted.status, StatusCode::CREATED);
    let (frame, _) = ws
        .until(|f| matches!(f, ServerFrame::Message(m) if m.text == "from REST"))
        .await;
    let ServerFrame::Message(m) = frame else {
        unreachable!()
    };
    assert_eq!(m.seq, 1);
    assert_eq!(m.conversation_id, id);
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn conversations_close_and_reopen() {
    let (server, api, admin) = start().await;
    let site = api.create_site(&admin, "Shop").await;
    let (visitor, conv) = conversation(&server, site_id(&site)).await;
    let path = |action: &str| format!("/api/conversations/{}/{action}", conv.id);
    let post = |action: &'static str| {
        let p = path(action);
        let api = &api;
        let admin = &admin;
        async move { api.call(Method::POST, &p, Some(admin), None).await }
    };

    let closed = post("close").await;
    assert_eq!(closed.status, StatusCode::OK, "{}", closed.body);
    assert_eq!(closed.body["status"], "closed");
    assert_eq!(closed.body["id"], conv.id.to_string());
    assert_eq!(
        post("close").await.body["status"],
        "closed",
        "closing twice is harmless"
    );
    let refused = api
        .post(
            &path("messages"),
            &admin,
            json!({"client_id": uuid(), "text": "hi"}),
        )
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::CONFLICT, "conversation_closed")
    );

    let reopened = post("reopen").await;
    assert_eq!(reopened.status, StatusCode::OK);
    assert_eq!(reopened.body["status"], "open");
    let sent = api
        .post(
            &path("messages"),
            &admin,
            json!({"client_id": uuid(), "text": "hi"}),
        )
        .await;
    assert_eq!(sent.status, StatusCode::CREATED);
    let stored = server.store.conversation(conv.id).await.unwrap().unwrap();
    assert_eq!(stored.status, hark::domain::Status::Open);

    // Once the visitor has started another conversation, the old one cannot reopen.
    assert_eq!(post("close").await.body["status"], "closed");
    let (newer, opened) = server
        .store
        .open_conversation(site_id(&site), visitor.id)
        .await
        .unwrap();
    assert!(opened && newer.id != conv.id);
    let conflict = post("reopen").await;
    assert_eq!(
        (conflict.status, conflict.code()),
        (StatusCode::CONFLICT, "conflict")
    );
    assert_eq!(
        api.get(&format!("/api/conversations/{}", conv.id), &admin)
            .await
            .body["status"],
        "closed"
    );
    let unknown = api
        .call(
            Method::POST,
            &format!("/api/conversations/{}/reopen", uuid()),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test]
async fn openapi_document_describes_every_endpoint() {
    let server = TestServer::start().await;
    let api = Api::new(&server);
    let r = api.call(Method::GET, "/api/openapi.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc = r.body;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let expected: &[(&str, &[&str])] = &[
        ("/api/login", &["post"]),
        ("/api/logout", &["post"]),
        ("/api/me", &["get"]),
        ("/api/sites", &["get", "post"]),
        ("/api/sites/{id}", &["get", "patch"]),
        ("/api/agents", &["get", "post"]),
        ("/api/agents/{id}", &["patch"]),
        ("/api/conversations", &["get"]),
        ("/api/search", &["get"]),
        ("/api/conversations/{id}", &["get"]),
        ("/api/conversations/{id}/messages", &["get", "post"]),
        ("/api/conversations/{id}/close", &["post"]),
        ("/api/conversations/{id}/reopen", &["post"]),
        ("/api/conversations/{id}/assign", &["post"]),
        ("/api/conversations/{id}/read", &["get"]),
        ("/api/visitors/{id}/conversations", &["post"]),
        ("/api/openapi.json", &["get"]),
    ];
    for (path, methods) in expected {
        for m in *methods {
            let op = &doc["paths"][path][m];
            assert!(op.is_object(), "{m} {path} missing");
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{m} {path} has no responses"
            );
        }
    }
    assert_eq!(doc["paths"].as_object().unwrap().len(), expected.len());
    for schema in [
        "ErrorBody",
        "AgentView",
        "SiteView",
        "ConversationView",
        "MessageBody",
        "LoginRequest",
        "ConversationPage",
        "MessagePage",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "schema {schema} missing"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let list_params: BTreeSet<_> = doc["paths"]["/api/conversations"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        list_params,
        ["cursor", "limit", "site_id", "status", "visitor_id"]
            .map(String::from)
            .into()
    );
    server.shutdown().await;
}
