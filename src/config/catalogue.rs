//! The prices in force: `pricing` entries of the config, over a price catalogue
//! (`pricing.file`, JSON, read at start and at every reload), over the shipped table.
//!
//! The catalogue's format:
//!
//! ```json
//! {
//!   "date": "2026-11-01",
//!   "prices": {
//!     "gpt-4o": {"input": 2.5, "output": 10, "cached_input": 1.25},
//!     "claude-sonnet-4-5": {"input": 3, "output": 15, "cached_input": 0.3,
//!                           "cache_write": 3.75, "cache_write_1h": 6}
//!   }
//! }
//! ```
//!
//! Prices are USD per million tokens; `input` and `output` are required, the others
//! default as in the config. A file with a bad entry is refused, naming the entry.

use super::{file::FileConfig, ConfigError};
use crate::relay::pricing::{Price, Pricing, MAX_USD_PER_MTOK};
use std::collections::HashMap;

/// The largest catalogue read.
const MAX_FILE: u64 = 16 << 20;

/// Takes `pricing.file` out of the document (the one member of `pricing` that is not a
/// model: a string), so that the rest reads as prices.
pub(super) fn take_file(doc: &mut serde_yaml::Value) -> Option<serde_yaml::Value> {
    let pricing = doc.get_mut("pricing")?.as_mapping_mut()?;
    match pricing.get("file") {
        Some(serde_yaml::Value::String(_)) => pricing.remove("file"),
        _ => None,
    }
}

/// One price as the config and the catalogue write it, checked.
fn price(
    input: f64,
    output: f64,
    cached_input: Option<f64>,
    cache_write: Option<f64>,
    cache_write_1h: Option<f64>,
) -> Result<Price, String> {
    let ok = |v: f64| v.is_finite() && (0.0..=MAX_USD_PER_MTOK).contains(&v);
    let all = [
        Some(input),
        Some(output),
        cached_input,
        cache_write,
        cache_write_1h,
    ];
    if !all.into_iter().flatten().all(ok) {
        return Err(format!(
            "prices must be numbers of USD per million tokens from 0 to {MAX_USD_PER_MTOK}"
        ));
    }
    Ok(Price::from_usd(input, output, cached_input).with_cache_writes(cache_write, cache_write_1h))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    input: f64,
    output: f64,
    #[serde(default)]
    cached_input: Option<f64>,
    #[serde(default)]
    cache_write: Option<f64>,
    #[serde(default)]
    cache_write_1h: Option<f64>,
}

/// A catalogue as read: its date, if it gives one, and its prices.
pub struct Catalogue {
    pub date: Option<String>,
    pub prices: HashMap<String, Price>,
}

/// Reads the catalogue at `path`; every bad entry is an error naming it.
pub fn read(path: &str) -> Result<Catalogue, Vec<String>> {
    use std::io::Read;
    let mut text = String::new();
    let opened = std::fs::File::open(path).and_then(|f| {
        f.take(MAX_FILE + 1).read_to_string(&mut text)?;
        Ok(())
    });
    if let Err(e) = opened {
        return Err(vec![format!("cannot read {path}: {e}")]);
    }
    if text.len() as u64 > MAX_FILE {
        return Err(vec![format!("{path}: larger than {} MiB", MAX_FILE >> 20)]);
    }
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| vec![format!("{path}: not valid JSON: {e}")])?;
    let Some(top) = doc.as_object() else {
        return Err(vec![format!("{path}: expected an object with \"prices\"")]);
    };
    let mut errors = Vec::new();
    for key in top
        .keys()
        .filter(|k| !matches!(k.as_str(), "date" | "prices"))
    {
        errors.push(format!(
            "{path}: {key}: unknown field (expected date or prices)"
        ));
    }
    let date = match top.get("date") {
        None => None,
        Some(serde_json::Value::String(d)) => Some(d.clone()),
        Some(_) => {
            errors.push(format!("{path}: date: expected a string"));
            None
        }
    };
    let mut prices = HashMap::new();
    match top.get("prices").and_then(|p| p.as_object()) {
        None => errors.push(format!("{path}: prices: expected an object of models")),
        Some(entries) => {
            for (model, v) in entries {
                let entry = serde_json::from_value::<Entry>(v.clone())
                    .map_err(|e| e.to_string())
                    .and_then(|e| {
                        price(
                            e.input,
                            e.output,
                            e.cached_input,
                            e.cache_write,
                            e.cache_write_1h,
                        )
                    });
                match entry {
                    Ok(p) => {
                        prices.insert(model.clone(), p);
                    }
                    Err(why) => errors.push(format!("{path}: prices.{model}: {why}")),
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(Catalogue { date, prices })
    } else {
        Err(errors)
    }
}

/// The prices of the config: its entries, its catalogue (read now) and the shipped table.
pub(super) fn pricing(file: &FileConfig, errors: &mut Vec<ConfigError>) -> Pricing {
    let mut configured = HashMap::new();
    for (model, p) in &file.pricing {
        match price(
            p.input,
            p.output,
            p.cached_input,
            p.cache_write,
            p.cache_write_1h,
        ) {
            Ok(p) => {
                configured.insert(model.clone(), p);
            }
            Err(message) => errors.push(ConfigError {
                path: format!("pricing.{model}"),
                message,
            }),
        }
    }
    let mut pricing = Pricing::new(configured, true);
    if let Some(path) = &file.pricing_file {
        match read(path) {
            Ok(c) => pricing = pricing.with_catalogue(path, c.date, c.prices),
            Err(all) => errors.extend(all.into_iter().map(|message| ConfigError {
                path: "pricing.file".into(),
                message,
            })),
        }
    }
    pricing
}
