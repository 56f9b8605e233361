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
    // Each rule is valid alone; the gateway compiles the request rules and the response
    // rules each into one list, whose combined pre-filter has a size limit of its own.
    if ok && let Err(e) = guardrails::validate_list(&compiled) {
        report.error(object, reasons::INVALID_SPEC, field, e);
        ok = false;
    }
    ok.then_some(compiled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        diagnostics::Kind,
        v1alpha1::{Detector, GuardrailAction},
    };

    fn regex_rule(i: usize, target: GuardrailTarget, pattern: &str) -> Guardrail {
        Guardrail {
            name: Some(format!("r{i}")),
            detector: Detector::Regex,
            pattern: Some(pattern.to_owned()),
            terms: Vec::new(),
            limit: None,
            action: GuardrailAction::Block,
            apply_to: vec![target],
        }
    }

    fn run(rules: &[Guardrail]) -> (Option<Vec<CompiledGuardrail>>, Report) {
        let object = ObjectRef::new(Kind::RoutePolicy, "default", "chat");
        let mut report = Report::default();
        let out = compile(&object, "spec.guardrails", rules, &mut report);
        (out, report)
    }

    #[test]
    fn rules_valid_alone_but_too_large_together_are_an_invalid_spec() {
        let rules: Vec<_> = (0..9)
            .map(|i| regex_rule(i, GuardrailTarget::Response, r"\w{20}x"))
            .collect();
        let (out, report) = run(&rules);
        assert!(out.is_none());
        let [d] = report.diagnostics.as_slice() else {
            panic!("{:?}", report.diagnostics)
        };
        assert_eq!(d.reason, reasons::INVALID_SPEC);
        assert_eq!(d.field.as_deref(), Some("spec.guardrails"));
        assert!(
            d.message
                .contains("response guardrails cannot be compiled together"),
            "{}",
            d.message
        );

        let small: Vec<_> = (0..9)
            .map(|i| regex_rule(i, GuardrailTarget::Response, r"\w{2}x"))
            .collect();
        let (out, report) = run(&small);
        assert!(out.is_some() && report.diagnostics.is_empty());
    }

    #[test]
    fn a_pattern_that_matches_empty_text_is_an_invalid_spec() {
        let (out, report) = run(&[regex_rule(0, GuardrailTarget::Request, r"\b")]);
        assert!(out.is_none());
        assert_eq!(report.diagnostics.len(), 1);
        assert_eq!(
            report.diagnostics[0].field.as_deref(),
            Some("spec.guardrails[0]")
        );
        assert!(report.diagnostics[0].message.contains("empty text"));
    }
}
