//! What differs per provider on the way out: the credential header's name and form, and
//! the `anthropic-version` Anthropic needs. Used by attempts (`forward`) and active
//! health checks (`upstream::check`) alike.

use crate::config::file::Provider;
use crate::secret::Secret;
use pingora_http::RequestHeader;

/// `anthropic-version` sent when the client did not send one.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// One credential field: its name, and its value as a fixed prefix and the secret.
pub type CredentialField<'a> = (&'static str, &'static str, &'a str);

/// The server's credential in its provider's style, and `anthropic-version` for
/// Anthropic when the request carries none. Borrowed, so nothing is allocated per attempt.
pub fn credential(
    api_key: Option<&Secret>,
    provider: Provider,
    has_version: bool,
) -> [Option<CredentialField<'_>>; 2] {
    let key = api_key.map(|key| match provider {
        Provider::Openai | Provider::Generic => ("authorization", "Bearer ", key.expose()),
        Provider::Anthropic => ("x-api-key", "", key.expose()),
        Provider::Azure => ("api-key", "", key.expose()),
    });
    let version = (provider == Provider::Anthropic && !has_version).then_some((
        "anthropic-version",
        "",
        ANTHROPIC_VERSION,
    ));
    [key, version]
}

/// Sets a credential on a request built with Pingora's types (health checks).
pub fn set_credential(
    req: &mut RequestHeader,
    api_key: Option<&Secret>,
    provider: Provider,
) -> pingora_core::Result<()> {
    let has_version = req.headers.contains_key("anthropic-version");
    for (name, prefix, value) in credential(api_key, provider, has_version)
        .into_iter()
        .flatten()
    {
        req.insert_header(name, format!("{prefix}{value}"))?;
    }
    Ok(())
}
