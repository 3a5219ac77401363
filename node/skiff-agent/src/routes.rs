//! Routes to the other nodes' pods (direct routing): for every other Node with a pod CIDR and an
//! InternalIP, a route `podCIDR via InternalIP` in the agent's namespace, kept in sync as nodes
//! come and go. The routes carry skiff's routing protocol number, so the kernel's table is the
//! record: a restarted agent finds and corrects what a previous run left.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, reflector, watcher},
};
use skiff_net::Netlink;

/// Routing protocol number marking skiff's routes (`ip route show proto 151`).
pub const PROTO: u8 = 151;

type Route = (Ipv4Addr, u8, Ipv4Addr);

fn desired(nodes: &[std::sync::Arc<Node>], me: &str) -> BTreeSet<Route> {
    let mut out = BTreeSet::new();
    for n in nodes {
        if n.name_any() == me {
            continue;
        }
        let cidr = n
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.clone())
            .unwrap_or_default();
        let ip = n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|x| x.type_ == "InternalIP"))
            .and_then(|x| x.address.parse::<Ipv4Addr>().ok());
        let parsed = cidr
            .split_once('/')
            .and_then(|(a, p)| Some((a.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)));
        if let (Some((net, prefix)), Some(ip)) = (parsed, ip) {
            out.insert((net, prefix, ip));
        }
    }
    out
}

async fn sync(net: &Netlink, want: &BTreeSet<Route>) -> Result<(), skiff_net::NetError> {
    let have: BTreeSet<Route> = net
        .routes_with_protocol(PROTO)
        .await?
        .into_iter()
        .filter_map(|(d, p, g)| g.map(|g| (d, p, g)))
        .collect();
    for (d, p, g) in want.difference(&have) {
        net.replace_route(*d, *p, *g, PROTO).await?;
        tracing::info!(route = %format!("{d}/{p} via {g}"), "route to a node's pods");
    }
    for (d, p, _) in have.difference(want) {
        if !want.iter().any(|(wd, wp, _)| wd == d && wp == p) {
            net.delete_route(*d, *p, PROTO).await?;
            tracing::info!(route = %format!("{d}/{p}"), "removed the route of a gone node");
        }
    }
    Ok(())
}

/// Keeps the routes in sync until the process ends.
pub async fn run(client: Client, me: String) -> anyhow::Result<()> {
    let net = Netlink::connect()?;
    let (reader, writer) = reflector::store();
    // Every event, InitDone included: the reflector fills its store at InitDone, so computing
    // only on object events would miss the nodes that existed when the watch started.
    let stream = watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            ev = stream.next() => {
                if ev.is_none() {
                    anyhow::bail!("the node watch ended");
                }
            }
            _ = tick.tick() => {}
        }
        let want = desired(&reader.state(), &me);
        if let Err(e) = sync(&net, &want).await {
            tracing::warn!(error = %e, "syncing node routes failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_route_per_other_node_with_a_cidr_and_address() {
        let node = |name: &str, cidr: Option<&str>, ip: &str| {
            std::sync::Arc::new(
                serde_json::from_value::<Node>(serde_json::json!({
                    "metadata": {"name": name},
                    "spec": {"podCIDR": cidr},
                    "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
                }))
                .unwrap(),
            )
        };
        let nodes = vec![
            node("me", Some("10.244.0.0/24"), "10.200.0.10"),
            node("b", Some("10.244.1.0/24"), "10.200.0.11"),
            node("c", None, "10.200.0.12"),
        ];
        let want = desired(&nodes, "me");
        assert_eq!(
            want.into_iter().collect::<Vec<_>>(),
            vec![(
                Ipv4Addr::new(10, 244, 1, 0),
                24,
                Ipv4Addr::new(10, 200, 0, 11)
            )]
        );
    }
}
