//! Budgets: a spending cap in micro-USD per calendar period (UTC days, weeks from Monday,
//! months, or for all time), held in memory and enforced by reservation. Before a
//! request is forwarded, its most possible cost is reserved against every budget that
//! applies; it is refused when that does not fit next to what is spent and reserved
//! already, so concurrent requests cannot together spend past the cap. When the response
//! ends the reservation is replaced by the real cost; when nothing reached an upstream it
//! is released (by dropping the hold, whatever path the request took).

use chrono::{DateTime, Datelike, Duration as Days, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    Total,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Total => "total",
        }
    }

    /// The period holding `now_ms`: its start and its end (`None` for `total`), in
    /// milliseconds, UTC.
    pub fn bounds(self, now_ms: i64) -> (i64, Option<i64>) {
        let Some(now) = DateTime::<Utc>::from_timestamp_millis(now_ms) else {
            return (0, None);
        };
        let today = now.date_naive();
        let (start, end) = match self {
            Period::Total => return (0, None),
            Period::Daily => (today, today + Days::days(1)),
            Period::Weekly => {
                let start = today - Days::days(i64::from(today.weekday().num_days_from_monday()));
                (start, start + Days::days(7))
            }
            Period::Monthly => {
                let start = today.with_day(1).unwrap_or(today);
                let (y, m) = if start.month() == 12 {
                    (start.year() + 1, 1)
                } else {
                    (start.year(), start.month() + 1)
                };
                (start, NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(start))
            }
        };
        (midnight(start), Some(midnight(end)))
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "daily" => Ok(Period::Daily),
            "weekly" => Ok(Period::Weekly),
            "monthly" => Ok(Period::Monthly),
            "total" => Ok(Period::Total),
            _ => Err(serde::de::Error::custom(
                "expected daily, weekly, monthly or total",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "enforce" => Ok(Mode::Enforce),
            "track" => Ok(Mode::Track),
            _ => Err(serde::de::Error::custom("expected enforce or track")),
        }
    }
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Track => "track",
        }
    }
}

/// The largest budget accepted, USD.
pub const MAX_USD: f64 = 1e12;

impl BudgetSpec {
    /// Checks a budget as written (config or API): the failing field and why.
    pub fn new(
        max_usd: f64,
        period: Period,
        mode: Mode,
        alert_at: &[f64],
    ) -> Result<BudgetSpec, (&'static str, String)> {
        if !(max_usd.is_finite() && (0.0..=MAX_USD).contains(&max_usd)) {
            return Err((
                "max_usd",
                format!("expected a number of dollars from 0 to {MAX_USD}"),
            ));
        }
        if alert_at
            .iter()
            .any(|f| !(f.is_finite() && *f > 0.0 && *f <= 10.0))
        {
            return Err((
                "alert_at",
                "expected fractions above 0 and at most 10 (1.0 = the whole budget)".into(),
            ));
        }
        let mut alert_at = alert_at.to_vec();
        alert_at.sort_by(f64::total_cmp);
        alert_at.dedup();
        Ok(BudgetSpec {
            max_micro: (max_usd * 1e6).round() as i64,
            period,
            mode,
            alert_at,
        })
    }

    /// The budget as the API shows it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "max_usd": crate::relay::pricing::usd(self.max_micro),
            "period": self.period.as_str(),
            "mode": self.mode.as_str(),
            "alert_at": self.alert_at,
        })
    }
}

fn midnight(d: NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0)
        .map_or(0, |t| t.and_utc().timestamp_millis())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Refuse what does not fit (402).
    #[default]
    Enforce,
    /// Count and alert, never refuse.
    Track,
}

/// A budget as configured for a key or a team.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSpec {
    pub max_micro: i64,
    pub period: Period,
    pub mode: Mode,
    /// Fractions of `max` at which an alert is sent, ascending.
    pub alert_at: Vec<f64>,
}

/// Whose budget: the refusal and alerts name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `key` or `team`.
    pub scope: &'static str,
    pub id: String,
    pub name: String,
}

/// One budget's live figures.
#[derive(Debug)]
pub struct Budget {
    pub owner: Owner,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    spec: BudgetSpec,
    period_start: i64,
    /// Where the period ends (`None`: it does not): until then `now` is in it, with no
    /// calendar arithmetic.
    period_end: Option<i64>,
    spent: i64,
    reserved: i64,
    /// How many of `alert_at` were crossed in this period.
    alerted: usize,
    /// Whether a refusal was alerted in this period (one alert per period, not one per
    /// refused request).
    refusal_alerted: bool,
    /// Spend before this time does not count (`reset_spend`).
    reset_at: i64,
}

/// A crossing to report: the budget passed `fraction` of its cap in this period.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub owner: Owner,
    pub fraction: f64,
    pub spent_micro: i64,
    pub max_micro: i64,
    pub period: Period,
    pub period_start: i64,
}

/// What a refused reservation reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub owner: Owner,
    pub max_micro: i64,
    pub spent_micro: i64,
    pub period: Period,
    /// When the period ends (`None` for `total`).
    pub resets_at: Option<i64>,
    /// The first refusal of this budget in its period (the one that is alerted).
    pub first: bool,
}

/// A budget's figures now, for `/v1/key/info` and the admin API.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub spec: BudgetSpec,
    pub spent_micro: i64,
    pub reserved_micro: i64,
    pub resets_at: Option<i64>,
}

impl Budget {
    /// A budget with `spent` already counted in the period holding `now`.
    pub fn new(owner: Owner, spec: BudgetSpec, spent: i64, reset_at: i64, now: i64) -> Budget {
        let (period_start, period_end) = spec.period.bounds(now);
        let alerted = crossed(&spec, spent);
        Budget {
            owner,
            state: Mutex::new(State {
                spec,
                period_start,
                period_end,
                spent,
                reserved: 0,
                alerted,
                refusal_alerted: false,
                reset_at,
            }),
        }
    }

    fn lock(&self, now: i64) -> MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now >= s.period_start && s.period_end.is_none_or(|end| now < end) {
            return s;
        }
        let (start, end) = s.spec.period.bounds(now);
        s.period_end = end;
        if start != s.period_start {
            // A new period: what was spent belongs to the last one. Reservations in
            // flight stay reserved and settle into the new period.
            s.period_start = start;
            s.spent = 0;
            s.alerted = 0;
            s.refusal_alerted = false;
        }
        s
    }

    /// Replaces the spec (an admin change), keeping what was spent.
    pub fn respec(&self, spec: BudgetSpec, now: i64) {
        let mut s = self.lock(now);
        s.alerted = crossed(&spec, s.spent);
        let (start, end) = spec.period.bounds(now);
        s.period_start = start;
        s.period_end = end;
        s.spec = spec;
    }

    /// Forgets what was spent (`reset_spend`), from `now` on.
    pub fn reset(&self, now: i64) {
        let mut s = self.lock(now);
        s.spent = 0;
        s.alerted = 0;
        s.refusal_alerted = false;
        s.reset_at = now;
    }

    /// This budget as a shared backend counts it: the counter's key (its owner, period
    /// and last reset: a new period or a reset is a new counter), its limit (none for a
    /// tracked budget), and the spend this instance knows of, to start a missing counter.
    pub fn counter(&self, now: i64) -> (u64, u64, u64) {
        let s = self.lock(now);
        let from = s.period_start.max(s.reset_at);
        let name = format!("{}:{}@{from}", self.owner.scope, self.owner.id);
        let max = crate::limits::MAX_SPEND;
        let limit = match s.spec.mode {
            Mode::Enforce => u64::try_from(s.spec.max_micro).unwrap_or(0).min(max),
            Mode::Track => max,
        };
        let base = u64::try_from(s.spent).unwrap_or(0).min(max);
        (crate::limits::key_hash(&name), limit, base)
    }

    /// Takes the spend a shared counter reported as this instance's figure. Alert
    /// fractions it passed count as alerted: the instance whose request crossed them
    /// sent those.
    pub fn observe(&self, spent: i64, now: i64) {
        let mut s = self.lock(now);
        s.spent = spent;
        s.alerted = s.alerted.max(crossed(&s.spec, spent));
    }

    /// Raises this instance's figure to `spent` when that is more (spend other instances
    /// recorded in the store); alert fractions it passes count as alerted.
    pub fn raise(&self, spent: i64, now: i64) {
        let mut s = self.lock(now);
        if spent > s.spent {
            s.spent = spent;
            s.alerted = s.alerted.max(crossed(&s.spec, spent));
        }
    }

    /// The refusal of a reservation a shared counter found no room for.
    pub fn refused(&self, spent: i64, now: i64) -> Exceeded {
        let mut s = self.lock(now);
        s.spent = spent;
        let first = !s.refusal_alerted;
        s.refusal_alerted = true;
        Exceeded {
            first,
            owner: self.owner.clone(),
            max_micro: s.spec.max_micro,
            spent_micro: spent,
            period: s.spec.period,
            resets_at: s.period_end,
        }
    }

    /// When spend last began to count (`reset_spend`).
    pub fn reset_at(&self, now: i64) -> i64 {
        self.lock(now).reset_at
    }

    /// Where a spend sum must start: the later of the period's start and the last reset.
    pub fn counts_from(spec: &BudgetSpec, reset_at: i64, now: i64) -> i64 {
        spec.period.bounds(now).0.max(reset_at)
    }

    pub fn figures(&self, now: i64) -> Figures {
        let s = self.lock(now);
        Figures {
            spec: s.spec.clone(),
            spent_micro: s.spent,
            reserved_micro: s.reserved,
            resets_at: s.period_end,
        }
    }
}

/// The request path's use of a budget in this process: reserve before the request,
/// then release or settle. (Budgets shared by instances are counted as spend charges by
/// the limits' shared backend; see `keys::reserve`.)
impl Budget {
    /// Reserves `amount` unless an enforced budget has no room for it; returns what was
    /// reserved (0 for a tracked budget).
    pub fn reserve(&self, amount: i64, now: i64) -> Result<i64, Exceeded> {
        let mut s = self.lock(now);
        if s.spec.mode == Mode::Track {
            return Ok(0);
        }
        let total = s.spent.saturating_add(s.reserved).saturating_add(amount);
        if total > s.spec.max_micro {
            let first = !s.refusal_alerted;
            s.refusal_alerted = true;
            return Err(Exceeded {
                first,
                owner: self.owner.clone(),
                max_micro: s.spec.max_micro,
                spent_micro: s.spent,
                period: s.spec.period,
                resets_at: s.period_end,
            });
        }
        s.reserved += amount;
        Ok(amount)
    }

    /// Gives a reservation back (the request ended without an answer to charge).
    pub fn release(&self, reserved: i64, now: i64) {
        let mut s = self.lock(now);
        s.reserved = (s.reserved - reserved).max(0);
    }

    /// Counts `cost` as spent (in place of `reserved`); returns the alerts it crossed.
    pub fn settle(&self, reserved: i64, cost: i64, now: i64) -> Vec<Alert> {
        let mut s = self.lock(now);
        s.reserved = (s.reserved - reserved).max(0);
        s.spent = s.spent.saturating_add(cost);
        let now_crossed = crossed(&s.spec, s.spent);
        let mut alerts = Vec::new();
        while s.alerted < now_crossed {
            alerts.push(Alert {
                owner: self.owner.clone(),
                fraction: s.spec.alert_at[s.alerted],
                spent_micro: s.spent,
                max_micro: s.spec.max_micro,
                period: s.spec.period,
                period_start: s.period_start,
            });
            s.alerted += 1;
        }
        alerts
    }
}

/// How many alert fractions `spent` has reached.
fn crossed(spec: &BudgetSpec, spent: i64) -> usize {
    spec.alert_at
        .iter()
        .take_while(|f| spent as f64 >= **f * spec.max_micro as f64)
        .count()
}

/// What one request holds against its budgets. Dropped unsettled, it releases them.
#[derive(Default)]
pub struct Hold {
    held: Vec<(Arc<Budget>, i64)>,
    now: i64,
    /// Reserved by a shared backend (the limits' admission holds it there): here the
    /// budgets are only this instance's figures, settled for alerts.
    mirrored: Option<i64>,
}

impl Hold {
    /// Reserves `amount` against every budget of `budgets`, all or none.
    pub fn reserve(budgets: &[&Arc<Budget>], amount: i64, now: i64) -> Result<Hold, Exceeded> {
        let mut hold = Hold {
            held: Vec::with_capacity(budgets.len()),
            now,
            mirrored: None,
        };
        for b in budgets {
            // On refusal `hold` drops and releases what was reserved before.
            let reserved = b.reserve(amount, now)?;
            hold.held.push((Arc::clone(b), reserved));
        }
        Ok(hold)
    }

    /// A hold on `budgets` whose `amount` a shared backend reserved: settling it counts
    /// the cost in this instance's figures (and sends the alerts it crosses); dropping it
    /// gives back nothing here.
    pub fn mirror(budgets: &[Arc<Budget>], amount: i64, now: i64) -> Hold {
        Hold {
            held: budgets.iter().map(|b| (Arc::clone(b), 0)).collect(),
            now,
            mirrored: Some(amount),
        }
    }

    /// Replaces the reservations with the real cost.
    pub fn settle(mut self, cost: i64, now: i64) -> Vec<Alert> {
        let mut alerts = Vec::new();
        for (b, reserved) in std::mem::take(&mut self.held) {
            alerts.extend(b.settle(reserved, cost, now));
        }
        alerts
    }

    /// The largest reservation held (what an unreported answer is charged).
    pub fn reserved(&self) -> i64 {
        self.mirrored
            .unwrap_or_else(|| self.held.iter().map(|(_, r)| *r).max().unwrap_or(0))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        for (b, reserved) in self.held.drain(..) {
            b.release(reserved, self.now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::parse_time;

    fn t(s: &str) -> i64 {
        parse_time(s).unwrap()
    }

    fn budget(max: i64, period: Period, now: i64) -> Arc<Budget> {
        let owner = Owner {
            scope: "key",
            id: "k1".into(),
            name: "ci".into(),
        };
        let spec = BudgetSpec {
            max_micro: max,
            period,
            mode: Mode::Enforce,
            alert_at: vec![0.8, 1.0],
        };
        Arc::new(Budget::new(owner, spec, 0, 0, now))
    }

    #[test]
    fn periods_are_utc_calendar_periods() {
        let now = t("2026-12-02T17:06:45Z"); // a Wednesday
        assert_eq!(
            Period::Daily.bounds(now),
            (t("2026-12-02"), Some(t("2026-12-03")))
        );
        assert_eq!(
            Period::Weekly.bounds(now),
            (t("2026-11-30"), Some(t("2026-12-07")))
        );
        assert_eq!(
            Period::Monthly.bounds(now),
            (t("2026-12-01"), Some(t("2027-01-01")))
        );
        assert_eq!(Period::Total.bounds(now), (0, None));
        // Month ends and leap years.
        let leap = t("2024-02-29T23:59:59Z");
        assert_eq!(
            Period::Monthly.bounds(leap),
            (t("2024-02-01"), Some(t("2024-03-01")))
        );
        assert_eq!(Period::Daily.bounds(leap).1, Some(t("2024-03-01")));
        assert_eq!(
            Period::Monthly.bounds(t("2025-02-28T12:00:00Z")).1,
            Some(t("2025-03-01"))
        );
        assert_eq!(
            Period::Monthly.bounds(t("2026-01-31T00:00:00Z")),
            (t("2026-01-01"), Some(t("2026-02-01")))
        );
        // A Sunday belongs to the week that began on the Monday before.
        assert_eq!(
            Period::Weekly.bounds(t("2026-12-06T23:00:00Z")).0,
            t("2026-11-30")
        );
        assert_eq!(
            Period::Weekly.bounds(t("2026-12-07T00:00:00Z")).0,
            t("2026-12-07")
        );
        // A week across a year end.
        assert_eq!(
            Period::Weekly.bounds(t("2027-01-01T08:00:00Z")),
            (t("2026-12-28"), Some(t("2027-01-04")))
        );
    }

    #[test]
    fn reservations_cannot_overspend_and_roll_over_with_the_period() {
        let now = t("2026-12-31T23:00:00Z");
        let b = budget(1000, Period::Daily, now);
        let holds: Vec<Hold> = (0..10)
            .map(|_| Hold::reserve(&[&b], 100, now).unwrap())
            .collect();
        // The eleventh does not fit next to ten reserved.
        let e = Hold::reserve(&[&b], 100, now).map(|_| ()).unwrap_err();
        assert_eq!(e.resets_at, Some(t("2027-01-01")));
        assert!(e.first);
        let again = Hold::reserve(&[&b], 100, now).map(|_| ()).unwrap_err();
        assert!(!again.first, "one refusal alert per period");
        // Settling for less frees room; dropping unsettled releases.
        let mut holds = holds.into_iter();
        let alerts = holds.next().unwrap().settle(40, now);
        assert!(alerts.is_empty());
        drop(holds.next());
        assert_eq!(b.figures(now).spent_micro, 40);
        assert_eq!(b.figures(now).reserved_micro, 800);
        assert!(Hold::reserve(&[&b], 160, now).is_ok());
        drop(holds);
        // Spend 900 more: 80% and 100% cross, once each.
        let alerts = Hold::reserve(&[&b], 900, now).unwrap().settle(900, now);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].fraction, 0.8);
        let alerts = Hold::reserve(&[&b], 60, now).unwrap().settle(60, now);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].fraction, 1.0);
        assert!(Hold::reserve(&[&b], 1, now).is_err());
        // The next day (and year) starts at zero.
        let tomorrow = t("2027-01-01T00:00:00Z");
        assert_eq!(b.figures(tomorrow).spent_micro, 0);
        assert!(Hold::reserve(&[&b], 1000, tomorrow).is_ok());
    }

    #[test]
    fn all_budgets_or_none() {
        let now = t("2026-12-02T00:00:00Z");
        let key = budget(1000, Period::Monthly, now);
        let team = budget(100, Period::Total, now);
        let e = Hold::reserve(&[&key, &team], 500, now)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.resets_at, None);
        assert_eq!(key.figures(now).reserved_micro, 0);
        let track = Arc::new(Budget::new(
            team.owner.clone(),
            BudgetSpec {
                max_micro: 1,
                period: Period::Total,
                mode: Mode::Track,
                alert_at: vec![1.0],
            },
            0,
            0,
            now,
        ));
        let alerts = Hold::reserve(&[&track], 500, now).unwrap().settle(500, now);
        assert_eq!(alerts.len(), 1);
    }
}
