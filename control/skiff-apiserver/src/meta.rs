//! Object metadata: name rules, `generateName`, uid, timestamps, generation, and the checks
//! every kind shares (labels, annotations, owner references).

use rand::Rng;
use serde_json::{Map, Value, json};

use crate::{
    error::{ApiError, ApiResult, Cause},
    resources::ResourceDef,
    selectors::{valid_label_value, valid_qualified_name},
};

/// Upstream's total annotation size limit.
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

/// DNS-1123 subdomain: ≤ 253 chars of `[a-z0-9.-]`, starting and ending alphanumeric.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| is_label_shape(l, 253))
}

/// DNS-1123 label: ≤ 63 chars of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn is_dns1123_label(s: &str) -> bool {
    is_label_shape(s, 63)
}

/// DNS-1035 label: a DNS-1123 label that starts with a letter (Service names).
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

fn is_label_shape(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Which name rule a kind's names follow.
fn name_rule(def: &ResourceDef) -> (fn(&str) -> bool, &'static str) {
    const SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
    const LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
    const DNS1035: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
    match (def.group, def.kind) {
        ("", "Namespace") => (is_dns1123_label, LABEL),
        ("", "Service") => (is_dns1035_label, DNS1035),
        _ => (is_dns1123_subdomain, SUBDOMAIN),
    }
}

/// Characters upstream uses for `generateName` suffixes (no vowels, no look-alikes).
const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A `generateName` suffix of 5 characters.
pub fn random_suffix() -> String {
    let mut rng = rand::rng();
    (0..5)
        .map(|_| SUFFIX_ALPHABET[rng.random_range(0..SUFFIX_ALPHABET.len())] as char)
        .collect()
}

/// Current time as a Kubernetes timestamp (RFC 3339, seconds, `Z`).
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The object's `metadata`, created if missing.
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .unwrap_or_else(|| unreachable!("metadata was just made an object"))
}

/// A string field of `metadata`.
pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// Checks `apiVersion`/`kind` of a request body against the resource it was sent to and fills
/// them in when absent.
pub fn check_type(obj: &mut Value, def: &ResourceDef) -> ApiResult<()> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let api_version = def.api_version();
    match obj.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => obj["apiVersion"] = json!(api_version),
        Some(v) if v == api_version => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
    }
    match obj.get("kind").and_then(Value::as_str) {
        None | Some("") => obj["kind"] = json!(def.kind),
        Some(k) if k == def.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                def.kind
            )));
        }
    }
    Ok(())
}

/// Fills in what a create sets: namespace from the URL, a name from `generateName`, uid,
/// creation timestamp and generation; clears what clients may not set.
pub fn prepare_create(
    obj: &mut Value,
    def: &ResourceDef,
    namespace: Option<&str>,
) -> ApiResult<()> {
    let has_spec = def.has_spec;
    let m = metadata_mut(obj);
    if def.namespaced {
        let ns = namespace.unwrap_or("default");
        match m.get("namespace").and_then(Value::as_str) {
            None | Some("") => {
                m.insert("namespace".into(), json!(ns));
            }
            Some(given) if given == ns => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
    } else {
        m.remove("namespace");
    }
    let name = m.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty()
        && let Some(prefix) = m.get("generateName").and_then(Value::as_str)
        && !prefix.is_empty()
    {
        // Upstream truncates the prefix so the result stays within 63 characters.
        let mut p = prefix.to_string();
        p.truncate(58);
        m.insert("name".into(), json!(format!("{p}{}", random_suffix())));
    }
    if m.get("resourceVersion")
        .and_then(Value::as_str)
        .is_some_and(|rv| !rv.is_empty())
    {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    m.insert("creationTimestamp".into(), json!(now()));
    m.remove("deletionTimestamp");
    m.remove("deletionGracePeriodSeconds");
    m.remove("selfLink");
    m.remove("managedFields");
    if has_spec {
        m.insert("generation".into(), json!(1));
    } else {
        m.remove("generation");
    }
    drop_empty(obj);
    Ok(())
}

/// Carries over what an update may not change (uid, creation timestamp, deletion state) and
/// bumps `generation` when the spec changed.
pub fn prepare_update(new: &mut Value, old: &Value, def: &ResourceDef) {
    let spec_changed = def.has_spec && new.get("spec") != old.get("spec");
    let old_meta = old.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let m = metadata_mut(new);
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "namespace",
    ] {
        match old_meta.get(field) {
            Some(v) => m.insert(field.into(), v.clone()),
            None => m.remove(field),
        };
    }
    m.remove("selfLink");
    m.remove("managedFields");
    drop_empty(new);
    let m = metadata_mut(new);
    if spec_changed {
        let g = old_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        m.insert("generation".into(), json!(g + 1));
    }
}

/// Drops empty metadata collections, as Go's `omitempty` does (an orphaned object has no
/// `ownerReferences` rather than an empty list).
pub fn drop_empty(obj: &mut Value) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.retain(|k, v| {
            !(matches!(
                k.as_str(),
                "labels" | "annotations" | "finalizers" | "ownerReferences" | "managedFields"
            ) && (v.is_null()
                || v.as_array().is_some_and(Vec::is_empty)
                || v.as_object().is_some_and(Map::is_empty)))
        });
    }
}

/// The checks every object's metadata must pass. `name` is required unless `generateName` was
/// resolved already.
pub fn validate_meta(obj: &Value, def: &ResourceDef, causes: &mut Vec<Cause>) {
    let name = meta_str(obj, "name").unwrap_or("");
    let (rule, rule_text) = name_rule(def);
    if name.is_empty() {
        causes.push(Cause::required("metadata.name"));
    } else if !rule(name) {
        causes.push(Cause::invalid("metadata.name", name, rule_text));
    }
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if !valid_qualified_name(k) {
                causes.push(Cause::invalid(
                    "metadata.labels",
                    k,
                    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                ));
            }
            let v = v.as_str().unwrap_or("");
            if !valid_label_value(v) {
                causes.push(Cause::invalid(
                    format!("metadata.labels[{k}]"),
                    v,
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                ));
            }
        }
    }
    if let Some(ann) = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let mut total = 0;
        for (k, v) in ann {
            total += k.len() + v.as_str().map_or(0, str::len);
            if !valid_qualified_name(k) {
                causes.push(Cause::invalid(
                    "metadata.annotations",
                    k,
                    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                ));
            }
        }
        if total > ANNOTATIONS_MAX_BYTES {
            causes.push(Cause {
                reason: "FieldValueTooLong",
                message: format!("Too long: must have at most {ANNOTATIONS_MAX_BYTES} bytes"),
                field: "metadata.annotations".into(),
            });
        }
    }
    if let Some(refs) = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
    {
        for (i, r) in refs.iter().enumerate() {
            for field in ["apiVersion", "kind", "name", "uid"] {
                if r.get(field)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
                {
                    causes.push(Cause::required(format!(
                        "metadata.ownerReferences[{i}].{field}"
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rules() {
        assert!(is_dns1123_subdomain("a.b-c.d"));
        assert!(!is_dns1123_subdomain("A"));
        assert!(!is_dns1123_subdomain("-a"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(is_dns1123_label("abc-1"));
        assert!(!is_dns1123_label("a.b"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1035_label("web"));
        assert!(!is_dns1035_label("1web"));
    }

    #[test]
    fn generate_name_makes_a_unique_valid_name() {
        let def = crate::resources::find("", "v1", "configmaps").unwrap();
        let mut a = json!({"metadata": {"generateName": "web-"}});
        let mut b = a.clone();
        prepare_create(&mut a, def, Some("default")).unwrap();
        prepare_create(&mut b, def, Some("default")).unwrap();
        let (na, nb) = (meta_str(&a, "name").unwrap(), meta_str(&b, "name").unwrap());
        assert!(na.starts_with("web-") && na.len() == 9);
        assert_ne!(na, nb);
        assert!(is_dns1123_subdomain(na));
        assert_eq!(meta_str(&a, "namespace"), Some("default"));
    }
}
