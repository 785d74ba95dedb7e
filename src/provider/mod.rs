//! What differs per provider: which need an API key, the credential header's name and
//! form, the `anthropic-version` Anthropic needs, whether streams report usage only when
//! asked (`stream_options.include_usage`), and each wire format (`openai`, `anthropic`,
//! `gemini`) with the translation between them (`translate`). Used by the config checks,
//! attempts (`forward`), active health checks (`upstream::check`), the attempt loop and
//! the relay alike. (`inspect` classifies every upstream's errors with one set of presets
//! that knows each provider's markers.)

pub mod anthropic;
pub mod duration;
pub mod gemini;
pub mod inspect;
pub mod openai;
pub mod sse;
pub mod text;
pub mod translate;

use crate::secret::Secret;
use pingora_http::RequestHeader;

/// Which API an upstream speaks (`upstreams.NAME.provider`).
#[derive(Debug, serde::Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// OpenAI and anything OpenAI-compatible that takes `Authorization: Bearer`.
    Openai,
    /// Anthropic: `x-api-key` plus `anthropic-version`.
    Anthropic,
    /// Azure OpenAI: `api-key`.
    Azure,
    /// Google Gemini (`generateContent`): `x-goog-api-key`.
    Gemini,
    /// Self-hosted servers (vLLM, TGI, llama.cpp, Ollama): Bearer when a key is set.
    #[default]
    Generic,
}

impl Provider {
    /// The name in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Azure => "azure",
            Provider::Gemini => "gemini",
            Provider::Generic => "generic",
        }
    }
}

/// Whether servers of `provider` must have an `api_key` (the hosted APIs do; a generic
/// OpenAI-compatible fleet may not).
pub fn needs_api_key(provider: Provider) -> bool {
    matches!(
        provider,
        Provider::Openai | Provider::Anthropic | Provider::Azure | Provider::Gemini
    )
}

/// Whether streams from `provider` carry a usage chunk only when the request asks with
/// `stream_options.include_usage` (the default of `upstreams.NAME.stream_usage`).
pub fn asks_for_stream_usage(provider: Provider) -> bool {
    matches!(provider, Provider::Openai | Provider::Azure)
}

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
        Provider::Gemini => ("x-goog-api-key", "", key.expose()),
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
    let has_version = req
        .headers
        .contains_key(crate::transport::headers::ANTHROPIC_VERSION);
    for (name, prefix, value) in credential(api_key, provider, has_version)
        .into_iter()
        .flatten()
    {
        req.insert_header(name, format!("{prefix}{value}"))?;
    }
    Ok(())
}
