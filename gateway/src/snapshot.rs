//! An immutable, request-ready view of one [`GatewayConfig`]: hash maps and compiled globs
//! built once per reload, so the hot path does lookups only.

use std::{collections::HashMap, sync::Arc};

use sha2::{Digest, Sha256};

use crate::upstream::Operation;
use tollgate_api::{
    compile::patterns,
    config::{CompiledKey, CompiledProvider, CompiledRoute, GatewayConfig},
    guardrails::Guardrails,
};

/// A model name matcher: exact names plus globs.
#[derive(Debug, Default)]
pub struct ModelSet {
    exact: std::collections::HashSet<String>,
    globs: Vec<globset::GlobMatcher>,
}

impl ModelSet {
    fn new(patterns_in: &[String]) -> Self {
        let mut set = Self::default();
        for p in patterns_in {
            if patterns::is_glob(p) {
                // compile already rejected invalid globs.
                if let Ok(g) = patterns::compile_glob(p) {
                    set.globs.push(g);
                }
            } else {
                set.exact.insert(p.clone());
            }
        }
        set
    }

    /// Whether the set is empty (an empty allow-list allows everything).
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.globs.is_empty()
    }

    /// Whether `model` is in the set.
    pub fn contains(&self, model: &str) -> bool {
        self.exact.contains(model) || self.globs.iter().any(|g| g.is_match(model))
    }
}

/// A key as the hot path needs it.
#[derive(Debug)]
pub struct Key {
    /// Compiled entry (id, owner, limits, budget…).
    pub entry: CompiledKey,
    /// Allowed models; empty allows all.
    pub allowed: ModelSet,
    /// The key's own guardrails, checked after the route's.
    pub guardrails: Guards,
}

impl Key {
    /// Whether the key may call `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed.is_empty() || self.allowed.contains(model)
    }
}

/// A provider plus its credential and HTTP client.
pub struct Provider {
    /// Compiled settings.
    pub config: CompiledProvider,
    /// The credential, if any.
    pub credential: Option<String>,
    /// Pooled client for upstream calls (`None` for providers the gateway does not call
    /// over HTTP, such as the mock).
    pub client: Option<reqwest::Client>,
    /// Concurrency slots (`maxConcurrency`) for this replica, if limited.
    pub slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Upstream URLs by upstream model name and operation, parsed once per reload.
    endpoints: HashMap<String, [Option<reqwest::Url>; 4]>,
}

impl Provider {
    /// The URL of `operation` for `upstream_model`.
    pub fn endpoint(&self, operation: Operation, upstream_model: &str) -> Option<reqwest::Url> {
        self.endpoints.get(upstream_model)?[operation as usize].clone()
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

/// One served configuration.
#[derive(Debug)]
pub struct Snapshot {
    /// Hash identifying the configuration.
    pub config_hash: String,
    keys: HashMap<[u8; 32], Arc<Key>>,
    exact_routes: HashMap<String, usize>,
    glob_routes: Vec<(globset::GlobMatcher, usize)>,
    routes: Vec<Arc<CompiledRoute>>,
    /// Compiled guardrails by route id (routes without any are absent). Behind a pointer:
    /// snapshots move by value through the loader, and most configurations have none.
    route_guardrails: Arc<HashMap<String, Guards>>,
    providers: HashMap<String, Arc<Provider>>,
}

impl Snapshot {
    /// Builds the lookup structures.
    pub fn new(config: GatewayConfig, config_hash: String) -> Self {
        let GatewayConfig {
            routing,
            mut credentials,
            keys,
        } = config;
        let providers = routing
            .providers
            .into_iter()
            .map(|(id, config)| {
                let credential = credentials.providers.remove(&id);
                let client = crate::upstream::speaks_openai(config.provider_type)
                    .then(|| crate::upstream::client_for(&config))
                    .and_then(|built| {
                        built.map_err(|e| tracing::error!(provider = %id, error = %e, "cannot build an HTTP client")).ok()
                    });
                let slots = config.max_concurrency.map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize)));
                let endpoints = config
                    .models
                    .values()
                    .map(|m| {
                        let url = |op| {
                            reqwest::Url::parse(&crate::upstream::endpoint(&config, op, &m.upstream_name)).ok()
                        };
                        (m.upstream_name.clone(), Operation::ALL.map(url))
                    })
                    .collect();
                (id, Arc::new(Provider { config, credential, client, slots, endpoints }))
            })
            .collect();

        let mut exact_routes = HashMap::new();
        let mut globs: Vec<(usize, String, globset::GlobMatcher, usize)> = Vec::new();
        for (i, route) in routing.routes.iter().enumerate() {
            for name in &route.exact {
                exact_routes.insert(name.clone(), i);
            }
            for glob in &route.globs {
                if let Ok(m) = patterns::compile_glob(glob) {
                    globs.push((patterns::specificity(glob), route.id.clone(), m, i));
                }
            }
        }
        // Most specific glob first; ties go to the route id, so the order is stable.
        globs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let glob_routes = globs.into_iter().map(|(_, _, m, i)| (m, i)).collect();

        let route_guardrails = routing
            .routes
            .iter()
            .filter_map(|r| Some((r.id.clone(), compile_guardrails(&r.id, &r.guardrails)?)))
            .collect::<HashMap<_, _>>();

        let keys = keys
            .keys
            .into_iter()
            .filter_map(|entry| {
                let hash = decode_hex32(&entry.sha256)?;
                let allowed = ModelSet::new(&entry.allowed_models);
                let guardrails =
                    compile_guardrails(&entry.api_key, &entry.guardrails).unwrap_or_default();
                Some((
                    hash,
                    Arc::new(Key {
                        entry,
                        allowed,
                        guardrails,
                    }),
                ))
            })
            .collect();

        Self {
            config_hash,
            keys,
            exact_routes,
            glob_routes,
            routes: routing.routes.into_iter().map(Arc::new).collect(),
            route_guardrails: Arc::new(route_guardrails),
            providers,
        }
    }

    /// The key whose SHA-256 matches the presented secret, if any (expiry not checked).
    pub fn key(&self, presented: &str) -> Option<&Arc<Key>> {
        self.key_by_hash(&key_hash(presented))
    }

    /// The key with this SHA-256, if any.
    pub fn key_by_hash(&self, hash: &[u8; 32]) -> Option<&Arc<Key>> {
        self.keys.get(hash)
    }

    /// Hashes of every accepted key.
    pub fn key_hashes(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.keys.keys()
    }

    /// The compiled guardrails of the route `route_id`, if it has any.
    pub fn route_guardrails(&self, route_id: &str) -> Option<&Guards> {
        self.route_guardrails.get(route_id)
    }

    /// The route serving `model`: an exact name first, then the most specific glob.
    pub fn route(&self, model: &str) -> Option<&Arc<CompiledRoute>> {
        let index = self.exact_routes.get(model).copied().or_else(|| {
            self.glob_routes
                .iter()
                .find(|(g, _)| g.is_match(model))
                .map(|(_, i)| *i)
        })?;
        self.routes.get(index)
    }

    /// A provider by id.
    pub fn provider(&self, id: &str) -> Option<&Arc<Provider>> {
        self.providers.get(id)
    }

    /// Every concrete model name clients can ask for: exact route names, plus the
    /// provider models a glob route would send through unchanged.
    pub fn model_names(&self) -> Vec<(String, String)> {
        let mut out = std::collections::BTreeMap::new();
        for name in self.exact_routes.keys() {
            if let Some(route) = self.route(name) {
                out.insert(name.clone(), owner_of(route));
            }
        }
        for route in &self.routes {
            if route.globs.is_empty() {
                continue;
            }
            for target in route.tiers.iter().flatten().filter(|t| t.model.is_none()) {
                let Some(provider) = self.providers.get(&target.provider) else {
                    continue;
                };
                for model in provider.config.models.keys() {
                    // Only names this route actually wins.
                    if self.route(model).is_some_and(|r| Arc::ptr_eq(r, route)) {
                        out.insert(model.clone(), owner_of(route));
                    }
                }
            }
        }
        out.into_iter().collect()
    }

    /// Number of accepted key entries.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

/// SHA-256 of a presented key.
pub fn key_hash(presented: &str) -> [u8; 32] {
    Sha256::digest(presented.as_bytes()).into()
}

fn owner_of(route: &CompiledRoute) -> String {
    format!("tollgate:{}", route.id)
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// Guardrails of a route or key, compiled once per snapshot.
#[derive(Debug, Default)]
pub struct Guards {
    /// Rules checking requests.
    pub request: Option<Guardrails>,
    /// Rules checking complete answers.
    pub response: Option<Guardrails>,
}

/// Compiles a list of guardrails once per snapshot; `None` when it is empty. `compile`
/// already validated them, so a failure here means a hand-edited configuration: the owner
/// then gets a rule that blocks everything rather than no guardrails at all.
fn compile_guardrails(
    owner: &str,
    rules: &[tollgate_api::config::CompiledGuardrail],
) -> Option<Guards> {
    if rules.is_empty() {
        return None;
    }
    let build = |responses: bool| {
        let selected: Vec<_> = rules
            .iter()
            .filter(|r| if responses { r.response } else { r.request })
            .cloned()
            .collect();
        if selected.is_empty() {
            return None;
        }
        match Guardrails::new(&selected) {
            Ok(g) => Some(g),
            Err(error) => {
                tracing::error!(owner, %error, "invalid guardrails; every request of it is refused");
                Some(Guardrails::refuse_all("invalid-configuration"))
            }
        }
    };
    Some(Guards {
        request: build(false),
        response: build(true),
    })
}
