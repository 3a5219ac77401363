//! Where in the data path a program runs. Stored in map keys; values are stable.

/// An attach point of the skiff data path.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// TC ingress on a pod's host-side veth: packets leaving the pod.
    FromPod = 1,
    /// TC egress on a pod's host-side veth: packets entering the pod.
    ToPod = 2,
    /// TC ingress on the node's uplink: packets arriving from the network.
    FromNetdev = 3,
    /// XDP on the node's uplink: the earliest point a packet from the network is seen.
    XdpUplink = 4,
}

impl Hook {
    /// Every hook, in numeric order.
    pub const ALL: [Hook; 4] = [
        Hook::FromPod,
        Hook::ToPod,
        Hook::FromNetdev,
        Hook::XdpUplink,
    ];

    /// Decodes a value read from a map.
    pub const fn from_u8(v: u8) -> Option<Hook> {
        match v {
            1 => Some(Hook::FromPod),
            2 => Some(Hook::ToPod),
            3 => Some(Hook::FromNetdev),
            4 => Some(Hook::XdpUplink),
            _ => None,
        }
    }

    /// Stable lower-case name, used as a metrics label and in CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::FromPod => "from-pod",
            Hook::ToPod => "to-pod",
            Hook::FromNetdev => "from-netdev",
            Hook::XdpUplink => "xdp-uplink",
        }
    }
}
