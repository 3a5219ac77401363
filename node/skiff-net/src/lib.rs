//! Pod networking primitives, done directly over netlink (the CNI role without a CNI binary):
//! network namespaces that `ip netns` also sees, a small typed layer over `rtnetlink` for
//! links, addresses and routes, durable pod IP allocation ([`ipam`]) and the pod network itself
//! ([`pod`]).
//!
//! Every privileged call lives in this crate, so the rest of the agent reaches the kernel's
//! network configuration through one seam.

pub mod ipam;
pub mod link;
pub mod netns;
pub mod pod;

pub use link::Netlink;
pub use netns::NetNs;

use std::io;

/// A network configuration call failed. Each variant names the operation.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A namespace operation (unshare, setns, mount) failed.
    #[error("{op} {target}: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// What it was applied to (path or name).
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A netlink request failed.
    #[error("netlink {op} {target}: {source}")]
    Netlink {
        /// The operation.
        op: &'static str,
        /// What it was applied to.
        target: String,
        /// rtnetlink's error (carries the kernel's errno).
        #[source]
        source: rtnetlink::Error,
    },
    /// A link that should exist does not.
    #[error("no such link {0}")]
    NoSuchLink(String),
    /// A request that cannot be met (a malformed CIDR, an exhausted range).
    #[error("{0}")]
    Invalid(String),
}

impl NetError {
    pub(crate) fn os(op: &'static str, target: impl Into<String>, e: impl Into<io::Error>) -> Self {
        NetError::Os {
            op,
            target: target.into(),
            source: e.into(),
        }
    }
}
