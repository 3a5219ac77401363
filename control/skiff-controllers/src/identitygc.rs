//! Garbage collection of security identities (the Cilium operator's identity GC): a
//! `SecurityIdentity` whose label set no live pod carries any more is deleted once it has been
//! unused for the grace period — seen unused by two scans that far apart, and created at least
//! that long ago, so an identity an agent has just allocated for a pod the scan has not seen
//! yet survives. A pod that later carries the set again gets an identity anew (the agents'
//! create-if-absent allocation).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    chrono::Utc,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Preconditions},
};
use skiff_apimachinery::identity::{IdentityLabels, SecurityIdentity, namespace_labels, pod_live};

use crate::informer::Informer;

/// The label sets of the pods that may still hold an address.
fn in_use<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    namespaces: impl IntoIterator<Item = &'a Namespace>,
) -> BTreeSet<IdentityLabels> {
    let ns_labels = namespace_labels(namespaces);
    pods.into_iter()
        .filter(|p| pod_live(p))
        .map(|p| IdentityLabels::of_pod(p, &ns_labels))
        .collect()
}

/// The identities to delete now: unused, unused since at least `grace` ago (per
/// `unused_since`, updated here), and created at least `grace` ago.
fn expired(
    identities: &[SecurityIdentity],
    used: &BTreeSet<IdentityLabels>,
    unused_since: &mut BTreeMap<String, Instant>,
    grace: Duration,
    now: Instant,
) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut still = BTreeMap::new();
    for i in identities {
        let name = i.name_any();
        if used.contains(&i.labels) {
            continue;
        }
        let since = *unused_since.get(&name).unwrap_or(&now);
        still.insert(name.clone(), since);
        let old_enough = i.metadata.creation_timestamp.as_ref().is_none_or(|t| {
            Utc::now()
                .signed_duration_since(t.0)
                .to_std()
                .is_ok_and(|age| age >= grace)
        });
        if now.duration_since(since) >= grace && old_enough {
            out.push((name, i.metadata.resource_version.clone()));
        }
    }
    *unused_since = still;
    out
}

/// Runs the identity GC until the process ends: a scan every `grace / 2` (at least 1 s).
pub async fn run(
    client: Client,
    pods: Arc<Informer<Pod>>,
    namespaces: Arc<Informer<Namespace>>,
    grace: Duration,
) {
    let api: Api<SecurityIdentity> = Api::all(client.clone());
    let (pods_api, ns_api): (Api<Pod>, Api<Namespace>) =
        (Api::all(client.clone()), Api::all(client));
    let mut unused_since = BTreeMap::new();
    pods.synced().await;
    namespaces.synced().await;
    let grace = grace.max(Duration::from_secs(1));
    let period = (grace / 2).max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(period).await;
        let identities = match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::warn!(error = %e, "identity GC: listing security identities");
                continue;
            }
        };
        // The caches after the list: a pod created before the list is in them.
        let (cached_pods, cached_ns) = (pods.cache().list(), namespaces.cache().list());
        let used = in_use(
            cached_pods.iter().map(|p| &**p),
            cached_ns.iter().map(|n| &**n),
        );
        let mut doomed = expired(&identities, &used, &mut unused_since, grace, Instant::now());
        if doomed.is_empty() {
            continue;
        }
        // The caches may lag: deletions are decided again on a fresh list of pods.
        let (fresh_pods, fresh_ns) = match (
            pods_api.list(&ListParams::default()).await,
            ns_api.list(&ListParams::default()).await,
        ) {
            (Ok(p), Ok(n)) => (p.items, n.items),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "identity GC: listing pods and namespaces");
                continue;
            }
        };
        let used = in_use(&fresh_pods, &fresh_ns);
        doomed.retain(|(name, _)| {
            identities
                .iter()
                .find(|i| i.name_any() == *name)
                .is_some_and(|i| !used.contains(&i.labels))
        });
        for (name, rv) in doomed {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: rv,
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &dp).await {
                Ok(_) => {
                    tracing::info!(identity = %name, "security identity unused: deleted");
                    unused_since.remove(&name);
                }
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => tracing::warn!(identity = %name, error = %e, "identity GC: delete"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    fn pod(ns: &str, app: &str, phase: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": app, "namespace": ns, "labels": {"app": app}},
                "status": {"phase": phase},
            }))
            .unwrap(),
        )
    }

    fn identity(id: u32, ns: &str, app: &str, age: Duration) -> SecurityIdentity {
        let mut i = SecurityIdentity::new(
            id,
            IdentityLabels::of(
                ns,
                &BTreeMap::from([("app".to_string(), app.to_string())]),
                &BTreeMap::new(),
            ),
        );
        i.metadata.creation_timestamp = Some(Time(
            Utc::now() - k8s_openapi::chrono::TimeDelta::from_std(age).unwrap(),
        ));
        i
    }

    #[test]
    fn unused_identities_go_after_the_grace_period_only() {
        let grace = Duration::from_secs(60);
        let pods = [pod("a", "web", "Running"), pod("a", "done", "Succeeded")];
        let used = in_use(pods.iter().map(|p| &**p), []);
        let hour = Duration::from_secs(3600);
        let ids = [
            identity(300, "a", "web", hour),
            identity(301, "a", "done", hour),
            identity(302, "a", "gone", hour),
            // Just allocated for a pod not seen yet.
            identity(303, "a", "new", Duration::from_secs(1)),
        ];
        let mut since = BTreeMap::new();
        let t0 = Instant::now();
        // First seen unused: nothing yet.
        assert!(expired(&ids, &used, &mut since, grace, t0).is_empty());
        assert_eq!(since.len(), 3, "{since:?}");
        // A grace period later: the finished pod's and the gone one's; not the young one.
        let names: Vec<String> = expired(&ids, &used, &mut since, grace, t0 + grace)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["301", "302"]);
        // In use again: forgotten.
        let used = in_use([&*pod("a", "gone", "Running")], []);
        let _ = expired(&ids[2..3], &used, &mut since, grace, t0 + grace);
        assert!(since.is_empty());
    }
}
