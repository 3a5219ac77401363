//! The StatefulSet controller (`pkg/controller/statefulset`): pods with stable names
//! `<set>-<ordinal>` (from `ordinals.start`), hostnames and, with `serviceName`, a subdomain
//! (so a headless Service gives each a DNS name); one PersistentVolumeClaim per
//! `volumeClaimTemplates` entry and pod, `<claim>-<set>-<ordinal>`, created before the pod and
//! kept after it.
//!
//! `OrderedReady` (the default) creates pods one at a time in ordinal order, each once all
//! before it are Running and Ready, removes them highest ordinal first, and replaces a failed
//! or deleted pod under the same name; `Parallel` does all at once. Templates are kept as
//! ControllerRevisions: `updateRevision` is the current template's, `currentRevision` the one
//! the pods were made from until every pod is updated. `RollingUpdate` replaces pods from the
//! highest ordinal down to `partition`, one at a time, each once the others are Ready;
//! `OnDelete` only replaces pods that are deleted. Status: `replicas`, `readyReplicas`,
//! `availableReplicas`, `currentReplicas`, `updatedReplicas`, `currentRevision`,
//! `updateRevision`, `observedGeneration`, `collisionCount`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{ControllerRevision, StatefulSet, StatefulSetStatus},
        core::v1::{
            PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    chrono::Utc,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, PostParams},
};
use skiff_apimachinery::{
    events::{Kind, Recorder},
    pod as podfacts,
};

use crate::{
    Key,
    history::{self, REVISION_HASH},
    informer::Informer,
    owners,
    queue::Queue,
};

/// The label with a StatefulSet pod's name.
pub const POD_NAME: &str = "statefulset.kubernetes.io/pod-name";
/// The label with a StatefulSet pod's ordinal.
pub const POD_INDEX: &str = "apps.kubernetes.io/pod-index";

struct Ctx {
    client: Client,
    sets: Arc<Informer<StatefulSet>>,
    pods: Arc<Informer<Pod>>,
    claims: Arc<Informer<PersistentVolumeClaim>>,
    revisions: Arc<Informer<ControllerRevision>>,
    events: Recorder,
}

/// The ordinal of a pod named `<set>-<n>`.
pub fn ordinal(set: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

/// The claim name for template `claim` of pod `pod`.
pub fn claim_name(claim: &str, pod: &str) -> String {
    format!("{claim}-{pod}")
}

/// The pod of `ordinal` from `template` at revision `hash`.
fn pod_for(set: &StatefulSet, template: &PodTemplateSpec, hash: &str, ordinal: i32) -> Pod {
    let name = format!("{}-{ordinal}", set.name_any());
    let spec = set.spec.clone().unwrap_or_default();
    let meta = template.metadata.clone().unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    labels.insert(REVISION_HASH.into(), hash.into());
    labels.insert(POD_NAME.into(), name.clone());
    labels.insert(POD_INDEX.into(), ordinal.to_string());
    let mut pod_spec = template.spec.clone().unwrap_or_default();
    pod_spec.hostname = Some(name.clone());
    if !spec.service_name.is_empty() {
        pod_spec.subdomain = Some(spec.service_name.clone());
    }
    for claim in spec.volume_claim_templates.iter().flatten() {
        let cname = claim.metadata.name.clone().unwrap_or_default();
        let vols = pod_spec.volumes.get_or_insert_with(Vec::new);
        vols.retain(|v| v.name != cname);
        vols.push(Volume {
            name: cname.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(&cname, &name),
                read_only: None,
            }),
            ..Default::default()
        });
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: set.namespace(),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: Some(vec![owners::controller_reference(set)]),
            ..Default::default()
        },
        spec: Some(pod_spec),
        status: None,
    }
}

fn running_and_ready(p: &Pod) -> bool {
    podfacts::phase(p) == "Running"
        && podfacts::is_ready(p)
        && p.metadata.deletion_timestamp.is_none()
}

/// Deletes a member pod, with upstream's event; a pod already gone is fine.
async fn delete_member(ctx: &Ctx, set: &StatefulSet, p: &Pod) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    match api.delete(&p.name_any(), &DeleteParams::default()).await {
        Ok(either) => {
            if let Some(t) = either.left() {
                ctx.pods.cache().observe(t);
            }
            ctx.events.object(
                set,
                Kind::Normal,
                "SuccessfulDelete",
                &format!(
                    "delete Pod {} in StatefulSet {} successful",
                    p.name_any(),
                    set.name_any()
                ),
            );
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn ensure_claims(ctx: &Ctx, set: &StatefulSet, pod: &str) -> anyhow::Result<()> {
    let ns = set.namespace().unwrap_or_default();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    for t in set
        .spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.clone())
        .unwrap_or_default()
    {
        let name = claim_name(&t.metadata.name.clone().unwrap_or_default(), pod);
        if ctx.claims.cache().get(&ns, &name).is_some() {
            continue;
        }
        let mut labels = t.metadata.labels.clone().unwrap_or_default();
        if let Some(sel) = set
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone())
        {
            labels.extend(sel);
        }
        let claim = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(labels),
                annotations: t.metadata.annotations.clone(),
                ..Default::default()
            },
            spec: t.spec.clone(),
            status: None,
        };
        match api.create(&PostParams::default(), &claim).await {
            Ok(out) => {
                ctx.events.object(
                    set,
                    Kind::Normal,
                    "SuccessfulCreate",
                    &format!(
                        "create Claim {name} Pod {pod} in StatefulSet {} success",
                        set.name_any()
                    ),
                );
                ctx.claims.cache().observe(out);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn reconcile(key: Key, ctx: Arc<Ctx>) -> anyhow::Result<Option<Duration>> {
    let Some(set) = ctx.sets.cache().get(&key.namespace, &key.name) else {
        return Ok(None);
    };
    let spec = set.spec.clone().unwrap_or_default();
    let candidates = ctx.pods.cache().list_namespace(&key.namespace);
    let pods = owners::claim(
        &ctx.client,
        ctx.pods.cache(),
        &*set,
        &spec.selector,
        candidates,
    )
    .await?;
    if set.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let collisions = set.status.as_ref().and_then(|s| s.collision_count);
    let template = spec.template.clone();
    let (update_rev, old_revs) =
        history::current(&ctx.client, &*set, &template, collisions, &ctx.revisions).await?;
    let name = set.name_any();
    let update_hash = history::hash_of(&name, &update_rev);
    let start = spec.ordinals.as_ref().and_then(|o| o.start).unwrap_or(0);
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let parallel = spec.pod_management_policy.as_deref() == Some("Parallel");
    let on_delete = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref())
        == Some("OnDelete");
    let partition = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0);
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let now = Utc::now();
    // The revision the pods were made from: the previous status's, while pods of it remain.
    let mut current_hash = set
        .status
        .as_ref()
        .and_then(|s| s.current_revision.clone())
        .map(|r| {
            r.strip_prefix(&format!("{name}-"))
                .unwrap_or(&r)
                .to_string()
        })
        .unwrap_or_else(|| update_hash.clone());
    let by_ordinal: BTreeMap<i32, Arc<Pod>> = pods
        .iter()
        .filter_map(|p| ordinal(&name, &p.name_any()).map(|o| (o, p.clone())))
        .collect();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let wanted = start..start + replicas;
    let mut acted = false;
    // Create and replace, in order.
    for o in wanted.clone() {
        match by_ordinal.get(&o) {
            Some(p)
                if podfacts::phase(p) == "Failed" && p.metadata.deletion_timestamp.is_none() =>
            {
                delete_member(&ctx, &set, p).await?;
                acted = true;
                if !parallel {
                    break;
                }
            }
            Some(p) => {
                if !parallel && !running_and_ready(p) {
                    // Wait for this one before the next.
                    break;
                }
            }
            None => {
                // The pod's revision: the update's, unless partitioned below or OnDelete
                // keeps the current one.
                let hash = if (on_delete || o < partition)
                    && by_ordinal
                        .values()
                        .any(|p| p.labels().get(REVISION_HASH) == Some(&current_hash))
                {
                    current_hash.clone()
                } else {
                    update_hash.clone()
                };
                let rev_template = if hash == update_hash {
                    template.clone()
                } else {
                    old_revs
                        .iter()
                        .find(|r| history::hash_of(&name, r) == hash)
                        .and_then(|r| r.data.as_ref())
                        .and_then(|d| {
                            serde_json::from_value::<PodTemplateSpec>(
                                d.0["spec"]["template"].clone(),
                            )
                            .ok()
                        })
                        .unwrap_or_else(|| template.clone())
                };
                let pod_name = format!("{name}-{o}");
                ensure_claims(&ctx, &set, &pod_name).await?;
                match api
                    .create(
                        &PostParams::default(),
                        &pod_for(&set, &rev_template, &hash, o),
                    )
                    .await
                {
                    Ok(p) => {
                        ctx.events.object(
                            &*set,
                            Kind::Normal,
                            "SuccessfulCreate",
                            &format!("create Pod {pod_name} in StatefulSet {name} successful"),
                        );
                        ctx.pods.cache().observe(p);
                    }
                    // The old pod of that name is still going.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
                acted = true;
                if !parallel {
                    break;
                }
            }
        }
    }
    // Scale down, highest ordinal first.
    let all_ready = wanted
        .clone()
        .all(|o| by_ordinal.get(&o).is_some_and(|p| running_and_ready(p)));
    if !acted {
        let extra: Vec<&Arc<Pod>> = by_ordinal
            .iter()
            .rev()
            .filter(|(o, p)| !wanted.contains(o) && p.metadata.deletion_timestamp.is_none())
            .map(|(_, p)| p)
            .collect();
        for p in extra {
            if !parallel && !all_ready {
                break;
            }
            delete_member(&ctx, &set, p).await?;
            acted = true;
            if !parallel {
                break;
            }
        }
    }
    // Rolling update: one pod at a time from the top, down to the partition.
    if !acted && !on_delete && all_ready {
        let terminating = by_ordinal
            .values()
            .any(|p| p.metadata.deletion_timestamp.is_some());
        if !terminating {
            let stale = wanted
                .clone()
                .rev()
                .filter(|o| *o >= partition)
                .filter_map(|o| by_ordinal.get(&o))
                .find(|p| p.labels().get(REVISION_HASH) != Some(&update_hash));
            if let Some(p) = stale {
                delete_member(&ctx, &set, p).await?;
            }
        }
    }
    // Status.
    let live: Vec<&Arc<Pod>> = by_ordinal
        .values()
        .filter(|p| !podfacts::is_terminal(p))
        .collect();
    let updated = live
        .iter()
        .filter(|p| p.labels().get(REVISION_HASH) == Some(&update_hash))
        .count() as i32;
    let in_wanted = |p: &Pod| ordinal(&name, &p.name_any()).is_some_and(|o| wanted.contains(&o));
    if updated == replicas
        && live
            .iter()
            .all(|p| p.labels().get(REVISION_HASH) == Some(&update_hash))
    {
        current_hash = update_hash.clone();
    }
    let status = StatefulSetStatus {
        observed_generation: set.metadata.generation,
        replicas: live.len() as i32,
        ready_replicas: Some(live.iter().filter(|p| podfacts::is_ready(p)).count() as i32),
        available_replicas: Some(
            live.iter()
                .filter(|p| podfacts::is_available(p, min_ready, now))
                .count() as i32,
        ),
        current_replicas: Some(
            live.iter()
                .filter(|p| in_wanted(p) && p.labels().get(REVISION_HASH) == Some(&current_hash))
                .count() as i32,
        ),
        updated_replicas: Some(
            live.iter()
                .filter(|p| in_wanted(p) && p.labels().get(REVISION_HASH) == Some(&update_hash))
                .count() as i32,
        ),
        current_revision: Some(format!("{name}-{current_hash}")),
        update_revision: Some(format!("{name}-{update_hash}")),
        collision_count: collisions,
        conditions: set.status.as_ref().and_then(|s| s.conditions.clone()),
    };
    let in_use: Vec<String> = pods
        .iter()
        .filter_map(|p| p.labels().get(REVISION_HASH).cloned())
        .chain([current_hash.clone()])
        .collect();
    history::prune(
        &ctx.client,
        &name,
        &old_revs,
        &in_use,
        spec.revision_history_limit.unwrap_or(10),
        &ctx.revisions,
    )
    .await?;
    if set.status.as_ref() != Some(&status) {
        let mut updated_set = (*set).clone();
        updated_set.status = Some(status.clone());
        owners::replace_status(&ctx.client, ctx.sets.cache(), &updated_set).await?;
    }
    if min_ready > 0 && status.ready_replicas != status.available_replicas {
        return Ok(Some(Duration::from_secs(min_ready as u64)));
    }
    Ok(None)
}

/// Runs the StatefulSet controller until the process ends.
pub async fn run(
    client: Client,
    sets: Arc<Informer<StatefulSet>>,
    pods: Arc<Informer<Pod>>,
    claims: Arc<Informer<PersistentVolumeClaim>>,
    revisions: Arc<Informer<ControllerRevision>>,
) {
    let queue: Arc<Queue<Key>> = Queue::new();
    let mut set_changes = sets.subscribe();
    let mut pod_changes = pods.subscribe();
    sets.synced().await;
    pods.synced().await;
    claims.synced().await;
    revisions.synced().await;
    let ctx = Arc::new(Ctx {
        events: Recorder::new(client.clone(), "statefulset-controller", None),
        client,
        sets,
        pods,
        claims,
        revisions,
    });
    let q = queue.clone();
    let feed = async move {
        loop {
            tokio::select! {
                Some(c) = set_changes.recv() => q.add(Key::of(&**c.object())),
                Some(c) = pod_changes.recv() => {
                    if let Some(k) = owners::owner_key(&**c.object(), "StatefulSet") {
                        q.add(k);
                    }
                }
                else => return,
            }
        }
    };
    let work = queue.run("statefulset", 3, move |key| reconcile(key, ctx.clone()));
    tokio::join!(feed, work);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ordinals() {
        assert_eq!(ordinal("web", "web-0"), Some(0));
        assert_eq!(ordinal("web", "web-12"), Some(12));
        assert_eq!(ordinal("web", "web-x"), None);
        assert_eq!(ordinal("web", "webby-1"), None);
        assert_eq!(claim_name("data", "web-1"), "data-web-1");
    }
}
