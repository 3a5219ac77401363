//! ControllerRevisions, the template history of DaemonSets and StatefulSets
//! (`pkg/controller/history`): each distinct pod template is stored once as
//! `<owner>-<hash>` with `data` = `{"spec": {"template": …, "$patch": "replace"}}` (what
//! `kubectl rollout undo` patches back) and a `revision` number; a template that comes back gets
//! the next number. Pods carry the hash as `controller-revision-hash`. Old revisions no pod uses
//! are pruned beyond `revisionHistoryLimit`.

use std::sync::Arc;

use k8s_openapi::{
    NamespaceResourceScope,
    api::{apps::v1::ControllerRevision, core::v1::PodTemplateSpec},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, runtime::RawExtension},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use skiff_apimachinery::pod::controller_ref;

use crate::{deployment::util::template_hash, informer::Informer, owners};

/// The pod label naming the revision a pod was made from.
pub const REVISION_HASH: &str = "controller-revision-hash";

/// The revision data for `template`.
pub fn data(template: &PodTemplateSpec) -> serde_json::Value {
    let mut t = serde_json::to_value(template).unwrap_or_default();
    if let Some(o) = t.as_object_mut() {
        o.insert("$patch".into(), json!("replace"));
    }
    json!({"spec": {"template": t}})
}

/// The revisions `owner` controls, oldest revision first.
pub fn owned<O: Resource>(
    owner: &O,
    revisions: &Informer<ControllerRevision>,
) -> Vec<Arc<ControllerRevision>> {
    let uid = owner.meta().uid.clone();
    let mut out: Vec<Arc<ControllerRevision>> = revisions
        .cache()
        .list_namespace(owner.meta().namespace.as_deref().unwrap_or(""))
        .into_iter()
        .filter(|r| controller_ref(&r.metadata).is_some_and(|o| Some(&o.uid) == uid.as_ref()))
        .collect();
    out.sort_by_key(|r| r.revision);
    out
}

/// Finds or creates the revision of `template` for `owner`, renumbered to the newest if an old
/// one comes back. Returns it and the others (oldest first).
pub async fn current<O>(
    client: &Client,
    owner: &O,
    template: &PodTemplateSpec,
    collision_count: Option<i32>,
    revisions: &Informer<ControllerRevision>,
) -> anyhow::Result<(Arc<ControllerRevision>, Vec<Arc<ControllerRevision>>)>
where
    O: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    let ns = owner.meta().namespace.clone().unwrap_or_default();
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &ns);
    let mut all = owned(owner, revisions);
    let max = all.last().map_or(0, |r| r.revision);
    let want = data(template);
    if let Some(i) = all
        .iter()
        .position(|r| r.data.as_ref().map(|d| &d.0) == Some(&want))
    {
        let found = all.remove(i);
        if found.revision < max {
            let patch = json!({"metadata": {"resourceVersion": found.resource_version()}, "revision": max + 1});
            let out = api
                .patch(
                    &found.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
            revisions.cache().observe(out.clone());
            return Ok((Arc::new(out), all));
        }
        return Ok((found, all));
    }
    let hash = template_hash(template, collision_count);
    let labels = template.metadata.as_ref().and_then(|m| m.labels.clone());
    let rev = ControllerRevision {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}-{hash}",
                owner.meta().name.clone().unwrap_or_default()
            )),
            namespace: Some(ns),
            labels,
            owner_references: Some(vec![owners::controller_reference(owner)]),
            ..Default::default()
        },
        data: Some(RawExtension(want)),
        revision: max + 1,
    };
    match api.create(&PostParams::default(), &rev).await {
        Ok(out) => {
            revisions.cache().observe(out.clone());
            Ok((Arc::new(out), all))
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            anyhow::bail!(
                "ControllerRevision {} exists with other content (a hash collision); retrying",
                rev.name_any()
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// The hash part of a revision's name (what pods are labelled with).
pub fn hash_of(owner_name: &str, rev: &ControllerRevision) -> String {
    rev.name_any()
        .strip_prefix(&format!("{owner_name}-"))
        .unwrap_or(&rev.name_any())
        .to_string()
}

/// Deletes the oldest revisions beyond `limit` that no live pod uses (`in_use` hashes).
pub async fn prune(
    client: &Client,
    owner_name: &str,
    old: &[Arc<ControllerRevision>],
    in_use: &[String],
    limit: i32,
    revisions: &Informer<ControllerRevision>,
) -> anyhow::Result<()> {
    let unused: Vec<&Arc<ControllerRevision>> = old
        .iter()
        .filter(|r| !in_use.contains(&hash_of(owner_name, r)))
        .collect();
    let excess = unused.len().saturating_sub(limit.max(0) as usize);
    for r in unused.into_iter().take(excess) {
        let api: Api<ControllerRevision> =
            Api::namespaced(client.clone(), &r.namespace().unwrap_or_default());
        match api.delete(&r.name_any(), &DeleteParams::default()).await {
            Ok(_) => revisions.cache().observe_deleted(r),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
