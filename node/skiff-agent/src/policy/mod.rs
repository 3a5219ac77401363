//! NetworkPolicy, enforced by the eBPF data path (issue: identity-based enforcement with drop
//! attribution and a flow log). [`rules`] holds the semantics: an endpoint's rules from the
//! policies, resolved into the keys the data path looks up; [`map_key`] lays a key out as
//! `skiff_policy` stores it (`skiff_ebpf_common::policy`).

pub mod desired;
pub mod flows;
pub mod gate;
pub mod rules;
pub mod sync;

use skiff_ebpf_common::policy::{DIR_EGRESS, DIR_INGRESS, PolicyKey};

use rules::{Direction, Entry};

/// The `skiff_policy` key of `entry` for `endpoint` (its policy number) in `direction`, with
/// its prefix length.
pub fn map_key(endpoint: u16, direction: Direction, entry: &Entry) -> (u32, PolicyKey) {
    let dir = match direction {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    };
    PolicyKey::new(
        endpoint,
        dir,
        entry.identity,
        entry.proto,
        entry.port,
        entry.port_bits,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_ebpf_common::policy::{PREFIX_IDENTITY, PREFIX_PORT_BASE, PREFIX_PROTO};

    #[test]
    fn map_keys_carry_the_entry_prefix() {
        let e = |proto, port, port_bits| Entry {
            identity: 300,
            proto,
            port,
            port_bits,
        };
        for (entry, len) in [
            (e(0, 0, 0), PREFIX_IDENTITY),
            (e(6, 0, 0), PREFIX_PROTO),
            (e(6, 8000, 13), PREFIX_PORT_BASE + 13),
            (e(17, 53, 16), PREFIX_PORT_BASE + 16),
        ] {
            let (prefix_len, k) = map_key(7, Direction::Egress, &entry);
            assert_eq!(prefix_len, len, "{entry:?}");
            assert_eq!(k.direction, DIR_EGRESS);
            assert_eq!(u16::from_be(k.endpoint), 7);
            assert_eq!(u32::from_be(k.identity), 300);
            assert_eq!(u16::from_be(k.port), entry.port);
        }
    }
}
