//! The resources this server serves: one [`ResourceDef`] per REST resource, with its group,
//! version, kind, scope, verbs, short names, categories and subresources (what discovery
//! publishes), and the `k8s-openapi` type that decodes, validates and canonicalises its objects.

use k8s_openapi::{
    api::{
        apps::v1 as apps, batch::v1 as batch, coordination::v1 as coordination, core::v1 as core,
        discovery::v1 as discovery, events::v1 as events, networking::v1 as networking,
        scheduling::v1 as scheduling,
    },
    schemars::{JsonSchema, r#gen::SchemaGenerator, schema::Schema},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// Verbs of a plain collection resource, as discovery lists them.
pub const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
/// Verbs of a resource without `deletecollection` (namespaces).
pub const NO_COLLECTION_DELETE: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];
const GET_PATCH_UPDATE: &[&str] = &["get", "patch", "update"];
const CREATE: &[&str] = &["create"];
const GET: &[&str] = &["get"];
const GET_CREATE: &[&str] = &["create", "get"];
const UPDATE: &[&str] = &["update"];

/// A subresource (`pods/status`, `deployments/scale`, …).
#[derive(Debug)]
pub struct SubresourceDef {
    /// Its name after the slash.
    pub name: &'static str,
    /// Kind of the object it takes and returns.
    pub kind: &'static str,
    /// Group of that kind ("" = core).
    pub group: &'static str,
    /// Version of that kind.
    pub version: &'static str,
    /// Verbs discovery lists for it.
    pub verbs: &'static [&'static str],
}

const fn sub(name: &'static str, verbs: &'static [&'static str]) -> SubresourceDef {
    SubresourceDef {
        name,
        kind: "",
        group: "",
        version: "",
        verbs,
    }
}

const fn sub_kind(
    name: &'static str,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    verbs: &'static [&'static str],
) -> SubresourceDef {
    SubresourceDef {
        name,
        kind,
        group,
        version,
        verbs,
    }
}

/// Decodes an object into its typed form and back: drops unknown fields, normalises formats,
/// and fails on values of the wrong shape.
pub type Canonicalize = fn(Value) -> Result<Value, serde_json::Error>;
/// The OpenAPI schema of the resource's kind.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// One REST resource.
#[derive(Debug)]
pub struct ResourceDef {
    /// API group ("" = core).
    pub group: &'static str,
    /// Version.
    pub version: &'static str,
    /// Kind of its objects.
    pub kind: &'static str,
    /// Kind of its lists.
    pub list_kind: &'static str,
    /// Plural (the path segment).
    pub plural: &'static str,
    /// Singular name.
    pub singular: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Verbs on the resource itself.
    pub verbs: &'static [&'static str],
    /// Short names (`po`, `deploy`, …).
    pub short_names: &'static [&'static str],
    /// Categories (`all`).
    pub categories: &'static [&'static str],
    /// Subresources.
    pub subresources: &'static [SubresourceDef],
    /// Whether the object has a `spec` whose changes bump `metadata.generation`.
    pub has_spec: bool,
    /// Whether the object has a `status` that only the status subresource writes.
    pub has_status: bool,
    /// Typed round trip.
    pub canonicalize: Canonicalize,
    /// Schema of the kind.
    pub schema: SchemaFn,
    /// Schema definition name of the kind (`io.k8s.api.apps.v1.Deployment`).
    pub schema_name: fn() -> String,
}

impl ResourceDef {
    /// `apiVersion` of its objects (`v1`, `apps/v1`).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Path prefix of its group version (`/api/v1`, `/apis/apps/v1`).
    pub fn gv_path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    /// Storage group segment: "core" for the core group.
    pub fn storage_group(&self) -> &'static str {
        if self.group.is_empty() {
            "core"
        } else {
            self.group
        }
    }

    /// A subresource by name.
    pub fn subresource(&self, name: &str) -> Option<&'static SubresourceDef> {
        self.subresources.iter().find(|s| s.name == name)
    }

    /// Group-qualified name for messages (`deployments.apps`, `pods`).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

fn canonicalize<T: DeserializeOwned + Serialize>(v: Value) -> Result<Value, serde_json::Error> {
    let typed: T = serde_json::from_value(v)?;
    serde_json::to_value(typed)
}

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

macro_rules! resource {
    ($ty:ty, $group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr,
     namespaced: $ns:expr, verbs: $verbs:expr, short: $short:expr, categories: $cat:expr,
     subresources: $subs:expr, spec: $spec:expr, status: $status:expr) => {
        ResourceDef {
            group: $group,
            version: $version,
            kind: $kind,
            list_kind: concat!($kind, "List"),
            plural: $plural,
            singular: $singular,
            namespaced: $ns,
            verbs: $verbs,
            short_names: $short,
            categories: $cat,
            subresources: $subs,
            has_spec: $spec,
            has_status: $status,
            canonicalize: canonicalize::<$ty>,
            schema: schema::<$ty>,
            schema_name: <$ty as JsonSchema>::schema_name,
        }
    };
}

const ALL: &[&str] = &["all"];
const NONE: &[&str] = &[];
const STATUS: &[SubresourceDef] = &[sub("status", GET_PATCH_UPDATE)];

/// Every resource served, in discovery order.
pub static RESOURCES: &[ResourceDef] = &[
    // core/v1
    resource!(core::Binding, "", "v1", "Binding", "bindings", "binding",
        namespaced: true, verbs: CREATE, short: NONE, categories: NONE,
        subresources: &[], spec: false, status: false),
    resource!(core::ConfigMap, "", "v1", "ConfigMap", "configmaps", "configmap",
        namespaced: true, verbs: ALL_VERBS, short: &["cm"], categories: NONE,
        subresources: &[], spec: false, status: false),
    resource!(core::Endpoints, "", "v1", "Endpoints", "endpoints", "endpoints",
        namespaced: true, verbs: ALL_VERBS, short: &["ep"], categories: NONE,
        subresources: &[], spec: false, status: false),
    resource!(core::Event, "", "v1", "Event", "events", "event",
        namespaced: true, verbs: ALL_VERBS, short: &["ev"], categories: NONE,
        subresources: &[], spec: false, status: false),
    resource!(core::LimitRange, "", "v1", "LimitRange", "limitranges", "limitrange",
        namespaced: true, verbs: ALL_VERBS, short: &["limits"], categories: NONE,
        subresources: &[], spec: false, status: false),
    resource!(core::Namespace, "", "v1", "Namespace", "namespaces", "namespace",
        namespaced: false, verbs: NO_COLLECTION_DELETE, short: &["ns"], categories: NONE,
        subresources: &[sub("finalize", UPDATE), sub("status", GET_PATCH_UPDATE)],
        spec: false, status: true),
    resource!(core::Node, "", "v1", "Node", "nodes", "node",
        namespaced: false, verbs: ALL_VERBS, short: &["no"], categories: NONE,
        subresources: STATUS, spec: false, status: true),
    resource!(core::PersistentVolume, "", "v1", "PersistentVolume", "persistentvolumes", "persistentvolume",
        namespaced: false, verbs: ALL_VERBS, short: &["pv"], categories: NONE,
        subresources: STATUS, spec: false, status: true),
    resource!(core::PersistentVolumeClaim, "", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", "persistentvolumeclaim",
        namespaced: true, verbs: ALL_VERBS, short: &["pvc"], categories: ALL,
        subresources: STATUS, spec: false, status: true),
    resource!(core::Pod, "", "v1", "Pod", "pods", "pod",
        namespaced: true, verbs: ALL_VERBS, short: &["po"], categories: ALL,
        subresources: &[
            sub_kind("binding", "", "v1", "Binding", CREATE),
            sub_kind("eviction", "policy", "v1", "Eviction", CREATE),
            sub_kind("exec", "", "v1", "PodExecOptions", GET_CREATE),
            sub_kind("log", "", "v1", "Pod", GET),
            sub("status", GET_PATCH_UPDATE),
        ],
        spec: false, status: true),
    resource!(core::ResourceQuota, "", "v1", "ResourceQuota", "resourcequotas", "resourcequota",
        namespaced: true, verbs: ALL_VERBS, short: &["quota"], categories: NONE,
        subresources: STATUS, spec: false, status: true),
    resource!(core::Secret, "", "v1", "Secret", "secrets", "secret",
        namespaced: true, verbs: ALL_VERBS, short: NONE, categories: NONE,
        subresources: &[], spec: false, status: false),
    resource!(core::ServiceAccount, "", "v1", "ServiceAccount", "serviceaccounts", "serviceaccount",
        namespaced: true, verbs: ALL_VERBS, short: &["sa"], categories: NONE,
        subresources: &[], spec: false, status: false),
    resource!(core::Service, "", "v1", "Service", "services", "service",
        namespaced: true, verbs: ALL_VERBS, short: &["svc"], categories: ALL,
        subresources: STATUS, spec: false, status: true),
    // apps/v1
    resource!(apps::ControllerRevision, "apps", "v1", "ControllerRevision", "controllerrevisions", "controllerrevision",
        namespaced: true, verbs: ALL_VERBS, short: NONE, categories: NONE,
        subresources: &[], spec: false, status: false),
    resource!(apps::DaemonSet, "apps", "v1", "DaemonSet", "daemonsets", "daemonset",
        namespaced: true, verbs: ALL_VERBS, short: &["ds"], categories: ALL,
        subresources: STATUS, spec: true, status: true),
    resource!(apps::Deployment, "apps", "v1", "Deployment", "deployments", "deployment",
        namespaced: true, verbs: ALL_VERBS, short: &["deploy"], categories: ALL,
        subresources: &[sub_kind("scale", "autoscaling", "v1", "Scale", GET_PATCH_UPDATE), sub("status", GET_PATCH_UPDATE)],
        spec: true, status: true),
    resource!(apps::ReplicaSet, "apps", "v1", "ReplicaSet", "replicasets", "replicaset",
        namespaced: true, verbs: ALL_VERBS, short: &["rs"], categories: ALL,
        subresources: &[sub_kind("scale", "autoscaling", "v1", "Scale", GET_PATCH_UPDATE), sub("status", GET_PATCH_UPDATE)],
        spec: true, status: true),
    resource!(apps::StatefulSet, "apps", "v1", "StatefulSet", "statefulsets", "statefulset",
        namespaced: true, verbs: ALL_VERBS, short: &["sts"], categories: ALL,
        subresources: &[sub_kind("scale", "autoscaling", "v1", "Scale", GET_PATCH_UPDATE), sub("status", GET_PATCH_UPDATE)],
        spec: true, status: true),
    // batch/v1
    resource!(batch::CronJob, "batch", "v1", "CronJob", "cronjobs", "cronjob",
        namespaced: true, verbs: ALL_VERBS, short: &["cj"], categories: ALL,
        subresources: STATUS, spec: true, status: true),
    resource!(batch::Job, "batch", "v1", "Job", "jobs", "job",
        namespaced: true, verbs: ALL_VERBS, short: NONE, categories: ALL,
        subresources: STATUS, spec: true, status: true),
    // coordination.k8s.io/v1
    resource!(coordination::Lease, "coordination.k8s.io", "v1", "Lease", "leases", "lease",
        namespaced: true, verbs: ALL_VERBS, short: NONE, categories: NONE,
        subresources: &[], spec: false, status: false),
    // discovery.k8s.io/v1
    resource!(discovery::EndpointSlice, "discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", "endpointslice",
        namespaced: true, verbs: ALL_VERBS, short: NONE, categories: NONE,
        subresources: &[], spec: false, status: false),
    // events.k8s.io/v1
    resource!(events::Event, "events.k8s.io", "v1", "Event", "events", "event",
        namespaced: true, verbs: ALL_VERBS, short: &["ev"], categories: NONE,
        subresources: &[], spec: false, status: false),
    // networking.k8s.io/v1
    resource!(networking::Ingress, "networking.k8s.io", "v1", "Ingress", "ingresses", "ingress",
        namespaced: true, verbs: ALL_VERBS, short: &["ing"], categories: NONE,
        subresources: STATUS, spec: true, status: true),
    resource!(networking::NetworkPolicy, "networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", "networkpolicy",
        namespaced: true, verbs: ALL_VERBS, short: &["netpol"], categories: NONE,
        subresources: &[], spec: true, status: false),
    // skiff.dev/v1: NetworkPolicy's security identities (skiff_apimachinery::identity)
    resource!(skiff_apimachinery::identity::SecurityIdentity, "skiff.dev", "v1", "SecurityIdentity", "securityidentities", "securityidentity",
        namespaced: false, verbs: ALL_VERBS, short: &["sid"], categories: NONE,
        subresources: &[], spec: false, status: false),
    // scheduling.k8s.io/v1
    resource!(scheduling::PriorityClass, "scheduling.k8s.io", "v1", "PriorityClass", "priorityclasses", "priorityclass",
        namespaced: false, verbs: ALL_VERBS, short: &["pc"], categories: NONE,
        subresources: &[], spec: false, status: false),
];

/// The groups served with their versions, in discovery preference order.
pub fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        match out.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) if !versions.contains(&r.version) => versions.push(r.version),
            Some(_) => {}
            None => out.push((r.group, vec![r.version])),
        }
    }
    out
}

/// The resource at `group`/`version`/`plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Whether `group`/`version` is served.
pub fn has_group_version(group: &str, version: &str) -> bool {
    RESOURCES
        .iter()
        .any(|r| r.group == group && r.version == version)
}

/// The resource for `kind` in `group` (any version).
pub fn by_kind(group: &str, kind: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.kind == kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plural_names_are_unique_per_group_version() {
        for (i, a) in RESOURCES.iter().enumerate() {
            for b in &RESOURCES[i + 1..] {
                assert!(
                    !(a.group == b.group && a.version == b.version && a.plural == b.plural),
                    "{} listed twice",
                    a.qualified()
                );
            }
        }
    }

    #[test]
    fn canonicalize_drops_unknown_fields_and_rejects_wrong_shapes() {
        let pods = find("", "v1", "pods").unwrap();
        let v = (pods.canonicalize)(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "c", "image": "i", "bogus": 1}]}
        }))
        .unwrap();
        assert!(v["spec"]["containers"][0].get("bogus").is_none());
        assert!((pods.canonicalize)(serde_json::json!({"spec": {"containers": "nope"}})).is_err());
    }
}
