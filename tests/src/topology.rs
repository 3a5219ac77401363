//! A two-namespace test topology: a "node" namespace and a "peer" namespace joined by a veth
//! pair (`veth-node` <-> `veth-peer`, 10.244.255.1/30 <-> .2/30). Both namespaces are unique
//! to the test; the veth is created inside them, so nothing touches the host's namespace.
//! Dropping the topology deletes both namespaces (and with them the veth), also on panic.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::Path,
    time::Duration,
};

use skiff_net::{NetNs, Netlink, netns::DEFAULT_NETNS_DIR};

/// Interface name on the node side.
pub const NODE_IF: &str = "veth-node";
/// Interface name on the peer side.
pub const PEER_IF: &str = "veth-peer";
/// Address of the node side.
pub const NODE_IP: [u8; 4] = [10, 244, 255, 1];
/// Address of the peer side.
pub const PEER_IP: [u8; 4] = [10, 244, 255, 2];

/// See the module docs.
#[derive(Debug)]
pub struct Topology {
    /// The namespace standing in for a node.
    pub node: NetNs,
    /// The namespace standing in for a host on the node's network.
    pub peer: NetNs,
    /// MAC address of `veth-node`.
    pub node_mac: [u8; 6],
    /// Name of the node namespace (as `ip netns` lists it).
    pub node_name: String,
}

impl Topology {
    /// Builds the topology; panics (after cleaning up) if any step fails.
    pub fn new() -> Topology {
        let dir = Path::new(DEFAULT_NETNS_DIR);
        let node_name = crate::unique_name("skiff-t-node");
        let node = NetNs::create(dir, &node_name).expect("create node netns");
        let peer = match NetNs::create(dir, &crate::unique_name("skiff-t-peer")) {
            Ok(p) => p,
            Err(e) => {
                let _ = node.delete();
                panic!("create peer netns: {e}");
            }
        };
        let mut topo = Topology {
            node,
            peer,
            node_mac: [0; 6],
            node_name,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        topo.node_mac = rt
            .block_on(async {
                let node_nl = Netlink::connect_in(&topo.node)?;
                node_nl.create_veth(NODE_IF, PEER_IF).await?;
                node_nl.move_to(PEER_IF, &topo.peer).await?;
                node_nl
                    .add_address(NODE_IF, Ipv4Addr::from(NODE_IP).into(), 30)
                    .await?;
                node_nl.set_up(NODE_IF).await?;
                node_nl.set_up("lo").await?;
                let peer_nl = Netlink::connect_in(&topo.peer)?;
                peer_nl
                    .add_address(PEER_IF, Ipv4Addr::from(PEER_IP).into(), 30)
                    .await?;
                peer_nl.set_up(PEER_IF).await?;
                peer_nl.set_up("lo").await?;
                node_nl.mac(NODE_IF).await
            })
            .expect("set up veth pair between test namespaces");
        topo
    }

    /// Binds a UDP socket inside the node namespace at `NODE_IP:port`.
    pub fn bind_udp_on_node(&self, port: u16) -> UdpSocket {
        let sock = self
            .node
            .run(|| UdpSocket::bind(SocketAddrV4::new(NODE_IP.into(), port)))
            .expect("enter node netns")
            .expect("bind UDP in node netns");
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("set timeout");
        sock
    }

    /// Sends `count` UDP datagrams from the peer namespace to `NODE_IP:port`.
    pub fn send_udp_from_peer(&self, port: u16, count: usize, payload: &[u8]) {
        let sock = self
            .peer
            .run(|| UdpSocket::bind(SocketAddrV4::new(PEER_IP.into(), 0)))
            .expect("enter peer netns")
            .expect("bind UDP in peer netns");
        for _ in 0..count {
            sock.send_to(payload, SocketAddrV4::new(NODE_IP.into(), port))
                .expect("send UDP");
        }
    }

    /// Sends a raw Ethernet frame out of `veth-peer` (it arrives on `veth-node`).
    pub fn send_raw_from_peer(&self, frame: &[u8]) {
        self.peer
            .run(|| send_raw(PEER_IF, frame))
            .expect("enter peer netns")
            .expect("send raw frame");
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.node, &self.peer] {
            if let Err(e) = skiff_net::netns::remove_path(ns.path()) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Sends one Ethernet frame on `iface` through an AF_PACKET socket (calling thread's netns).
fn send_raw(iface: &str, frame: &[u8]) -> io::Result<()> {
    let ifindex = nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)?;
    // SAFETY: plain socket(2) call with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created socket we own; OwnedFd closes it exactly once.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is a plain C struct for which all-zero bytes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` is valid for `frame.len()` bytes and `addr` is a fully initialised
    // sockaddr_ll whose size we pass; the fd is open for the duration of the call.
    let sent = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
