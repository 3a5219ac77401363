//! Claiming dependents, as client-go's `ControllerRefManager` does: a controller owns the
//! objects whose controller reference names it and that its selector still matches; it adopts
//! matching orphans (adding itself as controller owner) and releases objects that stopped
//! matching (removing its reference). Both writes carry the object's resourceVersion, so a
//! change made meanwhile makes them fail and the claim is retried.

use std::{collections::BTreeMap, fmt::Debug, sync::Arc};

use k8s_openapi::{
    NamespaceResourceScope,
    apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use skiff_apimachinery::{labels, pod::controller_ref};

use crate::informer::Cache;

/// The controller reference an owner puts on what it creates or adopts.
pub fn controller_reference<O: Resource<DynamicType = ()>>(owner: &O) -> OwnerReference {
    OwnerReference {
        api_version: O::api_version(&()).into_owned(),
        kind: O::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Claims, among `candidates` (objects in the owner's namespace), those `owner` controls:
/// adopts matching orphans and releases owned objects that no longer match. Returns the owned
/// objects (as after the writes).
pub async fn claim<O, K>(
    client: &Client,
    cache: &Cache<K>,
    owner: &O,
    selector: &LabelSelector,
    candidates: Vec<Arc<K>>,
) -> anyhow::Result<Vec<Arc<K>>>
where
    O: Resource<DynamicType = ()>,
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let owner_uid = owner.uid().unwrap_or_default();
    let deleting = owner.meta().deletion_timestamp.is_some();
    let selects =
        |l: &BTreeMap<String, String>| !labels::is_empty(selector) && labels::matches(selector, l);
    let mut owned = Vec::new();
    for obj in candidates {
        match controller_ref(obj.meta()) {
            Some(r) if r.uid == owner_uid => {
                if selects(obj.labels()) || deleting {
                    owned.push(obj);
                } else {
                    release(client, cache, owner, &obj).await?;
                }
            }
            Some(_) => {}
            None => {
                if deleting || obj.meta().deletion_timestamp.is_some() || !selects(obj.labels()) {
                    continue;
                }
                match adopt(client, cache, owner, &obj).await {
                    Ok(o) => owned.push(o),
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(owned)
}

fn api_for<K: Resource<DynamicType = (), Scope = NamespaceResourceScope>>(
    client: &Client,
    obj: &K,
) -> Api<K> {
    Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default())
}

async fn adopt<O, K>(
    client: &Client,
    cache: &Cache<K>,
    owner: &O,
    obj: &K,
) -> Result<Arc<K>, kube::Error>
where
    O: Resource<DynamicType = ()>,
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let mut refs = obj.owner_references().to_vec();
    refs.push(controller_reference(owner));
    let patch =
        json!({"metadata": {"ownerReferences": refs, "resourceVersion": obj.resource_version()}});
    let out = api_for(client, obj)
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    tracing::info!(kind = %K::kind(&()), object = %obj.name_any(), owner = %owner.name_any(), "adopted");
    cache.observe(out.clone());
    Ok(Arc::new(out))
}

async fn release<O, K>(client: &Client, cache: &Cache<K>, owner: &O, obj: &K) -> anyhow::Result<()>
where
    O: Resource<DynamicType = ()>,
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let refs: Vec<&OwnerReference> = obj
        .owner_references()
        .iter()
        .filter(|r| Some(&r.uid) != owner.uid().as_ref())
        .collect();
    let patch =
        json!({"metadata": {"ownerReferences": refs, "resourceVersion": obj.resource_version()}});
    match api_for(client, obj)
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(out) => {
            tracing::info!(kind = %K::kind(&()), object = %obj.name_any(), owner = %owner.name_any(), "released");
            cache.observe(out);
            Ok(())
        }
        // Gone already, or changed: the next reconcile sees the new state.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The key of the `kind` controlling `obj`, if one does.
pub fn owner_key<K: Resource>(obj: &K, kind: &str) -> Option<crate::Key> {
    controller_ref(obj.meta())
        .filter(|r| r.kind == kind)
        .map(|r| crate::Key::new(obj.meta().namespace.as_deref().unwrap_or(""), &r.name))
}

/// Creates `pod` for `owner`: a `SuccessfulCreate` (or `FailedCreate`) event, and the pod
/// written through to `cache`.
pub async fn create_pod<O: Resource<DynamicType = ()>>(
    client: &Client,
    cache: &Cache<k8s_openapi::api::core::v1::Pod>,
    events: &skiff_apimachinery::events::Recorder,
    owner: &O,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> Result<Arc<k8s_openapi::api::core::v1::Pod>, kube::Error> {
    use skiff_apimachinery::events::Kind;
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(
        client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or(""),
    );
    match api.create(&kube::api::PostParams::default(), pod).await {
        Ok(p) => {
            events.object(
                owner,
                Kind::Normal,
                "SuccessfulCreate",
                &format!("Created pod: {}", p.name_any()),
            );
            cache.observe(p.clone());
            Ok(Arc::new(p))
        }
        Err(e) => {
            let msg = match &e {
                kube::Error::Api(s) => s.message.clone(),
                e => e.to_string(),
            };
            events.object(
                owner,
                Kind::Warning,
                "FailedCreate",
                &format!("Error creating: {msg}"),
            );
            Err(e)
        }
    }
}

/// Deletes `pod` of `owner`: a `SuccessfulDelete` event, and the deletion written through to
/// `cache`. A pod already gone is not an error.
pub async fn delete_pod<O: Resource<DynamicType = ()>>(
    client: &Client,
    cache: &Cache<k8s_openapi::api::core::v1::Pod>,
    events: &skiff_apimachinery::events::Recorder,
    owner: &O,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> Result<(), kube::Error> {
    use skiff_apimachinery::events::Kind;
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(
        client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or(""),
    );
    match api
        .delete(&pod.name_any(), &kube::api::DeleteParams::default())
        .await
    {
        Ok(either) => {
            events.object(
                owner,
                Kind::Normal,
                "SuccessfulDelete",
                &format!("Deleted pod: {}", pod.name_any()),
            );
            match either.left() {
                Some(terminating) => cache.observe(terminating),
                None => cache.observe_deleted(pod),
            }
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {
            cache.observe_deleted(pod);
            Ok(())
        }
        Err(e) => {
            events.object(
                owner,
                Kind::Warning,
                "FailedDelete",
                &format!("Error deleting: {e}"),
            );
            Err(e)
        }
    }
}

/// Writes `next` (the object with its new status) through `/status`, and into `cache`.
pub async fn replace_status<K>(client: &Client, cache: &Cache<K>, next: &K) -> anyhow::Result<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(
        client.clone(),
        next.meta().namespace.as_deref().unwrap_or(""),
    );
    let out = api
        .replace_status(
            &next.name_any(),
            &kube::api::PostParams::default(),
            serde_json::to_vec(next)?,
        )
        .await?;
    cache.observe(out.clone());
    Ok(out)
}
