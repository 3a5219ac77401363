//! Server-side printing: `meta.k8s.io/v1` `Table` responses with upstream's columns per kind
//! (`pkg/printers/internalversion`), so `kubectl get` (and `-o wide`, and `-w`) look as they do
//! against upstream.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::resources::ResourceDef;

/// How much of each object a row carries (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    /// No object.
    None,
    /// `PartialObjectMetadata` (the default).
    Metadata,
    /// The whole object.
    Object,
}

impl IncludeObject {
    /// Parses the query parameter (unknown values mean the default).
    pub fn parse(s: Option<&str>) -> IncludeObject {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

struct Col {
    name: &'static str,
    ty: &'static str,
    format: &'static str,
    priority: u8,
    description: &'static str,
}

const fn col(name: &'static str, ty: &'static str, priority: u8, description: &'static str) -> Col {
    Col {
        name,
        ty,
        format: "",
        priority,
        description,
    }
}

const NAME: Col = Col {
    name: "Name",
    ty: "string",
    format: "name",
    priority: 0,
    description: "Name must be unique within a namespace. It is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition.",
};
const AGE: Col = col(
    "Age",
    "string",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);
const CONTAINERS: Col = col(
    "Containers",
    "string",
    1,
    "Names of each container in the template.",
);
const IMAGES: Col = col(
    "Images",
    "string",
    1,
    "Images referenced by each container in the template.",
);
const SELECTOR: Col = col(
    "Selector",
    "string",
    1,
    "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment.",
);

fn columns(def: &ResourceDef) -> Vec<Col> {
    match (def.group, def.kind) {
        ("", "Pod") => vec![
            NAME,
            col(
                "Ready",
                "string",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                0,
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            AGE,
            col(
                "IP",
                "string",
                1,
                "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
            ),
            col(
                "Node",
                "string",
                1,
                "NodeName is a request to schedule this pod onto a specific node.",
            ),
            col(
                "Nominated Node",
                "string",
                1,
                "nominatedNodeName is set only when this pod preempts other pods on the node.",
            ),
            col(
                "Readiness Gates",
                "string",
                1,
                "If specified, all readiness gates will be evaluated for pod readiness.",
            ),
        ],
        ("apps", "Deployment") => vec![
            NAME,
            col("Ready", "string", 0, "Number of the pod with ready state"),
            col(
                "Up-to-date",
                "integer",
                0,
                "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
            ),
            col(
                "Available",
                "integer",
                0,
                "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        ("apps", "ReplicaSet") => vec![
            NAME,
            col(
                "Desired",
                "integer",
                0,
                "Replicas is the number of desired replicas.",
            ),
            col(
                "Current",
                "integer",
                0,
                "Replicas is the most recently observed number of replicas.",
            ),
            col(
                "Ready",
                "integer",
                0,
                "The number of ready replicas for this replica set.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        ("apps", "StatefulSet") => vec![
            NAME,
            col("Ready", "string", 0, "Number of the pod with ready state"),
            AGE,
            CONTAINERS,
            IMAGES,
        ],
        ("apps", "DaemonSet") => vec![
            NAME,
            col(
                "Desired",
                "integer",
                0,
                "The total number of nodes that should be running the daemon pod.",
            ),
            col(
                "Current",
                "integer",
                0,
                "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod.",
            ),
            col(
                "Ready",
                "integer",
                0,
                "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and ready.",
            ),
            col(
                "Up-to-date",
                "integer",
                0,
                "The total number of nodes that are running updated daemon pod",
            ),
            col(
                "Available",
                "integer",
                0,
                "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available.",
            ),
            col(
                "Node Selector",
                "string",
                0,
                "NodeSelector is a selector which must be true for the pod to fit on a node.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        ("", "Service") => vec![
            NAME,
            col(
                "Type",
                "string",
                0,
                "type determines how the Service is exposed.",
            ),
            col(
                "Cluster-IP",
                "string",
                0,
                "clusterIP is the IP address of the service and is usually assigned randomly by the master.",
            ),
            col(
                "External-IP",
                "string",
                0,
                "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.",
            ),
            col(
                "Port(s)",
                "string",
                0,
                "The list of ports that are exposed by this service.",
            ),
            AGE,
            col(
                "Selector",
                "string",
                1,
                "Route service traffic to pods with label keys and values matching this selector.",
            ),
        ],
        ("discovery.k8s.io", "EndpointSlice") => vec![
            NAME,
            col(
                "AddressType",
                "string",
                0,
                "addressType specifies the type of address carried by this EndpointSlice.",
            ),
            col(
                "Ports",
                "string",
                0,
                "ports specifies the list of network ports exposed by each endpoint in this slice.",
            ),
            col(
                "Endpoints",
                "string",
                0,
                "endpoints is a list of unique endpoints in this slice.",
            ),
            AGE,
        ],
        ("", "Endpoints") => vec![
            NAME,
            col(
                "Endpoints",
                "string",
                0,
                "Endpoints is the list of endpoints.",
            ),
            AGE,
        ],
        ("", "PersistentVolumeClaim") => vec![
            NAME,
            col("Status", "string", 0, "The phase of the claim."),
            col("Volume", "string", 0, "The volume bound to the claim."),
            col("Capacity", "string", 0, "The capacity of the bound volume."),
            col(
                "Access Modes",
                "string",
                0,
                "The access modes of the claim.",
            ),
            col(
                "StorageClass",
                "string",
                0,
                "The storage class of the claim.",
            ),
            col(
                "VolumeAttributesClass",
                "string",
                0,
                "The volume attributes class of the claim.",
            ),
            AGE,
        ],
        ("", "PersistentVolume") => vec![
            NAME,
            col("Capacity", "string", 0, "The capacity of the volume."),
            col(
                "Access Modes",
                "string",
                0,
                "The access modes of the volume.",
            ),
            col(
                "Reclaim Policy",
                "string",
                0,
                "What happens to the volume when released.",
            ),
            col("Status", "string", 0, "The phase of the volume."),
            col("Claim", "string", 0, "The claim bound to the volume."),
            col(
                "StorageClass",
                "string",
                0,
                "The storage class of the volume.",
            ),
            col(
                "VolumeAttributesClass",
                "string",
                0,
                "The volume attributes class of the volume.",
            ),
            col("Reason", "string", 0, "Why the volume is in its phase."),
            AGE,
        ],
        ("", "Node") => vec![
            NAME,
            col("Status", "string", 0, "The status of the node"),
            col("Roles", "string", 0, "The roles of the node"),
            AGE,
            col(
                "Version",
                "string",
                0,
                "Kubelet Version reported by the node.",
            ),
            col(
                "Internal-IP",
                "string",
                1,
                "List of addresses reachable to the node. Queried from cloud provider, if available.",
            ),
            col(
                "External-IP",
                "string",
                1,
                "List of addresses reachable to the node. Queried from cloud provider, if available.",
            ),
            col(
                "OS-Image",
                "string",
                1,
                "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
            ),
            col(
                "Kernel-Version",
                "string",
                1,
                "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
            ),
            col(
                "Container-Runtime",
                "string",
                1,
                "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
            ),
        ],
        ("", "Namespace") => vec![
            NAME,
            col("Status", "string", 0, "The status of the namespace"),
            AGE,
        ],
        ("batch", "Job") => vec![
            NAME,
            col("Status", "string", 0, "Status of the job."),
            col(
                "Completions",
                "string",
                0,
                "The desired number of successfully finished pods the job should be run with.",
            ),
            col(
                "Duration",
                "string",
                0,
                "Time required to complete the job.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        ("batch", "CronJob") => vec![
            NAME,
            col(
                "Schedule",
                "string",
                0,
                "The schedule in Cron format, see https://en.wikipedia.org/wiki/Cron.",
            ),
            col(
                "Timezone",
                "string",
                0,
                "The time zone name for the given schedule, see https://en.wikipedia.org/wiki/List_of_tz_database_time_zones.",
            ),
            col(
                "Suspend",
                "boolean",
                0,
                "This flag tells the controller to suspend subsequent executions.",
            ),
            col(
                "Active",
                "integer",
                0,
                "A list of pointers to currently running jobs.",
            ),
            col(
                "Last Schedule",
                "string",
                0,
                "Information when was the last time the job was successfully scheduled.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        ("", "Event") => vec![
            col(
                "Last Seen",
                "string",
                0,
                "Time when last occurrence of this event was recorded.",
            ),
            col(
                "Type",
                "string",
                0,
                "Type of this event (Normal, Warning), new types could be added in the future.",
            ),
            col(
                "Reason",
                "string",
                0,
                "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
            ),
            col(
                "Object",
                "string",
                0,
                "The object that this event is about.",
            ),
            col(
                "Subobject",
                "string",
                1,
                "The subobject that this event is about.",
            ),
            col("Source", "string", 1, "The component reporting this event."),
            col(
                "Message",
                "string",
                0,
                "A human-readable description of the status of this operation.",
            ),
            col(
                "First Seen",
                "string",
                1,
                "The time at which the event was first recorded.",
            ),
            col(
                "Count",
                "string",
                1,
                "The number of times this event has occurred.",
            ),
            NAME,
        ],
        ("", "ConfigMap") => vec![
            NAME,
            col("Data", "string", 0, "Data contains the configuration data."),
            AGE,
        ],
        ("", "Secret") => vec![
            NAME,
            col(
                "Type",
                "string",
                0,
                "Used to facilitate programmatic handling of secret data.",
            ),
            col("Data", "string", 0, "Data contains the secret data."),
            AGE,
        ],
        ("", "ServiceAccount") => vec![
            NAME,
            col(
                "Secrets",
                "string",
                0,
                "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.",
            ),
            AGE,
        ],
        ("networking.k8s.io", "NetworkPolicy") => vec![
            NAME,
            col(
                "Pod-Selector",
                "string",
                0,
                "Selects the pods to which this NetworkPolicy object applies.",
            ),
            AGE,
        ],
        ("networking.k8s.io", "Ingress") => vec![
            NAME,
            col(
                "Class",
                "string",
                0,
                "The name of the IngressClass resource.",
            ),
            col(
                "Hosts",
                "string",
                0,
                "Hosts that incoming requests are matched against before the ingress rule",
            ),
            col(
                "Address",
                "string",
                0,
                "Address is a list containing ingress points for the load-balancer",
            ),
            col(
                "Ports",
                "string",
                0,
                "Ports of TLS configurations that open",
            ),
            AGE,
        ],
        ("scheduling.k8s.io", "PriorityClass") => vec![
            NAME,
            col(
                "Value",
                "integer",
                0,
                "value represents the integer value of this priority class.",
            ),
            col(
                "Global-Default",
                "boolean",
                0,
                "globalDefault specifies whether this PriorityClass should be considered as the default priority.",
            ),
            AGE,
            col(
                "PreemptionPolicy",
                "string",
                0,
                "preemptionPolicy is the Policy for preempting pods with lower priority.",
            ),
        ],
        ("coordination.k8s.io", "Lease") => vec![
            NAME,
            col(
                "Holder",
                "string",
                0,
                "HolderIdentity contains the identity of the holder of a current lease.",
            ),
            AGE,
        ],
        ("apps", "ControllerRevision") => vec![
            NAME,
            col("Controller", "string", 0, "Controller of the object"),
            col(
                "Revision",
                "integer",
                0,
                "Revision indicates the revision of the state represented by Data.",
            ),
            AGE,
        ],
        _ => vec![NAME, AGE],
    }
}

/// Upstream's `duration.HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn since(ts: Option<&str>, now: DateTime<Utc>) -> String {
    match ts.and_then(|t| DateTime::parse_from_rfc3339(t).ok()) {
        Some(t) => human_duration((now - t.with_timezone(&Utc)).num_seconds()),
        None => "<unknown>".into(),
    }
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn i(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

/// kubectl's short forms of access modes.
fn access_mode(m: &str) -> &str {
    match m {
        "ReadWriteOnce" => "RWO",
        "ReadOnlyMany" => "ROX",
        "ReadWriteMany" => "RWX",
        "ReadWriteOncePod" => "RWOP",
        other => other,
    }
}

fn or_unset(s: &str) -> Value {
    json!(if s.is_empty() { "<unset>" } else { s })
}

fn or_none(s: &str) -> Value {
    json!(if s.is_empty() { "<none>" } else { s })
}

fn arr<'a>(v: &'a Value, ptr: &str) -> &'a [Value] {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn join_field(items: &[Value], field: &str) -> String {
    items
        .iter()
        .filter_map(|c| c.get(field).and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(",")
}

/// `matchLabels` and `matchExpressions` printed as a selector string.
pub(crate) fn selector_string(sel: Option<&Value>) -> String {
    let Some(sel) = sel else {
        return "<none>".into();
    };
    let mut parts: Vec<String> = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = s(e, "/key");
        let values: Vec<&str> = arr(e, "/values").iter().filter_map(Value::as_str).collect();
        parts.push(match s(e, "/operator") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            _ => continue,
        });
    }
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

fn map_selector(m: Option<&Value>) -> String {
    let parts: Vec<String> = m
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

fn pod_status(pod: &Value) -> String {
    let mut reason = s(pod, "/status/phase").to_string();
    if !s(pod, "/status/reason").is_empty() {
        reason = s(pod, "/status/reason").to_string();
    }
    let mut initializing = false;
    let init_total = arr(pod, "/spec/initContainers").len();
    for (n, c) in arr(pod, "/status/initContainerStatuses").iter().enumerate() {
        let term = c.pointer("/state/terminated");
        if term.is_some_and(|t| i(t, "/exitCode") == 0) {
            continue;
        }
        initializing = true;
        if let Some(t) = term {
            reason = if s(t, "/reason").is_empty() {
                format!("Init:ExitCode:{}", i(t, "/exitCode"))
            } else {
                format!("Init:{}", s(t, "/reason"))
            };
        } else if !s(c, "/state/waiting/reason").is_empty()
            && s(c, "/state/waiting/reason") != "PodInitializing"
        {
            reason = format!("Init:{}", s(c, "/state/waiting/reason"));
        } else {
            reason = format!("Init:{n}/{init_total}");
        }
        break;
    }
    if !initializing {
        let mut has_running = false;
        for c in arr(pod, "/status/containerStatuses").iter().rev() {
            if !s(c, "/state/waiting/reason").is_empty() {
                reason = s(c, "/state/waiting/reason").to_string();
            } else if let Some(t) = c.pointer("/state/terminated") {
                reason = if !s(t, "/reason").is_empty() {
                    s(t, "/reason").to_string()
                } else if i(t, "/signal") != 0 {
                    format!("Signal:{}", i(t, "/signal"))
                } else {
                    format!("ExitCode:{}", i(t, "/exitCode"))
                };
            } else if c.pointer("/state/running").is_some() && c.get("ready") == Some(&json!(true))
            {
                has_running = true;
            }
        }
        if reason == "Completed" && has_running {
            reason = "Running".into();
        }
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        reason = if s(pod, "/status/reason") == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    reason
}

fn cells(def: &ResourceDef, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let age = json!(since(
        o.pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str),
        now
    ));
    let tpl_containers = |p: &str| arr(o, p).to_vec();
    match (def.group, def.kind) {
        ("", "Pod") => {
            let total = arr(o, "/spec/containers").len();
            let statuses = arr(o, "/status/containerStatuses");
            let ready = statuses
                .iter()
                .filter(|c| c.get("ready") == Some(&json!(true)))
                .count();
            let restarts: i64 = statuses.iter().map(|c| i(c, "/restartCount")).sum();
            let last_restart = statuses
                .iter()
                .filter_map(|c| {
                    c.pointer("/lastState/terminated/finishedAt")
                        .and_then(Value::as_str)
                })
                .max();
            let restarts = match last_restart {
                Some(t) if restarts > 0 => format!("{restarts} ({} ago)", since(Some(t), now)),
                _ => restarts.to_string(),
            };
            let gates = arr(o, "/spec/readinessGates");
            let gates = if gates.is_empty() {
                "<none>".to_string()
            } else {
                let ok = arr(o, "/status/conditions")
                    .iter()
                    .filter(|c| {
                        gates
                            .iter()
                            .any(|g| g.get("conditionType") == c.get("type"))
                            && s(c, "/status") == "True"
                    })
                    .count();
                format!("{ok}/{}", gates.len())
            };
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(o)),
                json!(restarts),
                age,
                or_none(s(o, "/status/podIP")),
                or_none(s(o, "/spec/nodeName")),
                or_none(s(o, "/status/nominatedNodeName")),
                json!(gates),
            ]
        }
        ("apps", "Deployment") => {
            let cs = tpl_containers("/spec/template/spec/containers");
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    i(o, "/status/readyReplicas"),
                    i(o, "/spec/replicas")
                )),
                json!(i(o, "/status/updatedReplicas")),
                json!(i(o, "/status/availableReplicas")),
                age,
                json!(join_field(&cs, "name")),
                json!(join_field(&cs, "image")),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        ("apps", "ReplicaSet") => {
            let cs = tpl_containers("/spec/template/spec/containers");
            vec![
                name,
                json!(i(o, "/spec/replicas")),
                json!(i(o, "/status/replicas")),
                json!(i(o, "/status/readyReplicas")),
                age,
                json!(join_field(&cs, "name")),
                json!(join_field(&cs, "image")),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        ("apps", "StatefulSet") => {
            let cs = tpl_containers("/spec/template/spec/containers");
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    i(o, "/status/readyReplicas"),
                    i(o, "/spec/replicas")
                )),
                age,
                json!(join_field(&cs, "name")),
                json!(join_field(&cs, "image")),
            ]
        }
        ("apps", "DaemonSet") => {
            let cs = tpl_containers("/spec/template/spec/containers");
            vec![
                name,
                json!(i(o, "/status/desiredNumberScheduled")),
                json!(i(o, "/status/currentNumberScheduled")),
                json!(i(o, "/status/numberReady")),
                json!(i(o, "/status/updatedNumberScheduled")),
                json!(i(o, "/status/numberAvailable")),
                json!(map_selector(o.pointer("/spec/template/spec/nodeSelector"))),
                age,
                json!(join_field(&cs, "name")),
                json!(join_field(&cs, "image")),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        ("", "Service") => {
            let ty = s(o, "/spec/type");
            let mut external: Vec<String> = arr(o, "/spec/externalIPs")
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
            let ext = match ty {
                "ExternalName" => s(o, "/spec/externalName").to_string(),
                "LoadBalancer" => {
                    for ing in arr(o, "/status/loadBalancer/ingress") {
                        let a = if s(ing, "/ip").is_empty() {
                            s(ing, "/hostname")
                        } else {
                            s(ing, "/ip")
                        };
                        external.push(a.to_string());
                    }
                    if external.is_empty() {
                        "<pending>".into()
                    } else {
                        external.join(",")
                    }
                }
                _ if external.is_empty() => "<none>".into(),
                _ => external.join(","),
            };
            let ports: Vec<String> = arr(o, "/spec/ports")
                .iter()
                .map(|p| {
                    let np = i(p, "/nodePort");
                    if np > 0 {
                        format!("{}:{np}/{}", i(p, "/port"), s(p, "/protocol"))
                    } else {
                        format!("{}/{}", i(p, "/port"), s(p, "/protocol"))
                    }
                })
                .collect();
            vec![
                name,
                json!(ty),
                or_none(s(o, "/spec/clusterIP")),
                json!(ext),
                json!(if ports.is_empty() {
                    "<none>".into()
                } else {
                    ports.join(",")
                }),
                age,
                json!(map_selector(o.pointer("/spec/selector"))),
            ]
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            let ports: Vec<String> = arr(o, "/ports")
                .iter()
                .map(|p| {
                    let n = i(p, "/port");
                    if n == 0 {
                        "<unset>".into()
                    } else {
                        n.to_string()
                    }
                })
                .collect();
            let addrs: Vec<&str> = arr(o, "/endpoints")
                .iter()
                .flat_map(|e| arr(e, "/addresses"))
                .filter_map(Value::as_str)
                .collect();
            vec![
                name,
                json!(s(o, "/addressType")),
                json!(if ports.is_empty() {
                    "<unset>".into()
                } else {
                    ports.join(",")
                }),
                json!(truncated_list(&addrs)),
                age,
            ]
        }
        ("", "Endpoints") => {
            let mut eps: Vec<String> = Vec::new();
            for sub in arr(o, "/subsets") {
                for a in arr(sub, "/addresses") {
                    let ports = arr(sub, "/ports");
                    if ports.is_empty() {
                        eps.push(s(a, "/ip").to_string());
                    }
                    for p in ports {
                        eps.push(format!("{}:{}", s(a, "/ip"), i(p, "/port")));
                    }
                }
            }
            let refs: Vec<&str> = eps.iter().map(String::as_str).collect();
            vec![name, json!(truncated_list(&refs)), age]
        }
        ("", "PersistentVolumeClaim") => {
            let modes: Vec<&str> = arr(o, "/spec/accessModes")
                .iter()
                .filter_map(Value::as_str)
                .map(access_mode)
                .collect();
            vec![
                name,
                json!(s(o, "/status/phase")),
                json!(s(o, "/spec/volumeName")),
                json!(s(o, "/status/capacity/storage")),
                json!(modes.join(",")),
                or_none(s(o, "/spec/storageClassName")),
                or_unset(s(o, "/spec/volumeAttributesClassName")),
                age,
            ]
        }
        ("", "PersistentVolume") => {
            let modes: Vec<&str> = arr(o, "/spec/accessModes")
                .iter()
                .filter_map(Value::as_str)
                .map(access_mode)
                .collect();
            let claim = match (
                s(o, "/spec/claimRef/namespace"),
                s(o, "/spec/claimRef/name"),
            ) {
                (_, "") => String::new(),
                (ns, n) => format!("{ns}/{n}"),
            };
            vec![
                name,
                json!(s(o, "/spec/capacity/storage")),
                json!(modes.join(",")),
                json!(s(o, "/spec/persistentVolumeReclaimPolicy")),
                json!(s(o, "/status/phase")),
                json!(claim),
                json!(s(o, "/spec/storageClassName")),
                or_unset(s(o, "/spec/volumeAttributesClassName")),
                json!(s(o, "/status/reason")),
                age,
            ]
        }
        ("", "Node") => {
            let ready = arr(o, "/status/conditions")
                .iter()
                .find(|c| s(c, "/type") == "Ready")
                .map(|c| {
                    if s(c, "/status") == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            let mut status = ready.to_string();
            if o.pointer("/spec/unschedulable") == Some(&json!(true)) {
                status.push_str(",SchedulingDisabled");
            }
            let mut roles: Vec<String> = o
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| {
                    k.strip_prefix("node-role.kubernetes.io/")
                        .map(str::to_string)
                })
                .collect();
            roles.sort();
            let addr = |t: &str| {
                arr(o, "/status/addresses")
                    .iter()
                    .find(|a| s(a, "/type") == t)
                    .map(|a| s(a, "/address").to_string())
                    .unwrap_or_else(|| "<none>".into())
            };
            vec![
                name,
                json!(status),
                json!(if roles.is_empty() {
                    "<none>".into()
                } else {
                    roles.join(",")
                }),
                age,
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                or_none(s(o, "/status/nodeInfo/osImage")),
                or_none(s(o, "/status/nodeInfo/kernelVersion")),
                or_none(s(o, "/status/nodeInfo/containerRuntimeVersion")),
            ]
        }
        ("", "Namespace") => vec![name, json!(s(o, "/status/phase")), age],
        ("batch", "Job") => {
            let cs = tpl_containers("/spec/template/spec/containers");
            let completions = match o.pointer("/spec/completions").and_then(Value::as_i64) {
                Some(c) => format!("{}/{c}", i(o, "/status/succeeded")),
                None => format!(
                    "{}/1 of {}",
                    i(o, "/status/succeeded"),
                    i(o, "/spec/parallelism").max(1)
                ),
            };
            let conds = arr(o, "/status/conditions");
            let has = |t: &str| {
                conds
                    .iter()
                    .any(|c| s(c, "/type") == t && s(c, "/status") == "True")
            };
            let status = if has("Complete") {
                "Complete"
            } else if has("Failed") {
                "Failed"
            } else if has("FailureTarget") {
                "FailureTarget"
            } else if has("SuccessCriteriaMet") {
                "SuccessCriteriaMet"
            } else if o.pointer("/spec/suspend") == Some(&json!(true)) {
                "Suspended"
            } else {
                "Running"
            };
            let start = s(o, "/status/startTime");
            let duration = match DateTime::parse_from_rfc3339(start) {
                Ok(st) => {
                    let end = DateTime::parse_from_rfc3339(s(o, "/status/completionTime"))
                        .map(|e| e.with_timezone(&Utc))
                        .unwrap_or(now);
                    human_duration((end - st.with_timezone(&Utc)).num_seconds())
                }
                Err(_) => String::new(),
            };
            vec![
                name,
                json!(status),
                json!(completions),
                json!(duration),
                age,
                json!(join_field(&cs, "name")),
                json!(join_field(&cs, "image")),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        ("batch", "CronJob") => {
            let cs = tpl_containers("/spec/jobTemplate/spec/template/spec/containers");
            let last = s(o, "/status/lastScheduleTime");
            vec![
                name,
                json!(s(o, "/spec/schedule")),
                or_none(s(o, "/spec/timeZone")),
                json!(o.pointer("/spec/suspend") == Some(&json!(true))),
                json!(arr(o, "/status/active").len()),
                json!(if last.is_empty() {
                    "<none>".into()
                } else {
                    since(Some(last), now)
                }),
                age,
                json!(join_field(&cs, "name")),
                json!(join_field(&cs, "image")),
                json!(selector_string(
                    o.pointer("/spec/jobTemplate/spec/selector")
                )),
            ]
        }
        ("", "Event") => {
            let last = [
                s(o, "/series/lastObservedTime"),
                s(o, "/lastTimestamp"),
                s(o, "/eventTime"),
                s(o, "/metadata/creationTimestamp"),
            ]
            .into_iter()
            .find(|t| !t.is_empty());
            let first = [
                s(o, "/firstTimestamp"),
                s(o, "/eventTime"),
                s(o, "/metadata/creationTimestamp"),
            ]
            .into_iter()
            .find(|t| !t.is_empty());
            let object = format!(
                "{}/{}",
                s(o, "/involvedObject/kind").to_lowercase(),
                s(o, "/involvedObject/name")
            );
            let source = if s(o, "/source/component").is_empty() {
                s(o, "/reportingComponent").to_string()
            } else {
                s(o, "/source/component").to_string()
            };
            vec![
                json!(since(last, now)),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(object),
                json!(s(o, "/involvedObject/fieldPath")),
                json!(source),
                json!(s(o, "/message").trim()),
                json!(since(first, now)),
                json!(i(o, "/count").max(1).to_string()),
                name,
            ]
        }
        ("", "ConfigMap") => {
            let n = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
                + o.get("binaryData")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len());
            vec![name, json!(n), age]
        }
        ("", "Secret") => {
            let n = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len());
            vec![name, json!(s(o, "/type")), json!(n), age]
        }
        ("", "ServiceAccount") => vec![name, json!(arr(o, "/secrets").len()), age],
        ("networking.k8s.io", "NetworkPolicy") => {
            vec![
                name,
                json!(selector_string(o.pointer("/spec/podSelector"))),
                age,
            ]
        }
        ("networking.k8s.io", "Ingress") => {
            let hosts: Vec<&str> = arr(o, "/spec/rules")
                .iter()
                .map(|r| {
                    if s(r, "/host").is_empty() {
                        "*"
                    } else {
                        s(r, "/host")
                    }
                })
                .collect();
            let addrs: Vec<&str> = arr(o, "/status/loadBalancer/ingress")
                .iter()
                .map(|a| {
                    if s(a, "/ip").is_empty() {
                        s(a, "/hostname")
                    } else {
                        s(a, "/ip")
                    }
                })
                .collect();
            let ports = if arr(o, "/spec/tls").is_empty() {
                "80"
            } else {
                "80, 443"
            };
            vec![
                name,
                or_none(s(o, "/spec/ingressClassName")),
                json!(if hosts.is_empty() {
                    "*".into()
                } else {
                    hosts.join(",")
                }),
                json!(addrs.join(",")),
                json!(ports),
                age,
            ]
        }
        ("coordination.k8s.io", "Lease") => vec![name, json!(s(o, "/spec/holderIdentity")), age],
        ("scheduling.k8s.io", "PriorityClass") => vec![
            name,
            o.get("value").cloned().unwrap_or(json!(0)),
            json!(o.get("globalDefault") == Some(&json!(true))),
            age,
            json!(s(o, "/preemptionPolicy")),
        ],
        ("apps", "ControllerRevision") => {
            let owner = arr(o, "/metadata/ownerReferences")
                .iter()
                .find(|r| r.get("controller") == Some(&json!(true)))
                .map(|r| {
                    let group = s(r, "/apiVersion").split('/').rev().nth(1).unwrap_or("");
                    let kind = s(r, "/kind").to_lowercase();
                    if group.is_empty() {
                        format!("{kind}/{}", s(r, "/name"))
                    } else {
                        format!("{kind}.{group}/{}", s(r, "/name"))
                    }
                })
                .unwrap_or_else(|| "<none>".into());
            vec![name, json!(owner), json!(i(o, "/revision")), age]
        }
        _ => vec![name, age],
    }
}

/// Upstream prints at most three endpoints and "+ N more...".
fn truncated_list(items: &[&str]) -> String {
    if items.is_empty() {
        return "<none>".into();
    }
    if items.len() <= 3 {
        return items.join(",");
    }
    format!("{} + {} more...", items[..3].join(","), items.len() - 3)
}

fn row_object(o: &Value, include: IncludeObject) -> Value {
    match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Object => o.clone(),
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": o.get("metadata").cloned().unwrap_or_else(|| json!({})),
        }),
    }
}

/// A table of `objects`. `list_meta` is the list's metadata (resourceVersion, continue).
pub fn table(
    def: &ResourceDef,
    objects: &[Value],
    list_meta: Value,
    include: IncludeObject,
    with_columns: bool,
) -> Value {
    let now = Utc::now();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(def, o, now)});
            let obj = row_object(o, include);
            if !obj.is_null() {
                row["object"] = obj;
            }
            row
        })
        .collect();
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "rows": rows,
    });
    if with_columns {
        t["columnDefinitions"] = columns(def)
            .iter()
            .map(|c| {
                json!({"name": c.name, "type": c.ty, "format": c.format, "description": c.description, "priority": c.priority})
            })
            .collect();
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{RESOURCES, find};

    #[test]
    fn human_durations_as_upstream() {
        for (secs, want) in [
            (-5, "<invalid>"),
            (5, "5s"),
            (119, "119s"),
            (150, "2m30s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (10 * 3600, "10h"),
            (3 * 86400, "3d"),
            (400 * 86400, "400d"),
            (3 * 365 * 86400, "3y"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn every_kind_has_as_many_cells_as_columns() {
        let obj = json!({"metadata": {"name": "x", "creationTimestamp": "2020-01-01T00:00:00Z"}});
        for def in RESOURCES {
            assert_eq!(
                cells(def, &obj, Utc::now()).len(),
                columns(def).len(),
                "{}",
                def.kind
            );
        }
    }

    #[test]
    fn pod_rows() {
        let pods = find("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.244.0.5", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 1, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let t = table(pods, &[pod], json!({}), IncludeObject::Metadata, true);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "CrashLoopBackOff");
        assert_eq!(cells[3], "1");
        assert_eq!(cells[5], "10.244.0.5");
        assert_eq!(cells[6], "n1");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}
