//! Helm's custom readiness: a chart may annotate an object with
//! `helm.sh/readiness-success` and `helm.sh/readiness-failure`, each a JSON array of
//! `{<jsonpath>} <op> <value>` expressions evaluated against the object's `.status`, and
//! `helm --wait` then judges that object by them instead of its kind's rules. Failure
//! conditions win; with only one of the two annotations, Helm keeps its kind's rules, and so
//! do we.
//!
//! Paths are rooted at `.status` (`{.phase}` and `{.status.phase}` are the same) and are
//! evaluated as RFC 9535 JSONPath, which reads the usual Kubernetes forms
//! (`{.conditions[?(@.type=="Ready")].status}`). Comparison as Helm does it: numerically when
//! both sides are numbers, as booleans for `true`/`false`, otherwise as strings (`==`, `!=`
//! only; an ordering of non-numbers is a condition not met).

use std::collections::BTreeMap;

use serde_json::Value;
use serde_json_path::JsonPath;

pub const SUCCESS_ANNOTATION: &str = "helm.sh/readiness-success";
/// Longest annotation value taken, in bytes.
const MAX_ANNOTATION_BYTES: usize = 4096;
/// Brackets and parentheses an expression's path may hold: the JSONPath parser backtracks
/// on nested filters, its time doubling with each level (found by fuzzing: 30 nested `[?@`
/// would take the better part of an hour), and real readiness paths nest one or two.
const MAX_PATH_NESTING: usize = 8;
pub const FAILURE_ANNOTATION: &str = "helm.sh/readiness-failure";

/// Whether both annotations are present (the only case where they replace the kind's rules).
pub fn declared(annotations: &BTreeMap<String, String>) -> bool {
    annotations.contains_key(SUCCESS_ANNOTATION) && annotations.contains_key(FAILURE_ANNOTATION)
}

/// The object's readiness by its annotations: `None` when it does not declare both, so the
/// kind's rules apply; otherwise ready (`Ok`) or why not.
pub fn evaluate(annotations: &BTreeMap<String, String>, status: Option<&Value>) -> Option<Result<(), String>> {
    let success = annotations.get(SUCCESS_ANNOTATION)?;
    let failure = annotations.get(FAILURE_ANNOTATION)?;
    Some(contained(|| judge(success, failure, status)))
}

/// Runs `evaluate` so that a panic in the JSONPath library on hostile input (serde_json_path
/// has had one) is this object's error, never the end of the watch that judges its kind.
fn contained(evaluate: impl FnOnce() -> Result<(), String> + std::panic::UnwindSafe) -> Result<(), String> {
    std::panic::catch_unwind(evaluate).unwrap_or_else(|_| {
        Err("its readiness annotations could not be evaluated (the JSONPath library failed on them)".to_owned())
    })
}

fn judge(success: &str, failure: &str, status: Option<&Value>) -> Result<(), String> {
    let success = parse(SUCCESS_ANNOTATION, success)?;
    let failure = parse(FAILURE_ANNOTATION, failure)?;
    if success.is_empty() || failure.is_empty() {
        // Helm: an empty list counts as absent.
        return Err(format!(
            "{SUCCESS_ANNOTATION} and {FAILURE_ANNOTATION} must both list conditions"
        ));
    }
    let Some(status) = status else {
        return Err("it has no status yet".to_owned());
    };
    let root = serde_json::json!({ "status": status });
    if let Some(met) = failure.iter().find(|expression| expression.holds(&root)) {
        return Err(format!("readiness failure condition met: {}", met.text));
    }
    if success.iter().any(|expression| expression.holds(&root)) {
        return Ok(());
    }
    let texts: Vec<&str> = success.iter().map(|expression| expression.text.as_str()).collect();
    Err(format!("no readiness success condition met yet: {}", texts.join(", ")))
}

#[derive(Debug)]
struct Expression {
    text: String,
    path: JsonPath,
    op: Op,
    value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

fn parse(annotation: &str, value: &str) -> Result<Vec<Expression>, String> {
    let invalid = |why: String| format!("annotation {annotation} is invalid: {why}");
    if value.len() > MAX_ANNOTATION_BYTES {
        return Err(invalid(format!("longer than {MAX_ANNOTATION_BYTES} bytes")));
    }
    let texts: Vec<String> =
        serde_json::from_str(value.trim()).map_err(|error| invalid(format!("not a JSON array of strings: {error}")))?;
    texts
        .iter()
        .map(|text| Expression::parse(text.trim()).map_err(&invalid))
        .collect()
}

/// Whether every `\\u` escape in `path` has its four hex digits. serde_json_path 0.7.2 panics
/// (an `unreachable!` on a streaming parser's "incomplete") when a path ends inside one, as in
/// `{.s['\\u}`: found by the fuzzer, so such paths never reach the parser.
fn unicode_escapes_complete(path: &str) -> bool {
    let mut chars = path.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('u') => {
                    let digits = chars.clone().take(4).filter(char::is_ascii_hexdigit).count();
                    if digits < 4 {
                        return false;
                    }
                }
                Some(_) => {}
                None => return false,
            }
        }
    }
    true
}

impl Expression {
    fn parse(text: &str) -> Result<Self, String> {
        let inner = text
            .strip_prefix('{')
            .ok_or_else(|| format!("{text:?} does not start with {{<jsonpath>}}"))?;
        let (path, rest) = inner
            .split_once('}')
            .ok_or_else(|| format!("{text:?} misses the closing }}"))?;
        let path = path.trim();
        let nesting = |open: char| path.chars().filter(|c| *c == open).count();
        if nesting('[') > MAX_PATH_NESTING || nesting('(') > MAX_PATH_NESTING {
            return Err(format!(
                "{text:?}: the path has more than {MAX_PATH_NESTING} brackets or parentheses"
            ));
        }
        if !unicode_escapes_complete(path) {
            return Err(format!("{text:?}: a \\u escape needs four hex digits"));
        }
        let rooted = if path.starts_with(".status.") || path.starts_with(".status[") {
            format!("${path}")
        } else if path.starts_with('.') || path.starts_with('[') {
            format!("$.status{path}")
        } else {
            return Err(format!("{text:?}: the path must start with . or ["));
        };
        let path = JsonPath::parse(&rooted).map_err(|error| format!("{text:?}: invalid JSONPath: {error}"))?;
        let rest = rest.trim_start();
        let (op, value) = [
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("<", Op::Lt),
            (">", Op::Gt),
        ]
        .into_iter()
        .find_map(|(symbol, op)| rest.strip_prefix(symbol).map(|value| (op, value.trim())))
        .ok_or_else(|| format!("{text:?}: expected one of == != < <= > >= after the path"))?;
        if value.is_empty() {
            return Err(format!("{text:?} misses the value to compare with"));
        }
        let value = unquote(value).to_owned();
        if !matches!(op, Op::Eq | Op::Ne) && value.parse::<f64>().is_err() {
            return Err(format!("{text:?}: < <= > >= need a number"));
        }
        Ok(Self {
            text: text.to_owned(),
            path,
            op,
            value,
        })
    }

    /// Whether the condition holds; a path that finds nothing does not.
    fn holds(&self, root: &Value) -> bool {
        let found = self.path.query(root).all();
        if found.is_empty() {
            return false;
        }
        // As kubectl's JSONPath prints it: several results joined by a space.
        let actual = found.iter().map(|value| text(value)).collect::<Vec<_>>().join(" ");
        compare(&actual, self.op, &self.value)
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn unquote(value: &str) -> &str {
    for quote in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(quote).and_then(|rest| rest.strip_suffix(quote)) {
            return inner;
        }
    }
    value
}

fn compare(actual: &str, op: Op, expected: &str) -> bool {
    if let (Ok(actual), Ok(expected)) = (actual.parse::<f64>(), expected.parse::<f64>()) {
        return match op {
            Op::Eq => actual == expected,
            Op::Ne => actual != expected,
            Op::Lt => actual < expected,
            Op::Le => actual <= expected,
            Op::Gt => actual > expected,
            Op::Ge => actual >= expected,
        };
    }
    // Booleans and strings: only equality makes sense.
    match op {
        Op::Eq => actual == expected,
        Op::Ne => actual != expected,
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn annotations(success: &str, failure: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (SUCCESS_ANNOTATION.to_owned(), success.to_owned()),
            (FAILURE_ANNOTATION.to_owned(), failure.to_owned()),
        ])
    }

    #[test]
    fn both_annotations_replace_the_kind_rules() {
        let declared = annotations(r#"["{.phase} == \"Ready\""]"#, r#"["{.phase} == 'Failed'"]"#);
        assert_eq!(evaluate(&declared, Some(&json!({"phase": "Ready"}))), Some(Ok(())));
        assert_eq!(
            evaluate(&declared, Some(&json!({"phase": "Failed"}))),
            Some(Err("readiness failure condition met: {.phase} == 'Failed'".into()))
        );
        assert_eq!(
            evaluate(&declared, Some(&json!({"phase": "Pending"}))),
            Some(Err(
                "no readiness success condition met yet: {.phase} == \"Ready\"".into()
            ))
        );
        assert_eq!(evaluate(&declared, None), Some(Err("it has no status yet".into())));
        let only_success = BTreeMap::from([(SUCCESS_ANNOTATION.to_owned(), "[]".to_owned())]);
        assert_eq!(
            evaluate(&only_success, Some(&json!({}))),
            None,
            "the kind's rules apply"
        );
    }

    #[test]
    fn failure_wins_over_success() {
        let declared = annotations(r#"["{.ready} == true"]"#, r#"["{.errors} > 0"]"#);
        assert_eq!(
            evaluate(&declared, Some(&json!({"ready": true, "errors": 2}))),
            Some(Err("readiness failure condition met: {.errors} > 0".into()))
        );
        assert_eq!(
            evaluate(&declared, Some(&json!({"ready": true, "errors": 0}))),
            Some(Ok(()))
        );
    }

    #[test]
    fn paths_numbers_and_filters_read_as_helm_reads_them() {
        let status = json!({
            "succeeded": 3,
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "Synced", "status": "False"}],
        });
        let ready = |success: &str| {
            evaluate(
                &annotations(&format!("[{success:?}]"), r#"["{.failed} >= 1"]"#),
                Some(&status),
            )
        };
        assert_eq!(
            ready(r#"{.conditions[?(@.type=="Ready")].status} == "True""#),
            Some(Ok(()))
        );
        assert_eq!(ready("{.status.succeeded} >= 3"), Some(Ok(())), "rooted at .status too");
        assert_eq!(ready("{.succeeded} == 3.0"), Some(Ok(())), "numbers compare as numbers");
        assert!(ready("{.succeeded} > 3").unwrap().is_err());
        assert!(ready("{.missing} != 1").unwrap().is_err(), "nothing found is not met");
        assert!(
            ready("{.conditions[0].type} < 1").unwrap().is_err(),
            "no ordering of words"
        );
    }

    #[test]
    fn a_panic_while_evaluating_is_the_objects_error() {
        assert_eq!(contained(|| Ok(())), Ok(()));
        let error = contained(|| panic!("a library bug")).unwrap_err();
        assert!(error.contains("could not be evaluated"), "{error}");
    }

    #[test]
    fn malformed_annotations_say_what_is_wrong() {
        let error = |success: &str| {
            evaluate(&annotations(success, r#"["{.x} == 1"]"#), Some(&json!({})))
                .unwrap()
                .unwrap_err()
        };
        assert!(error("not json").starts_with("annotation helm.sh/readiness-success is invalid: not a JSON array"));
        assert!(error(r#"["phase == 1"]"#).contains("does not start with {<jsonpath>}"));
        assert!(error(r#"["{.phase == 1"]"#).contains("misses the closing }"));
        assert!(error(r#"["{phase} == 1"]"#).contains("must start with . or ["));
        assert!(error(r#"["{.phase} ~ 1"]"#).contains("expected one of"));
        assert!(error(r#"["{.phase} > high"]"#).contains("need a number"));
        assert!(error(r#"["{.[[} == 1"]"#).contains("invalid JSONPath"));
        assert!(error("[]").contains("must both list conditions"));
        let nested = format!("[\"{{{}}} == 1\"]", "[?@".repeat(30));
        // Refused before the parser sees it (parsing this would take most of an hour).
        assert!(error(&nested).contains("more than 8 brackets or parentheses"));
        assert!(error(&format!("[{:?}]", "x".repeat(5000))).contains("longer than 4096 bytes"));
        // serde_json_path panics on a path that ends inside a \u escape (found by the fuzzer):
        // refused before it parses; complete escapes and an escaped backslash still parse.
        for cut in [
            r#"["{.s['\\u} == 1"]"#,
            r#"["{.s['\\u12} == 1"]"#,
            r#"["{.s['\\uD800\\u} == 1"]"#,
            r#"["{.s['\\} == 1"]"#,
        ] {
            assert!(error(cut).contains("needs four hex digits"), "{cut}: {}", error(cut));
        }
        for whole in [
            r#"["{.s['\\u0041']} == 1", "{.f} == 1"]"#,
            r#"["{.s['\\\\u']} == 1", "{.f} == 1"]"#,
        ] {
            assert!(
                parse(SUCCESS_ANNOTATION, whole).is_ok(),
                "{whole}: {:?}",
                parse(SUCCESS_ANNOTATION, whole).err()
            );
        }
    }
}
