//! A pod's network, the CNI role over netlink (Calico's layout, no bridge):
//!
//! - the pod's network namespace, bind-mounted under the agent's run directory;
//! - a veth pair: the host side in the node's namespace, named from the pod
//!   (`sk` + 11 hex digits of a hash of its uid), and `eth0` in the pod;
//! - in the pod: `lo` and `eth0` up, the pod IP as a /32, a link route to the gateway
//!   169.254.1.1, a permanent neighbour entry mapping it to the host side's MAC (as Cilium does:
//!   no ARP for the gateway, and no dependence on the node's own routes), and the default route
//!   through it (on-link);
//! - on the node: a /32 route to the pod IP through the host side, IPv4 forwarding on, proxy ARP
//!   on the host side (for pods that ARP anyway, e.g. after flushing their neighbours).
//!
//! Setup is idempotent (a half-built pod network is torn down and built again), teardown too.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use crate::{NetError, NetNs, Netlink};

/// The pod's gateway: a link-local address the host side answers for by proxy ARP.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's interface name.
pub const POD_IF: &str = "eth0";

/// Host-side interface name of a pod (≤ 15 characters, stable across agent restarts).
pub fn host_if(pod_uid: &str) -> String {
    // FNV-1a: stable across Rust releases (unlike `DefaultHasher`'s guarantees).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pod_uid.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("sk{:011x}", h & 0xfff_ffff_ffff)
}

fn peer_tmp_if(pod_uid: &str) -> String {
    format!("tp{}", &host_if(pod_uid)[2..])
}

/// The name of a pod's network namespace.
pub fn netns_name(pod_uid: &str) -> String {
    format!("pod-{pod_uid}")
}

fn sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(path, value).map_err(|e| NetError::os("write sysctl", path, e))
}

/// A pod's network, as built.
#[derive(Clone, Debug)]
pub struct PodNetwork {
    /// The pod's namespace (path to pass to the runtime).
    pub netns: PathBuf,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The host-side interface.
    pub host_if: String,
    /// The pod interface's MAC (`None` when an adopted pod's could not be read: it then gets
    /// no same-node delivery, and its network is kept).
    pub mac: Option<[u8; 6]>,
    /// The host-side interface's MAC (the pod's gateway).
    pub host_mac: [u8; 6],
}

/// Builds the network of pod `uid` with address `ip`. `node` is a netlink connection in the
/// node's namespace, `node_ns` that namespace (`None`: the agent's own), `netns_dir` where pod
/// namespaces are bind-mounted. Needs a Tokio runtime.
pub async fn setup(
    node: &Netlink,
    node_ns: Option<&NetNs>,
    netns_dir: &Path,
    uid: &str,
    ip: Ipv4Addr,
) -> Result<PodNetwork, NetError> {
    // Whatever a previous attempt left is rebuilt from scratch.
    teardown(node, netns_dir, uid).await?;
    let ns = NetNs::create(netns_dir, &netns_name(uid))?;
    let host = host_if(uid);
    let tmp = peer_tmp_if(uid);
    let built = async {
        node.create_veth(&host, &tmp).await?;
        node.move_to(&tmp, &ns).await?;
        let pod = Netlink::connect_in(&ns)?;
        pod.rename(&tmp, POD_IF).await?;
        pod.set_up("lo").await?;
        pod.set_up(POD_IF).await?;
        pod.add_address(POD_IF, ip.into(), 32).await?;
        pod.add_route(GATEWAY, 32, POD_IF, None).await?;
        let host_mac = node.mac(&host).await?;
        pod.add_neighbour(POD_IF, GATEWAY, host_mac).await?;
        pod.add_route(Ipv4Addr::UNSPECIFIED, 0, POD_IF, Some(GATEWAY))
            .await?;
        let host_cfg = {
            let host = host.clone();
            move || -> Result<(), NetError> {
                sysctl(&format!("/proc/sys/net/ipv4/conf/{host}/proxy_arp"), "1")?;
                sysctl("/proc/sys/net/ipv4/ip_forward", "1")
            }
        };
        match node_ns {
            Some(n) => n.run(host_cfg)??,
            None => host_cfg()?,
        }
        node.set_up(&host).await?;
        node.add_route(ip, 32, &host, None).await?;
        Ok::<_, NetError>((Some(pod.mac(POD_IF).await?), host_mac))
    }
    .await;
    let netns = ns.path().to_path_buf();
    let (mac, host_mac) = match built {
        Ok(macs) => macs,
        Err(e) => {
            drop(ns);
            let _ = teardown(node, netns_dir, uid).await;
            return Err(e);
        }
    };
    Ok(PodNetwork {
        netns,
        ip,
        host_if: host,
        mac,
        host_mac,
    })
}

/// The network of pod `uid` as an earlier run of the agent left it, when it is whole (the
/// namespace is mounted and the host interface exists): its running containers keep it. The
/// host route to `ip` is put back if it went missing.
pub async fn adopt(
    node: &Netlink,
    netns_dir: &Path,
    uid: &str,
    ip: Ipv4Addr,
) -> Option<PodNetwork> {
    let netns = netns_dir.join(netns_name(uid));
    let host = host_if(uid);
    if !netns.exists() {
        return None;
    }
    let host_mac = node.mac(&host).await.ok()?;
    // Not being able to read the pod's MAC is no reason to rebuild the network of a running
    // pod.
    let mac = match NetNs::open(&netns) {
        Ok(ns) => match Netlink::connect_in(&ns) {
            Ok(nl) => nl.mac(POD_IF).await.ok(),
            Err(_) => None,
        },
        Err(_) => None,
    };
    // Already there is the usual case; a real failure shows when the pod is unreachable.
    let _ = node.add_route(ip, 32, &host, None).await;
    Some(PodNetwork {
        netns,
        ip,
        host_if: host,
        mac,
        host_mac,
    })
}

/// Removes the network of pod `uid`: the veth pair (its route goes with it) and the namespace.
/// Missing parts are fine.
pub async fn teardown(node: &Netlink, netns_dir: &Path, uid: &str) -> Result<(), NetError> {
    node.delete_link(&host_if(uid)).await?;
    node.delete_link(&peer_tmp_if(uid)).await?;
    let path = netns_dir.join(netns_name(uid));
    if path.exists() {
        crate::netns::remove_path(&path)?;
    }
    Ok(())
}

/// Pod uids with a namespace under `netns_dir` (to collect orphans at start).
pub fn existing(netns_dir: &Path) -> Vec<String> {
    std::fs::read_dir(netns_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("pod-")
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_and_are_stable() {
        let a = host_if("0d9a7c8e-4f7e-4a8b-9a51-2f1b3c4d5e6f");
        assert_eq!(a.len(), 13);
        assert_eq!(a, host_if("0d9a7c8e-4f7e-4a8b-9a51-2f1b3c4d5e6f"));
        assert_ne!(a, host_if("another"));
        assert!(peer_tmp_if("x").len() <= 15);
    }
}
