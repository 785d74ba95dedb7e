//! What differs per provider: which need an API key, the credential header's name and
//! form, the `anthropic-version` Anthropic needs, whether streams report usage only when
//! asked (`stream_options.include_usage`), and which endpoints each serves. Used by the
//! config checks, attempts (`forward`), active health checks (`upstream::check`) and the
//! attempt loop alike. (Error shapes are the same across OpenAI-compatible providers, so
//! `inspect` classifies every upstream's errors with one set of presets.)

pub mod inspect;

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
    /// Self-hosted servers (vLLM, TGI, llama.cpp, Ollama): Bearer when a key is set.
    #[default]
    Generic,
}

/// Whether servers of `provider` must have an `api_key` (the hosted APIs do; a generic
/// OpenAI-compatible fleet may not).
pub fn needs_api_key(provider: Provider) -> bool {
    matches!(
        provider,
        Provider::Openai | Provider::Anthropic | Provider::Azure
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

/// What kind of endpoint a request is for. Anthropic's `/v1/messages` can only go to
/// upstreams of provider `anthropic`; the OpenAI-shaped endpoints go to any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    /// The dialect of an endpoint, by its path after `/v1`.
    pub fn of(suffix: &str) -> Dialect {
        if suffix == "/messages" {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }

    /// Whether an upstream of `provider` takes requests of this dialect.
    pub fn served_by(self, provider: Provider) -> bool {
        match self {
            Dialect::OpenAi => true,
            Dialect::Anthropic => provider == Provider::Anthropic,
        }
    }
}
