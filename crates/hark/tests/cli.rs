//! The `hark` binary's front door: admin commands against a data directory (passwords on standard
//! input, never argv), clear refusals of bad input, and `serve` refusing what this build lacks.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_hark");

fn hark(dir: &std::path::Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("admin")
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hark");
    // A command that refuses its arguments exits before reading: a broken pipe is fine here.
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    child.wait_with_output().expect("hark runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn admin_commands_manage_sites_and_agents() {
    let dir = tempfile::tempdir().unwrap();
    let site = hark(
        dir.path(),
        &[
            "create-site",
            "--name",
            "Shop",
            "--origin",
            "https://Shop.Example.com",
        ],
        "",
    );
    assert!(site.status.success(), "{}", text(&site));
    let out = text(&site);
    assert!(out.contains("site key: hk_"), "{out}");
    assert!(
        out.contains("https://shop.example.com"),
        "origins are normalised: {out}"
    );
    let site_id = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("id:").map(|s| s.trim().to_owned()))
        .expect("site id printed");

    let agent = hark(
        dir.path(),
        &[
            "create-agent",
            "--email",
            "Ada@Example.com",
            "--name",
            "Ada",
            "--site",
            &site_id,
        ],
        "a long enough password\n",
    );
    assert!(agent.status.success(), "{}", text(&agent));
    assert!(
        !text(&agent).contains("a long enough password"),
        "the password is never echoed"
    );

    let list = hark(dir.path(), &["list-agents"], "");
    let listed = text(&list);
    assert!(
        listed.contains("ada@example.com") && listed.contains(&site_id),
        "{listed}"
    );
    let sites = hark(dir.path(), &["list-sites"], "");
    assert!(text(&sites).contains("Shop"));

    let pw = hark(
        dir.path(),
        &["set-password", "--email", "ada@example.com"],
        "another good password\n",
    );
    assert!(pw.status.success(), "{}", text(&pw));
}

#[test]
fn admin_commands_refuse_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["create-site", "--name", "X", "--origin", "example.com"],
            "",
            "is not an origin",
        ),
        (
            vec![
                "create-site",
                "--name",
                " ",
                "--origin",
                "https://a.example",
            ],
            "",
            "--name",
        ),
        (
            vec!["create-agent", "--email", "nope", "--name", "N"],
            "password123\n",
            "not an email",
        ),
        (
            vec!["create-agent", "--email", "a@example.com", "--name", "N"],
            "short\n",
            "at least 8",
        ),
        (
            vec!["create-agent", "--email", "a@example.com", "--name", "N"],
            "",
            "no password",
        ),
        (
            vec![
                "create-agent",
                "--email",
                "a@example.com",
                "--name",
                "N",
                "--site",
                "not-an-id",
            ],
            "password123\n",
            "not a site id",
        ),
        (
            vec![
                "create-agent",
                "--email",
                "a@example.com",
                "--name",
                "N",
                "--role",
                "owner",
            ],
            "password123\n",
            "admin or agent",
        ),
        (
            vec!["set-password", "--email", "ghost@example.com"],
            "password123\n",
            "no agent",
        ),
    ];
    for (args, stdin, expect) in cases {
        let o = hark(dir.path(), &args, stdin);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(text(&o).contains(expect), "{args:?}: {}", text(&o));
    }
    // The same email twice is refused, and the first agent stays.
    let ok = hark(
        dir.path(),
        &["create-agent", "--email", "b@example.com", "--name", "B"],
        "password123\n",
    );
    assert!(ok.status.success(), "{}", text(&ok));
    let dup = hark(
        dir.path(),
        &["create-agent", "--email", "B@example.com", "--name", "B2"],
        "password123\n",
    );
    assert!(
        !dup.status.success() && text(&dup).contains("exists already"),
        "{}",
        text(&dup)
    );
}

#[test]
fn serve_refuses_what_this_build_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expect) in [
        (vec!["--database", "mysql://x"], "postgres://"),
        // A malformed PostgreSQL URL is named as such, before any connection is tried.
        (
            vec!["--database", "postgres://127.0.0.1:notaport/hark"],
            "--database: not a valid PostgreSQL URL",
        ),
        // Nothing listens on port 1: the store cannot be opened, and the password never shows.
        (
            vec!["--database", "postgres://hark:hunter2@127.0.0.1:1/hark"],
            "opening the store",
        ),
        // Nothing listens on port 1: a NATS server that cannot be reached fails the start.
        (
            vec!["--nats", "nats://127.0.0.1:1"],
            "cannot connect to NATS at nats://127.0.0.1:1",
        ),
        (vec!["--nats", "tcp://x"], "nats://"),
    ] {
        let o = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(&args)
            .output()
            .expect("hark runs");
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(text(&o).contains(expect), "{args:?}: {}", text(&o));
        assert!(!text(&o).contains("hunter2"), "{args:?}: {}", text(&o));
    }
    let bad_file = dir.path().join("hark.toml");
    std::fs::write(&bad_file, "listen = \"not an address\"\n").unwrap();
    let o = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&bad_file)
        .output()
        .expect("hark runs");
    assert!(!o.status.success());
    assert!(text(&o).contains("hark.toml"), "{}", text(&o));
}

/// A fresh PostgreSQL database on the server named by `HARK_TEST_POSTGRES` (as in
/// `tests/store_suite.rs`), dropped when this value is. No server is a failure, not a skip.
struct PgDatabase {
    server: String,
    name: String,
    url: String,
}

impl PgDatabase {
    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f)
    }

    fn create() -> PgDatabase {
        use sqlx::Connection;
        let server = std::env::var("HARK_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("hark_cli_{}", uuid::Uuid::new_v4().simple());
        Self::run(async {
            let mut admin = sqlx::PgConnection::connect(&server)
                .await
                .unwrap_or_else(|e| {
                    panic!("PostgreSQL at {server} is needed (set HARK_TEST_POSTGRES): {e}")
                });
            sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                .execute(&mut admin)
                .await
                .expect("create a test database");
            let _ = admin.close().await;
        });
        // The server URL with its database (the last path segment) replaced.
        let base = server.split('?').next().unwrap_or(&server);
        let authority = base.find("://").map_or(0, |i| i + 3);
        let base = match base[authority..].find('/') {
            Some(slash) => &base[..authority + slash],
            None => base,
        };
        let url = format!("{base}/{name}");
        PgDatabase { server, name, url }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        use sqlx::Connection;
        let dropped = Self::run(async {
            let mut admin = sqlx::PgConnection::connect(&self.server).await?;
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin)
            .await?;
            admin.close().await
        });
        // Never panic here: this may run while a failed test unwinds.
        if let Err(e) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

#[test]
fn admin_commands_work_against_postgres() {
    let db = PgDatabase::create();
    // An empty data directory that must stay empty: with --database nothing is stored locally.
    let dir = tempfile::tempdir().unwrap();
    let admin = |args: &[&str], stdin: &str| {
        let mut all = vec!["--database", db.url.as_str()];
        all.extend_from_slice(args);
        hark(dir.path(), &all, stdin)
    };

    let site = admin(
        &[
            "create-site",
            "--name",
            "Cluster Shop",
            "--origin",
            "https://cluster.example.com",
        ],
        "",
    );
    assert!(site.status.success(), "{}", text(&site));
    let out = text(&site);
    assert!(out.contains("site key: hk_"), "{out}");
    let site_id = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("id:").map(|s| s.trim().to_owned()))
        .expect("site id printed");

    // Another process (another node) reads what the first one wrote.
    let sites = admin(&["list-sites"], "");
    assert!(sites.status.success(), "{}", text(&sites));
    let listed = text(&sites);
    assert!(
        listed.contains("Cluster Shop") && listed.contains(&site_id),
        "{listed}"
    );

    let agent = admin(
        &[
            "create-agent",
            "--email",
            "ops@example.com",
            "--name",
            "Ops",
            "--role",
            "admin",
        ],
        "a long enough password\n",
    );
    assert!(agent.status.success(), "{}", text(&agent));
    let agents = admin(&["list-agents"], "");
    assert!(
        text(&agents).contains("ops@example.com"),
        "{}",
        text(&agents)
    );

    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written to the data directory"
    );
}
