//! The ServiceAccount controller (`pkg/controller/serviceaccount`): every active namespace
//! has a `default` ServiceAccount, recreated if deleted.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::{Namespace, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, ResourceExt, api::PostParams};

use crate::{
    Key,
    informer::{Change, Informer},
    queue::Queue,
};

/// The account every namespace gets.
pub const DEFAULT: &str = "default";

async fn reconcile(
    key: Key,
    client: Client,
    namespaces: Arc<Informer<Namespace>>,
    accounts: Arc<Informer<ServiceAccount>>,
) -> anyhow::Result<Option<Duration>> {
    let Some(ns) = namespaces.cache().get("", &key.name) else {
        return Ok(None);
    };
    let active = ns.metadata.deletion_timestamp.is_none()
        && ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating");
    if !active || accounts.cache().get(&key.name, DEFAULT).is_some() {
        return Ok(None);
    }
    let api: Api<ServiceAccount> = Api::namespaced(client, &key.name);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(DEFAULT.into()),
            namespace: Some(key.name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &sa).await {
        Ok(out) => accounts.cache().observe(out),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        // The namespace began terminating meanwhile.
        Err(kube::Error::Api(e)) if e.code == 403 || e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(None)
}

/// Runs the ServiceAccount controller until the process ends.
pub async fn run(
    client: Client,
    namespaces: Arc<Informer<Namespace>>,
    accounts: Arc<Informer<ServiceAccount>>,
) {
    let queue: Arc<Queue<Key>> = Queue::new();
    let mut ns_changes = namespaces.subscribe();
    let mut sa_changes = accounts.subscribe();
    namespaces.synced().await;
    accounts.synced().await;
    let q = queue.clone();
    let feed = async move {
        loop {
            tokio::select! {
                Some(c) = ns_changes.recv() => q.add(Key::new("", &c.object().name_any())),
                Some(c) = sa_changes.recv() => {
                    if let Change::Deleted(sa) = &*c
                        && sa.name_any() == DEFAULT
                    {
                        q.add(Key::new("", &sa.namespace().unwrap_or_default()));
                    }
                }
                else => return,
            }
        }
    };
    let work = queue.run("serviceaccount", 2, move |key| {
        reconcile(key, client.clone(), namespaces.clone(), accounts.clone())
    });
    tokio::join!(feed, work);
}
