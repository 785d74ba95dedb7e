//! The shipped systemd unit: `systemd-analyze verify` prints nothing and
//! `systemd-analyze security --offline=yes` scores it 2.0 or better. Runs where
//! systemd-analyze is required (scripts/bootstrap installs it); the unit's binary path is
//! pointed at the built binary, since verify checks that the executables exist.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn analyze_available() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn unit_with_built_binary(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/tollgate.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStartPre=/usr/local/bin/tollgate -t -c /etc/tollgate/tollgate.yaml"));
    let path = dir.path().join("tollgate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/tollgate", env!("CARGO_BIN_EXE_tollgate")),
    )
    .unwrap();
    path
}

#[test]
fn the_unit_verifies_cleanly_and_scores_two_or_better() {
    // Not a silent pass: scripts/bootstrap installs systemd-analyze.
    assert!(
        analyze_available(),
        "systemd-analyze is not installed (scripts/bootstrap installs the systemd package)"
    );
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_with_built_binary(&dir);
    // The default store's directory is the unit's state directory.
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains("StateDirectory=tollgate\n"), "{text}");
    assert!(tollgate::config::file::DEFAULT_STORE_URL.starts_with("sqlite:///var/lib/tollgate/"));
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for tollgate.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in: {text}"));
    assert!(score <= 2.0, "exposure {score}");
}
