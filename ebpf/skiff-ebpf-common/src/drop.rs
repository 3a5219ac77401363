//! Stable drop reasons: one numeric code per cause, shared by the programs (which record it on
//! their single drop path), the agent's metrics and the CLI.
//!
//! Ranges, so related causes stay together as the list grows:
//! - `1..=9`    packet parsing (malformed or truncated headers)
//! - `10..=19`  service load balancing and connection tracking
//! - `20..=29`  network policy
//! - `30..=39`  pod network
//!
//! `0` is not a drop: in [`crate::metrics::MetricsKey::reason`] it means "forwarded".

/// Why the data path dropped a packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// The frame is shorter than an Ethernet header.
    MalformedEthernet = 1,
    /// The IPv4 header is truncated, or its version, header length or total length is invalid.
    MalformedIpv4 = 2,
    /// The TCP or UDP header is truncated, or its header length field is invalid.
    MalformedL4 = 3,
    /// A new connection to a Service frontend with no ready or terminating endpoint: rejected
    /// at once (TCP RST, ICMP port unreachable) rather than black-holed.
    ServiceNoBackend = 10,
    /// A backend slot names a backend id that is gone (an update raced the packet).
    ServiceBackendMissing = 11,
    /// A connection-tracking entry could not be created for a new translated flow (the map
    /// refused it, or no free NAT port was found for its tuple).
    CtCreateFailed = 12,
    /// A new connection of an isolated endpoint that no NetworkPolicy allows (or a later
    /// fragment of a datagram whose first fragment it did not allow).
    PolicyDenied = 20,
    /// A packet from a pod's interface whose source is not the pod's address (spoofed).
    SourceNotPod = 30,
}

impl DropReason {
    /// Every reason, in numeric order.
    pub const ALL: [DropReason; 8] = [
        DropReason::MalformedEthernet,
        DropReason::MalformedIpv4,
        DropReason::MalformedL4,
        DropReason::ServiceNoBackend,
        DropReason::ServiceBackendMissing,
        DropReason::CtCreateFailed,
        DropReason::PolicyDenied,
        DropReason::SourceNotPod,
    ];

    /// The numeric code stored in maps.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Decodes a code read from a map.
    pub const fn from_code(code: u8) -> Option<DropReason> {
        match code {
            1 => Some(DropReason::MalformedEthernet),
            2 => Some(DropReason::MalformedIpv4),
            3 => Some(DropReason::MalformedL4),
            10 => Some(DropReason::ServiceNoBackend),
            11 => Some(DropReason::ServiceBackendMissing),
            12 => Some(DropReason::CtCreateFailed),
            20 => Some(DropReason::PolicyDenied),
            30 => Some(DropReason::SourceNotPod),
            _ => None,
        }
    }

    /// Stable snake_case identifier, used as a metrics label.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::MalformedEthernet => "malformed_ethernet",
            DropReason::MalformedIpv4 => "malformed_ipv4",
            DropReason::MalformedL4 => "malformed_l4",
            DropReason::ServiceNoBackend => "service_no_backend",
            DropReason::ServiceBackendMissing => "service_backend_missing",
            DropReason::CtCreateFailed => "ct_create_failed",
            DropReason::PolicyDenied => "policy_denied",
            DropReason::SourceNotPod => "source_not_pod",
        }
    }

    /// One-line explanation for people reading CLI output.
    pub const fn description(self) -> &'static str {
        match self {
            DropReason::MalformedEthernet => "frame shorter than an Ethernet header",
            DropReason::MalformedIpv4 => "IPv4 header truncated or invalid",
            DropReason::MalformedL4 => "TCP/UDP header truncated or invalid",
            DropReason::ServiceNoBackend => "service has no endpoint: connection rejected",
            DropReason::ServiceBackendMissing => "backend slot names a removed backend",
            DropReason::CtCreateFailed => {
                "connection tracking entry not created (or no free NAT port)"
            }
            DropReason::PolicyDenied => "no NetworkPolicy allows this new connection",
            DropReason::SourceNotPod => "from a pod's interface with a source not the pod's",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DropReason;

    /// Codes are a stable interface: each decodes back to itself, names are unique, and a
    /// change to a published code fails here.
    #[test]
    fn codes_are_stable_and_round_trip() {
        let published = [
            (1, "malformed_ethernet"),
            (2, "malformed_ipv4"),
            (3, "malformed_l4"),
            (10, "service_no_backend"),
            (11, "service_backend_missing"),
            (12, "ct_create_failed"),
            (20, "policy_denied"),
            (30, "source_not_pod"),
        ];
        assert_eq!(DropReason::ALL.len(), published.len());
        for (r, (code, name)) in DropReason::ALL.iter().zip(published) {
            assert_eq!(r.code(), code);
            assert_eq!(r.name(), name);
            assert_eq!(DropReason::from_code(code), Some(*r));
        }
        assert_eq!(DropReason::from_code(0), None, "0 means forwarded");
    }
}
