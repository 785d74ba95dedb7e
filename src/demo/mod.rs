//! The embedded mock upstream behind `tollgate demo` and `tollgate mock-upstream` (also
//! the integration tests' and benchmarks' upstream). Its state is bounded.

pub mod mock;
