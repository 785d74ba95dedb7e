//! `tollgate pricing`: the price each route of each alias is charged at, and where it
//! came from (the config's `pricing`, the catalogue of `pricing.file`, or the shipped
//! table and its date).

use crate::config::Config;
use crate::relay::pricing::{usd, Price, Source, SHIPPED_DATE};
use serde_json::{json, Value};

/// Every route of every alias with its price, as rows.
pub fn rows(config: &Config) -> Vec<Value> {
    let mut aliases: Vec<_> = config.router.all().collect();
    aliases.sort_by(|a, b| a.name.cmp(&b.name));
    let mut rows = Vec::new();
    for alias in aliases {
        for tier in &alias.tiers {
            for route in &tier.routes {
                let model = route.model.as_deref();
                let found = model
                    .and_then(|m| config.pricing.explain(m))
                    .or_else(|| config.pricing.explain(&alias.name));
                let mut row = json!({
                    "alias": alias.name,
                    "tier": tier.priority,
                    "upstream": route.upstream.name,
                    "model": model.unwrap_or("(the client's)"),
                });
                match found {
                    Some((price, source, name)) => {
                        fill(&mut row, &price);
                        row["priced_as"] = name.into();
                        row["source"] = source_label(config, source).into();
                    }
                    None if model.is_none() => {
                        row["source"] = "each client model's own price".into()
                    }
                    None => row["source"] = "none (unpriced)".into(),
                }
                rows.push(row);
            }
        }
    }
    rows
}

fn fill(row: &mut Value, p: &Price) {
    row["input"] = usd(p.input as i64).into();
    row["cached_input"] = usd(p.cached_input as i64).into();
    row["cache_write"] = usd(p.cache_write as i64).into();
    row["cache_write_1h"] = usd(p.cache_write_1h as i64).into();
    row["output"] = usd(p.output as i64).into();
}

fn source_label(config: &Config, source: Source) -> String {
    match source {
        Source::Config => "config".into(),
        Source::File => match config.pricing.catalogue() {
            Some((path, Some(date))) => format!("file {path} ({date})"),
            Some((path, None)) => format!("file {path}"),
            None => "file".into(),
        },
        Source::Shipped => format!("shipped ({SHIPPED_DATE})"),
    }
}

/// The report `tollgate pricing` prints: USD per million tokens.
pub fn report(config: &Config) -> String {
    let mut out = format!(
        "USD per million tokens (WRITE_5M and WRITE_1H: prompt-cache writes, billed by Anthropic). Shipped table: list prices as of {SHIPPED_DATE}.\n"
    );
    if let Some((path, date)) = config.pricing.catalogue() {
        out.push_str(&format!(
            "Catalogue: {path}{}.\n",
            date.map(|d| format!(" (dated {d})")).unwrap_or_default()
        ));
    }
    out.push_str(&super::cli::table(
        &rows(config),
        &[
            ("ALIAS", "alias"),
            ("TIER", "tier"),
            ("UPSTREAM", "upstream"),
            ("MODEL", "model"),
            ("INPUT", "input"),
            ("CACHED", "cached_input"),
            ("WRITE_5M", "cache_write"),
            ("WRITE_1H", "cache_write_1h"),
            ("OUTPUT", "output"),
            ("PRICED_AS", "priced_as"),
            ("SOURCE", "source"),
        ],
    ));
    out.push('\n');
    out
}
