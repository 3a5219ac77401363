//! Userspace side of `skiff_endpoints`, the pods of this node that the programs deliver to
//! directly (layout in `skiff_ebpf_common::endpoint`).

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData};
use skiff_ebpf_common::{endpoint::EndpointInfo, map_names};

use crate::{
    DatapathError, PinDir,
    lb::{collect, remove_err, update_err},
};

/// The endpoint map of one node, opened from its pin.
pub struct EndpointMap {
    map: HashMap<MapData, u32, EndpointInfo>,
}

impl std::fmt::Debug for EndpointMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointMap").finish_non_exhaustive()
    }
}

fn key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl EndpointMap {
    /// Opens the map the node's programs pinned in `pins`.
    pub fn open(pins: &PinDir) -> Result<EndpointMap, DatapathError> {
        Ok(EndpointMap {
            map: pins.open_map(map_names::ENDPOINTS)?,
        })
    }

    /// Records the pod at `ip`.
    pub fn set(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<(), DatapathError> {
        self.map
            .insert(key(ip), info, 0)
            .map_err(|e| update_err(map_names::ENDPOINTS, e))
    }

    /// Changes the entry of the pod at `ip` if it is still there (`BPF_EXIST`: a pod removed
    /// meanwhile is not brought back); whether it was.
    pub fn update_existing(
        &mut self,
        ip: Ipv4Addr,
        info: EndpointInfo,
    ) -> Result<bool, DatapathError> {
        const BPF_EXIST: u64 = 2;
        match self.map.insert(key(ip), info, BPF_EXIST) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(update_err(map_names::ENDPOINTS, e)),
        }
    }

    /// The entry of the pod at `ip`, if any.
    pub fn get(&self, ip: Ipv4Addr) -> Option<EndpointInfo> {
        self.map.get(&key(ip), 0).ok()
    }

    /// Forgets the pod at `ip` (absent is fine).
    pub fn remove(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        match self.map.remove(&key(ip)) {
            Ok(()) => Ok(()),
            Err(e) => remove_err(map_names::ENDPOINTS, e).map_or(Ok(()), Err),
        }
    }

    /// Every pod recorded, by address.
    pub fn list(&self) -> Result<Vec<(Ipv4Addr, EndpointInfo)>, DatapathError> {
        Ok(collect(self.map.iter(), map_names::ENDPOINTS)?
            .into_iter()
            .map(|(k, v)| (Ipv4Addr::from(k.to_ne_bytes()), v))
            .collect())
    }
}
