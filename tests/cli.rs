//! The command line: `-t` on good and bad configs, and every shipped example config.

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
