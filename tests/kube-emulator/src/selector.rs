//! Label and field selectors (`labelSelector=` / `fieldSelector=` query parameters).
//!
//! Label selectors support the full string syntax of the API server:
//! `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (a,b)` and
//! `key notin (a,b)`, combined with commas (logical AND). As in Kubernetes,
//! `!=` and `notin` also match objects that do not have the key at all.
//!
//! Field selectors support `metadata.name` and `metadata.namespace` with `=`,
//! `==` and `!=`; other field labels are rejected like the API server rejects
//! labels a resource does not support.

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector: all requirements must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    /// Parses the string form; an empty string selects everything.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in split_top_level(s) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            reqs.push(parse_label_term(term)?);
        }
        Ok(Self(reqs))
    }

    /// Whether an object with `labels` (a JSON map, or null) is selected.
    pub fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, set) => get(k).is_some_and(|v| set.iter().any(|s| s == v)),
            LabelReq::NotIn(k, set) => !get(k).is_some_and(|v| set.iter().any(|s| s == v)),
        })
    }
}

/// Splits on commas that are not inside `( ... )`.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

fn parse_label_term(term: &str) -> Result<LabelReq, String> {
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        check_key(key, term)?;
        return Ok(LabelReq::NotExists(key.to_string()));
    }
    let key_end = term.find(|c: char| !is_key_char(c)).unwrap_or(term.len());
    let key = &term[..key_end];
    check_key(key, term)?;
    let rest = term[key_end..].trim_start();
    if rest.is_empty() {
        return Ok(LabelReq::Exists(key.to_string()));
    }
    let value = |v: &str| -> Result<String, String> {
        let v = v.trim();
        if v.chars().all(is_key_char) {
            Ok(v.to_string())
        } else {
            Err(format!("invalid label value in selector term {term:?}"))
        }
    };
    if let Some(v) = rest.strip_prefix("!=") {
        return Ok(LabelReq::NotEquals(key.to_string(), value(v)?));
    }
    if let Some(v) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
        return Ok(LabelReq::Equals(key.to_string(), value(v)?));
    }
    if let Some(set) = rest.strip_prefix("notin") {
        return Ok(LabelReq::NotIn(key.to_string(), parse_set(set, term)?));
    }
    if let Some(set) = rest.strip_prefix("in") {
        return Ok(LabelReq::In(key.to_string(), parse_set(set, term)?));
    }
    Err(format!("unable to parse label selector term {term:?}"))
}

fn check_key(key: &str, term: &str) -> Result<(), String> {
    if key.is_empty() || !key.chars().all(is_key_char) {
        Err(format!("invalid label key in selector term {term:?}"))
    } else {
        Ok(())
    }
}

fn parse_set(set: &str, term: &str) -> Result<Vec<String>, String> {
    let inner = set
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised value set in {term:?}"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

/// A parsed field selector: all `(field, value, negated)` terms must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, String, bool)>);

impl FieldSelector {
    /// Parses the string form; an empty string selects everything.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value, negated) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, v, false)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let field = field.trim();
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), value.trim().to_string(), negated));
        }
        Ok(Self(terms))
    }

    /// Whether `obj` is selected.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, value, negated)| {
            let actual = match field.as_str() {
                "metadata.name" => obj["metadata"]["name"].as_str(),
                _ => obj["metadata"]["namespace"].as_str(),
            }
            .unwrap_or("");
            (actual == value) != *negated
        })
    }
}

/// Label and field selector of one request.
#[derive(Clone, Debug, Default)]
pub(crate) struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, String> {
        Ok(Self {
            labels: LabelSelector::parse(labels.unwrap_or(""))?,
            fields: FieldSelector::parse(fields.unwrap_or(""))?,
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(&obj["metadata"]["labels"]) && self.fields.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(s: &str, labels: Value) -> bool {
        LabelSelector::parse(s).unwrap().matches(&labels)
    }

    #[test]
    fn label_selector_operators() {
        let l = json!({"app": "gw", "tier": "edge", "dotted.io/key": "x"});
        assert!(sel("", l.clone()));
        assert!(sel("app=gw", l.clone()));
        assert!(sel("app==gw", l.clone()));
        assert!(!sel("app=other", l.clone()));
        assert!(sel("app!=other", l.clone()));
        assert!(sel("missing!=x", l.clone()));
        assert!(sel("app", l.clone()));
        assert!(!sel("!app", l.clone()));
        assert!(sel("!missing", l.clone()));
        assert!(sel("tier in (edge, core)", l.clone()));
        assert!(sel("tier in(edge)", l.clone()));
        assert!(!sel("tier notin (edge,core)", l.clone()));
        assert!(sel("missing notin (edge)", l.clone()));
        assert!(!sel("missing in (edge)", l.clone()));
        assert!(sel(
            "app=gw, tier in (edge,core),dotted.io/key=x",
            l.clone()
        ));
        assert!(!sel("app=gw,tier=core", l.clone()));
        assert!(sel("!app", Value::Null));
    }

    #[test]
    fn label_selector_rejects_garbage() {
        assert!(LabelSelector::parse("app=(x").is_err());
        assert!(LabelSelector::parse("app in x").is_err());
        assert!(LabelSelector::parse("=x").is_err());
    }

    #[test]
    fn field_selector() {
        let o = json!({"metadata": {"name": "a", "namespace": "ns1"}});
        let f = |s: &str| FieldSelector::parse(s).unwrap().matches(&o);
        assert!(f("metadata.name=a"));
        assert!(f("metadata.name==a,metadata.namespace=ns1"));
        assert!(!f("metadata.name!=a"));
        assert!(f("metadata.namespace!=ns2"));
        assert!(FieldSelector::parse("spec.x=1").is_err());
    }
}
