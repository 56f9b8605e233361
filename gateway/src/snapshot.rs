//! An immutable, request-ready view of one [`GatewayConfig`]: hash maps and compiled globs
//! built once per reload, so the hot path does lookups only.

use std::{collections::HashMap, sync::Arc};

use sha2::{Digest, Sha256};

use crate::targets::{Health, Provider, Route};
use tollgate_api::{
    compile::{patterns, views},
    config::{CompiledKey, CompiledRoute, GatewayConfig, namespace_of},
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
    /// The key's namespace (its tenant).
    pub namespace: String,
    /// Allowed models; empty allows all.
    pub allowed: ModelSet,
    /// The key's own guardrails, checked after the route's.
    pub guardrails: Guards,
    /// The routes the key can reach, shared by every key with the same namespace and
    /// accepted namespaces.
    routes: Arc<RouteView>,
}

/// Model names of one namespace's routes that one consumer namespace may use: exact names,
/// then globs, most specific first (indices into the snapshot's routes).
#[derive(Debug, Default)]
struct RouteTable {
    exact: HashMap<String, usize>,
    globs: Vec<(globset::GlobMatcher, usize)>,
}

impl RouteTable {
    fn new<'a>(routes: impl IntoIterator<Item = (usize, &'a CompiledRoute)>) -> Self {
        let mut exact = HashMap::new();
        let mut globs: Vec<(usize, &str, globset::GlobMatcher, usize)> = Vec::new();
        for (i, route) in routes {
            for name in &route.exact {
                exact.insert(name.clone(), i);
            }
            for glob in &route.globs {
                if let Ok(m) = patterns::compile_glob(glob) {
                    globs.push((patterns::specificity(glob), &route.id, m, i));
                }
            }
        }
        // Most specific glob first; ties go to the route id, so the order is stable.
        globs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        Self {
            exact,
            globs: globs.into_iter().map(|(_, _, m, i)| (m, i)).collect(),
        }
    }

    fn route(&self, model: &str) -> Option<usize> {
        self.exact.get(model).copied().or_else(|| {
            self.globs
                .iter()
                .find(|(g, _)| g.is_match(model))
                .map(|(_, i)| *i)
        })
    }
}

/// What one tenant sees: its namespace's routes, then those shared with it from the
/// namespaces it accepts, in order ([`tollgate_api::compile::views`]).
#[derive(Debug, Default)]
pub struct RouteView {
    layers: Vec<Arc<RouteTable>>,
}

impl RouteView {
    /// Index of the route serving `model`: the first layer that serves it wins.
    fn route(&self, model: &str) -> Option<usize> {
        self.layers.iter().find_map(|t| t.route(model))
    }
}

impl Key {
    /// Whether the key may call `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed.is_empty() || self.allowed.contains(model)
    }
}

/// One served configuration.
#[derive(Debug)]
pub struct Snapshot {
    /// Hash identifying the configuration.
    pub config_hash: String,
    keys: HashMap<[u8; 32], Arc<Key>>,
    routes: Vec<Arc<Route>>,
    /// Compiled guardrails by route id (routes without any are absent). Behind a pointer:
    /// snapshots move by value through the loader, and most configurations have none.
    route_guardrails: Arc<HashMap<String, Guards>>,
    providers: HashMap<String, Arc<Provider>>,
}

impl Snapshot {
    /// Builds the lookup structures.
    pub fn new(config: GatewayConfig, config_hash: String, health: &Health) -> Self {
        let GatewayConfig {
            routing,
            mut credentials,
            keys,
        } = config;
        let providers: HashMap<String, Arc<Provider>> = routing
            .providers
            .into_iter()
            .map(|(id, config)| {
                let credential = credentials.providers.remove(&id);
                let provider = Provider::new(config, credential, health);
                (id, Arc::new(provider))
            })
            .collect();

        let mut views = Views::new(&routing.routes);
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
                let namespace = namespace_of(&entry.api_key).to_owned();
                let routes = views.view(&namespace, &entry.shared_routes_from);
                Some((
                    hash,
                    Arc::new(Key {
                        entry,
                        namespace,
                        allowed,
                        guardrails,
                        routes,
                    }),
                ))
            })
            .collect();

        drop(views);
        Self {
            config_hash,
            keys,
            routes: routing
                .routes
                .into_iter()
                .map(|r| Arc::new(Route::new(r, |id| providers.get(id).cloned(), health)))
                .collect(),
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

    /// The route serving `model` for `key`: among its namespace's routes first, then the
    /// shared routes it accepts; within each, an exact name before the most specific glob.
    pub fn route_for(&self, key: &Key, model: &str) -> Option<&Arc<Route>> {
        self.routes.get(key.routes.route(model)?)
    }

    /// The route serving `model` for a key of `namespace` that accepts no shared route
    /// (tests and fuzzing).
    pub fn route_in_namespace(&self, namespace: &str, model: &str) -> Option<&Arc<Route>> {
        let routes: Vec<CompiledRoute> = self.routes.iter().map(|r| r.config.clone()).collect();
        let view = Views::new(&routes).view(namespace, &[]);
        self.routes.get(view.route(model)?)
    }

    /// A route by id.
    pub fn route_by_id(&self, id: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.id == id)
    }

    /// A provider by id.
    pub fn provider(&self, id: &str) -> Option<&Arc<Provider>> {
        self.providers.get(id)
    }

    /// Every concrete model name `key` can reach, with the route that owns it: exact
    /// route names, plus the provider models a glob route would send through unchanged.
    pub fn model_names(&self, key: &Key) -> Vec<(String, String)> {
        let mut out = std::collections::BTreeMap::new();
        let wins = |name: &str, route: &Arc<Route>| {
            self.route_for(key, name)
                .is_some_and(|r| Arc::ptr_eq(r, route))
        };
        for table in &key.routes.layers {
            for (name, &i) in &table.exact {
                if wins(name, &self.routes[i]) {
                    out.insert(name.clone(), owner_of(&self.routes[i]));
                }
            }
            for &(_, i) in &table.globs {
                let route = &self.routes[i];
                for target in route.tiers.iter().flatten().filter(|t| t.model.is_none()) {
                    let Some(provider) = self.providers.get(&target.provider) else {
                        continue;
                    };
                    for model in provider.config.models.keys() {
                        // Only names this route actually wins for this key.
                        if wins(model, route) {
                            out.insert(model.clone(), owner_of(route));
                        }
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

/// Builds [`RouteView`]s once per distinct (namespace, accepted namespaces), and each
/// table once per (namespace of the routes, namespace of the keys).
struct Views<'a> {
    routes: &'a [CompiledRoute],
    index: HashMap<&'a str, usize>,
    tables: HashMap<(String, String), Arc<RouteTable>>,
    views: HashMap<(String, Vec<String>), Arc<RouteView>>,
}

impl<'a> Views<'a> {
    fn new(routes: &'a [CompiledRoute]) -> Self {
        Self {
            routes,
            index: routes
                .iter()
                .enumerate()
                .map(|(i, r)| (r.id.as_str(), i))
                .collect(),
            tables: HashMap::new(),
            views: HashMap::new(),
        }
    }

    fn view(&mut self, namespace: &str, shared_routes_from: &[String]) -> Arc<RouteView> {
        let wanted = (namespace.to_owned(), shared_routes_from.to_vec());
        if let Some(v) = self.views.get(&wanted) {
            return v.clone();
        }
        let names = views::layer_namespaces(namespace, shared_routes_from);
        let layers = views::layers(self.routes, namespace, shared_routes_from);
        let mut tables = Vec::with_capacity(layers.len());
        for (from, routes) in names.into_iter().zip(layers) {
            let index = &self.index;
            let table = self
                .tables
                .entry((from.to_owned(), namespace.to_owned()))
                .or_insert_with(|| {
                    Arc::new(RouteTable::new(
                        routes.into_iter().map(|r| (index[r.id.as_str()], r)),
                    ))
                });
            tables.push(table.clone());
        }
        let view = Arc::new(RouteView { layers: tables });
        self.views.insert(wanted, view.clone());
        view
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
    pub request: Option<Arc<Guardrails>>,
    /// Rules checking answers (whole, and streamed as they are relayed).
    pub response: Option<Arc<Guardrails>>,
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
            Ok(g) => Some(Arc::new(g)),
            Err(error) => {
                tracing::error!(owner, %error, "invalid guardrails; every request of it is refused");
                Some(Arc::new(Guardrails::refuse_all("invalid-configuration")))
            }
        }
    };
    Some(Guards {
        request: build(false),
        response: build(true),
    })
}
