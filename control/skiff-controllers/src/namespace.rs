//! Namespace lifecycle: when a namespace is being deleted (`deletionTimestamp` set, the
//! `kubernetes` finalizer in `spec.finalizers`), delete everything in it, and once nothing is
//! left, finalize it (`PUT /api/v1/namespaces/<name>/finalize` without the finalizer), which lets
//! the API server remove it.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, PostParams},
    discovery::{ApiCapabilities, ApiResource, verbs},
    runtime::{Controller, controller::Action, watcher},
};

/// What the reconciler needs.
struct Ctx {
    client: Client,
    resources: Vec<(ApiResource, ApiCapabilities)>,
}

/// A reconcile failure (retried).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(#[from] kube::Error);

/// How long to wait for objects with finalizers (or graceful pods) to go.
const RECHECK: Duration = Duration::from_secs(1);

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let name = ns.name_any();
    let terminating = ns.metadata.deletion_timestamp.is_some();
    let ours = ns
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.as_ref())
        .is_some_and(|f| f.iter().any(|x| x == "kubernetes"));
    if !terminating || !ours {
        return Ok(Action::await_change());
    }
    let mut remaining = 0usize;
    for (ar, caps) in ctx.resources.iter().filter(|(_, c)| crate::namespaced(c)) {
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &name, ar);
        let left = api.list_metadata(&ListParams::default()).await?;
        if left.items.is_empty() {
            continue;
        }
        remaining += left.items.len();
        if caps.supports_operation(verbs::DELETE_COLLECTION) {
            api.delete_collection(&DeleteParams::background(), &ListParams::default())
                .await?;
        } else {
            for o in &left.items {
                match api.delete(&o.name_any(), &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    if remaining > 0 {
        tracing::debug!(namespace = %name, remaining, "waiting for the namespace to empty");
        return Ok(Action::requeue(RECHECK));
    }
    let mut done = (*ns).clone();
    if let Some(spec) = done.spec.as_mut() {
        spec.finalizers = Some(
            spec.finalizers
                .take()
                .unwrap_or_default()
                .into_iter()
                .filter(|f| f != "kubernetes")
                .collect(),
        );
    }
    let body = serde_json::to_vec(&done).unwrap_or_default();
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    match api
        .replace_subresource("finalize", &name, &PostParams::default(), body)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(namespace = %name, "namespace emptied and finalized");
    Ok(Action::await_change())
}

fn error_policy(ns: Arc<Namespace>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(namespace = %ns.name_any(), error = %e, "namespace reconcile failed; retrying");
    Action::requeue(crate::backoff(1))
}

/// Runs the controller until the process ends.
pub async fn run(
    client: Client,
    resources: Vec<(ApiResource, ApiCapabilities)>,
) -> anyhow::Result<()> {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        resources,
    });
    Controller::new(Api::<Namespace>::all(client), watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
    Ok(())
}
