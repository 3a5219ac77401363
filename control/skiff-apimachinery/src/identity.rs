//! Security identities (`skiff.dev/v1` `SecurityIdentity`, cluster-scoped): the numbers
//! NetworkPolicy enforcement works with. An identity stands for one set of labels that policy
//! can select on — a pod's namespace, its labels and its namespace's labels — so every pod with
//! the same set shares it, and the data path keys its policy maps by number rather than by
//! address. Identities are objects of the API so every node agrees on them; the object's name
//! is the number.
//!
//! Allocation ([`allocate`]) is create-if-absent: the first number tried is derived from the
//! labels, so agents allocating the same set at once try the same number, one wins and the
//! others find it (a 409, then a read showing the same labels); a number taken by other labels
//! moves on to the next. Labels that differ per pod of one workload (`pod-template-hash`, …)
//! are left out, as Cilium leaves them out, or every pod would need its own identity.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Api, api::PostParams};
use serde::{Deserialize, Serialize};

/// The group/version of the kind.
pub const API_VERSION: &str = "skiff.dev/v1";
/// The first number of cluster-allocated identities (below: reserved).
pub const FIRST: u32 = 256;
/// The last number of cluster-allocated identities.
pub const LAST: u32 = 65535;

// Reserved identities (below FIRST) are the data path's: `skiff_ebpf_common::policy`.

/// Pod labels left out of identities: they differ between pods of one workload.
pub const EXCLUDED_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
    "batch.kubernetes.io/job-completion-index",
];

fn api_version() -> String {
    API_VERSION.into()
}

fn kind() -> String {
    "SecurityIdentity".into()
}

/// The labels an identity stands for.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct IdentityLabels {
    /// The pods' namespace.
    pub namespace: String,
    /// The pods' labels (less [`EXCLUDED_LABELS`]).
    #[serde(default)]
    pub pod_labels: BTreeMap<String, String>,
    /// Their namespace's labels.
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, String>,
}

/// The identity number an object name stands for: a number in `FIRST..=LAST`, written
/// without leading zeros.
pub fn id_of_name(name: &str) -> Option<u32> {
    name.parse::<u32>()
        .ok()
        .filter(|n| (FIRST..=LAST).contains(n) && n.to_string() == name)
}

/// Whether `pod` may still hold an address: not Succeeded or Failed.
pub fn pod_live(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Namespace name → its labels.
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// The labels of each of `namespaces`, by name.
pub fn namespace_labels<'a>(
    namespaces: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::Namespace>,
) -> NamespaceLabels {
    namespaces
        .into_iter()
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                n.metadata.labels.clone().unwrap_or_default(),
            )
        })
        .collect()
}

impl IdentityLabels {
    /// The identity labels of `pod`, its namespace's labels looked up in `namespaces`.
    pub fn of_pod(
        pod: &k8s_openapi::api::core::v1::Pod,
        namespaces: &NamespaceLabels,
    ) -> IdentityLabels {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let empty = BTreeMap::new();
        let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
        IdentityLabels::of(&ns, labels, namespaces.get(&ns).unwrap_or(&empty))
    }

    /// The labels of a pod in `namespace` with `labels`, its namespace labelled
    /// `namespace_labels`.
    pub fn of(
        namespace: &str,
        labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
    ) -> IdentityLabels {
        IdentityLabels {
            namespace: namespace.to_string(),
            pod_labels: labels
                .iter()
                .filter(|(k, _)| !EXCLUDED_LABELS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            namespace_labels: namespace_labels.clone(),
        }
    }

    /// The first number [`allocate`] tries: FNV-1a of the labels, in the cluster range.
    pub fn preferred(&self) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |s: &str| {
            for b in s.bytes().chain([0xff]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&self.namespace);
        for (k, v) in &self.pod_labels {
            eat(k);
            eat(v);
        }
        eat("\u{1}");
        for (k, v) in &self.namespace_labels {
            eat(k);
            eat(v);
        }
        let span = u64::from(LAST - FIRST + 1);
        FIRST + u32::try_from(h % span).unwrap_or(0)
    }
}

/// A security identity: its number (the name) and the labels it stands for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schemars",
    schemars(rename = "dev.skiff.v1.SecurityIdentity")
)]
#[serde(rename_all = "camelCase")]
pub struct SecurityIdentity {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What it stands for.
    #[serde(default)]
    pub labels: IdentityLabels,
}

impl SecurityIdentity {
    /// Identity `id` for `labels`.
    pub fn new(id: u32, labels: IdentityLabels) -> SecurityIdentity {
        SecurityIdentity {
            api_version: api_version(),
            kind: kind(),
            metadata: ObjectMeta {
                name: Some(id.to_string()),
                ..Default::default()
            },
            labels,
        }
    }

    /// Its number, when its name is one in the cluster range.
    pub fn id(&self) -> Option<u32> {
        id_of_name(self.metadata.name.as_deref()?)
    }
}

impl k8s_openapi::Resource for SecurityIdentity {
    const API_VERSION: &'static str = API_VERSION;
    const GROUP: &'static str = "skiff.dev";
    const KIND: &'static str = "SecurityIdentity";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "securityidentities";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::ListableResource for SecurityIdentity {
    const LIST_KIND: &'static str = "SecurityIdentityList";
}

impl k8s_openapi::Metadata for SecurityIdentity {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// How many numbers [`allocate`] tries before giving up.
const ATTEMPTS: u32 = 64;

/// The identity for `labels`: one in `known` (the caller's cache of identities), else a new
/// one created through `api`.
pub async fn allocate(
    api: &Api<SecurityIdentity>,
    known: &[SecurityIdentity],
    labels: &IdentityLabels,
) -> Result<u32> {
    if let Some(id) = known
        .iter()
        .find(|i| i.labels == *labels)
        .and_then(SecurityIdentity::id)
    {
        return Ok(id);
    }
    let span = LAST - FIRST + 1;
    let start = labels.preferred() - FIRST;
    for n in 0..ATTEMPTS {
        let id = FIRST + (start + n) % span;
        if known.iter().any(|i| i.id() == Some(id)) {
            continue;
        }
        match api
            .create(
                &PostParams::default(),
                &SecurityIdentity::new(id, labels.clone()),
            )
            .await
        {
            Ok(_) => return Ok(id),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Taken meanwhile: by the same labels (another node allocating them), or not.
                let other = api
                    .get(&id.to_string())
                    .await
                    .context("read a taken identity")?;
                if other.labels == *labels {
                    return Ok(id);
                }
            }
            Err(e) => return Err(e).context("create a security identity"),
        }
    }
    bail!("no free security identity after {ATTEMPTS} tries")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_leave_out_per_pod_keys_and_prefer_a_stable_number() {
        let pod = BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("pod-template-hash".to_string(), "5d8f".to_string()),
        ]);
        let ns = BTreeMap::from([("team".to_string(), "a".to_string())]);
        let l = IdentityLabels::of("shop", &pod, &ns);
        assert_eq!(l.pod_labels.len(), 1);
        let other_hash = BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("pod-template-hash".to_string(), "77aa".to_string()),
        ]);
        assert_eq!(IdentityLabels::of("shop", &other_hash, &ns), l);
        let n = l.preferred();
        assert!((FIRST..=LAST).contains(&n));
        assert_eq!(n, l.clone().preferred());
        // Another namespace, another number (almost surely; these two differ).
        assert_ne!(IdentityLabels::of("shop2", &pod, &ns).preferred(), n);
    }

    #[test]
    fn the_object_round_trips_with_its_kind() {
        let i = SecurityIdentity::new(300, IdentityLabels::default());
        let v = serde_json::to_value(&i).unwrap();
        assert_eq!(v["apiVersion"], "skiff.dev/v1");
        assert_eq!(v["kind"], "SecurityIdentity");
        assert_eq!(v["metadata"]["name"], "300");
        let back: SecurityIdentity = serde_json::from_value(v).unwrap();
        assert_eq!(back.id(), Some(300));
        assert_eq!(
            SecurityIdentity::new(7, IdentityLabels::default()).id(),
            None
        );
    }
}
