//! The command line: `-t` on good and bad configs, and every shipped example config.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn check_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "good.yaml", "upstreams:\n  u:\n    servers: [{url: \"http://127.0.0.1:1/v1\"}]\nmodels:\n  m:\n    routes: [{upstream: u}]\n");
    let out = tollgate().args(["-t", "-c", &path]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn check_lists_every_error_with_its_path_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "bad.yaml",
        "keys:\n  - {name: a, key: \"sk-live-do-not-print-0001\"}\n  - {name: a, key: \"sk-live-do-not-print-0001\"}\nupstreams:\n  openai:\n    provider: openai\n    servers: [{url: \"https://api.openai.com/v1\"}]\nmodels:\n  gpt-4o:\n    routes:\n      - {upstream: openai}\n      - {upstream: azure}\n",
    );
    let out = tollgate().args(["-t", "-c", &path]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keys[1].name: duplicate key name \"a\""),
        "{err}"
    );
    assert!(
        err.contains("keys[1].key: the same key is configured twice"),
        "{err}"
    );
    assert!(
        err.contains("upstreams.openai.servers[0].api_key: required for provider openai"),
        "{err}"
    );
    assert!(
        err.contains("models.gpt-4o.routes[1].upstream: no upstream named \"azure\""),
        "{err}"
    );
    assert!(!err.contains("sk-live-do-not-print"), "{err}");
}

#[test]
fn check_reports_a_missing_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "env.yaml", "keys:\n  - {name: a, key: \"${TG_SURELY_UNSET_VAR}\"}\nupstreams:\n  u:\n    servers: [{url: \"http://127.0.0.1:1/v1\"}]\nmodels:\n  m:\n    routes: [{upstream: u}]\n");
    let out = tollgate()
        .args(["-t", "-c", &path])
        .env_remove("TG_SURELY_UNSET_VAR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("keys[0].key: environment variable TG_SURELY_UNSET_VAR is not set"));
}

#[test]
fn shipped_example_configs_are_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut checked = 0;
    for entry in std::fs::read_dir(format!("{root}/conf")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let out = tollgate()
            .arg("-t")
            .arg("-c")
            .arg(&path)
            .envs([
                ("TOLLGATE_KEY_TEAM_A", "tg-example-team-a"),
                ("OPENAI_KEY_1", "sk-example-1"),
                ("OPENAI_KEY_2", "sk-example-2"),
                ("ANTHROPIC_KEY", "sk-ant-example"),
                ("AZURE_OPENAI_KEY", "azure-example"),
                ("TOLLGATE_DEMO_UPSTREAM", "http://127.0.0.1:1/v1"),
                ("TOLLGATE_DEMO_LISTEN", "127.0.0.1:0"),
                ("TOLLGATE_DEMO_ADMIN", "127.0.0.1:0"),
                (
                    "TOLLGATE_DEMO_STORE",
                    "sqlite:///tmp/tollgate-cli-test-never-created.db",
                ),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 2);
}

fn check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "c.yaml", text);
    let out = tollgate().args(["-t", "-c", &path]).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const MODELS: &str = "models:\n  m:\n    routes: [{upstream: u}]\n";

/// Regression: the password of an upstream URL was printed by `-t` (and by reloads).
#[test]
fn check_masks_credentials_in_an_upstream_url() {
    let (ok, out) = check(&format!(
        "upstreams:\n  u:\n    servers: [{{url: \"http://admin:hunter2-do-not-print@127.0.0.1:1/v1\"}}]\n{MODELS}"
    ));
    assert!(!ok);
    assert!(!out.contains("hunter2"), "{out}");
    assert!(!out.contains("admin:"), "{out}");
    assert!(out.contains("http://***@127.0.0.1:1/v1"), "{out}");
}

/// Regression: `-t` printed the password of a store or Redis URL that did not parse.
#[test]
fn check_never_prints_the_password_of_a_malformed_url() {
    let upstream = "upstreams:\n  u: {servers: [{url: \"http://127.0.0.1:1/v1\"}]}\n";
    for field in [
        "store: {url: \"postgres//u:PW-do-not-print@@host/db\"}",
        "store: {url: \"sqlite://u:PW-do-not-print@/x.db\"}",
        "cluster: {redis: \"redis:/:PW-do-not-print@host:notaport/0\"}",
        "cluster: {redis: \"redis://:PW-do-not-print@host:notaport/0\"}",
    ] {
        let (ok, out) = check(&format!("{field}\n{upstream}{MODELS}"));
        assert!(!ok, "{field}: {out}");
        assert!(
            out.contains(".url:") || out.contains("cluster.redis:"),
            "{out}"
        );
        assert!(!out.contains("PW-do-not"), "{field}: {out}");
    }
    // The same through an environment variable.
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "c.yaml",
        &format!("store: {{url: \"${{TG_STORE}}\"}}\n{upstream}{MODELS}"),
    );
    let out = tollgate()
        .args(["-t", "-c", &path])
        .env("TG_STORE", "postgres//u:PW-do-not-print@@host")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("store.url:") && !text.contains("PW-do-not"),
        "{text}"
    );
}

/// Regression: `-t` accepted a master key anyone could guess, and a client key equal to it.
#[test]
fn check_refuses_a_short_master_key_and_a_client_key_equal_to_it() {
    let upstream = "upstreams:\n  u: {servers: [{url: \"http://127.0.0.1:1/v1\"}]}\n";
    let (ok, out) = check(&format!(
        "admin: {{master_key: short-key}}\n{upstream}{MODELS}"
    ));
    assert!(!ok);
    assert!(
        out.contains("admin.master_key: must be at least 16 characters"),
        "{out}"
    );
    assert!(!out.contains("short-key"), "{out}");
    let (ok, out) = check(&format!(
        "admin: {{master_key: master-key-0123456789, viewer_key: view}}\n{upstream}{MODELS}"
    ));
    assert!(!ok);
    assert!(
        out.contains("admin.viewer_key: must be at least 16 characters"),
        "{out}"
    );
    let (ok, out) = check(&format!(
        "admin: {{master_key: master-key-0123456789}}\nkeys:\n  - {{name: a, key: master-key-0123456789}}\n{upstream}{MODELS}"
    ));
    assert!(!ok);
    assert!(
        out.contains("keys[0].key: must differ from admin.master_key"),
        "{out}"
    );
    assert!(!out.contains("master-key-0123456789"), "{out}");
}

/// Regression: one unknown field hid every other error of the file.
#[test]
fn check_lists_unknown_fields_together_with_the_other_errors() {
    let (ok, out) = check(&format!(
        "server:\n  colour: red\n  threads: 100000\nupstreams:\n  u:\n    conect_timeout: 1s\n    first_byte_timeout: 0s\n    servers: [{{url: \"http://127.0.0.1:1/v1\", weight: 0}}]\n{MODELS}"
    ));
    assert!(!ok);
    for want in [
        "server: unknown field `colour`",
        "upstreams.u: unknown field `conect_timeout`",
        "server.threads: must be between 1 and 1024",
        "upstreams.u.first_byte_timeout: must be longer than 0s",
        "upstreams.u.servers[0].weight: must be between 1 and 1000",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

/// Regression: a bad global `failover.retry_on` was reported under an upstream's path.
#[test]
fn a_bad_global_retry_rule_is_reported_once_under_its_own_path() {
    let (ok, out) = check(&format!(
        "failover:\n  retry_on: {{status: [\"abc\"]}}\nupstreams:\n  u:\n    servers: [{{url: \"http://127.0.0.1:1/v1\"}}]\n{MODELS}"
    ));
    assert!(!ok);
    assert!(out.contains("failover.retry_on:"), "{out}");
    assert!(!out.contains("upstreams.u.retry_on"), "{out}");
}

/// Regression: `-t -c /dev/zero` grew without bound, and deep nesting took seconds.
#[test]
fn oversized_and_deeply_nested_files_are_refused_at_once() {
    let started = std::time::Instant::now();
    let out = tollgate().args(["-t", "-c", "/dev/zero"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger than 16 MiB"));
    let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let (ok, out) = check(&deep);
    assert!(!ok);
    assert!(out.contains("nested deeper than 64 levels"), "{out}");
    let wide: String = (0..3000)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    let (ok, out) = check(&wide);
    assert!(!ok);
    assert!(out.contains("indented more than 256 columns"), "{out}");
    // Generous: the point is seconds (before) against milliseconds.
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// An admin listener off loopback without a master key is allowed, with a warning.
#[test]
fn check_warns_about_an_open_admin_listener_off_loopback() {
    let base =
        format!("upstreams:\n  u:\n    servers: [{{url: \"http://127.0.0.1:1/v1\"}}]\n{MODELS}");
    let (ok, out) = check(&format!(
        "server:\n  admin_listen: \"0.0.0.0:9091\"\n{base}"
    ));
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: server.admin_listen 0.0.0.0:9091 is not a loopback address and admin.master_key is not set"),
        "{out}"
    );
    let (ok, out) = check(&format!(
        "server:\n  admin_listen: \"0.0.0.0:9091\"\nadmin:\n  master_key: \"adm-key-0000000000\"\n{base}"
    ));
    assert!(ok, "{out}");
    assert!(!out.contains("warning"), "{out}");
    assert!(!out.contains("adm-key"), "{out}");
}

#[test]
fn the_config_check_reports_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/t.db");
    let path = dir.path().join("t.yaml");
    std::fs::write(
        &path,
        format!(
            "store: {{url: \"sqlite://{}\"}}\nupstreams:\n  u: {{servers: [{{url: \"http://127.0.0.1:1/v1\"}}]}}\nmodels:\n  m: {{routes: [{{upstream: u}}]}}\n",
            db.display()
        ),
    )
    .unwrap();
    let out = tollgate().arg("-t").arg("-c").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("will be created at start"), "{text}");
    assert!(!db.exists(), "-t must not create the database");
    // A database written by a newer version is refused.
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", db.display()))
            .await
            .unwrap();
        sqlx::query(
            "CREATE TABLE tollgate_schema (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut c)
        .await
        .unwrap();
        sqlx::query("INSERT INTO tollgate_schema VALUES (99, 0)")
            .execute(&mut c)
            .await
            .unwrap();
    });
    let out = tollgate().arg("-t").arg("-c").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("schema version 99, newer"), "{err}");
    // A bad URL is a config error with its path.
    // (A password no temporary directory's random name can hold by chance.)
    std::fs::write(&path, "store: {url: \"mysql://u:Pw-9@h/db\"}\n").unwrap();
    let out = tollgate().arg("-t").arg("-c").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store.url:") && !err.contains("Pw-9"), "{err}");
}

/// A PostgreSQL store that cannot be reached is reported with the reason, its password
/// masked (checked against a real server in tests/scale_out.rs).
#[test]
fn the_config_check_reports_an_unreachable_postgres_store_without_its_password() {
    // Bound but never listening: refuses connections, and no other test can take it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    let (ok, out) = check(&format!(
        "store: {{url: \"postgres://tollgate:pg-secret-do-not-print@127.0.0.1:{port}/db\"}}\nupstreams:\n  u: {{servers: [{{url: \"http://127.0.0.1:1/v1\"}}]}}\n{MODELS}"
    ));
    assert!(!ok, "{out}");
    assert!(out.contains("Connection refused"), "{out}");
    assert!(!out.contains("pg-secret"), "{out}");
}
