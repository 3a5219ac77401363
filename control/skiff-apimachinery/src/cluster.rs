//! Well-known cluster addresses and names: the API server creates them, the node agent serves
//! them and hands them to pods. One definition so the two cannot disagree.

use std::net::Ipv4Addr;

/// The cluster DNS Service's ClusterIP (kubeadm's and k3s's choice in 10.96.0.0/12): what
/// pods' `/etc/resolv.conf` names.
pub const CLUSTER_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The cluster DNS Service's namespace.
pub const DNS_SERVICE_NAMESPACE: &str = "kube-system";
/// The cluster DNS Service's name (upstream's, so tools that look for it find it).
pub const DNS_SERVICE_NAME: &str = "kube-dns";
