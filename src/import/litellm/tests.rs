//! The config importer on small LiteLLM configs, one rule each.

use super::*;

fn import(text: &str) -> (Value, Vec<String>) {
    let i = translate(text).unwrap();
    let w = i.warnings.iter().map(|w| w.to_string()).collect();
    (serde_yaml::from_str(&i.yaml).unwrap(), w)
}

#[test]
fn environment_references_become_variables_and_literal_dollars_stay_literal() {
    assert_eq!(value("os.environ/OPENAI_API_KEY"), "${OPENAI_API_KEY}");
    assert_eq!(value("pa${ss"), "pa$${ss");
    assert_eq!(seconds(30.0), "30s");
    assert_eq!(seconds(0.25), "250ms");
}

#[test]
fn base_urls_get_their_version_prefix() {
    assert_eq!(
        base_url("anthropic", "https://proxy.example"),
        "https://proxy.example/v1"
    );
    assert_eq!(
        base_url("anthropic", "https://p.example/v1/"),
        "https://p.example/v1"
    );
    assert_eq!(
        base_url("generic", "http://vllm:8000"),
        "http://vllm:8000/v1"
    );
    assert_eq!(
        base_url("generic", "http://vllm:8000/v1"),
        "http://vllm:8000/v1"
    );
    assert_eq!(
        base_url("generic", "os.environ/VLLM_BASE"),
        "${VLLM_BASE}",
        "an unknown value is left as it is"
    );
}

#[test]
fn a_provider_wildcard_is_the_catch_all_alias_and_other_wildcards_are_reported() {
    let (c, w) = import(
        "model_list:\n  - model_name: \"*\"\n    litellm_params: {model: \"openai/*\", api_key: os.environ/K}\n  - model_name: \"anthropic/*\"\n    litellm_params: {model: \"anthropic/*\", api_key: os.environ/A}\n",
    );
    assert_eq!(c["models"]["*"]["routes"][0]["upstream"], "openai");
    assert_eq!(c["models"]["*"]["routes"][0].get("model"), None);
    assert!(c["models"].get("anthropic/*").is_none());
    assert!(
        w.iter()
            .any(|w| w.starts_with("model_list[1].model_name: a wildcard")),
        "{w:?}"
    );
}

#[test]
fn every_setting_without_an_equivalent_is_named_with_its_path() {
    let (c, w) = import(
        "model_list:\n  - model_name: m\n    litellm_params: {model: azure/dep, api_key: k1234}\n  - model_name: m\n    litellm_params: {model: openai/gpt-4o, api_key: os.environ/K, organization: org-1, weight: 5000}\n  - model_name: m\n    litellm_params: {model: openai/gpt-4o-mini, api_key: os.environ/K, weight: 1}\ngeneral_settings: {master_key: sk-1234}\nguardrails: []\n",
    );
    let has = |s: &str| w.iter().any(|x| x.starts_with(s));
    assert!(
        has("model_list[0].litellm_params.model: an azure deployment needs api_base"),
        "{w:?}"
    );
    assert!(
        has("model_list[1].litellm_params.organization: has no equivalent"),
        "{w:?}"
    );
    assert!(has("general_settings.master_key: shorter than"), "{w:?}");
    assert!(has("guardrails: has no equivalent"), "{w:?}");
    assert!(
        c.get("admin").is_none(),
        "a short master key is not written"
    );
    // Weights beyond Tollgate's 1 to 1000 keep their ratio.
    let routes = &c["models"]["m"]["routes"];
    assert_eq!(
        (routes[0]["weight"].as_u64(), routes[1]["weight"].as_u64()),
        (Some(1000), Some(1))
    );
    assert_eq!(c["models"]["m"]["strategy"], "weighted");
}

#[test]
fn prices_per_token_become_prices_per_million() {
    let (c, _) = import(
        "model_list:\n  - model_name: local\n    litellm_params: {model: hosted_vllm/llama, api_base: \"http://10.0.0.5:8000\", input_cost_per_token: 0.0000002, output_cost_per_token: 0.0000006}\n",
    );
    assert_eq!(c["pricing"]["llama"]["input"].as_f64(), Some(0.2));
    assert_eq!(c["pricing"]["llama"]["output"].as_f64(), Some(0.6));
    assert_eq!(
        c["upstreams"]["hosted_vllm-10-0-0-5-8000"]["servers"][0]["url"],
        "http://10.0.0.5:8000/v1"
    );
}
