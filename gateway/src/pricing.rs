//! What tokens cost: a model's prices, and the one formula every cost in the gateway comes
//! from (budget reservations, settled spend, metrics, spans, the access log, and the
//! `adaptive` strategy's price signal).

use tollgate_api::config::CompiledModel;

/// A model's prices per million tokens, in its Provider's currency.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pricing {
    /// Input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
    /// Input tokens read from the provider's prompt cache (`cachedInputPerMillion`).
    /// Compiled, not yet applied: cached tokens are billed as input until answers carry
    /// their cached count through accounting (the next issue).
    pub cached_input: f64,
}

impl Pricing {
    /// The prices of a compiled model.
    pub fn of(model: &CompiledModel) -> Self {
        Self {
            input: model.input_per_million,
            output: model.output_per_million,
            cached_input: model.cached_input_per_million,
        }
    }

    /// The cost of `input` and `output` tokens.
    pub fn cost(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input + output as f64 * self.output) / 1_000_000.0
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

    #[test]
    fn cost_is_tokens_times_price_per_million() {
        let p = Pricing {
            input: 2.5,
            output: 10.0,
            cached_input: 1.25,
        };
        assert_eq!(p.cost(1_000_000, 0), 2.5);
        assert_eq!(p.cost(1_000, 500), 0.0075);
        assert_eq!(p.weight(), Some(12.5));
        assert_eq!(Pricing::default().weight(), None);
        assert_eq!(Pricing::default().cost(10, 10), 0.0);
    }
}
