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
        (
            vec!["--database", "postgres://127.0.0.1/hark"],
            "not available in this build",
        ),
        (
            vec!["--nats", "nats://127.0.0.1:4222"],
            "not available in this build",
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
