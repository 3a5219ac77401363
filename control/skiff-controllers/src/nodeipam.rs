//! Node IPAM: gives every Node a /24 `podCIDR` from the cluster CIDR (10.244.0.0/16), the
//! lowest free one, once (it never changes after). Node agents hand out pod IPs from it.
//!
//! Allocation is serialised inside the controller and remembers what it handed out before the
//! watch caught up, so two nodes registering together never get the same range. With the /16
//! split into /24s there are 256 ranges; a node beyond that gets none, and an event says so (as
//! upstream's range allocator does).

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{Controller, controller::Action, reflector::Store, watcher},
};
use serde_json::json;

/// The cluster CIDR.
pub const CLUSTER_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 16);
/// Prefix length of each node's range.
pub const NODE_PREFIX: u8 = 24;

/// The `i`th node range (`10.244.i.0/24`).
pub fn range(i: u32) -> String {
    let base = u32::from(CLUSTER_CIDR.0) + (i << (32 - NODE_PREFIX));
    format!("{}/{NODE_PREFIX}", Ipv4Addr::from(base))
}

/// How many node ranges the cluster CIDR holds.
pub fn capacity() -> u32 {
    1 << (NODE_PREFIX - CLUSTER_CIDR.1)
}

/// The lowest range index not in `used`.
pub fn lowest_free(used: &HashSet<String>) -> Option<u32> {
    (0..capacity()).find(|i| !used.contains(&range(*i)))
}

struct Ctx {
    client: Client,
    nodes: Store<Node>,
    /// Ranges handed out that the watch may not show yet.
    pending: Mutex<HashSet<String>>,
    lock: tokio::sync::Mutex<()>,
}

/// A reconcile failure (retried).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(#[from] kube::Error);

async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_ref())
        .is_some_and(|c| !c.is_empty())
    {
        return Ok(Action::await_change());
    }
    let _guard = ctx.lock.lock().await;
    let mut used: HashSet<String> = ctx
        .nodes
        .state()
        .iter()
        .filter_map(|n| n.spec.as_ref().and_then(|s| s.pod_cidr.clone()))
        .collect();
    used.extend(
        ctx.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned(),
    );
    let Some(i) = lowest_free(&used) else {
        tracing::warn!(node = %node.name_any(), "no pod CIDR left in {}/{}", CLUSTER_CIDR.0, CLUSTER_CIDR.1);
        return Ok(Action::await_change());
    };
    let cidr = range(i);
    let api: Api<Node> = Api::all(ctx.client.clone());
    // Read the node live: a trigger queued before an earlier assignment landed must not
    // assign a second range. The resourceVersion makes the patch conditional on that read.
    let Some(live) = api.get_opt(&node.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if live
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_ref())
        .is_some_and(|c| !c.is_empty())
    {
        return Ok(Action::await_change());
    }
    let patch = json!({
        "metadata": {"resourceVersion": live.resource_version()},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    });
    api.patch(
        &node.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    ctx.pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(cidr.clone());
    tracing::info!(node = %node.name_any(), pod_cidr = %cidr, "assigned pod CIDR");
    Ok(Action::await_change())
}

fn error_policy(node: Arc<Node>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(node = %node.name_any(), error = %e, "pod CIDR assignment failed; retrying");
    Action::requeue(crate::backoff(1))
}

/// Runs the controller until the process ends.
pub async fn run(client: Client) -> anyhow::Result<()> {
    let controller = Controller::new(Api::<Node>::all(client.clone()), watcher::Config::default());
    let ctx = Arc::new(Ctx {
        client,
        nodes: controller.store(),
        pending: Mutex::new(HashSet::new()),
        lock: tokio::sync::Mutex::new(()),
    });
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_the_24s_of_the_cluster_cidr() {
        assert_eq!(range(0), "10.244.0.0/24");
        assert_eq!(range(255), "10.244.255.0/24");
        assert_eq!(capacity(), 256);
        let used: HashSet<String> = [range(0), range(2)].into();
        assert_eq!(lowest_free(&used), Some(1));
        let all: HashSet<String> = (0..256).map(range).collect();
        assert_eq!(lowest_free(&all), None);
    }
}
