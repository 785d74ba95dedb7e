//! The seam between the admission logic and where counters live. The admission logic
//! (which scopes a request is charged to, in which order, when) is the same whatever the
//! backend; a backend only checks and counts. `LocalCounters` keeps them in this process
//! (pingora-limits sketches); a shared backend keeps them where every instance sees them.

use super::{Charge, Dimension, Refusal, Room, Scope};
use async_trait::async_trait;

/// Where rate windows and in-flight counts are kept.
///
/// A request reaches the backend at most twice (before its body is read, and once it is
/// in), each time with every charge of that stage, so that a shared backend can check
/// and count them in one round trip.
#[async_trait]
pub trait CounterBackend: Send + Sync {
    /// Checks every charge against its limit and, only when all of them fit, counts them
    /// all. A refusal counts nothing and names the first charge, in the given order, that
    /// did not fit.
    async fn reserve(&self, charges: &mut [Charge]) -> Result<(), Refusal>;

    /// Replaces the estimate a `Tpm` charge counted by the tokens the request really used.
    fn settle(&self, charge: &Charge, actual: u64);

    /// Gives back the in-flight slots among `charges` (`Concurrency` charges). Called on
    /// every path a request ends by, from `Admission`'s drop.
    fn release(&self, charges: &[Charge]);

    /// Takes back everything `charges` counted, slots and rates alike: a request refused at
    /// a later stage counts nowhere.
    fn undo(&self, charges: &[Charge]);

    /// What is left of a rate limit of one scope's key, for the `x-ratelimit-*` headers.
    fn room(&self, scope: Scope, key: u64, dimension: Dimension, limit: u64) -> Room;
}
