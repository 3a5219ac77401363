//! Service ClusterIP and NodePort allocation.
//!
//! Each allocated IP or port is a key of its own (`/registry/ranges/serviceips/<ip>`,
//! `/registry/ranges/servicenodeports/<port>`), created in the same store transaction as the
//! Service with an "absent" compare and deleted with it. Two concurrent creates can therefore
//! never hold the same IP or port: the second transaction fails its compare and the server
//! picks again (or answers 422 when the client asked for that exact value).

use std::net::Ipv4Addr;

use rand::Rng;
use serde_json::{Value, json};

use crate::{error::Cause, resources::ResourceDef};

/// Service CIDR (10.96.0.0/12).
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 12);
/// The `kubernetes` Service's ClusterIP (the first address of the range).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// NodePort range.
pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;
/// Addresses below this offset are only handed out on request (static band, KEP-3070), so
/// well-known IPs such as the DNS service's 10.96.0.10 stay free for those who ask for them.
const STATIC_BAND: u32 = 256;

const IP_PREFIX: &str = "/registry/ranges/serviceips/";
const PORT_PREFIX: &str = "/registry/ranges/servicenodeports/";

/// Keys to take and release with a write.
#[derive(Debug, Default)]
pub struct Changes {
    /// Keys to create (must be absent).
    pub creates: Vec<String>,
    /// Of those, the ones the client asked for (a conflict on them is the client's).
    pub requested: Vec<String>,
    /// Keys to delete.
    pub releases: Vec<String>,
}

fn range_size() -> u32 {
    1u32 << (32 - SERVICE_CIDR.1)
}

fn in_range(ip: Ipv4Addr) -> bool {
    let base = u32::from(SERVICE_CIDR.0);
    let off = u32::from(ip).wrapping_sub(base);
    off >= 1 && off < range_size() - 1
}

fn ip_key(ip: &str) -> String {
    format!("{IP_PREFIX}{ip}")
}

fn port_key(p: i64) -> String {
    format!("{PORT_PREFIX}{p}")
}

/// The Cause for a requested IP or port that another Service holds.
pub fn taken_cause(key: &str) -> Cause {
    if let Some(ip) = key.strip_prefix(IP_PREFIX) {
        Cause::invalid(
            "spec.clusterIPs",
            ip,
            &format!("failed to allocate IP {ip}: provided IP is already allocated"),
        )
    } else {
        let port = key.strip_prefix(PORT_PREFIX).unwrap_or(key);
        Cause::invalid(
            "spec.ports[0].nodePort",
            port,
            "provided port is already allocated",
        )
    }
}

/// The keys a Service holds.
pub fn held(def: &ResourceDef, obj: &Value) -> Vec<String> {
    if !def.group.is_empty() || def.kind != "Service" {
        return Vec::new();
    }
    let mut keys = Vec::new();
    for ip in obj
        .pointer("/spec/clusterIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if ip != "None" && !ip.is_empty() {
            keys.push(ip_key(ip));
        }
    }
    for p in obj
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64)
            && np != 0
        {
            let k = port_key(np);
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    if let Some(hc) = obj
        .pointer("/spec/healthCheckNodePort")
        .and_then(Value::as_i64)
        .filter(|p| *p != 0)
    {
        let k = port_key(hc);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys
}

fn random_ip() -> Ipv4Addr {
    let off = rand::rng().random_range(STATIC_BAND..range_size() - 1);
    Ipv4Addr::from(u32::from(SERVICE_CIDR.0) + off)
}

/// Fills in ClusterIP and NodePorts; records requested values. `old` carries over what an
/// update left out.
fn fill(
    obj: &mut Value,
    old: Option<&Value>,
    requested: &mut Vec<String>,
) -> Result<(), Vec<Cause>> {
    let ty = obj
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    let spec = &mut obj["spec"];
    if ty == "ExternalName" {
        if let Some(m) = spec.as_object_mut() {
            m.remove("clusterIP");
            m.remove("clusterIPs");
        }
    } else {
        let mut ip = spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if ip.is_empty()
            && let Some(o) = old
                .and_then(|o| o.pointer("/spec/clusterIP"))
                .and_then(Value::as_str)
        {
            ip = o.to_string();
        }
        let old_ip = old
            .and_then(|o| o.pointer("/spec/clusterIP"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if ip.is_empty() {
            ip = random_ip().to_string();
        } else if ip != "None" && ip != old_ip {
            let parsed: Ipv4Addr = ip.parse().map_err(|_| {
                vec![Cause::invalid(
                    "spec.clusterIPs[0]",
                    &ip,
                    "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
                )]
            })?;
            if !in_range(parsed) {
                return Err(vec![Cause::invalid(
                    "spec.clusterIPs[0]",
                    &ip,
                    &format!(
                        "failed to allocate IP {ip}: provided IP is not in the valid range. The range of valid IPs is {}/{}",
                        SERVICE_CIDR.0, SERVICE_CIDR.1
                    ),
                )]);
            }
            requested.push(ip_key(&ip));
        }
        spec["clusterIP"] = json!(ip);
        spec["clusterIPs"] = json!([ip]);
        spec["ipFamilies"] = json!(["IPv4"]);
        if spec.get("ipFamilyPolicy").is_none_or(Value::is_null) {
            spec["ipFamilyPolicy"] = json!("SingleStack");
        }
    }
    let node_ports = matches!(ty.as_str(), "NodePort" | "LoadBalancer");
    let old_ports: Vec<Value> = old
        .and_then(|o| o.pointer("/spec/ports"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let old_held: Vec<i64> = old_ports
        .iter()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_i64))
        .collect();
    let mut used: Vec<i64> = Vec::new();
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut() {
            let Some(m) = p.as_object_mut() else { continue };
            if !node_ports {
                m.remove("nodePort");
                continue;
            }
            let mut np = m.get("nodePort").and_then(Value::as_i64).unwrap_or(0);
            if np == 0 {
                // Keep the port an update left out, matched by port number and protocol.
                let same = old_ports.iter().find(|o| {
                    o.get("port") == m.get("port") && o.get("protocol") == m.get("protocol")
                });
                np = same
                    .and_then(|o| o.get("nodePort"))
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
            } else if !old_held.contains(&np) && !used.contains(&np) {
                requested.push(port_key(np));
            }
            if np == 0 {
                np = random_node_port(&used, &old_held);
            }
            used.push(np);
            m.insert("nodePort".into(), json!(np));
        }
    }
    // A LoadBalancer with externalTrafficPolicy Local gets a node port of its own for load
    // balancers' health checks (kube-proxy answers it with the node's local endpoint count).
    let local = spec.get("externalTrafficPolicy").and_then(Value::as_str) == Some("Local");
    if let Some(m) = spec.as_object_mut() {
        if ty == "LoadBalancer" && local {
            let old_hc = old
                .and_then(|o| o.pointer("/spec/healthCheckNodePort"))
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let mut hc = m
                .get("healthCheckNodePort")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if hc == 0 {
                hc = old_hc;
            } else if hc != old_hc && !old_held.contains(&hc) {
                requested.push(port_key(hc));
            }
            if hc == 0 {
                hc = random_node_port(&used, &old_held);
            }
            m.insert("healthCheckNodePort".into(), json!(hc));
        } else {
            m.remove("healthCheckNodePort");
        }
    }
    Ok(())
}

/// A random node port in the range that is neither in `used` (this Service's, so far) nor in
/// `held` (what the Service held before); ports of other Services are caught by the store
/// transaction's "absent" compare.
fn random_node_port(used: &[i64], held: &[i64]) -> i64 {
    let mut rng = rand::rng();
    loop {
        let c = i64::from(rng.random_range(NODE_PORTS));
        if !used.contains(&c) && !held.contains(&c) {
            return c;
        }
    }
}

/// Allocation for a create. Fills `obj` in.
pub fn for_create(def: &ResourceDef, obj: &mut Value) -> Result<Changes, Vec<Cause>> {
    if !def.group.is_empty() || def.kind != "Service" {
        return Ok(Changes::default());
    }
    let mut requested = Vec::new();
    fill(obj, None, &mut requested)?;
    Ok(Changes {
        creates: held(def, obj),
        requested,
        releases: Vec::new(),
    })
}

/// Allocation for an update from `old` to `new`. Fills `new` in.
pub fn for_update(def: &ResourceDef, old: &Value, new: &mut Value) -> Result<Changes, Vec<Cause>> {
    if !def.group.is_empty() || def.kind != "Service" {
        return Ok(Changes::default());
    }
    let mut requested = Vec::new();
    fill(new, Some(old), &mut requested)?;
    let before = held(def, old);
    let after = held(def, new);
    Ok(Changes {
        creates: after
            .iter()
            .filter(|k| !before.contains(k))
            .cloned()
            .collect(),
        requested,
        releases: before.into_iter().filter(|k| !after.contains(k)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    #[test]
    fn a_local_load_balancer_holds_a_health_check_node_port() {
        let def = find("", "v1", "services").expect("services");
        let mut svc = json!({"metadata": {"name": "lb", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "ports": [{"port": 80, "protocol": "TCP"}]}});
        let c = for_create(def, &mut svc).expect("allocates");
        let hc = svc["spec"]["healthCheckNodePort"]
            .as_i64()
            .expect("allocated");
        assert!(NODE_PORTS.contains(&(hc as u16)));
        assert_ne!(Some(hc), svc["spec"]["ports"][0]["nodePort"].as_i64());
        assert!(c.creates.contains(&port_key(hc)), "held like a node port");
        // Switching to Cluster releases it.
        let old = svc.clone();
        svc["spec"]["externalTrafficPolicy"] = json!("Cluster");
        let c = for_update(def, &old, &mut svc).expect("update");
        assert!(svc["spec"].get("healthCheckNodePort").is_none());
        assert!(c.releases.contains(&port_key(hc)));
    }

    #[test]
    fn cluster_ips_come_from_the_dynamic_band_and_node_ports_from_the_range() {
        let def = find("", "v1", "services").unwrap();
        let mut svc = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}});
        let c = for_create(def, &mut svc).unwrap();
        let ip: Ipv4Addr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
        assert!(in_range(ip));
        assert!(u32::from(ip) - u32::from(SERVICE_CIDR.0) >= STATIC_BAND);
        let p0 = svc["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
        let p1 = svc["spec"]["ports"][1]["nodePort"].as_i64().unwrap();
        assert!((30000..=32767).contains(&p0) && p0 != p1);
        assert_eq!(c.creates.len(), 3);
        assert!(c.requested.is_empty());
    }

    #[test]
    fn requested_values_are_checked() {
        let def = find("", "v1", "services").unwrap();
        let mut svc = json!({"spec": {"clusterIP": "192.168.0.1", "ports": [{"port": 80}]}});
        let err = for_create(def, &mut svc).unwrap_err();
        assert!(err[0].message.contains("not in the valid range"));
        let mut svc = json!({"spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}});
        let c = for_create(def, &mut svc).unwrap();
        assert_eq!(c.requested, vec!["/registry/ranges/serviceips/10.96.0.10"]);
    }

    #[test]
    fn updates_keep_and_release() {
        let def = find("", "v1", "services").unwrap();
        let mut old =
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        for_create(def, &mut old).unwrap();
        let mut new =
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        let c = for_update(def, &old, &mut new).unwrap();
        assert_eq!(new["spec"], old["spec"]);
        assert!(c.creates.is_empty() && c.releases.is_empty());
        let mut cip =
            json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80, "protocol": "TCP"}]}});
        let c = for_update(def, &old, &mut cip).unwrap();
        assert_eq!(c.releases.len(), 1);
        assert!(cip["spec"]["ports"][0].get("nodePort").is_none());
    }
}
