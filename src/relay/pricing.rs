//! What a request cost, computed once (budgets, usage rows and metrics all take this
//! figure). Prices are USD per million tokens in the config and the shipped table; they
//! are held and summed as integers: micro-USD per million tokens, and a request's cost
//! in micro-USD, rounded up, so that many small requests never add up to less than they
//! cost.

use crate::relay::usage::Usage;
use std::collections::HashMap;

/// Micro-USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input: u64,
    pub output: u64,
    /// Input tokens read from the provider's prompt cache.
    pub cached_input: u64,
    /// Input tokens written to the prompt cache for 5 minutes (Anthropic bills them at
    /// 1.25 x the input price) and for an hour (2 x).
    pub cache_write: u64,
    pub cache_write_1h: u64,
}

/// What a prompt-cache write costs when no price is given, as a multiple of the input
/// price: Anthropic's published rule (5 minutes: 1.25 x; an hour: 2 x).
pub const CACHE_WRITE: (u64, u64) = (5, 4);
pub const CACHE_WRITE_1H: (u64, u64) = (2, 1);

/// USD per million tokens to micro-USD per million tokens (the config checks the value
/// is finite, not negative and at most [`MAX_USD_PER_MTOK`]).
pub fn micro_per_mtok(usd: f64) -> u64 {
    (usd * 1e6).round().clamp(0.0, MAX_USD_PER_MTOK * 1e6) as u64
}

/// The largest price the config accepts, USD per million tokens.
pub const MAX_USD_PER_MTOK: f64 = 1e6;

impl Price {
    pub fn from_usd(input: f64, output: f64, cached_input: Option<f64>) -> Price {
        let input = micro_per_mtok(input);
        let times = |(n, d): (u64, u64)| (input.saturating_mul(n)).div_ceil(d);
        Price {
            input,
            output: micro_per_mtok(output),
            cached_input: cached_input.map_or(input, micro_per_mtok),
            cache_write: times(CACHE_WRITE),
            cache_write_1h: times(CACHE_WRITE_1H),
        }
    }

    /// The same with prompt-cache write prices given (USD per million tokens); one not
    /// given keeps its multiple of the input price.
    pub fn with_cache_writes(mut self, five_minutes: Option<f64>, hour: Option<f64>) -> Price {
        if let Some(usd) = five_minutes {
            self.cache_write = micro_per_mtok(usd);
        }
        if let Some(usd) = hour {
            self.cache_write_1h = micro_per_mtok(usd);
        }
        self
    }

    /// The cost of `usage`, micro-USD, rounded up once for the whole request. Cache reads
    /// and writes are part of `usage.input` and are charged at their own prices instead
    /// of the input price.
    pub fn cost(&self, usage: &Usage) -> i64 {
        let mut left = usage.input;
        let mut take = |n: u64| {
            let n = n.min(left);
            left -= n;
            u128::from(n)
        };
        let pico = take(usage.cached) * u128::from(self.cached_input)
            + take(usage.cache_write) * u128::from(self.cache_write)
            + take(usage.cache_write_1h) * u128::from(self.cache_write_1h)
            + u128::from(left) * u128::from(self.input)
            + u128::from(usage.output) * u128::from(self.output);
        i64::try_from(pico.div_ceil(1_000_000)).unwrap_or(i64::MAX)
    }

    /// The most `input` and `output` tokens can cost at the input and output prices,
    /// micro-USD (cost routing; budget reservations fold the write prices of routes that
    /// bill prompt-cache writes into the input price first).
    pub fn most(&self, input: u64, output: u64) -> i64 {
        self.cost(&Usage {
            input,
            output,
            ..Default::default()
        })
    }

    /// The highest price an input token can be billed at: on a provider that bills
    /// prompt-cache writes, any input token may turn out to be one.
    pub fn dearest_input(&self, bills_cache_writes: bool) -> u64 {
        let input = self.input.max(self.cached_input);
        if bills_cache_writes {
            input.max(self.cache_write).max(self.cache_write_1h)
        } else {
            input
        }
    }
}

/// The prices in force: the config's `pricing` over a catalogue file over the shipped
/// table.
#[derive(Debug, Default, Clone)]
pub struct Pricing {
    configured: HashMap<String, Price>,
    file: HashMap<String, Price>,
    /// The same entries as a list, for names matched by family.
    file_entries: Vec<(String, Price)>,
    /// The catalogue's path and the date it gives.
    catalogue: Option<(String, Option<String>)>,
    shipped: bool,
}

/// Where a price came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    File,
    Shipped,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::File => "file",
            Source::Shipped => "shipped",
        }
    }
}

/// The date of the shipped table's list prices.
pub const SHIPPED_DATE: &str = "2025-11-01";

impl Pricing {
    pub fn new(configured: HashMap<String, Price>, use_shipped: bool) -> Pricing {
        Pricing {
            configured,
            shipped: use_shipped,
            ..Pricing::default()
        }
    }

    /// The same with a catalogue's prices under the config's.
    pub fn with_catalogue(
        mut self,
        path: &str,
        date: Option<String>,
        prices: HashMap<String, Price>,
    ) -> Pricing {
        self.file_entries = prices.iter().map(|(k, v)| (k.clone(), *v)).collect();
        self.file = prices;
        self.catalogue = Some((path.to_string(), date));
        self
    }

    /// The catalogue in force: its path and date.
    pub fn catalogue(&self) -> Option<(&str, Option<&str>)> {
        self.catalogue
            .as_ref()
            .map(|(p, d)| (p.as_str(), d.as_deref()))
    }

    /// The price of an upstream model or alias: the config's entry of that exact name;
    /// else the catalogue's; else the shipped table's, where a dated or versioned name
    /// (`gpt-4o-2024-08-06`) takes its family's price.
    pub fn get(&self, model: &str) -> Option<Price> {
        self.explain(model).map(|(p, _, _)| p)
    }

    /// [`get`](Self::get), with where the price came from and the entry that gave it
    /// (`gpt-4o` for `gpt-4o-2024-08-06`). A catalogue's names match as the shipped
    /// table's do.
    pub fn explain(&self, model: &str) -> Option<(Price, Source, &str)> {
        if let Some((name, p)) = self.configured.get_key_value(model) {
            return Some((*p, Source::Config, name));
        }
        if !self.file.is_empty() {
            if let Some((name, p)) = self.file.get_key_value(model) {
                return Some((*p, Source::File, name));
            }
            if let Some((name, p)) = best_match(&self.file_entries, |e| e.0.as_str(), model) {
                return Some((*p, Source::File, name));
            }
        }
        if !self.shipped {
            return None;
        }
        best_match(SHIPPED, |e| e.0, model).map(|&(name, input, cached, output)| {
            (
                Price::from_usd(input, output, Some(cached)),
                Source::Shipped,
                name,
            )
        })
    }

    /// The price of an attempt: its upstream model's, else its alias's.
    pub fn for_route(&self, upstream_model: &str, alias: &str) -> Option<Price> {
        self.get(upstream_model).or_else(|| self.get(alias))
    }
}

/// Published list prices as of [`SHIPPED_DATE`] (the date the README gives), USD per
/// million tokens: (model, input, cached input, output). Prompt-cache writes are billed by
/// Anthropic only, at its published 1.25 x and 2 x the input price (the defaults).
const SHIPPED: &[(&str, f64, f64, f64)] = &[
    // OpenAI
    ("gpt-5", 1.25, 0.125, 10.0),
    ("gpt-5-mini", 0.25, 0.025, 2.0),
    ("gpt-5-nano", 0.05, 0.005, 0.40),
    ("gpt-4.1", 2.0, 0.50, 8.0),
    ("gpt-4.1-mini", 0.40, 0.10, 1.60),
    ("gpt-4.1-nano", 0.10, 0.025, 0.40),
    ("gpt-4o", 2.50, 1.25, 10.0),
    ("gpt-4o-mini", 0.15, 0.075, 0.60),
    ("o3", 2.0, 0.50, 8.0),
    ("o4-mini", 1.10, 0.275, 4.40),
    ("text-embedding-3-small", 0.02, 0.02, 0.0),
    ("text-embedding-3-large", 0.13, 0.13, 0.0),
    // Anthropic
    ("claude-opus-4-1", 15.0, 1.50, 75.0),
    ("claude-opus-4", 15.0, 1.50, 75.0),
    ("claude-sonnet-4-5", 3.0, 0.30, 15.0),
    ("claude-sonnet-4", 3.0, 0.30, 15.0),
    ("claude-haiku-4-5", 1.0, 0.10, 5.0),
    ("claude-3-5-haiku", 0.80, 0.08, 4.0),
    // Google
    ("gemini-2.5-pro", 1.25, 0.125, 10.0),
    ("gemini-2.5-flash", 0.30, 0.03, 2.50),
    ("gemini-2.5-flash-lite", 0.10, 0.01, 0.40),
    // DeepSeek
    ("deepseek-chat", 0.28, 0.028, 0.42),
    ("deepseek-reasoner", 0.28, 0.028, 0.42),
    // Mistral
    ("mistral-large-latest", 2.0, 2.0, 6.0),
    ("mistral-medium-latest", 0.40, 0.40, 2.0),
    ("mistral-small-latest", 0.10, 0.10, 0.30),
];

/// Published context windows (input plus output tokens) as of 2025-11-01, the default of
/// `routes[].max_context`.
const CONTEXT: &[(&str, u64)] = &[
    ("gpt-5", 400_000),
    ("gpt-5-mini", 400_000),
    ("gpt-5-nano", 400_000),
    ("gpt-4.1", 1_047_576),
    ("gpt-4.1-mini", 1_047_576),
    ("gpt-4.1-nano", 1_047_576),
    ("gpt-4o", 128_000),
    ("gpt-4o-mini", 128_000),
    ("o3", 200_000),
    ("o4-mini", 200_000),
    ("text-embedding-3-small", 8_191),
    ("text-embedding-3-large", 8_191),
    ("claude-opus-4-1", 200_000),
    ("claude-opus-4", 200_000),
    ("claude-sonnet-4-5", 200_000),
    ("claude-sonnet-4", 200_000),
    ("claude-haiku-4-5", 200_000),
    ("claude-3-5-haiku", 200_000),
    ("gemini-2.5-pro", 1_048_576),
    ("gemini-2.5-flash", 1_048_576),
    ("gemini-2.5-flash-lite", 1_048_576),
    ("deepseek-chat", 128_000),
    ("deepseek-reasoner", 128_000),
    ("mistral-large-latest", 128_000),
    ("mistral-medium-latest", 128_000),
    ("mistral-small-latest", 128_000),
];

/// The entry of a shipped table for `model`: an exact name, else the longest name `E` such
/// that the model is `E-<digit>...` (a date or version suffix; `gpt-4o-mini` is not
/// `gpt-4o`).
fn best_match<'t, T>(table: &'t [T], name_of: impl Fn(&T) -> &str, model: &str) -> Option<&'t T> {
    let mut best: Option<&T> = None;
    for entry in table {
        let name = name_of(entry);
        let fits = model == name
            || model
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
        if fits && best.is_none_or(|b| name.len() > name_of(b).len()) {
            best = Some(entry);
        }
    }
    best
}

/// The shipped context window of `model`, in tokens.
pub fn shipped_context(model: &str) -> Option<u64> {
    best_match(CONTEXT, |e| e.0, model).map(|e| e.1)
}

pub use crate::spec::{dollars, usd};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_windows_match_like_prices() {
        assert_eq!(shipped_context("gpt-4o"), Some(128_000));
        assert_eq!(shipped_context("gpt-4o-2024-08-06"), Some(128_000));
        assert_eq!(shipped_context("gpt-4.1-mini"), Some(1_047_576));
        assert_eq!(shipped_context("claude-sonnet-4-5-20250929"), Some(200_000));
        assert_eq!(shipped_context("my-local-llama"), None);
    }

    #[test]
    fn costs_are_integers_rounded_up() {
        let p = Price::from_usd(0.15, 0.60, Some(0.075));
        // 1000 input, 200 output: 150 + 120 micro-USD.
        let u = Usage {
            input: 1000,
            output: 200,
            cached: 0,
            ..Default::default()
        };
        assert_eq!(p.cost(&u), 270);
        // Half the input from the cache: 500 x 0.15 + 500 x 0.075 = 75 + 37.5 -> rounded up.
        let u = Usage {
            input: 1000,
            output: 200,
            cached: 500,
            ..Default::default()
        };
        assert_eq!(p.cost(&u), 233);
        // One token of a cheap model still costs a (rounded-up) micro-dollar.
        let one = Usage {
            input: 1,
            output: 0,
            cached: 0,
            ..Default::default()
        };
        assert_eq!(p.cost(&one), 1);
        assert_eq!(p.cost(&Usage::default()), 0);
    }

    /// Anthropic's prompt caching, priced by hand: claude-sonnet-4-5 at $3 input, $0.30
    /// cache reads, $15 output; writes at the default 1.25 x and 2 x ($3.75 and $6).
    #[test]
    fn cache_reads_and_both_write_tiers_are_priced_apart() {
        let p = Price::from_usd(3.0, 15.0, Some(0.30));
        assert_eq!((p.cache_write, p.cache_write_1h), (3_750_000, 6_000_000));
        let u = Usage {
            input: 1000,
            cached: 200,
            cache_write: 300,
            cache_write_1h: 100,
            output: 50,
            reasoning: 0,
        };
        // 400 x 3 + 200 x 0.30 + 300 x 3.75 + 100 x 6 + 50 x 15 micro-USD.
        assert_eq!(p.cost(&u), 1200 + 60 + 1125 + 600 + 750);
        // Given prices replace the multiples.
        let own = p.with_cache_writes(Some(4.0), None);
        assert_eq!(own.cost(&u), 1200 + 60 + 1200 + 600 + 750);
        // A reservation covers input that all turns out to be hour-long writes.
        assert_eq!(p.dearest_input(true), 6_000_000);
        assert_eq!(p.dearest_input(false), 3_000_000);
        // Counts that do not add up are bounded by the input (never a negative count).
        let odd = Usage {
            input: 10,
            cached: 8,
            cache_write: 8,
            cache_write_1h: 8,
            output: 0,
            reasoning: 0,
        };
        assert_eq!(
            p.cost(&odd),
            (8 * 300_000u64 + 2 * 3_750_000).div_ceil(1_000_000) as i64
        );
    }

    #[test]
    fn dollars_read_well_at_any_size() {
        assert_eq!(dollars(12_500_000), "$12.50");
        assert_eq!(dollars(100), "$0.0001");
        assert_eq!(dollars(0), "$0.00");
        assert_eq!(dollars(1_234_567), "$1.234567");
    }

    #[test]
    fn shipped_names_match_families_not_neighbours() {
        let pricing = Pricing::new(HashMap::new(), true);
        let mini = pricing.get("gpt-4o-mini").unwrap();
        assert_eq!(mini.input, 150_000);
        assert_eq!(pricing.get("gpt-4o-mini-2024-07-18"), Some(mini));
        assert_eq!(pricing.get("gpt-4o-2024-08-06").unwrap().input, 2_500_000);
        assert_eq!(
            pricing.get("claude-sonnet-4-5-20250929").unwrap().output,
            15_000_000
        );
        assert_eq!(pricing.get("gpt-4ox"), None);
        assert_eq!(pricing.get("llama-3-8b"), None);
        let mut own = HashMap::new();
        own.insert("gpt-4o".to_string(), Price::from_usd(1.0, 2.0, None));
        let pricing = Pricing::new(own, true);
        assert_eq!(pricing.get("gpt-4o").unwrap().cached_input, 1_000_000);
        assert_eq!(Pricing::new(HashMap::new(), false).get("gpt-4o"), None);
    }
}
