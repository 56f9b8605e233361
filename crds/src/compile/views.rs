//! Which routes a key can reach: its namespace's, then the shared routes of the namespaces
//! it accepts, in order (docs/tenancy.md). The one definition of that precedence: compile
//! uses it for diagnostics, the gateway's snapshot for resolving model names.

use std::collections::HashMap;

use super::patterns;
use crate::{config::CompiledRoute, diagnostics::reasons};

/// The namespaces a key of `namespace` resolves names in, in order: its own, then each
/// accepted one once.
pub fn layer_namespaces<'a>(namespace: &'a str, shared_routes_from: &'a [String]) -> Vec<&'a str> {
    let mut out = vec![namespace];
    for from in shared_routes_from {
        if !out.contains(&from.as_str()) {
            out.push(from);
        }
    }
    out
}

/// The routes a key of `namespace` can use, one layer per namespace of
/// [`layer_namespaces`]: a model name is resolved in the first layer that serves it.
pub fn layers<'a>(
    routes: &'a [CompiledRoute],
    namespace: &str,
    shared_routes_from: &[String],
) -> Vec<Vec<&'a CompiledRoute>> {
    layer_namespaces(namespace, shared_routes_from)
        .into_iter()
        .map(|from| {
            routes
                .iter()
                .filter(|r| r.namespace() == from && r.usable_from(namespace))
                .collect()
        })
        .collect()
}

/// A warning about a key's view, shared by every key with the same namespace and list.
pub(super) struct ViewDiagnostic {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

/// What compile checks of one view.
pub(super) struct View {
    exact: Vec<String>,
    globs: Vec<String>,
    pub diagnostics: Vec<ViewDiagnostic>,
}

impl View {
    /// Whether any route of the view serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.exact.iter().any(|e| e == model) || patterns::any_matches(&self.globs, model)
    }
}

/// Views by (namespace, accepted namespaces), computed once each: 10,000 keys usually
/// share a handful.
pub(super) struct Views<'a> {
    routes: &'a [CompiledRoute],
    cache: HashMap<(String, Vec<String>), View>,
}

impl<'a> Views<'a> {
    pub fn new(routes: &'a [CompiledRoute]) -> Self {
        Self {
            routes,
            cache: HashMap::new(),
        }
    }

    pub fn get(&mut self, namespace: &str, shared_routes_from: &[String]) -> &View {
        let routes = self.routes;
        self.cache
            .entry((namespace.to_owned(), shared_routes_from.to_vec()))
            .or_insert_with(|| view(routes, namespace, shared_routes_from))
    }
}

/// At most this many shadowed names are listed in one message.
const LISTED: usize = 5;

fn view(routes: &[CompiledRoute], namespace: &str, shared_routes_from: &[String]) -> View {
    let mut v = View {
        exact: Vec::new(),
        globs: Vec::new(),
        diagnostics: Vec::new(),
    };
    let names = layer_namespaces(namespace, shared_routes_from);
    let layers = layers(routes, namespace, shared_routes_from);
    for (i, from) in shared_routes_from.iter().enumerate() {
        let field = format!("spec.sharedRoutesFrom[{i}]");
        if from == namespace {
            v.diagnostics.push(ViewDiagnostic {
                reason: reasons::INVALID_SPEC,
                field,
                message: "the key's own namespace is always used first; no need to list it"
                    .to_owned(),
            });
        } else if names
            .iter()
            .zip(&layers)
            .any(|(ns, rs)| ns == from && rs.is_empty())
        {
            v.diagnostics.push(ViewDiagnostic {
                reason: reasons::REF_NOT_PERMITTED,
                field,
                message: format!(
                    "namespace {from} shares no RoutePolicy with namespace {namespace} (RoutePolicy spec.sharedWith)"
                ),
            });
        }
    }
    for (layer, (from, rs)) in names.iter().zip(&layers).enumerate() {
        let mut shadowed = Vec::new();
        for r in rs {
            for name in &r.exact {
                if v.serves(name) {
                    shadowed.push(format!("{name:?} of RoutePolicy {}", r.id));
                }
            }
            for glob in &r.globs {
                if v.globs.contains(glob) {
                    shadowed.push(format!("{glob:?} of RoutePolicy {}", r.id));
                }
            }
        }
        // Names within one layer were already settled by per-namespace claims.
        for r in rs {
            v.exact.extend(r.exact.iter().cloned());
            v.globs.extend(r.globs.iter().cloned());
        }
        if layer > 0 && !shadowed.is_empty() {
            let more = shadowed.len().saturating_sub(LISTED);
            shadowed.truncate(LISTED);
            let mut message = format!(
                "shared from {from} but served first by an earlier namespace, which wins: {}",
                shadowed.join(", ")
            );
            if more > 0 {
                message.push_str(&format!(" and {more} more"));
            }
            v.diagnostics.push(ViewDiagnostic {
                reason: reasons::SHARED_ROUTE_SHADOWED,
                field: "spec.sharedRoutesFrom".to_owned(),
                message,
            });
        }
    }
    if v.exact.is_empty() && v.globs.is_empty() {
        let mut elsewhere: Vec<&str> = routes
            .iter()
            .map(CompiledRoute::namespace)
            .filter(|ns| *ns != namespace)
            .collect();
        elsewhere.dedup();
        let hint = if elsewhere.is_empty() {
            String::new()
        } else {
            format!(
                "; RoutePolicies of other namespaces ({}) serve a key only when shared with its namespace (RoutePolicy spec.sharedWith) and accepted (ApiKey spec.sharedRoutesFrom), see docs/tenancy.md",
                elsewhere
                    .iter()
                    .take(LISTED)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        v.diagnostics.push(ViewDiagnostic {
            reason: reasons::NO_ROUTES,
            field: String::new(),
            message: format!(
                "no RoutePolicy of namespace {namespace} or shared with it serves any model, so every call with this key is refused{hint}"
            ),
        });
    }
    v
}
