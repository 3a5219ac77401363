//! `metav1.LabelSelector` matching, as `metav1.LabelSelectorAsSelector` does it: `matchLabels`
//! and every `matchExpressions` requirement (`In`, `NotIn`, `Exists`, `DoesNotExist`) must
//! hold. An empty selector matches everything; an absent one matches nothing (callers decide
//! which applies).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

/// A selector that is not valid (an unknown operator, or values where none belong).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSelector(pub String);

impl std::fmt::Display for InvalidSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid label selector: {}", self.0)
    }
}

impl std::error::Error for InvalidSelector {}

/// Checks that `sel` is well formed.
pub fn validate(sel: &LabelSelector) -> Result<(), InvalidSelector> {
    for r in sel.match_expressions.iter().flatten() {
        let n = r.values.as_ref().map_or(0, Vec::len);
        match r.operator.as_str() {
            "In" | "NotIn" if n == 0 => {
                return Err(InvalidSelector(format!(
                    "{}: operator {} needs values",
                    r.key, r.operator
                )));
            }
            "Exists" | "DoesNotExist" if n > 0 => {
                return Err(InvalidSelector(format!(
                    "{}: operator {} takes no values",
                    r.key, r.operator
                )));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            op => return Err(InvalidSelector(format!("{}: unknown operator {op}", r.key))),
        }
    }
    Ok(())
}

/// Whether `labels` satisfy requirement `r` (an unknown operator matches nothing).
pub fn requirement_matches(
    r: &LabelSelectorRequirement,
    labels: &BTreeMap<String, String>,
) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let v = labels.get(&r.key);
    match r.operator.as_str() {
        "In" => v.is_some_and(|v| values.contains(v)),
        "NotIn" => v.is_none_or(|v| !values.contains(v)),
        "Exists" => v.is_some(),
        "DoesNotExist" => v.is_none(),
        _ => false,
    }
}

/// Whether `labels` satisfy `sel` (empty matches everything; an invalid one nothing).
pub fn matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    if validate(sel).is_err() {
        return false;
    }
    sel.match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && sel
            .match_expressions
            .iter()
            .flatten()
            .all(|r| requirement_matches(r, labels))
}

/// Whether `sel` selects everything (no labels and no expressions).
pub fn is_empty(sel: &LabelSelector) -> bool {
    sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && sel.match_expressions.as_ref().is_none_or(Vec::is_empty)
}

/// `sel` in the string form `kubectl get -l` takes and `kubectl describe` prints
/// (`app=web,tier in (a,b)`).
pub fn to_string(sel: &LabelSelector) -> String {
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for r in sel.match_expressions.iter().flatten() {
        let values = r.values.clone().unwrap_or_default().join(",");
        parts.push(match r.operator.as_str() {
            "In" => format!("{} in ({values})", r.key),
            "NotIn" => format!("{} notin ({values})", r.key),
            "Exists" => r.key.clone(),
            _ => format!("!{}", r.key),
        });
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(v: serde_json::Value) -> LabelSelector {
        serde_json::from_value(v).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn match_labels_and_expressions() {
        let s = sel(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "NotIn", "values": ["z1"]},
            ]
        }));
        assert!(matches(&s, &labels(&[("app", "web"), ("tier", "a")])));
        assert!(matches(
            &s,
            &labels(&[("app", "web"), ("tier", "b"), ("zone", "z2")])
        ));
        assert!(!matches(&s, &labels(&[("app", "web"), ("tier", "c")])));
        assert!(!matches(&s, &labels(&[("app", "db"), ("tier", "a")])));
        assert!(!matches(
            &s,
            &labels(&[("app", "web"), ("tier", "a"), ("canary", "")])
        ));
        assert!(!matches(
            &s,
            &labels(&[("app", "web"), ("tier", "a"), ("zone", "z1")])
        ));
        assert_eq!(
            to_string(&s),
            "app=web,tier in (a,b),!canary,zone notin (z1)"
        );
    }

    #[test]
    fn empty_matches_everything_invalid_nothing() {
        assert!(matches(&sel(json!({})), &labels(&[("x", "y")])));
        assert!(is_empty(&sel(json!({"matchLabels": {}}))));
        let bad = sel(json!({"matchExpressions": [{"key": "k", "operator": "In"}]}));
        assert!(validate(&bad).is_err());
        assert!(!matches(&bad, &labels(&[("k", "v")])));
        let unknown =
            sel(json!({"matchExpressions": [{"key": "k", "operator": "Gt", "values": ["1"]}]}));
        assert!(validate(&unknown).is_err());
    }
}
