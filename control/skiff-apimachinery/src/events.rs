//! core/v1 Events as upstream components record them: the kubelet's (`Pulled`, `Started`,
//! `Killing`, … about a pod and, where it applies, one container, `spec.containers{name}`), the
//! scheduler's (`Scheduled`, `FailedScheduling`) and the controllers' (`ScalingReplicaSet`,
//! `SuccessfulCreate`, …). A repeat of the same event (same object, reason and message) within
//! ten minutes bumps `count` and `lastTimestamp` on the existing Event instead of creating
//! another, as upstream's correlator does. Recording never blocks or fails the caller: events
//! go through a queue (1000 deep; beyond that they are dropped, as upstream's broadcaster
//! does) to one writer per recorder, so they reach the API in the order they were recorded.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    chrono::Utc,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

/// How long a repeated event is folded into the first one.
const FOLD_WINDOW: Duration = Duration::from_secs(600);

/// `Normal` or `Warning`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Something expected happened.
    Normal,
    /// Something the user should look at.
    Warning,
}

/// (object uid, field path, reason, message).
type Key = (String, String, String, String);

/// A recorded event (in its object's namespace): its name, count, and when it was first
/// recorded.
#[derive(Debug)]
struct Recorded {
    name: String,
    count: i32,
    first: Instant,
}

/// How many events may wait for the writer.
const QUEUE: usize = 1000;
/// How long one event's write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// An event waiting to be written.
struct Pending {
    involved: ObjectReference,
    kind: Kind,
    reason: String,
    message: String,
}

/// What the writer needs.
struct Writer {
    client: Client,
    component: String,
    host: Option<String>,
    seen: Mutex<HashMap<Key, Recorded>>,
}

/// Records events as one component (`kubelet` on a host, `default-scheduler`,
/// `deployment-controller`, …).
#[derive(Clone)]
pub struct Recorder {
    writer: Arc<Writer>,
    /// The writer task's queue, started with the first event (on the caller's runtime, again
    /// if that task is gone); it ends when every clone of the recorder is gone.
    queue: Arc<Mutex<Option<tokio::sync::mpsc::Sender<Pending>>>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("component", &self.writer.component)
            .field("host", &self.writer.host)
            .finish()
    }
}

impl Recorder {
    /// A recorder reporting as the kubelet of `node`.
    pub fn kubelet(client: Client, node: String) -> Recorder {
        Recorder::new(client, "kubelet", Some(node))
    }

    /// A recorder reporting as `component` (on `host`, for per-node components).
    pub fn new(client: Client, component: &str, host: Option<String>) -> Recorder {
        Recorder {
            writer: Arc::new(Writer {
                client,
                component: component.to_string(),
                host,
                seen: Mutex::new(HashMap::new()),
            }),
            queue: Arc::new(Mutex::new(None)),
        }
    }

    /// Records an event about `pod` (and its `container`, if given), in the background.
    pub fn pod(&self, pod: &Pod, container: Option<&str>, kind: Kind, reason: &str, message: &str) {
        let mut involved = reference(pod);
        involved.field_path = container.map(|c| format!("spec.containers{{{c}}}"));
        self.record(involved, kind, reason, message);
    }

    /// Records an event about `obj`, in the background.
    pub fn object<K>(&self, obj: &K, kind: Kind, reason: &str, message: &str)
    where
        K: Resource<DynamicType = ()>,
    {
        self.record(reference(obj), kind, reason, message);
    }

    /// Records an event about the object `involved` refers to, in the background.
    pub fn record(&self, involved: ObjectReference, kind: Kind, reason: &str, message: &str) {
        let mut pending = Pending {
            involved,
            kind,
            reason: reason.to_string(),
            message: message.to_string(),
        };
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        // At most two tries: the writer may be gone (its runtime ended), then a new one starts.
        for _ in 0..2 {
            let tx = queue.get_or_insert_with(|| self.spawn_writer());
            match tx.try_send(pending) {
                Ok(()) => return,
                Err(tokio::sync::mpsc::error::TrySendError::Full(p)) => {
                    tracing::debug!(reason = p.reason, "event queue full: event dropped");
                    return;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(p)) => {
                    tracing::warn!("the event writer ended; starting another");
                    *queue = None;
                    pending = p;
                }
            }
        }
    }

    fn spawn_writer(&self) -> tokio::sync::mpsc::Sender<Pending> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Pending>(QUEUE);
        let writer = self.writer.clone();
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let reason = p.reason.clone();
                // One stuck request must not hold back every later event.
                if tokio::time::timeout(WRITE_TIMEOUT, writer.write(p))
                    .await
                    .is_err()
                {
                    tracing::debug!(reason, "recording an event timed out");
                }
            }
        });
        tx
    }
}

impl Writer {
    async fn write(&self, p: Pending) {
        let Pending {
            involved,
            kind,
            reason,
            message,
        } = p;
        let ns = involved
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let key = (
            involved.uid.clone().unwrap_or_default(),
            involved.field_path.clone().unwrap_or_default(),
            reason.clone(),
            message.clone(),
        );
        let now = Time(Utc::now());
        let repeat = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.retain(|_, v| v.first.elapsed() < FOLD_WINDOW);
            seen.get_mut(&key).map(|v| {
                v.count += 1;
                (v.name.clone(), v.count)
            })
        };
        if let Some((name, count)) = repeat {
            let patch = json!({"count": count, "lastTimestamp": now});
            if api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_ok()
            {
                return;
            }
        }
        let name = format!(
            "{}.{:x}",
            involved.name.clone().unwrap_or_default(),
            Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: involved,
            reason: Some(reason),
            message: Some(message),
            type_: Some(match kind {
                Kind::Normal => "Normal".into(),
                Kind::Warning => "Warning".into(),
            }),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: self.host.clone(),
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.host.clone().unwrap_or_else(|| self.component.clone())),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ev).await {
            Ok(_) => {
                self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    key,
                    Recorded {
                        name,
                        count: 1,
                        first: Instant::now(),
                    },
                );
            }
            Err(e) => tracing::debug!(error = %e, "recording an event failed"),
        }
    }
}

/// A reference to `obj` (kind, name, namespace, uid, resourceVersion).
pub fn reference<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: Some(obj.name_any()),
        namespace: obj.namespace(),
        uid: obj.uid(),
        resource_version: obj.resource_version(),
        field_path: None,
    }
}
