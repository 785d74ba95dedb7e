//! The directory on a real SQLite file, its time told by a `ManualClock`.

use super::auth::KeyRing;
use super::*;
use crate::clock::ManualClock;

/// A directory on a new SQLite file, its time told by `clock`, holding one key whose
/// secret was rotated (the old one valid until `t0 + 500`) and which expires at
/// `t0 + 1000`, with `budget`; returns the directory and the old and new secrets.
fn directory(
    dir: &std::path::Path,
    clock: Arc<ManualClock>,
    t0: i64,
    budget: Option<BudgetSpec>,
) -> (Directory, String, String) {
    let url = format!("sqlite://{}/keys.db", dir.display());
    crate::store::prepare(&url, t0, |_| async { Ok(()) }).unwrap();
    let (old, old_digest, _) = new_secret("k1").unwrap();
    let (new, digest, prefix) = new_secret("k1").unwrap();
    let rec = KeyRecord {
        id: "k1".into(),
        name: "ci".into(),
        team_id: None,
        digest,
        prefix,
        old_digest: Some(old_digest),
        old_valid_until: Some(t0 + 500),
        models: None,
        limits: Limits::default(),
        budget,
        expires_at: Some(t0 + 1000),
        metadata: serde_json::Value::Null,
        blocked: false,
        created_at: t0,
        updated_at: t0,
        spend_reset_at: 0,
        deleted_at: None,
    };
    let d = Directory::new(Store::new(&url), clock);
    d.store
        .run_blocking(move |pool| async move { save_key(&pool, &rec).await })
        .unwrap();
    d.refresh_blocking(Vec::new()).unwrap();
    (d, old, new)
}

#[test]
fn a_rotated_secret_and_then_the_key_stop_working_when_the_clock_says() {
    let tmp = tempfile::tempdir().unwrap();
    let t0 = 1_800_000_000_000;
    let clock = Arc::new(ManualClock::new(t0));
    let (d, old, new) = directory(tmp.path(), Arc::clone(&clock), t0, None);
    let ring = KeyRing::default();
    let id = |r: Result<auth::Caller, Rejected>| r.map(|c| c.id());
    assert_eq!(id(d.authenticate(&ring, Some(&old))), Ok("k1".into()));
    assert_eq!(id(d.authenticate(&ring, Some(&new))), Ok("k1".into()));
    clock.set(t0 + 499);
    assert!(d.authenticate(&ring, Some(&old)).is_ok());
    clock.set(t0 + 500);
    assert_eq!(
        id(d.authenticate(&ring, Some(&old))),
        Err(Rejected::Rotated)
    );
    assert!(d.authenticate(&ring, Some(&new)).is_ok());
    clock.set(t0 + 1000);
    assert_eq!(
        id(d.authenticate(&ring, Some(&new))),
        Err(Rejected::Expired)
    );
    assert_eq!(
        id(d.authenticate(&ring, Some("tg-k1-not-the-secret"))),
        Err(Rejected::Unknown)
    );
}

/// A daily budget spent today refuses until midnight UTC on the directory's clock,
/// and has its whole room again from then.
#[test]
fn a_spent_daily_budget_has_room_again_when_the_clock_passes_midnight() {
    use budget::{Hold, Mode, Period};
    let tmp = tempfile::tempdir().unwrap();
    let t0 = 1_800_000_000_000;
    let clock = Arc::new(ManualClock::new(t0));
    let spec = BudgetSpec::new(1.0, Period::Daily, Mode::Enforce, &[1.0]).unwrap();
    let (d, _, new) = directory(tmp.path(), Arc::clone(&clock), t0, Some(spec));
    let caller = d.authenticate(&KeyRing::default(), Some(&new)).unwrap();
    let budgets = reserve::budgets_of(&d, &caller);
    let b = [&budgets[0]];
    let hold = Hold::reserve(&b, 600_000, d.now()).unwrap();
    hold.settle(600_000, d.now());
    assert!(Hold::reserve(&b, 400_000, d.now()).is_ok());
    assert!(Hold::reserve(&b, 400_001, d.now()).is_err());
    let midnight = (t0 / 86_400_000 + 1) * 86_400_000;
    clock.set(midnight - 1);
    assert!(Hold::reserve(&b, 400_001, d.now()).is_err());
    clock.set(midnight);
    assert!(Hold::reserve(&b, 1_000_000, d.now()).is_ok());
    assert!(Hold::reserve(&b, 1_000_001, d.now()).is_err());
}
