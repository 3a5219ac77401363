//! skiff's controllers: level-triggered reconcilers that watch the API server and act through
//! it (never on the store directly), as kube-controller-manager's do.
//!
//! - [`namespace`]: empties a terminating namespace, then finalizes it.
//! - [`gc`]: the garbage collector: deletes dependents whose owners are gone (background
//!   cascade), deletes dependents before their owner (`foregroundDeletion`), and orphans
//!   dependents (`orphan`).
//! - [`nodeipam`]: gives each Node a /24 pod CIDR from 10.244.0.0/16.
//! - [`scheduler`]: binds pending pods to nodes through filter and score plugins, with
//!   preemption.
//! - [`replicaset`]: keeps each ReplicaSet's pods.
//! - [`deployment`]: rolls Deployments out through ReplicaSets.
//! - [`endpoints`]: EndpointSlices and Endpoints for Services with selectors.
//! - [`serviceaccount`]: a `default` ServiceAccount in every namespace.
//! - [`job`] and [`cronjob`]: run-to-completion pods, and Jobs on a schedule.
//! - [`nodelifecycle`]: silent nodes become Unknown and tainted; pods leave NoExecute taints.
//! - [`daemonset`] and [`statefulset`]: a pod per node; pods with stable identities, with
//!   their templates kept as ControllerRevisions ([`history`]).
//!
//! - [`identitygc`]: deletes security identities no pod has carried for a grace period.
//!
//! [`leader`] elects the replica that runs them. They share one list+watch per kind
//! ([`informer`]) and reconcile keys from a deduplicating, rate-limited [`queue`], as
//! kube-controller-manager's do.
//! Controllers run inside `skiff-control` with the admin kubeconfig; their errors never stop
//! them: a failed reconcile is retried with backoff.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::FutureExt;
use kube::{
    Client,
    discovery::{ApiCapabilities, ApiResource, Discovery, Scope, verbs},
};

pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod endpoints;
pub mod gc;
pub mod history;
pub mod identitygc;
pub mod informer;
pub mod job;
pub mod leader;
pub mod namespace;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod owners;
pub mod queue;
pub mod replicaset;
pub mod scheduler;
pub mod serviceaccount;
pub mod statefulset;

/// A namespaced object's key in a work queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The namespace (`""` for cluster-scoped objects).
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl Key {
    /// The key of `namespace`/`name`.
    pub fn new(namespace: &str, name: &str) -> Key {
        Key {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// The key of `obj`.
    pub fn of<K: kube::Resource>(obj: &K) -> Key {
        Key {
            namespace: obj.meta().namespace.clone().unwrap_or_default(),
            name: obj.meta().name.clone().unwrap_or_default(),
        }
    }
}

/// Backoff for failed reconciles: 800 ms doubling to 30 s (kube-runtime's default policy).
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(800u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(30))
}

pub use skiff_apimachinery::client_from_kubeconfig;

/// The served resources that can be listed and watched, with their capabilities.
pub async fn resources(client: &Client) -> Result<Vec<(ApiResource, ApiCapabilities)>> {
    let d = Discovery::new(client.clone())
        .run()
        .await
        .context("API discovery")?;
    let mut out = Vec::new();
    for g in d.groups() {
        for (ar, caps) in g.recommended_resources() {
            if caps.supports_operation(verbs::LIST) && caps.supports_operation(verbs::WATCH) {
                out.push((ar, caps));
            }
        }
    }
    Ok(out)
}

/// Whether a resource is namespaced.
pub fn namespaced(caps: &ApiCapabilities) -> bool {
    caps.scope == Scope::Namespaced
}

/// Settings of the controllers.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long a security identity no pod carries is kept ([`identitygc`]).
    pub identity_gc_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            identity_gc_grace: Duration::from_secs(300),
        }
    }
}

/// Runs every controller until the process ends. If one stops, the others are stopped too
/// and the error returned (the caller restarts the set).
pub async fn run(client: Client, options: Options) -> Result<()> {
    use informer::Informer;
    use k8s_openapi::api::{
        apps::v1 as apps, batch::v1 as batch, coordination::v1 as coordination, core::v1 as core,
        discovery::v1 as discovery,
    };

    let resources = resources(&client).await?;
    let mut set = tokio::task::JoinSet::new();
    // One list+watch per kind, shared by the controllers that read it.
    let pods = Informer::<core::Pod>::new();
    let nodes = Informer::<core::Node>::new();
    let namespaces = Informer::<core::Namespace>::new();
    let services = Informer::<core::Service>::new();
    let endpoints = Informer::<core::Endpoints>::new();
    let accounts = Informer::<core::ServiceAccount>::new();
    let slices = Informer::<discovery::EndpointSlice>::new();
    let replicasets = Informer::<apps::ReplicaSet>::new();
    let deployments = Informer::<apps::Deployment>::new();
    let jobs = Informer::<batch::Job>::new();
    let cronjobs = Informer::<batch::CronJob>::new();
    let leases = Informer::<coordination::Lease>::new();
    let daemonsets = Informer::<apps::DaemonSet>::new();
    let statefulsets = Informer::<apps::StatefulSet>::new();
    let revisions = Informer::<apps::ControllerRevision>::new();
    let claims = Informer::<core::PersistentVolumeClaim>::new();

    macro_rules! spawn_informer {
        ($i:expr, $what:literal) => {
            set.spawn(
                $i.clone()
                    .run(client.clone())
                    .map(|()| anyhow::bail!(concat!("the ", $what, " informer stopped"))),
            );
        };
    }
    macro_rules! spawn_controller {
        ($fut:expr, $what:literal) => {
            set.spawn($fut.map(|()| anyhow::bail!(concat!("the ", $what, " stopped"))));
        };
    }
    spawn_controller!(
        replicaset::run(client.clone(), replicasets.clone(), pods.clone()),
        "ReplicaSet controller"
    );
    spawn_controller!(
        deployment::run(
            client.clone(),
            deployments.clone(),
            replicasets.clone(),
            pods.clone()
        ),
        "Deployment controller"
    );
    spawn_controller!(
        scheduler::run(
            client.clone(),
            pods.clone(),
            nodes.clone(),
            namespaces.clone()
        ),
        "scheduler"
    );
    spawn_controller!(
        endpoints::run(
            client.clone(),
            services.clone(),
            pods.clone(),
            slices.clone(),
            endpoints.clone(),
            nodes.clone()
        ),
        "EndpointSlice controller"
    );
    spawn_controller!(
        serviceaccount::run(client.clone(), namespaces.clone(), accounts.clone()),
        "ServiceAccount controller"
    );
    spawn_controller!(
        job::run(client.clone(), jobs.clone(), pods.clone()),
        "Job controller"
    );
    spawn_controller!(
        cronjob::run(client.clone(), cronjobs.clone(), jobs.clone()),
        "CronJob controller"
    );
    spawn_controller!(
        nodelifecycle::run(client.clone(), nodes.clone(), leases.clone(), pods.clone()),
        "node lifecycle controller"
    );
    spawn_controller!(
        daemonset::run(
            client.clone(),
            daemonsets.clone(),
            pods.clone(),
            nodes.clone(),
            revisions.clone()
        ),
        "DaemonSet controller"
    );
    spawn_controller!(
        statefulset::run(
            client.clone(),
            statefulsets.clone(),
            pods.clone(),
            claims.clone(),
            revisions.clone()
        ),
        "StatefulSet controller"
    );
    spawn_controller!(
        identitygc::run(
            client.clone(),
            pods.clone(),
            namespaces.clone(),
            options.identity_gc_grace
        ),
        "security identity GC"
    );
    spawn_informer!(daemonsets, "DaemonSet");
    spawn_informer!(statefulsets, "StatefulSet");
    spawn_informer!(revisions, "ControllerRevision");
    spawn_informer!(claims, "PersistentVolumeClaim");
    spawn_informer!(leases, "Lease");
    spawn_informer!(pods, "Pod");
    spawn_informer!(jobs, "Job");
    spawn_informer!(cronjobs, "CronJob");
    spawn_informer!(nodes, "Node");
    spawn_informer!(namespaces, "Namespace");
    spawn_informer!(services, "Service");
    spawn_informer!(endpoints, "Endpoints");
    spawn_informer!(accounts, "ServiceAccount");
    spawn_informer!(slices, "EndpointSlice");
    spawn_informer!(replicasets, "ReplicaSet");
    spawn_informer!(deployments, "Deployment");
    {
        let (client, resources) = (client.clone(), resources.clone());
        set.spawn(async move {
            namespace::run(client, resources)
                .await
                .context("namespace controller")
        });
    }
    {
        let client = client.clone();
        set.spawn(async move { nodeipam::run(client).await.context("node IPAM controller") });
    }
    set.spawn(async move {
        gc::run(client, resources)
            .await
            .context("garbage collector")
    });
    match set.join_next().await {
        Some(Ok(Ok(()))) => anyhow::bail!("a controller stopped"),
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => Err(e).context("a controller panicked"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds() {
        assert_eq!(backoff(0), Duration::from_millis(800));
        assert_eq!(backoff(1), Duration::from_millis(1600));
        assert_eq!(backoff(10), Duration::from_secs(30));
    }
}
