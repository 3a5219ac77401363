//! The garbage collector, as upstream's: a graph of every object's owner references, fed by
//! metadata watches on every resource, and three rules applied to objects whose part of the
//! graph changed.
//!
//! 1. **Dangling owners** (background cascade): a dependent whose owners are all gone is deleted;
//!    one with some owners gone and others alive loses the dangling references. "Gone" is
//!    confirmed with a live read of the owner (absent, or present with another uid), so a
//!    graph that has not seen an owner yet never deletes its dependents.
//! 2. **`foregroundDeletion`**: an owner being deleted with this finalizer has its dependents
//!    deleted (foreground too, so whole chains go before their root); once no dependent with
//!    `blockOwnerDeletion` is left, the finalizer is removed and the owner goes.
//! 3. **`orphan`**: an owner being deleted with this finalizer has its reference removed from
//!    every dependent, then the finalizer is removed.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use futures::{StreamExt, stream::select_all};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, Patch, PatchParams},
    discovery::{ApiCapabilities, ApiResource},
    runtime::{WatchStreamExt, metadata_watcher, watcher},
};
use serde_json::json;
use tokio::sync::Notify;

const ORPHAN: &str = "orphan";
const FOREGROUND: &str = "foregroundDeletion";

/// One object in the graph.
#[derive(Clone, Debug)]
struct Node {
    ar: ApiResource,
    namespace: Option<String>,
    name: String,
    owners: Vec<OwnerReference>,
    deleting: bool,
    finalizers: Vec<String>,
}

#[derive(Debug, Default)]
struct Graph {
    nodes: HashMap<String, Node>,
    dependents: HashMap<String, HashSet<String>>,
    dirty: HashSet<String>,
}

impl Graph {
    fn upsert(&mut self, uid: String, node: Node) {
        if let Some(old) = self.nodes.get(&uid) {
            for o in &old.owners {
                if let Some(d) = self.dependents.get_mut(&o.uid) {
                    d.remove(&uid);
                }
            }
        }
        for o in &node.owners {
            self.dependents
                .entry(o.uid.clone())
                .or_default()
                .insert(uid.clone());
            // An owner waiting for its dependents must look again.
            self.dirty.insert(o.uid.clone());
        }
        self.nodes.insert(uid.clone(), node);
        self.dirty.insert(uid);
    }

    fn remove(&mut self, uid: &str) {
        if let Some(old) = self.nodes.remove(uid) {
            for o in &old.owners {
                if let Some(d) = self.dependents.get_mut(&o.uid) {
                    d.remove(uid);
                }
                self.dirty.insert(o.uid.clone());
            }
        }
        // Its dependents may now be dangling.
        if let Some(deps) = self.dependents.get(uid) {
            self.dirty.extend(deps.iter().cloned());
        }
    }
}

struct Gc {
    client: Client,
    /// (apiVersion, kind) → resource and whether it is namespaced, to read owners.
    kinds: HashMap<(String, String), (ApiResource, bool)>,
    graph: Mutex<Graph>,
    wake: Notify,
}

fn node_of(ar: &ApiResource, meta: &kube::core::ObjectMeta) -> Option<(String, Node)> {
    let uid = meta.uid.clone()?;
    Some((
        uid,
        Node {
            ar: ar.clone(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone().unwrap_or_default(),
            owners: meta.owner_references.clone().unwrap_or_default(),
            deleting: meta.deletion_timestamp.is_some(),
            finalizers: meta.finalizers.clone().unwrap_or_default(),
        },
    ))
}

impl Gc {
    fn api(&self, ar: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            None => Api::all_with(self.client.clone(), ar),
        }
    }

    /// Whether `owner` (referenced from an object in `namespace`) still exists, read live.
    async fn owner_exists(
        &self,
        owner: &OwnerReference,
        namespace: Option<&str>,
    ) -> Result<bool, kube::Error> {
        let Some((ar, namespaced)) = self
            .kinds
            .get(&(owner.api_version.clone(), owner.kind.clone()))
        else {
            // A kind this server does not serve cannot exist.
            return Ok(false);
        };
        let ns = if *namespaced { namespace } else { None };
        match self.api(ar, ns).get_metadata_opt(&owner.name).await? {
            Some(o) => Ok(o.metadata.uid.as_deref() == Some(owner.uid.as_str())),
            None => Ok(false),
        }
    }

    async fn patch_meta(&self, n: &Node, patch: serde_json::Value) -> Result<(), kube::Error> {
        match self
            .api(&n.ar, n.namespace.as_deref())
            .patch(&n.name, &PatchParams::default(), &Patch::Strategic(patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn delete(&self, n: &Node, dp: &DeleteParams) -> Result<(), kube::Error> {
        match self
            .api(&n.ar, n.namespace.as_deref())
            .delete(&n.name, dp)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Applies the three rules to one object.
    async fn process(&self, uid: &str) -> Result<(), kube::Error> {
        let (node, dependents) = {
            let g = self.graph.lock().unwrap_or_else(|p| p.into_inner());
            let Some(n) = g.nodes.get(uid).cloned() else {
                return Ok(());
            };
            let deps: Vec<(String, Node)> = g
                .dependents
                .get(uid)
                .into_iter()
                .flatten()
                .filter_map(|d| g.nodes.get(d).map(|n| (d.clone(), n.clone())))
                .collect();
            (n, deps)
        };
        if node.deleting && node.finalizers.iter().any(|f| f == ORPHAN) {
            for (_, d) in &dependents {
                let patch =
                    json!({"metadata": {"ownerReferences": [{"$patch": "delete", "uid": uid}]}});
                self.patch_meta(d, patch).await?;
            }
            let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": [ORPHAN]}});
            self.patch_meta(&node, patch).await?;
            tracing::debug!(owner = %node.name, dependents = dependents.len(), "orphaned dependents");
            return Ok(());
        }
        if node.deleting && node.finalizers.iter().any(|f| f == FOREGROUND) {
            let mut blocking = 0;
            for (_, d) in &dependents {
                let blocks = d
                    .owners
                    .iter()
                    .any(|o| o.uid == uid && o.block_owner_deletion == Some(true));
                if blocks {
                    blocking += 1;
                }
                if !d.deleting {
                    self.delete(d, &DeleteParams::foreground()).await?;
                }
            }
            if blocking == 0 {
                let patch =
                    json!({"metadata": {"$deleteFromPrimitiveList/finalizers": [FOREGROUND]}});
                self.patch_meta(&node, patch).await?;
            }
            return Ok(());
        }
        if node.owners.is_empty() {
            return Ok(());
        }
        let mut dangling = Vec::new();
        let mut waiting = false;
        for o in &node.owners {
            let known = {
                let g = self.graph.lock().unwrap_or_else(|p| p.into_inner());
                g.nodes.get(&o.uid).cloned()
            };
            match known {
                Some(owner) => {
                    if owner.deleting && owner.finalizers.iter().any(|f| f == FOREGROUND) {
                        waiting = true;
                    }
                }
                None => {
                    if !self.owner_exists(o, node.namespace.as_deref()).await? {
                        dangling.push(o.uid.clone());
                    }
                }
            }
        }
        if dangling.is_empty() {
            return Ok(());
        }
        if dangling.len() == node.owners.len() {
            if !node.deleting {
                let dp = if waiting {
                    DeleteParams::foreground()
                } else {
                    DeleteParams::background()
                };
                tracing::debug!(object = %node.name, kind = %node.ar.kind, "deleting: its owners are gone");
                self.delete(&node, &dp).await?;
            }
        } else {
            let refs: Vec<_> = dangling
                .iter()
                .map(|u| json!({"$patch": "delete", "uid": u}))
                .collect();
            self.patch_meta(&node, json!({"metadata": {"ownerReferences": refs}}))
                .await?;
        }
        Ok(())
    }
}

/// Runs the garbage collector until the process ends.
pub async fn run(
    client: Client,
    resources: Vec<(ApiResource, ApiCapabilities)>,
) -> anyhow::Result<()> {
    let kinds = resources
        .iter()
        .map(|(ar, caps)| {
            (
                (ar.api_version.clone(), ar.kind.clone()),
                (ar.clone(), crate::namespaced(caps)),
            )
        })
        .collect();
    let gc = Arc::new(Gc {
        client: client.clone(),
        kinds,
        graph: Mutex::new(Graph::default()),
        wake: Notify::new(),
    });
    let streams = resources.iter().map(|(ar, _)| {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), ar);
        let ar = ar.clone();
        metadata_watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |e| (ar.clone(), e))
            .boxed()
    });
    let feeder = {
        let gc = gc.clone();
        let mut all = select_all(streams);
        tokio::spawn(async move {
            while let Some((ar, ev)) = all.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        tracing::debug!(kind = %ar.kind, error = %e, "watch error; the watcher retries");
                        continue;
                    }
                };
                let mut g = gc.graph.lock().unwrap_or_else(|p| p.into_inner());
                match ev {
                    watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                        if let Some((uid, n)) = node_of(&ar, &o.metadata) {
                            g.upsert(uid, n);
                        }
                    }
                    watcher::Event::Delete(o) => {
                        if let Some(uid) = o.metadata.uid {
                            g.remove(&uid);
                        }
                    }
                    watcher::Event::Init | watcher::Event::InitDone => {}
                }
                drop(g);
                gc.wake.notify_one();
            }
        })
    };
    let mut failures: HashMap<String, u32> = HashMap::new();
    loop {
        let batch: Vec<String> = {
            let mut g = gc.graph.lock().unwrap_or_else(|p| p.into_inner());
            g.dirty.drain().collect()
        };
        if batch.is_empty() {
            if feeder.is_finished() {
                anyhow::bail!("every watch ended");
            }
            gc.wake.notified().await;
            continue;
        }
        for uid in batch {
            match gc.process(&uid).await {
                Ok(()) => {
                    failures.remove(&uid);
                }
                Err(e) => {
                    let n = failures.entry(uid.clone()).or_default();
                    *n += 1;
                    tracing::warn!(uid = %uid, error = %e, "garbage collection failed; retrying");
                    let (gc, delay) = (gc.clone(), crate::backoff(*n));
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        gc.graph
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .dirty
                            .insert(uid);
                        gc.wake.notify_one();
                    });
                }
            }
        }
    }
}
