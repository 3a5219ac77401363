//! OpenAPI v2 and v3 documents, generated from the `k8s-openapi` types (their `schemars`
//! schemas carry upstream's definition names and field docs), plus the Kubernetes extensions
//! clients read: `x-kubernetes-group-version-kind` on each kind (kubectl explain finds schemas
//! by it) and the strategic-merge patch metadata (kubectl apply computes patches from it, and
//! [`crate::patch`] applies them by the same rules).

use std::sync::OnceLock;

use k8s_openapi::{
    api::{autoscaling::v1 as autoscaling, policy::v1 as policy},
    apimachinery::pkg::apis::meta::v1 as metav1,
    schemars::{
        JsonSchema,
        r#gen::{SchemaGenerator, SchemaSettings},
    },
};
use serde_json::{Map, Value, json};

use crate::resources::{RESOURCES, ResourceDef};

/// Definition name → schema (OpenAPI v3 form, refs to `#/components/schemas/`).
pub type Definitions = Map<String, Value>;

/// Strategic merge patch metadata of built-in types, as upstream's struct tags declare it:
/// (definition, property, patch strategy, merge key).
const PATCH_META: &[(&str, &str, &str, Option<&str>)] = &[
    (
        "io.k8s.api.core.v1.PodSpec",
        "containers",
        "merge",
        Some("name"),
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "initContainers",
        "merge",
        Some("name"),
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "ephemeralContainers",
        "merge",
        Some("name"),
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "volumes",
        "merge,retainKeys",
        Some("name"),
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "imagePullSecrets",
        "merge",
        Some("name"),
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "hostAliases",
        "merge",
        Some("ip"),
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "topologySpreadConstraints",
        "merge",
        Some("topologyKey"),
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "resourceClaims",
        "merge,retainKeys",
        Some("name"),
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "schedulingGates",
        "merge",
        Some("name"),
    ),
    (
        "io.k8s.api.core.v1.Container",
        "ports",
        "merge",
        Some("containerPort"),
    ),
    ("io.k8s.api.core.v1.Container", "env", "merge", Some("name")),
    (
        "io.k8s.api.core.v1.Container",
        "volumeMounts",
        "merge",
        Some("mountPath"),
    ),
    (
        "io.k8s.api.core.v1.Container",
        "volumeDevices",
        "merge",
        Some("devicePath"),
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "env",
        "merge",
        Some("name"),
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeMounts",
        "merge",
        Some("mountPath"),
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeDevices",
        "merge",
        Some("devicePath"),
    ),
    (
        "io.k8s.api.core.v1.ServiceSpec",
        "ports",
        "merge",
        Some("port"),
    ),
    (
        "io.k8s.api.core.v1.PodStatus",
        "conditions",
        "merge",
        Some("type"),
    ),
    (
        "io.k8s.api.core.v1.PodStatus",
        "podIPs",
        "merge",
        Some("ip"),
    ),
    (
        "io.k8s.api.core.v1.PodStatus",
        "hostIPs",
        "merge",
        Some("ip"),
    ),
    (
        "io.k8s.api.core.v1.NodeStatus",
        "conditions",
        "merge",
        Some("type"),
    ),
    (
        "io.k8s.api.core.v1.NodeStatus",
        "addresses",
        "merge",
        Some("type"),
    ),
    ("io.k8s.api.core.v1.NodeSpec", "podCIDRs", "merge", None),
    (
        "io.k8s.api.core.v1.NamespaceStatus",
        "conditions",
        "merge",
        Some("type"),
    ),
    (
        "io.k8s.api.apps.v1.DeploymentSpec",
        "strategy",
        "retainKeys",
        None,
    ),
    (
        "io.k8s.api.apps.v1.DeploymentStatus",
        "conditions",
        "merge",
        Some("type"),
    ),
    (
        "io.k8s.api.apps.v1.ReplicaSetStatus",
        "conditions",
        "merge",
        Some("type"),
    ),
    (
        "io.k8s.api.apps.v1.StatefulSetStatus",
        "conditions",
        "merge",
        Some("type"),
    ),
    (
        "io.k8s.api.apps.v1.DaemonSetStatus",
        "conditions",
        "merge",
        Some("type"),
    ),
    (
        "io.k8s.api.batch.v1.JobStatus",
        "conditions",
        "merge",
        Some("type"),
    ),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "finalizers",
        "merge",
        None,
    ),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "ownerReferences",
        "merge",
        Some("uid"),
    ),
];

/// Kinds that are not resources of their own but appear in requests and responses.
fn extra_kinds(g: &mut SchemaGenerator) -> Vec<(String, &'static str, &'static str, &'static str)> {
    g.subschema_for::<metav1::Status>();
    g.subschema_for::<metav1::DeleteOptions>();
    g.subschema_for::<metav1::APIResourceList>();
    g.subschema_for::<autoscaling::Scale>();
    g.subschema_for::<policy::Eviction>();
    vec![
        (
            <autoscaling::Scale as JsonSchema>::schema_name(),
            "autoscaling",
            "v1",
            "Scale",
        ),
        (
            <policy::Eviction as JsonSchema>::schema_name(),
            "policy",
            "v1",
            "Eviction",
        ),
        (
            <metav1::Status as JsonSchema>::schema_name(),
            "",
            "v1",
            "Status",
        ),
        (
            <metav1::DeleteOptions as JsonSchema>::schema_name(),
            "",
            "v1",
            "DeleteOptions",
        ),
    ]
}

fn list_kind_name(def: &ResourceDef) -> String {
    format!("{}List", (def.schema_name)())
}

/// Every definition, generated once.
pub fn definitions() -> &'static Definitions {
    static DEFS: OnceLock<Definitions> = OnceLock::new();
    DEFS.get_or_init(build_definitions)
}

fn build_definitions() -> Definitions {
    let mut g = SchemaSettings::openapi3().into_generator();
    for r in RESOURCES {
        (r.schema)(&mut g);
    }
    let extras = extra_kinds(&mut g);
    let mut defs: Definitions = g
        .take_definitions()
        .into_iter()
        .map(|(k, v)| (k, serde_json::to_value(v).unwrap_or(Value::Null)))
        .collect();
    for v in defs.values_mut() {
        refs_to_all_of(v);
    }
    for r in RESOURCES {
        let name = (r.schema_name)();
        if let Some(d) = defs.get_mut(&name) {
            add_gvk(d, r.group, r.version, r.kind);
        }
        // The list kind: `{apiVersion, kind, metadata: ListMeta, items: [kind]}`.
        let list = json!({
            "description": format!("{}List is a list of {}.", r.kind, r.kind),
            "type": "object",
            "required": ["items"],
            "properties": {
                "apiVersion": {"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."},
                "kind": {"type": "string", "description": "Kind is a string value representing the REST resource this object represents."},
                "metadata": {"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta"}], "default": {}},
                "items": {"type": "array", "items": {"allOf": [{"$ref": format!("#/components/schemas/{name}")}], "default": {}}},
            },
        });
        let mut list = list;
        add_gvk(&mut list, r.group, r.version, r.list_kind);
        defs.insert(list_kind_name(r), list);
    }
    for (name, group, version, kind) in extras {
        if let Some(d) = defs.get_mut(&name) {
            add_gvk(d, group, version, kind);
        }
    }
    // DeleteOptions travel in every group's version (and meta.k8s.io), as upstream lists them.
    if let Some(list) = defs
        .get_mut("io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions")
        .and_then(|d| d.get_mut("x-kubernetes-group-version-kind"))
        .and_then(Value::as_array_mut)
    {
        list.push(json!({"group": "meta.k8s.io", "kind": "DeleteOptions", "version": "v1"}));
        for (g, vs) in crate::resources::groups() {
            for v in vs {
                list.push(json!({"group": g, "kind": "DeleteOptions", "version": v}));
            }
        }
    }
    for (def, prop, strategy, key) in PATCH_META {
        if let Some(p) = defs
            .get_mut(*def)
            .and_then(|d| d.get_mut("properties"))
            .and_then(|p| p.get_mut(*prop))
            .and_then(Value::as_object_mut)
        {
            p.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
            if let Some(k) = key {
                p.insert("x-kubernetes-patch-merge-key".into(), json!(k));
            }
        }
    }
    defs
}

fn add_gvk(d: &mut Value, group: &str, version: &str, kind: &str) {
    if let Some(m) = d.as_object_mut() {
        m.insert(
            "x-kubernetes-group-version-kind".into(),
            json!([{"group": group, "kind": kind, "version": version}]),
        );
    }
}

/// Upstream writes a described reference as `allOf: [{$ref}]` (siblings of a bare `$ref` are
/// ignored by OpenAPI 3.0 readers).
fn refs_to_all_of(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.len() > 1
                && let Some(r) = m.remove("$ref")
            {
                m.insert("allOf".into(), json!([{"$ref": r}]));
            }
            for child in m.values_mut() {
                refs_to_all_of(child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(refs_to_all_of),
        _ => {}
    }
}

/// Names of definitions reachable from `roots`.
fn reachable(defs: &Definitions, roots: impl IntoIterator<Item = String>) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str)
                    && let Some(name) = r.rsplit('/').next()
                    && !out.iter().any(|n| n == name)
                {
                    out.push(name.to_string());
                }
                m.values().for_each(|c| walk(c, out));
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, out)),
            _ => {}
        }
    }
    let mut out: Vec<String> = roots.into_iter().collect();
    let mut i = 0;
    while i < out.len() {
        if let Some(d) = defs.get(&out[i]) {
            let mut found = Vec::new();
            walk(d, &mut found);
            for f in found {
                if !out.contains(&f) {
                    out.push(f);
                }
            }
        }
        i += 1;
    }
    out
}

/// Query parameters every write operation documents (kubectl looks for `fieldValidation` to
/// decide whether the server validates fields itself).
fn write_params() -> Value {
    json!([
        {"name": "dryRun", "in": "query", "description": "When present, indicates that modifications should not be persisted.", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "fieldManager", "in": "query", "description": "fieldManager is a name associated with the actor or entity that is making these changes.", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "fieldValidation", "in": "query", "description": "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn - Strict", "schema": {"type": "string", "uniqueItems": true}},
    ])
}

fn op(
    r: &ResourceDef,
    action: &str,
    schema: &str,
    body: bool,
    verb: &str,
    sub: Option<&str>,
) -> Value {
    let ref_ = json!({"$ref": format!("#/components/schemas/{schema}")});
    let mut o = json!({
        "operationId": format!("{verb}{}{}", r.kind, sub.map(|s| format!("_{s}")).unwrap_or_default()),
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": ref_.clone()}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
    });
    if body {
        o["parameters"] = write_params();
        let types: &[&str] = if action == "patch" {
            &[
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ]
        } else {
            &["application/json", "application/yaml"]
        };
        let content: Map<String, Value> = types
            .iter()
            .map(|t| {
                let schema = if action == "patch" {
                    json!({"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Patch"})
                } else {
                    ref_.clone()
                };
                (t.to_string(), json!({"schema": schema}))
            })
            .collect();
        o["requestBody"] = json!({"content": content, "required": true});
    }
    o
}

/// The paths of one resource (collection, item, subresources) in a v3 document.
fn resource_paths(r: &ResourceDef, paths: &mut Map<String, Value>) {
    let gv = r.gv_path();
    let (coll, item) = if r.namespaced {
        (
            format!("{gv}/namespaces/{{namespace}}/{}", r.plural),
            format!("{gv}/namespaces/{{namespace}}/{}/{{name}}", r.plural),
        )
    } else {
        (
            format!("{gv}/{}", r.plural),
            format!("{gv}/{}/{{name}}", r.plural),
        )
    };
    let kind = (r.schema_name)();
    let list = list_kind_name(r);
    let status = "io.k8s.apimachinery.pkg.apis.meta.v1.Status";
    let mut c = Map::new();
    if r.verbs.contains(&"list") {
        c.insert("get".into(), op(r, "list", &list, false, "list", None));
    }
    if r.verbs.contains(&"create") {
        c.insert("post".into(), op(r, "post", &kind, true, "create", None));
    }
    if r.verbs.contains(&"deletecollection") {
        c.insert(
            "delete".into(),
            op(
                r,
                "deletecollection",
                status,
                false,
                "deletecollection",
                None,
            ),
        );
    }
    paths.insert(coll, Value::Object(c));
    if r.verbs.contains(&"get") {
        let mut i = Map::new();
        i.insert("get".into(), op(r, "get", &kind, false, "read", None));
        i.insert("put".into(), op(r, "put", &kind, true, "replace", None));
        i.insert("patch".into(), op(r, "patch", &kind, true, "patch", None));
        i.insert(
            "delete".into(),
            op(r, "delete", &kind, false, "delete", None),
        );
        paths.insert(item.clone(), Value::Object(i));
    }
    for s in r.subresources {
        let schema = match s.name {
            "scale" => "io.k8s.api.autoscaling.v1.Scale".to_string(),
            "eviction" => "io.k8s.api.policy.v1.Eviction".to_string(),
            "binding" => "io.k8s.api.core.v1.Binding".to_string(),
            _ => kind.clone(),
        };
        let mut m = Map::new();
        for verb in s.verbs {
            let (method, action, body) = match *verb {
                "get" => ("get", "get", false),
                "update" => ("put", "put", true),
                "patch" => ("patch", "patch", true),
                _ => ("post", "post", true),
            };
            m.insert(
                method.into(),
                op(r, action, &schema, body, action, Some(s.name)),
            );
        }
        paths.insert(format!("{item}/{}", s.name), Value::Object(m));
    }
}

/// Group versions with a v3 document, as `api/v1`, `apis/apps/v1`.
pub fn v3_group_versions() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in RESOURCES {
        let gv = r.gv_path().trim_start_matches('/').to_string();
        if !out.contains(&gv) {
            out.push(gv);
        }
    }
    out
}

/// The v3 document of one group version (`api/v1`, `apis/apps/v1`).
pub fn v3_document(gv: &str) -> Option<Value> {
    let resources: Vec<&ResourceDef> = RESOURCES
        .iter()
        .filter(|r| r.gv_path().trim_start_matches('/') == gv)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let defs = definitions();
    let mut paths = Map::new();
    let mut roots = vec![
        "io.k8s.apimachinery.pkg.apis.meta.v1.Status".to_string(),
        "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions".to_string(),
        "io.k8s.apimachinery.pkg.apis.meta.v1.Patch".to_string(),
    ];
    for r in &resources {
        resource_paths(r, &mut paths);
        roots.push((r.schema_name)());
        roots.push(list_kind_name(r));
        for s in r.subresources {
            match s.name {
                "scale" => roots.push("io.k8s.api.autoscaling.v1.Scale".into()),
                "eviction" => roots.push("io.k8s.api.policy.v1.Eviction".into()),
                _ => {}
            }
        }
    }
    let mut schemas: Map<String, Value> = reachable(defs, roots)
        .into_iter()
        .filter_map(|n| defs.get(&n).map(|d| (n, d.clone())))
        .collect();
    schemas.insert(
        "io.k8s.apimachinery.pkg.apis.meta.v1.Patch".into(),
        json!({"description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body.", "type": "object"}),
    );
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": crate::discovery::GIT_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// The v2 (Swagger) document: every definition with refs to `#/definitions/`.
pub fn v2_document() -> Value {
    let mut doc = json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": crate::discovery::GIT_VERSION},
        "paths": {},
        "definitions": definitions(),
    });
    rewrite_refs(&mut doc, "#/components/schemas/", "#/definitions/");
    doc
}

fn rewrite_refs(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get_mut("$ref")
                && let Some(rest) = r.strip_prefix(from)
            {
                *r = format!("{to}{rest}");
            }
            m.values_mut().for_each(|c| rewrite_refs(c, from, to));
        }
        Value::Array(a) => a.iter_mut().for_each(|c| rewrite_refs(c, from, to)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_carry_gvk_and_patch_metadata() {
        let defs = definitions();
        let d = &defs["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            d["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        let c = &defs["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
        assert_eq!(c["x-kubernetes-patch-merge-key"], "name");
        assert!(
            defs["io.k8s.api.apps.v1.DeploymentStrategy"]["description"]
                .as_str()
                .unwrap()
                .contains("replace existing pods")
        );
    }

    #[test]
    fn v3_documents_are_self_contained() {
        let doc = v3_document("apis/apps/v1").unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut missing = Vec::new();
        let text = doc.to_string();
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap();
            if !schemas.contains_key(name) {
                missing.push(name.to_string());
            }
        }
        assert!(missing.is_empty(), "unresolved refs: {missing:?}");
        let post = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments"]["post"];
        assert!(post["parameters"].to_string().contains("fieldValidation"));
    }
}
