//! A typed layer over `rtnetlink` for the link, address and route calls skiff makes.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
};

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::{NetError, NetNs};

/// An rtnetlink connection bound to one network namespace.
#[derive(Debug)]
pub struct Netlink {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

fn nl(op: &'static str, target: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let target = target.into();
    move |source| NetError::Netlink { op, target, source }
}

impl Netlink {
    /// Connects in the calling thread's namespace. Needs a Tokio runtime.
    pub fn connect() -> Result<Netlink, NetError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| NetError::os("open netlink socket", "", e))?;
        Ok(Netlink {
            handle,
            conn: tokio::spawn(conn),
        })
    }

    /// Connects inside `ns`: the socket is opened there, so every request applies there.
    /// Needs a Tokio runtime.
    pub fn connect_in(ns: &NetNs) -> Result<Netlink, NetError> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = ns.run(move || {
            let _guard = rt.enter();
            rtnetlink::new_connection()
        })??;
        Ok(Netlink {
            handle,
            conn: tokio::spawn(conn),
        })
    }

    /// The link called `name`, if there is one.
    pub async fn link(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            // The kernel answers ENODEV for a name that does not exist.
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -(nix::errno::Errno::ENODEV as i32) =>
            {
                Ok(None)
            }
            Err(e) => Err(nl("get link", name)(e)),
        }
    }

    /// The interface index of `name`.
    pub async fn index(&self, name: &str) -> Result<u32, NetError> {
        self.link(name)
            .await?
            .map(|l| l.header.index)
            .ok_or_else(|| NetError::NoSuchLink(name.to_string()))
    }

    /// The MAC address of `name`.
    pub async fn mac(&self, name: &str) -> Result<[u8; 6], NetError> {
        let link = self
            .link(name)
            .await?
            .ok_or_else(|| NetError::NoSuchLink(name.to_string()))?;
        link.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(mac) if mac.len() == 6 => {
                    Some([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]])
                }
                _ => None,
            })
            .ok_or_else(|| NetError::NoSuchLink(format!("{name} (no MAC address)")))
    }

    /// Whether `name` is one end of a veth pair.
    pub async fn is_veth(&self, name: &str) -> Result<bool, NetError> {
        let link = self
            .link(name)
            .await?
            .ok_or_else(|| NetError::NoSuchLink(name.to_string()))?;
        Ok(link.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::LinkInfo(infos)
                if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
        }))
    }

    /// Creates the veth pair `name` <-> `peer`, both in this namespace, both down.
    pub async fn create_veth(&self, name: &str, peer: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).build())
            .execute()
            .await
            .map_err(nl("create veth", format!("{name}/{peer}")))
    }

    /// Moves link `name` into `ns`.
    pub async fn move_to(&self, name: &str, ns: &NetNs) -> Result<(), NetError> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(ns.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("move link to namespace", name))
    }

    /// Sets link `name` up.
    pub async fn set_up(&self, name: &str) -> Result<(), NetError> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl("set link up", name))
    }

    /// Sets link `name` down.
    pub async fn set_down(&self, name: &str) -> Result<(), NetError> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(nl("set link down", name))
    }

    /// Adds `addr/prefix` to link `name`.
    pub async fn add_address(&self, name: &str, addr: IpAddr, prefix: u8) -> Result<(), NetError> {
        let index = self.index(name).await?;
        self.handle
            .address()
            .add(index, addr, prefix)
            .execute()
            .await
            .map_err(nl("add address", format!("{addr}/{prefix} on {name}")))
    }

    /// Renames link `name` (which must be down) to `new`.
    pub async fn rename(&self, name: &str, new: &str) -> Result<(), NetError> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).name(new).build())
            .execute()
            .await
            .map_err(nl("rename link", format!("{name} -> {new}")))
    }

    /// Adds a route to `dest/prefix` out of link `dev`: through `gateway` (reached on-link, so
    /// it needs no address of its own on the link) or, without one, directly (scope link).
    pub async fn add_route(
        &self,
        dest: Ipv4Addr,
        prefix: u8,
        dev: &str,
        gateway: Option<Ipv4Addr>,
    ) -> Result<(), NetError> {
        let index = self.index(dev).await?;
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest, prefix)
            .output_interface(index);
        b = match gateway {
            Some(gw) => b.gateway(gw).onlink(),
            None => b.scope(RouteScope::Link),
        };
        self.handle
            .route()
            .add(b.build())
            .execute()
            .await
            .map_err(nl("add route", format!("{dest}/{prefix} dev {dev}")))
    }

    /// Adds (or replaces) a permanent neighbour entry: `ip` is at `mac` on link `dev`.
    pub async fn add_neighbour(
        &self,
        dev: &str,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), NetError> {
        let index = self.index(dev).await?;
        self.handle
            .neighbours()
            .add(index, ip.into())
            .link_layer_address(&mac)
            .state(netlink_packet_route::neighbour::NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl("add neighbour", format!("{ip} on {dev}")))
    }

    /// Creates bridge `name` (up).
    pub async fn create_bridge(&self, name: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(nl("create bridge", name))
    }

    /// Attaches link `name` to bridge `bridge`.
    pub async fn set_master(&self, name: &str, bridge: &str) -> Result<(), NetError> {
        let (index, master) = (self.index(name).await?, self.index(bridge).await?);
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).controller(master).build())
            .execute()
            .await
            .map_err(nl("attach to bridge", format!("{name} -> {bridge}")))
    }

    /// Adds or replaces the route to `dest/prefix` via `gateway`, tagged with `protocol` so its
    /// owner can find it again (as routing daemons tag theirs).
    pub async fn replace_route(
        &self,
        dest: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
        protocol: u8,
    ) -> Result<(), NetError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest, prefix)
            .gateway(gateway)
            .protocol(RouteProtocol::from(protocol))
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl(
                "replace route",
                format!("{dest}/{prefix} via {gateway}"),
            ))
    }

    /// IPv4 routes tagged with `protocol`: destination, prefix length, gateway.
    pub async fn routes_with_protocol(
        &self,
        protocol: u8,
    ) -> Result<Vec<(Ipv4Addr, u8, Option<Ipv4Addr>)>, NetError> {
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut out = Vec::new();
        while let Some(r) = routes.try_next().await.map_err(nl("list routes", ""))? {
            if r.header.protocol != RouteProtocol::from(protocol) {
                continue;
            }
            let mut dest = None;
            let mut gw = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dest = Some(*ip),
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
                    _ => {}
                }
            }
            if let Some(d) = dest {
                out.push((d, r.header.destination_prefix_length, gw));
            }
        }
        Ok(out)
    }

    /// Deletes the route to `dest/prefix` tagged with `protocol` (absent is fine).
    pub async fn delete_route(
        &self,
        dest: Ipv4Addr,
        prefix: u8,
        protocol: u8,
    ) -> Result<(), NetError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest, prefix)
            .protocol(RouteProtocol::from(protocol))
            .build();
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -(nix::errno::Errno::ESRCH as i32) =>
            {
                Ok(())
            }
            Err(e) => Err(nl("delete route", format!("{dest}/{prefix}"))(e)),
        }
    }

    /// Deletes link `name` (for a veth, its peer goes too). Missing links are not an error.
    pub async fn delete_link(&self, name: &str) -> Result<(), NetError> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        self.handle
            .link()
            .del(link.header.index)
            .execute()
            .await
            .map_err(nl("delete link", name))
    }
}

impl From<std::io::Error> for NetError {
    fn from(e: std::io::Error) -> Self {
        NetError::os("netlink", "", e)
    }
}
