//! Route targets resolved once per configuration load, so the request path does no
//! string formatting and no lookup by composed keys.
//!
//! [`Health`] holds what must outlive configuration snapshots: circuit breakers per
//! provider model and routing statistics per route target. Loading a configuration
//! ([`crate::snapshot::Snapshot::new`]) takes handles from it: each
//! [`Provider`] gets its [`ProviderModel`]s (upstream name, URLs,
//! pricing, breaker) and each route its [`ResolvedTarget`]s. A target that names its
//! model is resolved completely then; a target that passes the requested model through
//! (glob routes) finds its provider model by name and its statistics by key on each
//! request, since the model is only known then.

use std::sync::Arc;

use std::collections::HashMap;

use tollgate_api::config::{CompiledModel, CompiledProvider, CompiledRoute, CompiledTarget};

use crate::{
    circuit::{Breaker, Breakers},
    dialects::Operation,
    pricing::Pricing,
    target_stats::{Slot, TargetStatsStore},
};

/// State about upstream targets that outlives configuration reloads.
#[derive(Debug, Default)]
pub struct Health {
    /// Circuit breakers per provider model.
    pub breakers: Breakers,
    /// Recent latency and outcomes per route target, for adaptive routing.
    pub stats: Arc<TargetStatsStore>,
}

/// A provider plus its credential and HTTP client.
pub struct Provider {
    /// Compiled settings.
    pub config: CompiledProvider,
    /// The credential, if any.
    pub credential: Option<String>,
    /// What kind of API it is (`None` for the in-process mock).
    pub adapter: Option<&'static dyn crate::providers::Adapter>,
    /// Pooled client for upstream calls (`None` for providers the gateway does not call
    /// over HTTP, such as the mock).
    pub client: Option<reqwest::Client>,
    /// Concurrency slots (`maxConcurrency`) for this replica, if limited.
    pub slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Its models, resolved once per reload (URLs, pricing, breaker), by name.
    models: HashMap<String, Arc<ProviderModel>>,
}

impl Provider {
    /// Builds the HTTP client, the concurrency slots and the models of `config`.
    pub fn new(config: CompiledProvider, credential: Option<String>, health: &Health) -> Self {
        let adapter = crate::providers::adapter(config.provider_type);
        let client = adapter
            .map(|_| crate::upstream::client_for(&config))
            .and_then(|built| {
                built
                    .map_err(|e| tracing::error!(provider = %config.id, error = %e, "cannot build an HTTP client"))
                    .ok()
            });
        let slots = config
            .max_concurrency
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize)));
        let models = config
            .models
            .iter()
            .map(|(name, m)| {
                let resolved = ProviderModel::new(&config, adapter, name, m, &health.breakers);
                (name.clone(), Arc::new(resolved))
            })
            .collect();
        Self {
            config,
            credential,
            adapter,
            client,
            slots,
            models,
        }
    }

    /// What must never reach a client: the credential and the extra header values (an
    /// upstream may echo them in its errors).
    pub fn secrets(&self) -> Vec<&str> {
        self.credential
            .as_deref()
            .into_iter()
            .chain(self.config.headers.values().map(String::as_str))
            .collect()
    }

    /// The model `name`, if the provider serves it.
    pub fn model(&self, name: &str) -> Option<&Arc<ProviderModel>> {
        self.models.get(name)
    }
}

// Never print the credential.
impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("config", &self.config)
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// One model of one provider, ready to call.
#[derive(Debug)]
pub struct ProviderModel {
    /// The model's name at the provider (the key of its `models`).
    pub name: String,
    /// Name sent upstream.
    pub upstream_name: String,
    /// Prices per million tokens.
    pub pricing: Pricing,
    /// Upstream URL per operation (empty for the in-process mock).
    pub endpoints: [Option<reqwest::Url>; Operation::ALL.len()],
    /// Its circuit breaker, shared with every snapshot that serves it.
    pub breaker: Arc<Breaker>,
    /// Its context window (`contextWindow`), in tokens.
    pub context_window: Option<u64>,
    /// Most tokens it generates in one answer (`maxOutputTokens`).
    pub max_output: Option<u64>,
}

/// What a request needs of a model's limits: its prompt, estimated, and the output it asks
/// for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// Estimated prompt tokens.
    pub prompt: u64,
    /// `max_tokens` (or its other names), when the request sets it.
    pub output: Option<u64>,
}

/// Whether a request fits a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// It does (or the model declares no limits).
    Fits,
    /// Prompt plus requested output exceed the context window.
    TooLong {
        /// The window.
        window: u64,
    },
    /// The requested output exceeds what the model generates.
    OutputTooLarge {
        /// The model's output limit.
        max: u64,
    },
}

impl ProviderModel {
    /// Resolves `model` of `provider`.
    pub fn new(
        provider: &tollgate_api::config::CompiledProvider,
        adapter: Option<&'static dyn crate::providers::Adapter>,
        name: &str,
        model: &CompiledModel,
        breakers: &Breakers,
    ) -> Self {
        let endpoints = Operation::ALL.map(|op| {
            adapter.and_then(|a| {
                reqwest::Url::parse(&a.endpoint(provider, op, &model.upstream_name)).ok()
            })
        });
        Self {
            name: name.to_owned(),
            upstream_name: model.upstream_name.clone(),
            pricing: Pricing::of(model),
            endpoints,
            breaker: breakers.get(&provider.id, name),
            context_window: model.context_window.map(u64::from),
            max_output: model.max_output_tokens.map(u64::from),
        }
    }

    /// Whether this model declares limits a request may exceed.
    pub fn has_limits(&self) -> bool {
        self.context_window.is_some() || self.max_output.is_some()
    }

    /// Whether a request needing `need` fits this model.
    pub fn fit(&self, need: &Need) -> Fit {
        if let (Some(max), Some(output)) = (self.max_output, need.output)
            && output > max
        {
            return Fit::OutputTooLarge { max };
        }
        match self.context_window {
            Some(window) if need.prompt.saturating_add(need.output.unwrap_or(0)) > window => {
                Fit::TooLong { window }
            }
            _ => Fit::Fits,
        }
    }

    /// The URL of `operation`.
    pub fn endpoint(&self, operation: Operation) -> Option<&reqwest::Url> {
        self.endpoints[operation as usize].as_ref()
    }
}

/// A compiled route with its targets resolved.
#[derive(Debug)]
pub struct Route {
    /// The compiled route.
    pub config: CompiledRoute,
    /// Its targets, tier by tier, in the order of `config.tiers`.
    pub targets: Vec<Vec<ResolvedTarget>>,
}

impl std::ops::Deref for Route {
    type Target = CompiledRoute;

    fn deref(&self) -> &CompiledRoute {
        &self.config
    }
}

impl Route {
    /// Resolves the targets of `config` against `providers`.
    pub fn new(
        config: CompiledRoute,
        provider: impl Fn(&str) -> Option<Arc<Provider>>,
        health: &Health,
    ) -> Self {
        let targets = config
            .tiers
            .iter()
            .map(|tier| {
                tier.iter()
                    .map(|t| ResolvedTarget::new(&config.id, t, provider(&t.provider), health))
                    .collect()
            })
            .collect();
        Self { config, targets }
    }
}

/// One target of a route.
#[derive(Debug)]
pub struct ResolvedTarget {
    /// As compiled.
    pub config: CompiledTarget,
    /// Its provider; `None` when the configuration lacks it (the target is skipped).
    pub provider: Option<Arc<Provider>>,
    /// Set when the target names its model: that model and the target's statistics.
    fixed: Option<(Option<Arc<ProviderModel>>, Arc<Slot>)>,
}

impl ResolvedTarget {
    fn new(
        route: &str,
        config: &CompiledTarget,
        provider: Option<Arc<Provider>>,
        health: &Health,
    ) -> Self {
        let fixed = config.model.as_deref().map(|model| {
            let resolved = provider.as_ref().and_then(|p| p.model(model).cloned());
            (resolved, health.stats.slot(route, &config.provider, model))
        });
        Self {
            config: config.clone(),
            provider,
            fixed,
        }
    }

    /// The model this target sends `requested` to (its own when it names one).
    pub fn model_name<'a>(&'a self, requested: &'a str) -> &'a str {
        self.config.model.as_deref().unwrap_or(requested)
    }

    /// The provider model serving a request for `requested`, if the provider has it.
    pub fn model(&self, requested: &str) -> Option<Arc<ProviderModel>> {
        match &self.fixed {
            Some((model, _)) => model.clone(),
            None => self.provider.as_ref()?.model(requested).cloned(),
        }
    }

    /// The target's routing statistics for a request for `requested`.
    pub fn stats(&self, route: &str, requested: &str, store: &TargetStatsStore) -> Arc<Slot> {
        match &self.fixed {
            Some((_, slot)) => slot.clone(),
            None => store.slot(route, &self.config.provider, requested),
        }
    }
}

impl crate::routing::Weighted for ResolvedTarget {
    fn weight(&self) -> u32 {
        self.config.weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_fits_a_model_by_its_window_and_output_limit() {
        let model = |window: Option<u64>, max_output: Option<u64>| ProviderModel {
            name: "m".into(),
            upstream_name: "m".into(),
            pricing: Pricing::default(),
            endpoints: Default::default(),
            breaker: Default::default(),
            context_window: window,
            max_output,
        };
        let need = |prompt, output| Need { prompt, output };
        let small = model(Some(8_000), Some(1_000));
        assert_eq!(small.fit(&need(6_000, Some(1_000))), Fit::Fits);
        assert_eq!(
            small.fit(&need(7_500, None)),
            Fit::Fits,
            "no output asked: the prompt alone"
        );
        assert_eq!(
            small.fit(&need(7_500, Some(1_000))),
            Fit::TooLong { window: 8_000 }
        );
        assert_eq!(
            small.fit(&need(10, Some(4_000))),
            Fit::OutputTooLarge { max: 1_000 }
        );
        assert_eq!(
            small.fit(&need(u64::MAX, Some(u64::MAX))),
            Fit::OutputTooLarge { max: 1_000 }
        );
        let unbounded = model(None, None);
        assert!(!unbounded.has_limits());
        assert_eq!(unbounded.fit(&need(u64::MAX, Some(u64::MAX))), Fit::Fits);
    }
    use crate::{
        config_source::{Outcome, Source},
        snapshot::Snapshot,
    };

    const CONFIG: &str = "\
apiVersion: tollgate.dev/v1alpha1
kind: Provider
metadata: {name: mock}
spec: {type: mock, models: [{name: small, pricing: {inputPerMillion: 1, outputPerMillion: 2}}, {name: large}]}
---
apiVersion: tollgate.dev/v1alpha1
kind: RoutePolicy
metadata: {name: chat}
spec:
  models: [chat]
  targets: [{provider: mock, model: small}]
---
apiVersion: tollgate.dev/v1alpha1
kind: RoutePolicy
metadata: {name: all}
spec:
  models: ['*']
  targets: [{provider: mock}]
";

    fn load(dir: &std::path::Path, health: &Health) -> Snapshot {
        match Source::Resources(dir.to_owned()).load_if_changed(None, true, health) {
            Outcome::Loaded(l) => l.snapshot,
            other => panic!("not loaded: {other:?}"),
        }
    }

    #[test]
    fn reloads_hand_out_the_same_breakers_and_statistics() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.yaml"), CONFIG).unwrap();
        let health = Health::default();
        let (first, second) = (load(dir.path(), &health), load(dir.path(), &health));
        let route = |s: &Snapshot, model: &str| {
            let key_ns = "default";
            s.route_in_namespace(key_ns, model).unwrap().clone()
        };
        let (a, b) = (route(&first, "chat"), route(&second, "chat"));
        let (ta, tb) = (&a.targets[0][0], &b.targets[0][0]);
        let (ma, mb) = (ta.model("chat").unwrap(), tb.model("chat").unwrap());
        assert_eq!(
            ma.name, "small",
            "the target's own model, not the requested one"
        );
        assert_eq!(ma.pricing.weight(), Some(3.0));
        assert!(
            Arc::ptr_eq(&ma.breaker, &mb.breaker),
            "a reload keeps the circuit"
        );
        ma.breaker.failure(1, 60_000);
        assert!(
            !mb.breaker.allow(),
            "the open circuit is seen through the new snapshot"
        );
        let (sa, sb) = (
            ta.stats(&a.id, "chat", &health.stats),
            tb.stats(&b.id, "chat", &health.stats),
        );
        assert!(
            Arc::ptr_eq(&sa, &sb),
            "a reload keeps the routing statistics"
        );

        // A target without a model of its own serves the requested one, if the provider
        // has it, with a breaker per model.
        let glob = route(&first, "large");
        let pass = &glob.targets[0][0];
        let large = pass.model("large").unwrap();
        assert_eq!(large.name, "large");
        assert!(!Arc::ptr_eq(&large.breaker, &ma.breaker));
        assert!(large.breaker.allow());
        assert!(pass.model("unknown").is_none());
    }
}
