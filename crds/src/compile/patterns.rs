//! Client-facing model names and globs.

use globset::{GlobBuilder, GlobMatcher};

/// Whether `pattern` contains glob syntax.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', ']', '{', '}'])
}

/// Compiles a model glob (`*` and `?` match any characters, `/` included; `[abc]` classes).
pub fn compile_glob(pattern: &str) -> Result<GlobMatcher, String> {
    if pattern.is_empty() || pattern.chars().any(char::is_whitespace) {
        return Err(format!("{pattern:?} is empty or contains whitespace"));
    }
    GlobBuilder::new(pattern)
        .literal_separator(false)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{pattern:?} is not a valid glob: {}", e.kind()))
}

/// Checks an exact name or a glob.
pub fn validate(pattern: &str) -> Result<(), String> {
    if is_glob(pattern) {
        compile_glob(pattern).map(|_| ())
    } else if pattern.is_empty() || pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!("{pattern:?} is empty or contains whitespace"))
    } else {
        Ok(())
    }
}

/// How specific a glob is: its number of literal characters (more wins).
pub fn specificity(pattern: &str) -> usize {
    pattern
        .chars()
        .filter(|c| !matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | ','))
        .count()
}

/// Whether any of `patterns` (exact names or globs) matches `model`. Invalid globs match
/// nothing.
pub fn any_matches(patterns: &[String], model: &str) -> bool {
    patterns.iter().any(|p| {
        if is_glob(p) {
            compile_glob(p).is_ok_and(|g| g.is_match(model))
        } else {
            p == model
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_across_slashes_and_exact_names_match_only_themselves() {
        let g = compile_glob("meta-llama/*").unwrap();
        assert!(g.is_match("meta-llama/Llama-3.1-8B"));
        assert!(compile_glob("gpt-4o*").unwrap().is_match("gpt-4o-mini"));
        assert!(!compile_glob("gpt-4o*").unwrap().is_match("gpt-4"));
        assert!(
            compile_glob("claude-?-*")
                .unwrap()
                .is_match("claude-3-opus")
        );
        assert!(any_matches(&["gpt-4o".into()], "gpt-4o"));
        assert!(!any_matches(&["gpt-4o".into()], "gpt-4o-mini"));
    }

    #[test]
    fn invalid_patterns_are_rejected() {
        assert!(validate("gpt-[4").is_err());
        assert!(validate("gpt 4").is_err());
        assert!(validate("").is_err());
        assert!(validate("{a,b").is_err());
        assert!(validate("gpt-4o").is_ok());
        assert!(validate("gpt-{4o,4}").is_ok());
    }

    #[test]
    fn longer_literal_patterns_are_more_specific() {
        assert!(specificity("gpt-4o-*") > specificity("gpt-*"));
        assert_eq!(specificity("*"), 0);
    }
}
