//! Label and field selectors, as `k8s.io/apimachinery/pkg/labels` and `fields` parse them.
//!
//! Label selectors: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` (exists), `!k`
//! (does not exist), `k>n`, `k<n`, joined by commas (all must hold). Field selectors: `f=v`,
//! `f==v`, `f!=v` over the fields each kind supports.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{error::ApiError, resources::ResourceDef};

/// One label requirement.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
    Greater(String, i64),
    Less(String, i64),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<Requirement>,
}

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

/// Whether `s` is a valid label value (empty, or ≤ 63 alphanumerics with `-_.` inside).
pub fn valid_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
}

/// Whether `s` is a valid qualified name (`[prefix/]name`, the form of label keys).
pub fn valid_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix
        && !crate::meta::is_dns1123_subdomain(p)
    {
        return false;
    }
    !name.is_empty() && valid_label_value(name)
}

fn bad(input: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unable to parse requirement: {why} (selector {input:?})"
    ))
}

impl LabelSelector {
    /// Parses a `labelSelector` query value.
    pub fn parse(input: &str) -> Result<LabelSelector, ApiError> {
        let mut reqs = Vec::new();
        if input.trim().is_empty() {
            return Ok(LabelSelector { reqs });
        }
        for part in split_top_level(input) {
            let part = part.trim();
            if part.is_empty() {
                return Err(bad(input, "found '', expected: identifier"));
            }
            let req = Self::parse_one(input, part)?;
            reqs.push(req);
        }
        Ok(LabelSelector { reqs })
    }

    fn parse_one(input: &str, part: &str) -> Result<Requirement, ApiError> {
        let key_ok = |k: &str| -> Result<String, ApiError> {
            let k = k.trim();
            if valid_qualified_name(k) {
                Ok(k.to_string())
            } else {
                Err(bad(input, &format!("invalid label key {k:?}")))
            }
        };
        let value_ok = |v: &str| -> Result<String, ApiError> {
            let v = v.trim();
            if valid_label_value(v) {
                Ok(v.to_string())
            } else {
                Err(bad(input, &format!("invalid label value {v:?}")))
            }
        };
        if let Some(k) = part.strip_prefix('!') {
            return Ok(Requirement::NotExists(key_ok(k)?));
        }
        for (word, is_in) in [(" notin ", false), (" in ", true)] {
            if let Some(pos) = part.find(word) {
                let key = key_ok(&part[..pos])?;
                let rest = part[pos + word.len()..].trim();
                let inner = rest
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| bad(input, "expected a parenthesised set of values"))?;
                let values = inner
                    .split(',')
                    .map(value_ok)
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(if is_in {
                    Requirement::In(key, values)
                } else {
                    Requirement::NotIn(key, values)
                });
            }
        }
        for op in ["!=", "==", "=", ">", "<"] {
            if let Some(pos) = part.find(op) {
                let key = key_ok(&part[..pos])?;
                let raw = &part[pos + op.len()..];
                return Ok(match op {
                    "!=" => Requirement::NotEquals(key, value_ok(raw)?),
                    ">" | "<" => {
                        let n: i64 = raw.trim().parse().map_err(|_| {
                            bad(input, &format!("for '{op}' the value must be an integer"))
                        })?;
                        if op == ">" {
                            Requirement::Greater(key, n)
                        } else {
                            Requirement::Less(key, n)
                        }
                    }
                    _ => Requirement::Equals(key, value_ok(raw)?),
                });
            }
        }
        Ok(Requirement::Exists(key_ok(part)?))
    }

    /// Whether the selector matches nothing-specific (matches everything).
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
            Requirement::Greater(k, n) => labels
                .get(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l > *n),
            Requirement::Less(k, n) => labels
                .get(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l < *n),
        })
    }

    /// Whether the object's `metadata.labels` satisfy the selector.
    pub fn matches_object(&self, obj: &Value) -> bool {
        if self.reqs.is_empty() {
            return true;
        }
        self.matches(&labels_of(obj))
    }
}

/// `metadata.labels` of an object.
pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// The fields each kind can be selected by, besides `metadata.name` and `metadata.namespace`.
fn kind_fields(def: &ResourceDef) -> &'static [&'static str] {
    match (def.group, def.kind) {
        ("", "Pod") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ("", "Event") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("", "Secret") => &["type"],
        ("", "Namespace") => &["status.phase"],
        ("", "Node") => &["spec.unschedulable"],
        ("", "Service") => &["spec.clusterIP", "spec.type"],
        ("batch", "Job") => &["status.successful"],
        ("apps", "ReplicaSet") => &["status.replicas"],
        ("events.k8s.io", "Event") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ],
        _ => &[],
    }
}

/// A parsed field selector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses a `fieldSelector` for `def`; an unsupported field is a 400 as upstream.
    pub fn parse(input: &str, def: &ResourceDef) -> Result<FieldSelector, ApiError> {
        let mut reqs = Vec::new();
        if input.trim().is_empty() {
            return Ok(FieldSelector { reqs });
        }
        for part in input.split(',') {
            let part = part.trim();
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{input}'; can't understand '{part}'"
                )));
            };
            let field = field.trim();
            let supported = field == "metadata.name"
                || (field == "metadata.namespace" && def.namespaced)
                || kind_fields(def).contains(&field);
            if !supported {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            reqs.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector { reqs })
    }

    /// Whether `obj` satisfies the selector.
    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(field, equal, want)| {
            let got = field_value(obj, field);
            (got == *want) == *equal
        })
    }

    /// The value required for `field` by an `=` term, if any (lets lists narrow by name).
    pub fn required(&self, field: &str) -> Option<&str> {
        self.reqs
            .iter()
            .find(|(f, eq, _)| f == field && *eq)
            .map(|(_, _, v)| v.as_str())
    }

    /// Whether there are no terms.
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }
}

/// A field's value as selectors compare it: strings as is, booleans and numbers printed,
/// missing fields as "" (so `spec.nodeName=` selects unscheduled pods).
pub fn field_value(obj: &Value, field: &str) -> String {
    let pointer = format!("/{}", field.replace('.', "/"));
    match obj.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Null) | None => {
            // Upstream's field sets print false / 0 for unset booleans and counters.
            match field {
                "spec.hostNetwork" | "spec.unschedulable" => "false".into(),
                "status.successful" | "status.replicas" => "0".into(),
                _ => String::new(),
            }
        }
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::resources::find;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_label_operator() {
        let l = labels(&[("app", "web"), ("tier", "front"), ("n", "5")]);
        let yes = [
            "",
            "app=web",
            "app==web",
            "app!=db",
            "missing!=x",
            "app in (web,db)",
            "tier notin (back)",
            "missing notin (x)",
            "app",
            "!missing",
            "n>4",
            "n<6",
            "app=web, tier in (front)",
            "example.com/x notin (a)",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&l), "{s}");
        }
        let no = [
            "app=db",
            "app!=web",
            "app in (db)",
            "tier notin (front,back)",
            "missing",
            "!app",
            "n>5",
            "app=web,tier=back",
        ];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&l), "{s}");
        }
    }

    #[test]
    fn malformed_label_selectors_are_rejected() {
        for s in ["app in web", "a=b=c", "-bad=x", "app=", "n>x", ",", "a b"] {
            let r = LabelSelector::parse(s);
            if s == "app=" {
                // An empty value is valid: it matches objects with the label set to "".
                assert!(r.is_ok());
                continue;
            }
            assert_eq!(r.unwrap_err().code, 400, "{s}");
        }
    }

    #[test]
    fn field_selectors_per_kind() {
        let pods = find("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "a", "namespace": "ns"},
            "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let t = |s: &str| FieldSelector::parse(s, pods).unwrap().matches(&pod);
        assert!(t("metadata.name=a"));
        assert!(t("spec.nodeName==n1,status.phase=Running"));
        assert!(t("status.phase!=Pending"));
        assert!(!t("spec.nodeName="));
        assert!(t("spec.hostNetwork=false"));
        let err = FieldSelector::parse("spec.containers=x", pods).unwrap_err();
        assert_eq!(err.code, 400);
        assert!(err.message.contains("field label not supported"));
        let cms = find("", "v1", "configmaps").unwrap();
        assert!(FieldSelector::parse("status.phase=x", cms).is_err());
    }
}
