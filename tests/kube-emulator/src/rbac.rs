//! RBAC authorization for the client under test, from real Role / ClusterRole objects and
//! their bindings (for example a rendered Helm chart): a request no rule allows gets the
//! API server's 403 `Forbidden`, so a missing rule fails a test like it fails a cluster.
//!
//! Every HTTP request is the client under test (the harness writes directly to the store),
//! so once rules are set every resource request is authorized; discovery, `/version` and
//! health are open, as `system:discovery` makes them on a cluster.

use serde_json::Value;

/// One rule in force, with where it applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopedRule {
    /// `None`: every namespace and cluster-wide requests (a ClusterRoleBinding);
    /// `Some(ns)`: requests in that namespace (a RoleBinding).
    pub namespace: Option<String>,
    /// API groups (`""` is core; `*` any).
    pub api_groups: Vec<String>,
    /// Resources, `plural` or `plural/subresource` (`*` any).
    pub resources: Vec<String>,
    /// Verbs (`*` any).
    pub verbs: Vec<String>,
    /// Object names the rule is limited to; empty means any.
    pub resource_names: Vec<String>,
}

/// What one request asks to do, in RBAC's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub verb: String,
    /// API group (`""` is core).
    pub group: String,
    /// `plural` or `plural/subresource`.
    pub resource: String,
    /// Namespace of the request, if any.
    pub namespace: Option<String>,
    /// Object name (from the path, or a `metadata.name=` field selector on list/watch).
    pub name: Option<String>,
}

/// The rules of one subject.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rbac {
    /// Every rule bound to the subject.
    pub rules: Vec<ScopedRule>,
}

impl Rbac {
    /// The rules bound to ServiceAccount `namespace/name` by the Roles, ClusterRoles and
    /// bindings among `objects` (other kinds are ignored).
    pub fn for_service_account(objects: &[Value], namespace: &str, name: &str) -> Self {
        let find = |kind: &str, ns: Option<&str>, role: &str| {
            objects.iter().find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"] == role
                    && ns.is_none_or(|ns| o["metadata"]["namespace"] == ns)
            })
        };
        let mut rules = Vec::new();
        for binding in objects {
            let kind = binding["kind"].as_str().unwrap_or_default();
            if !matches!(kind, "RoleBinding" | "ClusterRoleBinding") {
                continue;
            }
            let bound = binding["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == name
                        && s["namespace"] == namespace
                });
            if !bound {
                continue;
            }
            let scope = (kind == "RoleBinding")
                .then(|| binding["metadata"]["namespace"].as_str().map(str::to_owned))
                .flatten();
            let role_ref = &binding["roleRef"];
            let role_name = role_ref["name"].as_str().unwrap_or_default();
            let role = match role_ref["kind"].as_str() {
                Some("Role") => find("Role", scope.as_deref(), role_name),
                Some("ClusterRole") => find("ClusterRole", None, role_name),
                _ => None,
            };
            let Some(role) = role else { continue };
            for rule in role["rules"].as_array().into_iter().flatten() {
                let strings = |field: &str| -> Vec<String> {
                    rule[field]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                };
                rules.push(ScopedRule {
                    namespace: scope.clone(),
                    api_groups: strings("apiGroups"),
                    resources: strings("resources"),
                    verbs: strings("verbs"),
                    resource_names: strings("resourceNames"),
                });
            }
        }
        Self { rules }
    }

    /// Whether some rule allows `request`.
    pub fn allows(&self, request: &Attributes) -> bool {
        self.rules.iter().any(|r| rule_allows(r, request))
    }
}

fn any_or(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

fn rule_allows(rule: &ScopedRule, request: &Attributes) -> bool {
    let scope_ok = match (&rule.namespace, &request.namespace) {
        (None, _) => true,
        (Some(rule_ns), Some(ns)) => rule_ns == ns,
        (Some(_), None) => false,
    };
    let names_ok = rule.resource_names.is_empty()
        || request
            .name
            .as_ref()
            .is_some_and(|n| rule.resource_names.contains(n));
    scope_ok
        && names_ok
        && any_or(&rule.api_groups, &request.group)
        && any_or(&rule.resources, &request.resource)
        && any_or(&rule.verbs, &request.verb)
}

/// The 403 message the API server writes.
pub fn forbidden_message(request: &Attributes) -> String {
    let (plural, sub) = request
        .resource
        .split_once('/')
        .map_or((request.resource.as_str(), None), |(p, s)| (p, Some(s)));
    let resource = match (&request.group, sub) {
        (g, None) if g.is_empty() => format!("resource \"{plural}\""),
        (g, None) => format!("resource \"{plural}\" in API group \"{g}\""),
        (g, Some(s)) if g.is_empty() => format!("resource \"{plural}/{s}\""),
        (g, Some(s)) => format!("resource \"{plural}/{s}\" in API group \"{g}\""),
    };
    let scope = match &request.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    format!(
        "the client under test cannot {} {resource} {scope}",
        request.verb
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn objects() -> Vec<Value> {
        vec![
            json!({"kind": "Role", "metadata": {"name": "r", "namespace": "a"}, "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"], "resourceNames": ["cfg"]},
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]},
            ]}),
            json!({"kind": "RoleBinding", "metadata": {"name": "rb", "namespace": "a"},
                "roleRef": {"kind": "Role", "name": "r"},
                "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "sys"}]}),
            json!({"kind": "ClusterRole", "metadata": {"name": "c"}, "rules": [
                {"apiGroups": ["tollgate.dev"], "resources": ["apikeys/status"], "verbs": ["patch"]},
            ]}),
            json!({"kind": "ClusterRoleBinding", "metadata": {"name": "crb"},
                "roleRef": {"kind": "ClusterRole", "name": "c"},
                "subjects": [{"kind": "ServiceAccount", "name": "other", "namespace": "sys"}]}),
        ]
    }

    fn ask(
        verb: &str,
        group: &str,
        resource: &str,
        ns: Option<&str>,
        name: Option<&str>,
    ) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.map(Into::into),
            name: name.map(Into::into),
        }
    }

    #[test]
    fn only_bound_rules_in_their_namespace_and_names_allow() {
        let rbac = Rbac::for_service_account(&objects(), "sys", "op");
        assert!(rbac.allows(&ask("patch", "", "configmaps", Some("a"), Some("cfg"))));
        assert!(!rbac.allows(&ask("patch", "", "configmaps", Some("a"), Some("other"))));
        assert!(!rbac.allows(&ask("patch", "", "configmaps", Some("b"), Some("cfg"))));
        assert!(rbac.allows(&ask("watch", "", "secrets", Some("a"), None)));
        assert!(
            !rbac.allows(&ask("watch", "", "secrets", None, None)),
            "cluster-wide"
        );
        assert!(!rbac.allows(&ask("get", "", "secrets", Some("a"), Some("x"))));
        // Bound to another ServiceAccount.
        assert!(!rbac.allows(&ask(
            "patch",
            "tollgate.dev",
            "apikeys/status",
            Some("a"),
            Some("k")
        )));
    }
}
