//! Shared informers, as client-go's `SharedInformerFactory` provides them: one list+watch per
//! resource kind for the whole controller manager, a cache of the objects indexed by
//! namespace, and a fan-out of changes (with the previous object) to every controller that
//! registered a handler.
//!
//! Why not kube-runtime's `Controller` per controller: each would open its own watch and keep
//! its own copy of every pod, and kube-runtime 0.99's shared streams do not pass deletions on,
//! which the ReplicaSet controller needs (a deleted pod must be replaced).
//!
//! The cache is also written through by the controllers themselves ([`Cache::observe`]): an
//! object a controller has just created, updated or deleted is in the cache before the watch
//! delivers it, so the next reconcile does not act on a stale view (client-go's controllers
//! reach the same end with "expectations"). A watch event older than what the cache holds
//! (by resourceVersion, which skiff's store makes a global revision) is not applied over it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Debug,
    sync::{Arc, Mutex, RwLock},
};

use futures::{StreamExt, TryStreamExt};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

/// A change seen by an informer.
#[derive(Debug)]
pub enum Change<K> {
    /// Created or updated; `old` is what the cache held before, if anything.
    Applied {
        /// The previous state, if the object was known.
        old: Option<Arc<K>>,
        /// The new state.
        new: Arc<K>,
    },
    /// Deleted (the last known state).
    Deleted(Arc<K>),
}

impl<K> Change<K> {
    /// The object as it is now (or was last, for a deletion).
    pub fn object(&self) -> &Arc<K> {
        match self {
            Change::Applied { new, .. } => new,
            Change::Deleted(o) => o,
        }
    }
}

type Handler<K> = mpsc::UnboundedSender<Arc<Change<K>>>;

/// Objects of one kind by namespace (`""` for cluster-scoped) and name.
#[derive(Debug)]
pub struct Cache<K> {
    objects: RwLock<BTreeMap<String, HashMap<String, Arc<K>>>>,
    /// Uids a controller deleted whose deletion the watch has not shown yet.
    deleted: Mutex<HashSet<String>>,
}

impl<K> Default for Cache<K> {
    fn default() -> Self {
        Cache {
            objects: RwLock::new(BTreeMap::new()),
            deleted: Mutex::new(HashSet::new()),
        }
    }
}

fn rv<K: Resource>(o: &K) -> Option<u64> {
    o.meta().resource_version.as_deref()?.parse().ok()
}

impl<K: Resource + Clone> Cache<K> {
    /// The object `name` in `namespace` (`""` for cluster-scoped kinds).
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        self.read().get(namespace)?.get(name).cloned()
    }

    /// Every object in `namespace`.
    pub fn list_namespace(&self, namespace: &str) -> Vec<Arc<K>> {
        self.read()
            .get(namespace)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every object.
    pub fn list(&self) -> Vec<Arc<K>> {
        self.read()
            .values()
            .flat_map(|m| m.values().cloned())
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, HashMap<String, Arc<K>>>> {
        self.objects.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, HashMap<String, Arc<K>>>> {
        self.objects.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what a controller's own write returned: the object is cached unless the cache
    /// already holds a newer state of it.
    pub fn observe(&self, obj: K) {
        let ns = obj.namespace().unwrap_or_default();
        let name = obj.name_any();
        let mut objects = self.write();
        let slot = objects.entry(ns).or_default();
        if slot
            .get(&name)
            .is_some_and(|cur| rv(&**cur) >= rv(&obj) && rv(&obj).is_some())
        {
            return;
        }
        slot.insert(name, Arc::new(obj));
    }

    /// Records that a controller deleted `obj` (and the API removed it at once).
    pub fn observe_deleted(&self, obj: &K) {
        let ns = obj.namespace().unwrap_or_default();
        let mut objects = self.write();
        if let Some(m) = objects.get_mut(&ns)
            && m.get(&obj.name_any()).is_some_and(|c| c.uid() == obj.uid())
        {
            m.remove(&obj.name_any());
        }
        if let Some(uid) = obj.uid() {
            self.deleted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(uid);
        }
    }

    /// Applies a watch event; returns the change to pass on, if any.
    fn apply(&self, obj: K) -> Option<Change<K>> {
        let uid = obj.uid();
        if uid.as_ref().is_some_and(|u| {
            self.deleted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(u)
        }) {
            return None;
        }
        let ns = obj.namespace().unwrap_or_default();
        let name = obj.name_any();
        let new = Arc::new(obj);
        let mut objects = self.write();
        let slot = objects.entry(ns).or_default();
        let old = slot.get(&name).cloned();
        // A newer state written through by a controller stays; the handlers still hear of
        // the change (the watch's state is what others see).
        match &old {
            Some(cur) if cur.uid() == new.uid() && rv(&**cur) > rv(&*new) => {}
            _ => {
                slot.insert(name, new.clone());
            }
        }
        Some(Change::Applied { old, new })
    }

    fn remove(&self, obj: K) -> Change<K> {
        if let Some(uid) = obj.uid() {
            self.deleted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&uid);
        }
        let ns = obj.namespace().unwrap_or_default();
        let mut objects = self.write();
        if let Some(m) = objects.get_mut(&ns) {
            if m.get(&obj.name_any()).is_some_and(|c| c.uid() == obj.uid()) {
                m.remove(&obj.name_any());
            }
            if m.is_empty() {
                objects.remove(&ns);
            }
        }
        Change::Deleted(Arc::new(obj))
    }

    /// Replaces the whole content after a (re)list; returns the changes against the old one.
    fn replace(&self, objs: Vec<K>) -> Vec<Change<K>> {
        self.deleted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let mut fresh: BTreeMap<String, HashMap<String, Arc<K>>> = BTreeMap::new();
        for o in objs {
            fresh
                .entry(o.namespace().unwrap_or_default())
                .or_default()
                .insert(o.name_any(), Arc::new(o));
        }
        let old = std::mem::replace(&mut *self.write(), fresh.clone());
        let mut changes = Vec::new();
        for (ns, m) in &fresh {
            for (name, new) in m {
                let prev = old.get(ns).and_then(|o| o.get(name)).cloned();
                if prev
                    .as_ref()
                    .is_some_and(|p| p.resource_version() == new.resource_version())
                {
                    continue;
                }
                changes.push(Change::Applied {
                    old: prev,
                    new: new.clone(),
                });
            }
        }
        for (ns, m) in old {
            for (name, o) in m {
                if fresh.get(&ns).is_none_or(|f| !f.contains_key(&name)) {
                    changes.push(Change::Deleted(o));
                }
            }
        }
        changes
    }
}

/// One kind's list+watch, cache and change fan-out.
#[derive(Debug)]
pub struct Informer<K> {
    cache: Arc<Cache<K>>,
    handlers: Mutex<Vec<Handler<K>>>,
    synced: watch::Receiver<bool>,
    synced_tx: watch::Sender<bool>,
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// An informer that has not started (see [`Informer::run`]).
    pub fn new() -> Arc<Informer<K>> {
        let (synced_tx, synced) = watch::channel(false);
        Arc::new(Informer {
            cache: Arc::new(Cache::default()),
            handlers: Mutex::new(Vec::new()),
            synced,
            synced_tx,
        })
    }

    /// The cache (complete once [`Informer::synced`] returns).
    pub fn cache(&self) -> &Arc<Cache<K>> {
        &self.cache
    }

    /// A stream of every change from now on, starting with every object already cached (as
    /// created), so a late subscriber misses nothing. Changes are never older than what was
    /// sent before them: the cache is read under the same lock the informer sends under.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Arc<Change<K>>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut handlers = self.handlers.lock().unwrap_or_else(|p| p.into_inner());
        for o in self.cache.list() {
            let _ = tx.send(Arc::new(Change::Applied { old: None, new: o }));
        }
        handlers.push(tx);
        rx
    }

    /// Waits until the first list is in the cache.
    pub async fn synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    fn emit(&self, change: Change<K>) {
        let change = Arc::new(change);
        self.handlers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|h| h.send(change.clone()).is_ok());
    }

    /// Lists and watches every object of the kind, in every namespace, until the process
    /// ends; watch errors are retried with backoff (re-listing when the watch expired).
    pub async fn run(self: Arc<Self>, client: Client) {
        let api: Api<K> = Api::all(client);
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listing: Vec<K> = Vec::new();
        loop {
            match stream.try_next().await {
                Ok(Some(ev)) => match ev {
                    watcher::Event::Init => listing.clear(),
                    watcher::Event::InitApply(o) => listing.push(o),
                    watcher::Event::InitDone => {
                        for c in self.cache.replace(std::mem::take(&mut listing)) {
                            self.emit(c);
                        }
                        let _ = self.synced_tx.send(true);
                    }
                    watcher::Event::Apply(o) => {
                        if let Some(c) = self.cache.apply(o) {
                            self.emit(c);
                        }
                    }
                    watcher::Event::Delete(o) => {
                        let c = self.cache.remove(o);
                        self.emit(c);
                    }
                },
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(kind = %K::kind(&()), error = %e, "watch failed; retrying")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;

    fn cm(name: &str, uid: &str, rv: u64) -> ConfigMap {
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": "ns", "uid": uid,
            "resourceVersion": rv.to_string()}}),
        )
        .unwrap()
    }

    #[test]
    fn own_writes_are_not_undone_by_an_older_watch_event() {
        let c: Cache<ConfigMap> = Cache::default();
        c.replace(vec![cm("a", "u1", 1)]);
        c.observe(cm("a", "u1", 5));
        assert!(matches!(
            c.apply(cm("a", "u1", 3)),
            Some(Change::Applied { .. })
        ));
        assert_eq!(c.get("ns", "a").unwrap().resource_version().unwrap(), "5");
        c.apply(cm("a", "u1", 6));
        assert_eq!(c.get("ns", "a").unwrap().resource_version().unwrap(), "6");
        // An older write-through does not replace a newer watch state.
        c.observe(cm("a", "u1", 4));
        assert_eq!(c.get("ns", "a").unwrap().resource_version().unwrap(), "6");
    }

    #[test]
    fn a_deletion_stays_until_the_watch_confirms_it() {
        let c: Cache<ConfigMap> = Cache::default();
        c.replace(vec![cm("a", "u1", 1), cm("b", "u2", 2)]);
        c.observe_deleted(&cm("a", "u1", 1));
        assert!(c.get("ns", "a").is_none());
        assert!(c.apply(cm("a", "u1", 1)).is_none(), "a stale event");
        assert!(c.get("ns", "a").is_none());
        assert!(matches!(c.remove(cm("a", "u1", 7)), Change::Deleted(_)));
        // A new object of the same name is another uid.
        c.apply(cm("a", "u3", 8));
        assert!(c.get("ns", "a").is_some());
    }

    #[test]
    fn a_relist_reports_what_changed() {
        let c: Cache<ConfigMap> = Cache::default();
        c.replace(vec![cm("a", "u1", 1), cm("b", "u2", 2)]);
        let changes = c.replace(vec![cm("a", "u1", 1), cm("c", "u3", 9)]);
        let names: Vec<String> = changes
            .iter()
            .map(|ch| match ch {
                Change::Applied { new, .. } => format!("+{}", new.name_any()),
                Change::Deleted(o) => format!("-{}", o.name_any()),
            })
            .collect();
        assert_eq!(names, ["+c", "-b"]);
        assert_eq!(c.list_namespace("ns").len(), 2);
    }
}
