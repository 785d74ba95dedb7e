//! Importers of other gateways' and proxies' configurations: `tollgate import-nginx FILE`,
//! and `tollgate import-litellm FILE`
//! (the keys of a LiteLLM database are copied by `keys::litellm`).

pub mod litellm;
pub mod nginx;

use std::fmt;

/// A config that could not be read at all.
#[derive(Debug)]
pub struct ImportError(pub String);

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
