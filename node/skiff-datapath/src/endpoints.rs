//! Userspace side of `skiff_endpoints`, the pods of this node that the programs deliver to
//! directly (layout in `skiff_ebpf_common::endpoint`).

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData};
use skiff_ebpf_common::{endpoint::EndpointInfo, map_names};

use crate::{
    DatapathError, PinDir,
    lb::{collect, remove_err, update_err},
};

/// The endpoint map of one node, opened from its pin, with `skiff_ifaces` (each pod
/// interface's address, for `from-pod`'s source check).
pub struct EndpointMap {
    map: HashMap<MapData, u32, EndpointInfo>,
    ifaces: HashMap<MapData, u32, u32>,
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
            ifaces: pins.open_map(map_names::IFACES)?,
        })
    }

    /// Records `ip` as the only source address allowed out of pod interface `ifindex`.
    pub fn set_iface(&mut self, ifindex: u32, ip: Ipv4Addr) -> Result<(), DatapathError> {
        self.ifaces
            .insert(ifindex, key(ip), 0)
            .map_err(|e| update_err(map_names::IFACES, e))
    }

    /// Forgets interface `ifindex` (absent is fine).
    pub fn remove_iface(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        match self.ifaces.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) => remove_err(map_names::IFACES, e).map_or(Ok(()), Err),
        }
    }

    /// Forgets every interface recorded with address `ip`.
    pub fn remove_ifaces_of(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        for (index, addr) in self.ifaces()? {
            if addr == ip {
                self.remove_iface(index)?;
            }
        }
        Ok(())
    }

    /// Every pod interface recorded: (ifindex, address).
    pub fn ifaces(&self) -> Result<Vec<(u32, Ipv4Addr)>, DatapathError> {
        Ok(collect(self.ifaces.iter(), map_names::IFACES)?
            .into_iter()
            .map(|(k, v)| (k, Ipv4Addr::from(v.to_ne_bytes())))
            .collect())
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
