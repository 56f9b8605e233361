//! What tokens cost: a model's prices, and the one formula every cost in the gateway comes
//! from (budget reservations, settled spend, metrics, spans, the access log, and the
//! `adaptive` strategy's price signal).

use tollgate_api::config::CompiledModel;

/// Token usage of an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens, cached ones and cache writes included.
    pub prompt: u64,
    /// Output (completion) tokens.
    pub completion: u64,
    /// Input tokens read from the provider's prompt cache (OpenAI's `cached_tokens`,
    /// Anthropic's `cache_read_input_tokens`), priced at `cachedInputPerMillion`.
    pub cached: u64,
    /// Input tokens written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`), priced at `cacheWritePerMillion`.
    pub cache_write: u64,
}

impl From<crate::canonical::Usage> for Usage {
    fn from(u: crate::canonical::Usage) -> Self {
        Self {
            prompt: u.input,
            completion: u.output,
            cached: u.cached_input.unwrap_or(0),
            cache_write: u.cache_write.unwrap_or(0),
        }
    }
}

/// A model's prices per million tokens, in its Provider's currency.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pricing {
    /// Input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
    /// Input tokens read from the provider's prompt cache (`cachedInputPerMillion`;
    /// the input price when unset).
    pub cached_input: f64,
    /// Input tokens written to the provider's prompt cache (`cacheWritePerMillion`; the
    /// input price when unset).
    pub cache_write: f64,
}

impl Pricing {
    /// The prices of a compiled model.
    pub fn of(model: &CompiledModel) -> Self {
        Self {
            input: model.input_per_million,
            output: model.output_per_million,
            cached_input: model.cached_input_per_million,
            cache_write: model
                .cache_write_per_million
                .unwrap_or(model.input_per_million),
        }
    }

    /// The cost of `usage`: cached input and cache writes at their own prices, the rest
    /// of the input at the input price, the output at the output price.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let cached = usage.cached.min(usage.prompt);
        let written = usage.cache_write.min(usage.prompt - cached);
        let plain = usage.prompt - cached - written;
        (plain as f64 * self.input
            + cached as f64 * self.cached_input
            + written as f64 * self.cache_write
            + usage.completion as f64 * self.output)
            / 1_000_000.0
    }

    /// Input plus output price per million, for comparing targets; `None` when free.
    pub fn weight(&self) -> Option<f64> {
        let price = self.input + self.output;
        (price > 0.0).then_some(price)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u64, completion: u64, cached: u64, cache_write: u64) -> Usage {
        Usage {
            prompt,
            completion,
            cached,
            cache_write,
        }
    }

    #[test]
    fn cost_is_tokens_times_price_per_million() {
        let p = Pricing {
            input: 2.5,
            output: 10.0,
            cached_input: 1.25,
            cache_write: 3.125,
        };
        assert_eq!(p.cost(&usage(1_000_000, 0, 0, 0)), 2.5);
        assert_eq!(p.cost(&usage(1_000, 500, 0, 0)), 0.0075);
        assert_eq!(p.weight(), Some(12.5));
        assert_eq!(Pricing::default().weight(), None);
        assert_eq!(Pricing::default().cost(&usage(10, 10, 5, 5)), 0.0);
    }

    #[test]
    fn cached_input_and_cache_writes_are_priced_apart() {
        let p = Pricing {
            input: 3.0,
            output: 15.0,
            cached_input: 0.3,
            cache_write: 3.75,
        };
        // 1M input of which 600k read from the cache and 200k written to it.
        let cost = p.cost(&usage(1_000_000, 0, 600_000, 200_000));
        assert!(
            (cost - (0.2 * 3.0 + 0.6 * 0.3 + 0.2 * 3.75)).abs() < 1e-9,
            "{cost}"
        );
        // Counts an upstream reports beyond the input cannot make the cost negative or
        // bill a token twice.
        let cost = p.cost(&usage(100, 0, 500, 500));
        assert!((cost - 100.0 * 0.3 / 1e6).abs() < 1e-12, "{cost}");
    }
}
