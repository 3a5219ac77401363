//! The node agent's cluster side (the kubelet role), used by `skiff-node`.
//!
//! - [`machine`]: facts about this machine (capacity, identity, pressure).
//! - [`register`]: the Node object, its status, and the Lease heartbeat.
//! - [`pods`]: pods bound to this node, on containerd, with their network and status.

pub mod machine;
pub mod pods;
pub mod register;

use std::path::Path;

use anyhow::{Context, Result};
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

/// A client from a kubeconfig file (the node kubeconfig `skiff-control` writes, or any other).
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path)
        .with_context(|| format!("read kubeconfig {}", path.display()))?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .context("kubeconfig")?;
    Client::try_from(cfg).context("API client")
}
