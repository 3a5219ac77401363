//! Userspace side of NetworkPolicy enforcement: the identity and policy tries and the flow
//! ring buffer (layouts in `skiff_ebpf_common::policy`).

use std::net::Ipv4Addr;

use aya::maps::{
    MapData, PerCpuArray, RingBuf,
    lpm_trie::{Key, LpmTrie},
};
use skiff_ebpf_common::{
    map_names,
    policy::{FlowEvent, IpcacheValue, LOST_RATE_LIMITED, LOST_RING_FULL, PolicyKey, PolicyValue},
};

use crate::{
    DatapathError, PinDir,
    lb::{collect, remove_err, update_err},
};

/// ((address, prefix length), identity).
pub type PrefixIdentity = ((Ipv4Addr, u32), u32);
/// ((prefix length, key), policy number).
pub type AllowEntry = ((u32, PolicyKey), u32);

/// The node's policy maps, opened from their pins.
pub struct PolicyMaps {
    ipcache: PrefixTrie,
    cidr: PrefixTrie,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
}

impl std::fmt::Debug for PolicyMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyMaps").finish_non_exhaustive()
    }
}

impl PolicyMaps {
    /// Opens the maps the node's programs pinned in `pins`.
    pub fn open(pins: &PinDir) -> Result<PolicyMaps, DatapathError> {
        Ok(PolicyMaps {
            ipcache: pins.open_map(map_names::IPCACHE)?,
            cidr: pins.open_map(map_names::CIDR)?,
            policy: pins.open_map(map_names::POLICY)?,
        })
    }

    /// `addr/len` has identity `identity` (a pod /32, a node).
    pub fn set_identity(
        &mut self,
        addr: Ipv4Addr,
        len: u32,
        identity: u32,
    ) -> Result<(), DatapathError> {
        set_prefix(&mut self.ipcache, map_names::IPCACHE, addr, len, identity)
    }

    /// The `ipBlock` prefix `addr/len` has node-local identity `identity`.
    pub fn set_cidr(
        &mut self,
        addr: Ipv4Addr,
        len: u32,
        identity: u32,
    ) -> Result<(), DatapathError> {
        set_prefix(&mut self.cidr, map_names::CIDR, addr, len, identity)
    }

    /// Every ipcache entry: ((address, prefix length), identity).
    pub fn identities(&self) -> Result<Vec<PrefixIdentity>, DatapathError> {
        lpm_entries(&self.ipcache, map_names::IPCACHE)
    }

    /// Every CIDR entry.
    pub fn cidrs(&self) -> Result<Vec<PrefixIdentity>, DatapathError> {
        lpm_entries(&self.cidr, map_names::CIDR)
    }

    /// Every allow key: ((prefix length, key), policy number).
    pub fn allows(&self) -> Result<Vec<AllowEntry>, DatapathError> {
        Ok(collect(self.policy.iter(), map_names::POLICY)?
            .into_iter()
            .map(|(k, v)| ((k.prefix_len(), k.data()), v.policy))
            .collect())
    }

    /// Removes an ipcache entry (absent is fine).
    pub fn remove_identity(&mut self, addr: Ipv4Addr, len: u32) -> Result<(), DatapathError> {
        remove_prefix(&mut self.ipcache, map_names::IPCACHE, addr, len)
    }

    /// Removes a CIDR entry (absent is fine).
    pub fn remove_cidr(&mut self, addr: Ipv4Addr, len: u32) -> Result<(), DatapathError> {
        remove_prefix(&mut self.cidr, map_names::CIDR, addr, len)
    }

    /// Removes an allow key (absent is fine).
    pub fn remove_allow(&mut self, prefix_len: u32, key: PolicyKey) -> Result<(), DatapathError> {
        match self.policy.remove(&Key::new(prefix_len, key)) {
            Ok(()) => Ok(()),
            Err(e) => remove_err(map_names::POLICY, e).map_or(Ok(()), Err),
        }
    }

    /// Stores an allow key (`prefix_len`, `key`: from `PolicyKey::new`) attributed to
    /// `policy`.
    pub fn allow(
        &mut self,
        prefix_len: u32,
        key: PolicyKey,
        policy: u32,
    ) -> Result<(), DatapathError> {
        let v = PolicyValue { policy, flags: 0 };
        self.policy
            .insert(&Key::new(prefix_len, key), v, 0)
            .map_err(|e| update_err(map_names::POLICY, e))
    }
}

type PrefixTrie = LpmTrie<MapData, [u8; 4], IpcacheValue>;

fn set_prefix(
    map: &mut PrefixTrie,
    name: &'static str,
    addr: Ipv4Addr,
    len: u32,
    identity: u32,
) -> Result<(), DatapathError> {
    let v = IpcacheValue { identity, flags: 0 };
    map.insert(&Key::new(len, addr.octets()), v, 0)
        .map_err(|e| update_err(name, e))
}

fn remove_prefix(
    map: &mut PrefixTrie,
    name: &'static str,
    addr: Ipv4Addr,
    len: u32,
) -> Result<(), DatapathError> {
    match map.remove(&Key::new(len, addr.octets())) {
        Ok(()) => Ok(()),
        Err(e) => remove_err(name, e).map_or(Ok(()), Err),
    }
}

fn lpm_entries(map: &PrefixTrie, name: &'static str) -> Result<Vec<PrefixIdentity>, DatapathError> {
    Ok(collect(map.iter(), name)?
        .into_iter()
        .map(|(k, v)| ((Ipv4Addr::from(k.data()), k.prefix_len()), v.identity))
        .collect())
}

/// Flow events the programs of the node in `pins` did not write, since its maps were
/// created: (the ring had no room, the CPU's drop-event budget was spent).
pub fn flows_lost(pins: &PinDir) -> Result<(u64, u64), DatapathError> {
    let lost: PerCpuArray<MapData, u64> = pins.open_map(map_names::FLOWS_LOST)?;
    let read = |slot: u32| -> Result<u64, DatapathError> {
        let per_cpu = lost.get(&slot, 0).map_err(|source| DatapathError::Map {
            op: "read",
            map: map_names::FLOWS_LOST.to_string(),
            source: Box::new(source),
        })?;
        Ok(per_cpu.iter().sum())
    };
    // A map pinned by an older agent has one slot.
    Ok((read(LOST_RING_FULL)?, read(LOST_RATE_LIMITED).unwrap_or(0)))
}

/// The flow ring buffer, read from userspace (by one reader: the agent).
pub struct Flows {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for Flows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flows").finish_non_exhaustive()
    }
}

impl std::os::fd::AsRawFd for Flows {
    /// The ring's descriptor (readable when events are waiting): the same one, open, for as
    /// long as the `Flows` lives.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.ring.as_fd().as_raw_fd()
    }
}

impl Flows {
    /// Opens the ring buffer of the node in `pins`.
    pub fn open(pins: &PinDir) -> Result<Flows, DatapathError> {
        Ok(Flows {
            ring: pins.open_map(map_names::FLOWS)?,
        })
    }

    /// The events written since the last call.
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        self.drain_up_to(usize::MAX)
    }

    /// At most `max` of the events written since the last call, oldest first.
    pub fn drain_up_to(&mut self, max: usize) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while out.len() < max
            && let Some(item) = self.ring.next()
        {
            if item.len() >= size_of::<FlowEvent>() {
                // SAFETY: the programs write whole `FlowEvent`s (`repr(C)`, every bit pattern
                // valid); the length is checked and the read is unaligned-safe.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
            }
        }
        out
    }
}
