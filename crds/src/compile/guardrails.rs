//! `spec.guardrails` (RoutePolicy and ApiKey) → [`CompiledGuardrail`]s, with every invalid
//! rule reported. A list with an invalid rule is not compiled at all: serving the object
//! without a guardrail it declares would quietly weaken it.

use std::collections::BTreeSet;

use super::Report;
use crate::{
    config::CompiledGuardrail,
    diagnostics::{ObjectRef, reasons},
    guardrails,
    v1alpha1::{Guardrail, GuardrailTarget},
};

/// The compiled rules, or `None` (with errors reported) if any rule is invalid.
pub(super) fn compile(
    object: &ObjectRef,
    field: &str,
    rules: &[Guardrail],
    report: &mut Report,
) -> Option<Vec<CompiledGuardrail>> {
    let mut ok = true;
    let mut names = BTreeSet::new();
    let mut compiled = Vec::with_capacity(rules.len());
    for (i, r) in rules.iter().enumerate() {
        let here = format!("{field}[{i}]");
        let rule = CompiledGuardrail {
            name: r
                .name
                .clone()
                .unwrap_or_else(|| r.detector.as_str().to_owned()),
            detector: r.detector,
            pattern: r.pattern.clone(),
            terms: r.terms.clone(),
            limit: r.limit,
            action: r.action,
            request: r.apply_to.contains(&GuardrailTarget::Request),
            response: r.apply_to.contains(&GuardrailTarget::Response),
        };
        if !names.insert(rule.name.clone()) {
            report.error(
                object,
                reasons::INVALID_SPEC,
                &format!("{here}.name"),
                format!(
                    "guardrail name {:?} is used twice; name each rule of the same detector",
                    rule.name
                ),
            );
            ok = false;
        }
        if let Err(e) = guardrails::validate(&rule) {
            report.error(object, reasons::INVALID_SPEC, &here, e);
            ok = false;
        }
        compiled.push(rule);
    }
    ok.then_some(compiled)
}
