//! The three patch types kubectl sends: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and
//! strategic merge patch.
//!
//! Strategic merge reads its rules from the same OpenAPI definitions the server publishes
//! (`x-kubernetes-patch-strategy`, `x-kubernetes-patch-merge-key`), as upstream's
//! `PatchMetaFromOpenAPI` does, so what `kubectl` computes and what the server applies agree.
//! Directives handled: `$patch: replace|delete|merge`, `$setElementOrder/<list>`,
//! `$deleteFromPrimitiveList/<list>`, `$retainKeys`.

use serde_json::{Map, Value};

use crate::{error::ApiError, openapi::Definitions};

/// A patch type by its content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    /// `application/json-patch+json`.
    Json,
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`.
    Strategic,
}

impl PatchType {
    /// The patch type of a `Content-Type`, if it is one.
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            _ => None,
        }
    }
}

/// Applies `patch` to `doc`. `type_name` is the OpenAPI definition of `doc` (for strategic
/// merge).
pub fn apply(
    ty: PatchType,
    doc: &Value,
    patch: &[u8],
    defs: &Definitions,
    type_name: &str,
) -> Result<Value, ApiError> {
    let mut out = doc.clone();
    match ty {
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_slice(patch)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            json_patch::patch(&mut out, &p).map_err(|e| {
                ApiError::invalid_patch(format!(
                    "the server rejected our request due to an error in our request: {e}"
                ))
            })?;
        }
        PatchType::Merge => {
            let p: Value = serde_json::from_slice(patch)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            json_patch::merge(&mut out, &p);
        }
        PatchType::Strategic => {
            let p: Value = serde_json::from_slice(patch)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            if !p.is_object() {
                return Err(ApiError::bad_request(
                    "strategic merge patch must be a JSON object",
                ));
            }
            out = strategic_merge(doc, &p, defs, Some(type_name))?;
        }
    }
    Ok(out)
}

/// Patch metadata of a property: its strategies and merge key.
#[derive(Debug, Default)]
struct Meta {
    merge: bool,
    merge_key: Option<String>,
    /// Definition of the property's value (or of its items, for a list).
    type_name: Option<String>,
}

fn ref_name(schema: &Value) -> Option<String> {
    let r = schema
        .get("$ref")
        .or_else(|| schema.pointer("/allOf/0/$ref"))?
        .as_str()?;
    Some(r.rsplit('/').next()?.to_string())
}

fn property_meta(defs: &Definitions, type_name: Option<&str>, field: &str) -> Meta {
    let Some(prop) = type_name.and_then(|t| defs.get(t)).and_then(|d| {
        d.pointer(&format!(
            "/properties/{}",
            field.replace('~', "~0").replace('/', "~1")
        ))
    }) else {
        return Meta::default();
    };
    let strategy = prop
        .get("x-kubernetes-patch-strategy")
        .and_then(Value::as_str)
        .unwrap_or("");
    let items = prop.get("items").unwrap_or(prop);
    Meta {
        merge: strategy.split(',').any(|s| s == "merge"),
        merge_key: prop
            .get("x-kubernetes-patch-merge-key")
            .and_then(Value::as_str)
            .map(str::to_string),
        type_name: ref_name(items).or_else(|| {
            // A map of objects (`additionalProperties`) keeps its value type.
            prop.get("additionalProperties").and_then(ref_name)
        }),
    }
}

fn directive_err(msg: &str) -> ApiError {
    ApiError::bad_request(format!("invalid strategic merge patch: {msg}"))
}

/// Merges a strategic patch map into an original map.
fn strategic_merge(
    original: &Value,
    patch: &Value,
    defs: &Definitions,
    type_name: Option<&str>,
) -> Result<Value, ApiError> {
    let Some(pmap) = patch.as_object() else {
        return Ok(patch.clone());
    };
    match pmap.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut p = pmap.clone();
            p.remove("$patch");
            return Ok(Value::Object(p));
        }
        Some("delete") => return Ok(Value::Null),
        Some("merge") | None => {}
        Some(other) => return Err(directive_err(&format!("unknown $patch value {other:?}"))),
    }
    let mut out: Map<String, Value> = original.as_object().cloned().unwrap_or_default();
    if let Some(retain) = pmap.get("$retainKeys") {
        let keep: Vec<&str> = retain
            .as_array()
            .ok_or_else(|| directive_err("$retainKeys must be a list"))?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        out.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, pv) in pmap {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = pv.as_array().cloned().unwrap_or_default();
            if let Some(list) = out.get_mut(field).and_then(Value::as_array_mut) {
                list.retain(|v| !remove.contains(v));
            }
            continue;
        }
        if pv.is_null() {
            out.remove(k);
            continue;
        }
        let meta = property_meta(defs, type_name, k);
        let merged = match (out.get(k), pv) {
            (Some(ov @ Value::Object(_)), Value::Object(_)) => {
                strategic_merge(ov, pv, defs, meta.type_name.as_deref())?
            }
            (None, Value::Object(_)) => strategic_merge(
                &Value::Object(Map::new()),
                pv,
                defs,
                meta.type_name.as_deref(),
            )?,
            (orig, Value::Array(items)) => {
                let orig = orig.and_then(Value::as_array).cloned().unwrap_or_default();
                let order = pmap
                    .get(&format!("$setElementOrder/{k}"))
                    .and_then(Value::as_array);
                Value::Array(merge_list(&orig, items, order, &meta, defs)?)
            }
            _ => pv.clone(),
        };
        if merged.is_null() {
            out.remove(k);
        } else {
            out.insert(k.clone(), merged);
        }
    }
    // A `$setElementOrder` for a list the patch did not touch still reorders it.
    for (k, order) in pmap {
        if let Some(field) = k.strip_prefix("$setElementOrder/")
            && !pmap.contains_key(field)
            && let (Some(list), Some(order)) = (
                out.get(field).and_then(Value::as_array).cloned(),
                order.as_array(),
            )
        {
            let meta = property_meta(defs, type_name, field);
            out.insert(
                field.to_string(),
                Value::Array(reorder(list, order, meta.merge_key.as_deref())),
            );
        }
    }
    Ok(Value::Object(out))
}

fn merge_list(
    original: &[Value],
    patch: &[Value],
    order: Option<&Vec<Value>>,
    meta: &Meta,
    defs: &Definitions,
) -> Result<Vec<Value>, ApiError> {
    if !meta.merge {
        // Lists without a merge strategy are replaced (after dropping directives).
        return Ok(patch
            .iter()
            .filter(|v| v.get("$patch").is_none())
            .cloned()
            .collect());
    }
    // `$patch: replace` as a list element replaces the whole list.
    if patch
        .iter()
        .any(|v| v.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(patch
            .iter()
            .filter(|v| v.get("$patch").is_none())
            .cloned()
            .collect());
    }
    let mut out: Vec<Value> = original.to_vec();
    match meta.merge_key.as_deref() {
        None => {
            // A merged list of primitives: a set union.
            for v in patch {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
        }
        Some(key) => {
            for pv in patch {
                let Some(kv) = pv.get(key) else {
                    return Err(directive_err(&format!(
                        "map in a merged list does not contain the merge key {key:?}"
                    )));
                };
                let pos = out.iter().position(|o| o.get(key) == Some(kv));
                let delete = pv.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        out.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => {
                        let merged = strategic_merge(&out[i], pv, defs, meta.type_name.as_deref())?;
                        out[i] = merged;
                    }
                    (None, false) => {
                        let fresh = strategic_merge(
                            &Value::Object(Map::new()),
                            pv,
                            defs,
                            meta.type_name.as_deref(),
                        )?;
                        out.push(fresh);
                    }
                }
            }
        }
    }
    Ok(match order {
        Some(order) => reorder(out, order, meta.merge_key.as_deref()),
        None => out,
    })
}

/// Orders `list` as `order` says; elements `order` does not name keep their place after.
fn reorder(list: Vec<Value>, order: &[Value], key: Option<&str>) -> Vec<Value> {
    let id = |v: &Value| -> Value {
        match key {
            Some(k) => v.get(k).cloned().unwrap_or(Value::Null),
            None => v.clone(),
        }
    };
    let wanted: Vec<Value> = order.iter().map(&id).collect();
    let mut out: Vec<Value> = Vec::with_capacity(list.len());
    for w in &wanted {
        if let Some(v) = list.iter().find(|v| id(v) == *w) {
            out.push(v.clone());
        }
    }
    for v in list {
        if !wanted.contains(&id(&v)) {
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn deployment(containers: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "finalizers": ["a"]},
            "spec": {"template": {"spec": {"containers": containers}}}})
    }

    fn sm(doc: &Value, patch: Value) -> Value {
        let defs = crate::openapi::definitions();
        apply(
            PatchType::Strategic,
            doc,
            patch.to_string().as_bytes(),
            defs,
            "io.k8s.api.apps.v1.Deployment",
        )
        .unwrap()
    }

    #[test]
    fn containers_merge_by_name() {
        let d = deployment(
            json!([{"name": "a", "image": "x", "env": [{"name": "E", "value": "1"}]}, {"name": "b", "image": "y"}]),
        );
        let out = sm(
            &d,
            json!({"spec": {"template": {"spec": {"containers": [{"name": "b", "image": "z"}]}}}}),
        );
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs.as_array().unwrap().len(), 2);
        assert_eq!(cs[0]["image"], "x");
        assert_eq!(cs[0]["env"][0]["value"], "1");
        assert_eq!(cs[1]["image"], "z");
    }

    #[test]
    fn delete_directive_and_element_order() {
        let d = deployment(json!([{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]));
        let out = sm(
            &d,
            json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "b"}],
            "containers": [{"$patch": "delete", "name": "a"}]}}}}),
        );
        let cs = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0]["name"], "b");
    }

    #[test]
    fn primitive_merge_lists_union_and_null_deletes() {
        let d = deployment(json!([{"name": "a", "image": "x"}]));
        let out = sm(
            &d,
            json!({"metadata": {"finalizers": ["b"], "labels": {"x": "1"}}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        let out = sm(
            &out,
            json!({"metadata": {"labels": {"x": null}, "$deleteFromPrimitiveList/finalizers": ["a"]}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({}));
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn lists_without_strategy_are_replaced() {
        let d = deployment(json!([{"name": "a", "image": "x", "args": ["1", "2"]}]));
        let out = sm(
            &d,
            json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "args": ["3"]}]}}}}),
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][0]["args"],
            json!(["3"])
        );
    }

    #[test]
    fn retain_keys_drops_the_other_strategy_fields() {
        let mut d = deployment(json!([]));
        d["spec"]["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}});
        let out = sm(
            &d,
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate", "rollingUpdate": null}}}),
        );
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn json_and_merge_patches() {
        let defs = crate::openapi::definitions();
        let d = deployment(json!([]));
        let out = apply(
            PatchType::Json,
            &d,
            br#"[{"op":"add","path":"/metadata/labels","value":{"a":"b"}}]"#,
            defs,
            "",
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"]["a"], "b");
        let out = apply(
            PatchType::Merge,
            &out,
            br#"{"metadata":{"labels":{"a":null,"c":"d"}}}"#,
            defs,
            "",
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"c": "d"}));
        let err = apply(
            PatchType::Json,
            &d,
            br#"[{"op":"test","path":"/metadata/name","value":"x"}]"#,
            defs,
            "",
        )
        .unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(
            apply(PatchType::Merge, &d, b"{not json", defs, "")
                .unwrap_err()
                .code,
            400
        );
    }
}
