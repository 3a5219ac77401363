//! The eBPF objects embedded at build time (see `build.rs`).

use crate::DatapathError;

/// An 8-byte aligned byte array, as the ELF parser expects.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

static FROM_POD: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/from-pod.o")));
static FROM_NETDEV: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/from-netdev.o")));
static TO_POD: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/to-pod.o")));
static XDP_UPLINK: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/xdp-uplink.o")));

/// One of skiff's programs; each is its own object with one program in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProgramKind {
    /// TC ingress on a pod's host-side veth (packets leaving the pod).
    FromPod,
    /// TC egress on a pod's host-side veth (packets entering the pod).
    ToPod,
    /// TC ingress on the node's uplink (NodePort and external IPs from outside).
    FromNetdev,
    /// XDP on the node's uplink.
    XdpUplink,
}

impl ProgramKind {
    /// Every program, in load order.
    pub const ALL: [ProgramKind; 4] = [
        ProgramKind::FromPod,
        ProgramKind::ToPod,
        ProgramKind::FromNetdev,
        ProgramKind::XdpUplink,
    ];

    /// Object (file) name.
    pub const fn object_name(self) -> &'static str {
        match self {
            ProgramKind::FromPod => "from-pod",
            ProgramKind::ToPod => "to-pod",
            ProgramKind::FromNetdev => "from-netdev",
            ProgramKind::XdpUplink => "xdp-uplink",
        }
    }

    /// Name of the program inside the object (its function name).
    pub const fn program_name(self) -> &'static str {
        match self {
            ProgramKind::FromPod => "from_pod",
            ProgramKind::ToPod => "to_pod",
            ProgramKind::FromNetdev => "from_netdev",
            ProgramKind::XdpUplink => "xdp_uplink",
        }
    }

    /// The embedded ELF bytes.
    pub fn object(self) -> Result<&'static [u8], DatapathError> {
        let bytes: &'static [u8] = match self {
            ProgramKind::FromPod => &FROM_POD.0,
            ProgramKind::ToPod => &TO_POD.0,
            ProgramKind::FromNetdev => &FROM_NETDEV.0,
            ProgramKind::XdpUplink => &XDP_UPLINK.0,
        };
        if bytes.is_empty() {
            return Err(DatapathError::ObjectMissing {
                object: self.object_name(),
            });
        }
        Ok(bytes)
    }
}
