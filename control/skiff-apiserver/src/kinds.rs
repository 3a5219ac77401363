//! What differs per kind: defaults (as upstream's `SetDefaults_*` and admission fill them in),
//! validation with field paths, and which fields an update may change.

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::{
    error::Cause,
    meta::{is_dns1123_label, meta_str},
    resources::ResourceDef,
};

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    v[key]
        .as_object_mut()
        .unwrap_or_else(|| unreachable!("{key} was just made an object"))
}

fn default(m: &mut Map<String, Value>, key: &str, value: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.into(), value);
    }
}

/// Defaults of a container (`SetDefaults_Container`).
fn default_container(c: &mut Value) {
    let Some(m) = c.as_object_mut() else { return };
    default(m, "terminationMessagePath", json!("/dev/termination-log"));
    default(m, "terminationMessagePolicy", json!("File"));
    let image = m.get("image").and_then(Value::as_str).unwrap_or("");
    let last = image.rsplit('/').next().unwrap_or("");
    let tag = if image.contains('@') {
        Some("digest")
    } else {
        last.split_once(':').map(|(_, t)| t)
    };
    let policy = match tag {
        None | Some("latest") => "Always",
        Some(_) => "IfNotPresent",
    };
    default(m, "imagePullPolicy", json!(policy));
    default(m, "resources", json!({}));
    if let Some(ports) = m.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            default(p, "protocol", json!("TCP"));
        }
    }
}

/// Defaults of a pod spec (`SetDefaults_PodSpec`), also applied to workload templates.
fn default_pod_spec(spec: &mut Map<String, Value>) {
    default(spec, "restartPolicy", json!("Always"));
    default(spec, "dnsPolicy", json!("ClusterFirst"));
    default(spec, "schedulerName", json!("default-scheduler"));
    default(spec, "terminationGracePeriodSeconds", json!(30));
    default(spec, "securityContext", json!({}));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
            cs.iter_mut().for_each(default_container);
        }
    }
}

fn default_template(obj: &mut Value) {
    if let Some(spec) = obj
        .pointer_mut("/spec/template/spec")
        .and_then(Value::as_object_mut)
    {
        default_pod_spec(spec);
    }
}

/// Applies the kind's defaults on create (and on update, for fields a client may unset).
pub fn apply_defaults(def: &ResourceDef, obj: &mut Value) {
    match (def.group, def.kind) {
        ("", "Pod") => {
            let spec = obj_mut(obj, "spec");
            default_pod_spec(spec);
            default(spec, "serviceAccountName", json!("default"));
            let sa = spec["serviceAccountName"].clone();
            default(spec, "serviceAccount", sa);
            default(spec, "enableServiceLinks", json!(true));
            default(spec, "priority", json!(0));
            default(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
            // DefaultTolerationSeconds admission.
            let tolerations = spec
                .entry("tolerations")
                .or_insert_with(|| json!([]))
                .as_array_mut();
            if let Some(t) = tolerations {
                for key in [
                    "node.kubernetes.io/not-ready",
                    "node.kubernetes.io/unreachable",
                ] {
                    if !t
                        .iter()
                        .any(|x| x.get("key").and_then(Value::as_str) == Some(key))
                    {
                        t.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
                    }
                }
            }
        }
        ("", "Service") => {
            let spec = obj_mut(obj, "spec");
            default(spec, "type", json!("ClusterIP"));
            let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
            if ty != "ExternalName" {
                default(spec, "sessionAffinity", json!("None"));
                default(spec, "internalTrafficPolicy", json!("Cluster"));
            }
            if ty == "NodePort" || ty == "LoadBalancer" {
                default(spec, "externalTrafficPolicy", json!("Cluster"));
            }
            if ty == "LoadBalancer" {
                default(spec, "allocateLoadBalancerNodePorts", json!(true));
            }
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    default(p, "protocol", json!("TCP"));
                    if let Some(port) = p.get("port").cloned() {
                        default(p, "targetPort", port);
                    }
                }
            }
        }
        ("", "Namespace") => {
            let name = meta_str(obj, "name").unwrap_or("").to_string();
            let spec = obj_mut(obj, "spec");
            default(spec, "finalizers", json!(["kubernetes"]));
            let m = crate::meta::metadata_mut(obj);
            if let Some(l) = m
                .entry("labels")
                .or_insert_with(|| json!({}))
                .as_object_mut()
            {
                l.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
        }
        ("", "Secret") => {
            if let Some(m) = obj.as_object_mut() {
                default(m, "type", json!("Opaque"));
                // stringData is write-only: merged into data (base64), as upstream does.
                if let Some(Value::Object(sd)) = m.remove("stringData") {
                    let data = m.entry("data").or_insert_with(|| json!({}));
                    if let Some(d) = data.as_object_mut() {
                        for (k, v) in sd {
                            let raw = v.as_str().unwrap_or("").as_bytes().to_vec();
                            d.insert(
                                k,
                                json!(base64::engine::general_purpose::STANDARD.encode(raw)),
                            );
                        }
                    }
                }
            }
        }
        ("apps", "Deployment") => {
            let spec = obj_mut(obj, "spec");
            default(spec, "replicas", json!(1));
            default(spec, "revisionHistoryLimit", json!(10));
            default(spec, "progressDeadlineSeconds", json!(600));
            default(spec, "strategy", json!({"type": "RollingUpdate"}));
            if let Some(s) = spec.get_mut("strategy").and_then(Value::as_object_mut)
                && s.get("type").and_then(Value::as_str) == Some("RollingUpdate")
            {
                let ru = s.entry("rollingUpdate").or_insert_with(|| json!({}));
                if let Some(ru) = ru.as_object_mut() {
                    default(ru, "maxUnavailable", json!("25%"));
                    default(ru, "maxSurge", json!("25%"));
                }
            }
            default_template(obj);
        }
        ("apps", "ReplicaSet") => {
            default(obj_mut(obj, "spec"), "replicas", json!(1));
            default_template(obj);
        }
        ("apps", "StatefulSet") => {
            let spec = obj_mut(obj, "spec");
            default(spec, "replicas", json!(1));
            default(spec, "podManagementPolicy", json!("OrderedReady"));
            default(spec, "revisionHistoryLimit", json!(10));
            default(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
            );
            default(
                spec,
                "persistentVolumeClaimRetentionPolicy",
                json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
            );
            default_template(obj);
        }
        ("apps", "DaemonSet") => {
            let spec = obj_mut(obj, "spec");
            default(spec, "revisionHistoryLimit", json!(10));
            default(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
            );
            default_template(obj);
        }
        ("scheduling.k8s.io", "PriorityClass") => {
            if let Some(m) = obj.as_object_mut() {
                default(m, "preemptionPolicy", json!("PreemptLowerPriority"));
            }
        }
        ("batch", "Job") => {
            // The generated selector: the job's uid, also labelled onto its pod template.
            let uid = meta_str(obj, "uid").unwrap_or("").to_string();
            let name = meta_str(obj, "name").unwrap_or("").to_string();
            let manual = obj.pointer("/spec/manualSelector") == Some(&json!(true));
            if !manual
                && !uid.is_empty()
                && obj.pointer("/spec/selector").is_none_or(Value::is_null)
            {
                obj["spec"]["selector"] =
                    json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
                let tpl = &mut obj["spec"]["template"];
                for (k, v) in [
                    ("batch.kubernetes.io/controller-uid", &uid),
                    ("batch.kubernetes.io/job-name", &name),
                    ("controller-uid", &uid),
                    ("job-name", &name),
                ] {
                    tpl["metadata"]["labels"][k] = json!(v);
                }
            }
            let spec = obj_mut(obj, "spec");
            if spec.get("completions").is_none() && spec.get("parallelism").is_none() {
                spec.insert("completions".into(), json!(1));
            }
            default(spec, "parallelism", json!(1));
            default(spec, "backoffLimit", json!(6));
            default(spec, "completionMode", json!("NonIndexed"));
            default(spec, "suspend", json!(false));
            default(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
            default_template(obj);
        }
        ("batch", "CronJob") => {
            let spec = obj_mut(obj, "spec");
            default(spec, "concurrencyPolicy", json!("Allow"));
            default(spec, "suspend", json!(false));
            default(spec, "successfulJobsHistoryLimit", json!(3));
            default(spec, "failedJobsHistoryLimit", json!(1));
            if let Some(t) = obj
                .pointer_mut("/spec/jobTemplate/spec/template/spec")
                .and_then(Value::as_object_mut)
            {
                default_pod_spec(t);
            }
        }
        ("networking.k8s.io", "NetworkPolicy") => {
            let spec = obj_mut(obj, "spec");
            if spec.get("policyTypes").is_none() {
                let mut types = vec![json!("Ingress")];
                if spec.get("egress").is_some() {
                    types.push(json!("Egress"));
                }
                spec.insert("policyTypes".into(), Value::Array(types));
            }
            for dir in ["ingress", "egress"] {
                if let Some(rules) = spec.get_mut(dir).and_then(Value::as_array_mut) {
                    for r in rules.iter_mut() {
                        if let Some(ports) = r.get_mut("ports").and_then(Value::as_array_mut) {
                            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                                default(p, "protocol", json!("TCP"));
                            }
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// Sets what a create resets in `status` (clients cannot create objects with a status).
pub fn initial_status(def: &ResourceDef, obj: &mut Value) {
    if !def.has_status {
        return;
    }
    let status = match (def.group, def.kind) {
        ("", "Pod") => json!({"phase": "Pending", "qosClass": qos_class(obj)}),
        ("", "Namespace") => json!({"phase": "Active"}),
        // No provisioner binds claims yet: they wait, as on a cluster without a storage class.
        ("", "PersistentVolumeClaim") => json!({"phase": "Pending"}),
        ("", "PersistentVolume") => json!({"phase": "Pending"}),
        ("", "Node") => return,
        ("", "Service") => json!({"loadBalancer": {}}),
        _ => json!({}),
    };
    obj["status"] = status;
}

/// The pod's QoS class from its containers' requests and limits.
fn qos_class(pod: &Value) -> &'static str {
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in &containers {
        let req = c.pointer("/resources/requests").and_then(Value::as_object);
        let lim = c.pointer("/resources/limits").and_then(Value::as_object);
        if req.is_some_and(|r| !r.is_empty()) || lim.is_some_and(|l| !l.is_empty()) {
            any = true;
        }
        for res in ["cpu", "memory"] {
            let l = lim.and_then(|l| l.get(res));
            let r = req.and_then(|r| r.get(res)).or(l);
            if l.is_none() || r != l {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn validate_containers(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    let containers = spec.get("containers").and_then(Value::as_array);
    match containers {
        None => causes.push(Cause::required(format!("{path}.containers"))),
        Some(cs) if cs.is_empty() => causes.push(Cause::required(format!("{path}.containers"))),
        Some(_) => {}
    }
    let mut names: Vec<&str> = Vec::new();
    for list in ["initContainers", "containers"] {
        for (i, c) in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let p = format!("{path}.{list}[{i}]");
            let name = c.get("name").and_then(Value::as_str).unwrap_or("");
            if name.is_empty() {
                causes.push(Cause::required(format!("{p}.name")));
            } else if !is_dns1123_label(name) {
                causes.push(Cause::invalid(
                    format!("{p}.name"),
                    name,
                    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
                ));
            } else if names.contains(&name) {
                causes.push(Cause::duplicate(format!("{p}.name"), name));
            } else {
                names.push(name);
            }
            if c.get("image")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                causes.push(Cause::required(format!("{p}.image")));
            }
            for (j, port) in c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let n = port
                    .get("containerPort")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                if !(1..=65535).contains(&n) {
                    causes.push(Cause::invalid(
                        format!("{p}.ports[{j}].containerPort"),
                        &n.to_string(),
                        "must be between 1 and 65535, inclusive",
                    ));
                }
            }
        }
    }
    if let Some(rp) = spec.get("restartPolicy").and_then(Value::as_str)
        && !["Always", "OnFailure", "Never"].contains(&rp)
    {
        causes.push(Cause::not_supported(
            format!("{path}.restartPolicy"),
            rp,
            &["Always", "OnFailure", "Never"],
        ));
    }
}

fn validate_selector_matches_template(obj: &Value, causes: &mut Vec<Cause>, required: bool) {
    let selector = obj.pointer("/spec/selector");
    let Some(selector) = selector.filter(|s| !s.is_null()) else {
        if required {
            causes.push(Cause::required("spec.selector"));
        }
        return;
    };
    let labels = obj
        .pointer("/spec/template/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let match_labels = selector.get("matchLabels").and_then(Value::as_object);
    let exprs = selector.get("matchExpressions").and_then(Value::as_array);
    if match_labels.is_none_or(|m| m.is_empty()) && exprs.is_none_or(|e| e.is_empty()) {
        causes.push(Cause::invalid(
            "spec.selector",
            "{}",
            "empty selector is invalid for deployment",
        ));
        return;
    }
    let ok = match_labels
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && exprs.into_iter().flatten().all(|e| {
            let key = e.get("key").and_then(Value::as_str).unwrap_or("");
            let values: Vec<&Value> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|v| v.iter().collect())
                .unwrap_or_default();
            match e.get("operator").and_then(Value::as_str).unwrap_or("") {
                "In" => labels.get(key).is_some_and(|l| values.contains(&l)),
                "NotIn" => labels.get(key).is_none_or(|l| !values.contains(&l)),
                "Exists" => labels.contains_key(key),
                "DoesNotExist" => !labels.contains_key(key),
                _ => false,
            }
        });
    if !ok {
        let shown = serde_json::to_string(&labels).unwrap_or_default();
        causes.push(Cause::invalid(
            "spec.template.metadata.labels",
            &shown,
            "`selector` does not match template `labels`",
        ));
    }
}

fn validate_replicas(obj: &Value, causes: &mut Vec<Cause>) {
    if let Some(r) = obj.pointer("/spec/replicas").and_then(Value::as_i64)
        && r < 0
    {
        causes.push(Cause::invalid(
            "spec.replicas",
            &r.to_string(),
            "must be greater than or equal to 0",
        ));
    }
}

fn valid_config_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k != "."
        && k != ".."
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Kind-specific validation of a whole object.
pub fn validate(def: &ResourceDef, obj: &Value, causes: &mut Vec<Cause>) {
    let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
    match (def.group, def.kind) {
        ("", "Pod") => validate_containers(&spec, "spec", causes),
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet") => {
            validate_selector_matches_template(obj, causes, true);
            validate_replicas(obj, causes);
            let t = obj
                .pointer("/spec/template/spec")
                .cloned()
                .unwrap_or(Value::Null);
            validate_containers(&t, "spec.template.spec", causes);
            if let Some(rp) = t.get("restartPolicy").and_then(Value::as_str)
                && rp != "Always"
            {
                causes.push(Cause::not_supported(
                    "spec.template.spec.restartPolicy",
                    rp,
                    &["Always"],
                ));
            }
        }
        ("skiff.dev", "SecurityIdentity") => {
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            let (first, last) = (
                skiff_apimachinery::identity::FIRST,
                skiff_apimachinery::identity::LAST,
            );
            if skiff_apimachinery::identity::id_of_name(name).is_none() {
                causes.push(Cause::invalid(
                    "metadata.name",
                    name,
                    &format!("must be a number from {first} to {last}"),
                ));
            }
            if obj
                .pointer("/labels/namespace")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                causes.push(Cause::required("labels.namespace"));
            }
        }
        ("scheduling.k8s.io", "PriorityClass") => {
            let value = obj.get("value").and_then(Value::as_i64).unwrap_or(0);
            let name = meta_str(obj, "name").unwrap_or("");
            if value > 1_000_000_000 && !name.starts_with("system-") {
                causes.push(Cause::invalid(
                    "value",
                    &value.to_string(),
                    "maximum allowed value of a user defined priority is 1000000000",
                ));
            }
        }
        ("batch", "Job") => {
            validate_selector_matches_template(obj, causes, false);
            let t = obj
                .pointer("/spec/template/spec")
                .cloned()
                .unwrap_or(Value::Null);
            validate_containers(&t, "spec.template.spec", causes);
            let rp = t.get("restartPolicy").and_then(Value::as_str).unwrap_or("");
            if rp != "Never" && rp != "OnFailure" {
                causes.push(Cause::not_supported(
                    "spec.template.spec.restartPolicy",
                    rp,
                    &["OnFailure", "Never"],
                ));
            }
        }
        ("batch", "CronJob") => {
            if spec
                .get("schedule")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                causes.push(Cause::required("spec.schedule"));
            }
            let t = obj
                .pointer("/spec/jobTemplate/spec/template/spec")
                .cloned()
                .unwrap_or(Value::Null);
            validate_containers(&t, "spec.jobTemplate.spec.template.spec", causes);
        }
        ("", "Service") => validate_service(&spec, causes),
        ("", "ConfigMap" | "Secret") => {
            for field in ["data", "binaryData", "stringData"] {
                for k in obj
                    .get(field)
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    if !valid_config_key(k.0) {
                        causes.push(Cause::invalid(
                            format!("{field}[{}]", k.0),
                            k.0,
                            "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                        ));
                    }
                }
            }
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            let t = obj.get("addressType").and_then(Value::as_str).unwrap_or("");
            if !["IPv4", "IPv6", "FQDN"].contains(&t) {
                causes.push(Cause::not_supported(
                    "addressType",
                    t,
                    &["IPv4", "IPv6", "FQDN"],
                ));
            }
        }
        _ => {}
    }
    if let Some(ns) = obj.pointer("/metadata/namespace").and_then(Value::as_str)
        && def.namespaced
        && !is_dns1123_label(ns)
    {
        causes.push(Cause::invalid(
            "metadata.namespace",
            ns,
            "a lowercase RFC 1123 label",
        ));
    }
}

fn validate_service(spec: &Value, causes: &mut Vec<Cause>) {
    let ty = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    let types = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
    if !types.contains(&ty) {
        causes.push(Cause::not_supported("spec.type", ty, &types));
    }
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    if ports.is_empty() && ty != "ExternalName" && !headless {
        causes.push(Cause::required("spec.ports"));
    }
    let mut names: Vec<String> = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            causes.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                &port.to_string(),
                "must be between 1 and 65535, inclusive",
            ));
        }
        let name = p
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if ports.len() > 1 && name.is_empty() {
            causes.push(Cause::required(format!("spec.ports[{i}].name")));
        } else if !name.is_empty() && names.contains(&name) {
            causes.push(Cause::duplicate(format!("spec.ports[{i}].name"), &name));
        }
        names.push(name);
        let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
        if !["TCP", "UDP", "SCTP"].contains(&proto) {
            causes.push(Cause::not_supported(
                format!("spec.ports[{i}].protocol"),
                proto,
                &["SCTP", "TCP", "UDP"],
            ));
        }
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64)
            && np != 0
            && !(30000..=32767).contains(&np)
        {
            causes.push(Cause::invalid(
                format!("spec.ports[{i}].nodePort"),
                &np.to_string(),
                "provided port is not in the valid range. The range of valid ports is 30000-32767",
            ));
        }
    }
    if ty == "ExternalName"
        && spec
            .get("externalName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
    {
        causes.push(Cause::required("spec.externalName"));
    }
}

/// Checks what an update may not change, per kind (immutable fields).
pub fn validate_update(def: &ResourceDef, new: &Value, old: &Value, causes: &mut Vec<Cause>) {
    let immutable = |path: &str, field: &str, causes: &mut Vec<Cause>| {
        if new.pointer(path) != old.pointer(path) {
            let shown = new.pointer(path).map(|v| v.to_string()).unwrap_or_default();
            causes.push(Cause::invalid(field, &shown, "field is immutable"));
        }
    };
    match (def.group, def.kind) {
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet") => {
            immutable("/spec/selector", "spec.selector", causes);
        }
        ("", "Node") => {
            // A node's pod CIDR never changes once assigned.
            let old_cidr = old.pointer("/spec/podCIDR").and_then(Value::as_str);
            if old_cidr.is_some_and(|c| !c.is_empty()) {
                immutable("/spec/podCIDR", "spec.podCIDR", causes);
            }
        }
        ("skiff.dev", "SecurityIdentity") => {
            // A number means one set of labels for as long as it exists.
            immutable("/labels", "labels", causes);
        }
        ("batch", "Job") => {
            immutable("/spec/selector", "spec.selector", causes);
            immutable("/spec/completionMode", "spec.completionMode", causes);
        }
        ("", "Service") => {
            let new_ip = new.pointer("/spec/clusterIP").and_then(Value::as_str);
            if new_ip.is_some_and(|ip| !ip.is_empty())
                && new.pointer("/spec/clusterIP") != old.pointer("/spec/clusterIP")
            {
                immutable("/spec/clusterIP", "spec.clusterIP", causes);
            }
        }
        ("", "Pod") => {
            // Only images, activeDeadlineSeconds and added tolerations may change.
            let mut a = new.get("spec").cloned().unwrap_or(Value::Null);
            let mut b = old.get("spec").cloned().unwrap_or(Value::Null);
            for s in [&mut a, &mut b] {
                for list in ["containers", "initContainers"] {
                    if let Some(cs) = s.get_mut(list).and_then(Value::as_array_mut) {
                        for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                            c.remove("image");
                        }
                    }
                }
                if let Some(m) = s.as_object_mut() {
                    m.remove("activeDeadlineSeconds");
                    m.remove("tolerations");
                    m.remove("nodeName");
                }
            }
            if a != b {
                causes.push(Cause::forbidden(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations)",
                ));
            }
            let old_node = old.pointer("/spec/nodeName").and_then(Value::as_str);
            if old_node.is_some_and(|n| !n.is_empty())
                && new.pointer("/spec/nodeName") != old.pointer("/spec/nodeName")
            {
                immutable("/spec/nodeName", "spec.nodeName", causes);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    #[test]
    fn deployment_defaults_as_upstream() {
        let def = find("apps", "v1", "deployments").unwrap();
        let mut d = json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "nginx:1.25"}]}}}});
        apply_defaults(def, &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(d["spec"]["revisionHistoryLimit"], 10);
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
    }

    #[test]
    fn selector_must_match_template_labels() {
        let def = find("apps", "v1", "deployments").unwrap();
        let d = json!({"spec": {"selector": {"matchLabels": {"app": "a"}},
            "template": {"metadata": {"labels": {"app": "b"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let mut causes = Vec::new();
        validate(def, &d, &mut causes);
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "spec.template.metadata.labels");
    }

    #[test]
    fn qos_classes() {
        let pod = |res: Value| json!({"spec": {"containers": [{"resources": res}]}});
        assert_eq!(qos_class(&pod(json!({}))), "BestEffort");
        assert_eq!(
            qos_class(&pod(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&pod(json!({"requests": {"cpu": "1"}}))),
            "Burstable"
        );
    }
}
