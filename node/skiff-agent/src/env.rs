//! A container's environment, as the kubelet builds it: the service variables of the pod's
//! namespace (`<SVC>_SERVICE_HOST`, `_SERVICE_PORT`, and the Docker-link style `<SVC>_PORT…`,
//! when `enableServiceLinks` is on; the `kubernetes` Service's always), then `envFrom`, then
//! `env` with `value`, `$(VAR)` expansion, and `valueFrom` (`fieldRef`, `resourceFieldRef`,
//! `configMapKeyRef`, `secretKeyRef`). A missing ConfigMap, Secret or key that is not optional is the container's
//! `CreateContainerConfigError`, retried.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{ConfigMap, Container, Pod, ResourceFieldSelector, Secret, Service},
    apimachinery::pkg::api::resource::Quantity,
};
use kube::{Api, Client, ResourceExt, api::ListParams};

/// What `fieldRef` and `resourceFieldRef` can read beyond the Pod object itself.
#[derive(Clone, Debug, Default)]
pub struct Runtime {
    /// The pod's IP.
    pub pod_ip: String,
    /// The node's IP.
    pub host_ip: String,
    /// The node's allocatable CPU (cores), memory and ephemeral storage (bytes): what an unset
    /// limit means.
    pub allocatable: (f64, f64, f64),
    /// The cluster DNS address for `dnsPolicy: ClusterFirst` (none: pods resolve as the node).
    pub cluster_dns: Option<String>,
    /// The node's own DNS server, for host-network pods with `ClusterFirstWithHostNet`.
    pub host_dns: Option<String>,
}

fn svc_name(name: &str) -> String {
    name.to_uppercase().replace('-', "_")
}

/// Service variables for `services` (Docker links plus `_SERVICE_HOST`/`_PORT`).
pub fn service_vars(services: &[Service]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in services {
        let Some(spec) = &s.spec else { continue };
        let ip = spec.cluster_ip.clone().unwrap_or_default();
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let n = svc_name(&s.name_any());
        let ports = spec.ports.clone().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        out.push((format!("{n}_SERVICE_HOST"), ip.clone()));
        out.push((format!("{n}_SERVICE_PORT"), first.port.to_string()));
        for p in &ports {
            if let Some(pn) = p.name.as_ref().filter(|x| !x.is_empty()) {
                out.push((
                    format!("{n}_SERVICE_PORT_{}", svc_name(pn)),
                    p.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
            p.protocol.clone().unwrap_or_else(|| "TCP".into())
        };
        out.push((
            format!("{n}_PORT"),
            format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port),
        ));
        for p in &ports {
            let pr = proto(p);
            let prefix = format!("{n}_PORT_{}_{}", p.port, pr.to_uppercase());
            out.push((
                prefix.clone(),
                format!("{}://{ip}:{}", pr.to_lowercase(), p.port),
            ));
            out.push((format!("{prefix}_PROTO"), pr.to_lowercase()));
            out.push((format!("{prefix}_PORT"), p.port.to_string()));
            out.push((format!("{prefix}_ADDR"), ip.clone()));
        }
    }
    out
}

/// Expands `$(VAR)` with earlier variables; `$$` escapes, unknown references stay as written.
pub fn expand(value: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('(')
            && let Some(end) = r.find(')')
        {
            let name = &r[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The value of a downward API `fieldRef`.
pub fn field(pod: &Pod, rt: &Runtime, path: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => rt.pod_ip.clone(),
        "status.hostIP" => rt.host_ip.clone(),
        p => {
            if let Some(k) = p
                .strip_prefix("metadata.labels['")
                .and_then(|r| r.strip_suffix("']"))
            {
                pod.labels().get(k).cloned().unwrap_or_default()
            } else if let Some(k) = p
                .strip_prefix("metadata.annotations['")
                .and_then(|r| r.strip_suffix("']"))
            {
                pod.annotations().get(k).cloned().unwrap_or_default()
            } else {
                return Err(format!("unsupported fieldRef {p:?}"));
            }
        }
    })
}

/// The value of a `resourceFieldRef` (`limits.cpu`, `requests.memory`, …) of the named container
/// (or `default_container`): the quantity divided by `divisor`, rounded up, as the kubelet
/// reports it. An unset limit is the node's allocatable amount; an unset request is the limit
/// if that is set (the API's defaulting), else 0.
pub fn resource_field(
    pod: &Pod,
    rt: &Runtime,
    sel: &ResourceFieldSelector,
    default_container: Option<&str>,
) -> Result<String, String> {
    let name = sel
        .container_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .or(default_container)
        .ok_or_else(|| format!("resourceFieldRef {:?} names no container", sel.resource))?;
    let c = pod
        .spec
        .as_ref()
        .and_then(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .find(|c| c.name == name)
        })
        .ok_or_else(|| format!("resourceFieldRef: container {name:?} not found"))?;
    let res = c.resources.clone().unwrap_or_default();
    let get = |m: &Option<BTreeMap<String, Quantity>>, k: &str| -> Result<Option<f64>, String> {
        m.as_ref()
            .and_then(|m| m.get(k))
            .map(|q| crate::quantity::parse(&q.0))
            .transpose()
    };
    let (kind, which) = sel
        .resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resourceFieldRef {:?}", sel.resource))?;
    let node = match which {
        "cpu" => rt.allocatable.0,
        "memory" => rt.allocatable.1,
        "ephemeral-storage" => rt.allocatable.2,
        _ => return Err(format!("unsupported resourceFieldRef {:?}", sel.resource)),
    };
    let limit = get(&res.limits, which)?;
    let value = match kind {
        "limits" => limit.unwrap_or(node),
        "requests" => get(&res.requests, which)?.or(limit).unwrap_or(0.0),
        _ => return Err(format!("unsupported resourceFieldRef {:?}", sel.resource)),
    };
    let divisor = match &sel.divisor {
        Some(q) => crate::quantity::parse(&q.0)?,
        None => 1.0,
    };
    if divisor <= 0.0 {
        return Err(format!(
            "resourceFieldRef divisor {:?} must be positive",
            sel.divisor
        ));
    }
    // Rounded to 1e-9 first, so that 0.25 / 0.001 is 250, not 251.
    let q = ((value / divisor) * 1e9).round() / 1e9;
    Ok(format!("{}", q.ceil() as i64))
}

/// The environment of container `c` of `pod`, as `KEY=VALUE`; an error is the message of a
/// `CreateContainerConfigError`.
pub async fn build(
    client: &Client,
    pod: &Pod,
    c: &Container,
    rt: &Runtime,
) -> Result<Vec<String>, String> {
    let ns = pod.namespace().unwrap_or_default();
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |vars: &mut BTreeMap<String, String>, k: String, v: String| {
        if !vars.contains_key(&k) {
            order.push(k.clone());
        }
        vars.insert(k, v);
    };
    // Service variables first (a container's own variables override them).
    let links = pod
        .spec
        .as_ref()
        .and_then(|s| s.enable_service_links)
        .unwrap_or(true);
    let mut services: Vec<Service> = Vec::new();
    if links {
        services.extend(
            Api::<Service>::namespaced(client.clone(), &ns)
                .list(&ListParams::default())
                .await
                .map_err(|e| format!("listing services: {e}"))?
                .items,
        );
    }
    if (ns != "default" || !links)
        && let Ok(Some(k)) = Api::<Service>::namespaced(client.clone(), "default")
            .get_opt("kubernetes")
            .await
    {
        services.retain(|s| s.name_any() != "kubernetes");
        services.push(k);
    }
    for (k, v) in service_vars(&services) {
        set(&mut vars, k, v);
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for from in c.env_from.clone().unwrap_or_default() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = from.config_map_ref {
            match cms.get_opt(&r.name).await.map_err(|e| e.to_string())? {
                Some(cm) => {
                    for (k, v) in cm.data.unwrap_or_default() {
                        set(&mut vars, format!("{prefix}{k}"), v);
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(format!("configmap \"{}\" not found", r.name)),
            }
        }
        if let Some(r) = from.secret_ref {
            match secrets.get_opt(&r.name).await.map_err(|e| e.to_string())? {
                Some(s) => {
                    for (k, v) in s.data.unwrap_or_default() {
                        set(
                            &mut vars,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v.0).into_owned(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(format!("secret \"{}\" not found", r.name)),
            }
        }
    }
    for e in c.env.clone().unwrap_or_default() {
        let value = if let Some(v) = e.value {
            expand(&v, &vars)
        } else if let Some(from) = e.value_from {
            if let Some(f) = from.field_ref {
                field(pod, rt, &f.field_path)?
            } else if let Some(r) = from.config_map_key_ref {
                let optional = r.optional == Some(true);
                match cms.get_opt(&r.name).await.map_err(|e| e.to_string())? {
                    Some(cm) => match cm.data.unwrap_or_default().get(&r.key) {
                        Some(v) => v.clone(),
                        None if optional => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {ns}/{}",
                                r.key, r.name
                            ));
                        }
                    },
                    None if optional => continue,
                    None => return Err(format!("configmap \"{}\" not found", r.name)),
                }
            } else if let Some(r) = from.secret_key_ref {
                let optional = r.optional == Some(true);
                match secrets.get_opt(&r.name).await.map_err(|e| e.to_string())? {
                    Some(s) => match s.data.unwrap_or_default().get(&r.key) {
                        Some(v) => String::from_utf8_lossy(&v.0).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in Secret {ns}/{}",
                                r.key, r.name
                            ));
                        }
                    },
                    None if optional => continue,
                    None => return Err(format!("secret \"{}\" not found", r.name)),
                }
            } else if let Some(r) = from.resource_field_ref {
                resource_field(pod, rt, &r, Some(&c.name))?
            } else {
                continue;
            }
        } else {
            String::new()
        };
        set(&mut vars, e.name, value);
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let v = vars.get(&k).cloned().unwrap_or_default();
            format!("{k}={v}")
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_fields_as_the_kubelet_reports_them() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "resources": {
                "limits": {"cpu": "250m", "memory": "64Mi"}, "requests": {"memory": "32Mi"}}}]}
        }))
        .unwrap();
        let rt = Runtime {
            allocatable: (2.0, 8.0 * 1024.0 * 1024.0 * 1024.0, 1e12),
            ..Default::default()
        };
        let get = |resource: &str, divisor: Option<&str>| {
            let sel = ResourceFieldSelector {
                container_name: None,
                resource: resource.into(),
                divisor: divisor.map(|d| Quantity(d.into())),
            };
            resource_field(&pod, &rt, &sel, Some("c"))
        };
        assert_eq!(get("limits.cpu", None).unwrap(), "1");
        assert_eq!(get("limits.cpu", Some("1m")).unwrap(), "250");
        assert_eq!(get("limits.memory", Some("1Mi")).unwrap(), "64");
        assert_eq!(get("requests.memory", None).unwrap(), "33554432");
        // An unset request is the limit; an unset limit is the node's allocatable.
        assert_eq!(get("requests.cpu", Some("1m")).unwrap(), "250");
        assert_eq!(get("limits.ephemeral-storage", Some("1G")).unwrap(), "1000");
        assert!(get("limits.gpu", None).is_err());
    }

    #[test]
    fn expansion_as_upstream() {
        let vars: BTreeMap<String, String> =
            [("A".to_string(), "1".to_string())].into_iter().collect();
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("cost $5", &vars), "cost $5");
    }

    #[test]
    fn service_variables() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-api"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        }))
        .unwrap();
        let vars: BTreeMap<String, String> = service_vars(&[svc]).into_iter().collect();
        assert_eq!(vars["WEB_API_SERVICE_HOST"], "10.96.0.20");
        assert_eq!(vars["WEB_API_SERVICE_PORT"], "80");
        assert_eq!(vars["WEB_API_SERVICE_PORT_HTTP"], "80");
        assert_eq!(vars["WEB_API_PORT"], "tcp://10.96.0.20:80");
        assert_eq!(vars["WEB_API_PORT_80_TCP_ADDR"], "10.96.0.20");
    }
}
