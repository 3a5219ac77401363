//! The node agent's cluster side (the kubelet role), used by `skiff-node`.
//!
//! - [`env`]: a container's environment (service variables, envFrom, env with valueFrom).
//! - [`machine`]: facts about this machine (capacity, identity, pressure).
//! - [`register`]: the Node object, its status, and the Lease heartbeat.
//! - [`pods`]: pods bound to this node, on containerd, with their network and status.
//! - [`routes`]: routes to the other nodes' pod CIDRs (direct routing).
//! - [`server`]: the agent's HTTPS endpoint (container logs for `kubectl logs`).
//! - [`services`]: Service load balancing (the kube-proxy role) through the eBPF maps.
//! - [`metrics`]: the Prometheus endpoint.

pub mod datapath;
pub mod dns;
pub mod env;
pub mod exec;
pub mod machine;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod probes;
pub mod qos;
pub mod register;
pub mod routes;
pub mod server;
pub mod services;
pub mod simulate;
pub mod volumes;

/// Quantities and events come from the API machinery shared with the control plane.
pub use skiff_apimachinery::{events, quantity};

use std::path::Path;

use anyhow::{Context, Result};
use kube::config::Kubeconfig;

pub use skiff_apimachinery::client_from_kubeconfig;

/// The bearer token of a kubeconfig's current user (what the agent accepts from the API server).
pub fn token_from_kubeconfig(path: &Path) -> Result<String> {
    let kc = Kubeconfig::read_from(path)
        .with_context(|| format!("read kubeconfig {}", path.display()))?;
    let user = kc
        .contexts
        .iter()
        .find(|c| Some(&c.name) == kc.current_context.as_ref())
        .and_then(|c| c.context.as_ref())
        .map(|c| c.user.clone())
        .with_context(|| format!("{}: no current context", path.display()))?;
    let token = kc
        .auth_infos
        .iter()
        .find(|a| Some(&a.name) == user.as_ref())
        .and_then(|a| a.auth_info.as_ref())
        .and_then(|a| a.token.as_ref())
        .map(|t| secrecy::ExposeSecret::expose_secret(t).to_string())
        .with_context(|| format!("{}: the current user has no token", path.display()))?;
    Ok(token)
}
