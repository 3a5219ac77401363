//! Kubernetes API machinery shared by skiff's controllers, scheduler and node agent.
//!
//! - [`quantity`]: resource quantities (`250m`, `64Mi`) as numbers.
//! - [`labels`]: `metav1.LabelSelector` matching.
//! - [`pod`]: pod readiness, availability, activity, owners and resource requests.
//! - [`events`]: the core/v1 Events recorder, with upstream's folding of repeats.
//! - [`identity`]: security identities (`skiff.dev/v1` `SecurityIdentity`) for NetworkPolicy.
//! - [`cluster`]: well-known cluster addresses and names (the cluster DNS Service).
//! - [`client_from_kubeconfig`]: an API client from a kubeconfig file.

pub mod cluster;
pub mod events;
pub mod identity;
pub mod labels;
pub mod pod;
pub mod quantity;

use std::path::Path;

use anyhow::Context as _;
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

/// A client from a kubeconfig file (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(path)
        .with_context(|| format!("read kubeconfig {}", path.display()))?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .context("kubeconfig")?;
    Client::try_from(cfg).context("API client")
}
