//! The seam between the admission logic and where counters live. The admission logic
//! (which scopes a request is charged to, in which order, when) is the same whatever the
//! backend; a backend only checks and counts. `LocalCounters` keeps them in this process
//! (pingora-limits sketches); a shared backend keeps them where every instance sees them.

use super::{Charge, Dimension, Refusal, Room, Scope};
use async_trait::async_trait;

/// Where rate windows and in-flight counts are kept.
///
/// A request reaches the backend at most twice (before its body is read, and once it is
/// in), each time with every charge of that stage; a backend that [`defers`] gets both
/// stages in one call, so a shared backend checks and counts a request in one round trip.
///
/// [`defers`]: CounterBackend::defers
#[async_trait]
pub trait CounterBackend: Send + Sync {
    /// Checks every charge against its limit and, only when all of them fit, counts them
    /// all. A refusal counts nothing and names the first charge, in the given order, that
    /// did not fit.
    async fn reserve(&self, charges: &mut [Charge]) -> Result<(), Refusal>;

    /// [`reserve`]'s answer at once, for a backend that never waits (counters in this
    /// process): without the boxed future an `async` trait method costs a call. `None`:
    /// call [`reserve`].
    ///
    /// [`reserve`]: CounterBackend::reserve
    fn reserve_now(&self, _charges: &mut [Charge]) -> Option<Result<(), Refusal>> {
        None
    }

    /// The request ended (by any path; called from `Admission`'s drop): gives back its
    /// in-flight slots and budget reservations, and counts what it really used
    /// (`settled`) in place of the estimates of its `Tpm` and `Spend` charges. A shared
    /// backend does all of it in one call that nothing waits for.
    fn finish(&self, charges: &[Charge]);

    /// Takes back everything `charges` counted, slots and rates alike: a request refused at
    /// a later stage counts nowhere.
    fn undo(&self, charges: &[Charge]);

    /// What is left of a rate limit of one scope's key, for the `x-ratelimit-*` headers.
    fn room(&self, scope: Scope, key: u64, dimension: Dimension, limit: u64) -> Room;

    /// Whether stage one's charges should wait and go with stage two's, so that a
    /// request costs one call (a shared backend: one round trip).
    fn defers(&self) -> bool {
        false
    }

    /// Counts deferred charges of a request that ended before its next stage (a bad body,
    /// an unknown model), so that such requests still count toward request rates; nothing
    /// waits for it.
    fn count_later(&self, _charges: Vec<Charge>) {}

    /// A refusal known without counting anything (a rate already refused in its
    /// current window).
    fn known_refusal(&self, _charges: &[Charge]) -> Option<Refusal> {
        None
    }

    /// Whether budgets are counted here (`Spend` charges) rather than by the in-process
    /// ledger of `keys::budget`.
    fn counts_spend(&self) -> bool {
        false
    }

    /// What a budget counted here has spent in its period, every instance's spend
    /// together (`None`: not counted here, or not known now).
    async fn spent(&self, _scope: Scope, _key: u64) -> Option<u64> {
        None
    }
}
