//! Userspace side of the service maps (`skiff_lb_*`, `skiff_ct`): writing frontends and
//! backends, reading them back for the CLI and for adoption after a restart.

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use skiff_ebpf_common::{
    MetricsValue,
    ct::{CtEntry, CtKey},
    lb::{AffinityKey, AffinityValue, Backend, LbConfig, ServiceKey, ServiceValue},
    map_names,
};

use crate::{DatapathError, PinDir};

/// The writes the agent makes to a node's service maps: the seam between its sync logic and the
/// kernel (unit tests record the calls instead).
pub trait LbTable {
    /// Writes a frontend or backend-slot entry.
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), DatapathError>;
    /// Deletes a frontend or backend-slot entry (absent is fine).
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError>;
    /// Writes a backend.
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), DatapathError>;
    /// Deletes a backend (absent is fine).
    fn remove_backend(&mut self, id: u32) -> Result<(), DatapathError>;
    /// Deletes the affinity entries of `service_id` whose backend is not kept.
    fn prune_affinity(
        &mut self,
        service_id: u32,
        keep: &dyn Fn(u32) -> bool,
    ) -> Result<(), DatapathError>;
    /// Zeroes the counters of `service_id`.
    fn reset_stats(&mut self, service_id: u32) -> Result<(), DatapathError>;
}

impl LbTable for LbMaps {
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), DatapathError> {
        LbMaps::set_service(self, key, value)
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
        LbMaps::remove_service(self, key)
    }
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), DatapathError> {
        LbMaps::set_backend(self, id, backend)
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        LbMaps::remove_backend(self, id)
    }
    fn prune_affinity(
        &mut self,
        service_id: u32,
        keep: &dyn Fn(u32) -> bool,
    ) -> Result<(), DatapathError> {
        LbMaps::prune_affinity(self, service_id, keep)
    }
    fn reset_stats(&mut self, service_id: u32) -> Result<(), DatapathError> {
        LbMaps::reset_stats(self, service_id)
    }
}

/// The service maps of one node, opened from their pins (the programs create them at load).
pub struct LbMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    stats: PerCpuArray<MapData, MetricsValue>,
    config: Array<MapData, LbConfig>,
}

impl std::fmt::Debug for LbMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LbMaps").finish_non_exhaustive()
    }
}

/// Turns a failed update into an error that says when the map is full.
pub(crate) fn update_err(map: &'static str, source: MapError) -> DatapathError {
    if let MapError::SyscallError(e) = &source
        && matches!(
            e.io_error.raw_os_error(),
            Some(libc::E2BIG) | Some(libc::ENOMEM)
        )
    {
        return DatapathError::MapFull { map };
    }
    DatapathError::Map {
        op: "update",
        map: map.to_string(),
        source: Box::new(source),
    }
}

pub(crate) fn remove_err(map: &'static str, source: MapError) -> Option<DatapathError> {
    match &source {
        MapError::KeyNotFound => None,
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOENT) => None,
        _ => Some(DatapathError::Map {
            op: "delete from",
            map: map.to_string(),
            source: Box::new(source),
        }),
    }
}

impl LbMaps {
    /// Opens the pinned service maps of the node in `pins`.
    pub fn open(pins: &PinDir) -> Result<LbMaps, DatapathError> {
        Ok(LbMaps {
            services: pins.open_map(map_names::SERVICES)?,
            backends: pins.open_map(map_names::BACKENDS)?,
            affinity: pins.open_map(map_names::AFFINITY)?,
            stats: pins.open_map(map_names::SERVICE_STATS)?,
            config: pins.open_map(map_names::LB_CONFIG)?,
        })
    }

    /// Writes the node facts the programs read.
    pub fn set_config(&mut self, config: LbConfig) -> Result<(), DatapathError> {
        self.config
            .set(0, config, 0)
            .map_err(|e| update_err(map_names::LB_CONFIG, e))
    }

    /// Writes a frontend or backend-slot entry.
    pub fn set_service(
        &mut self,
        key: ServiceKey,
        value: ServiceValue,
    ) -> Result<(), DatapathError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| update_err(map_names::SERVICES, e))
    }

    /// Deletes a frontend or backend-slot entry (absent is fine).
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
        match self.services.remove(key) {
            Ok(()) => Ok(()),
            Err(e) => remove_err(map_names::SERVICES, e).map_or(Ok(()), Err),
        }
    }

    /// Writes a backend.
    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), DatapathError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(|e| update_err(map_names::BACKENDS, e))
    }

    /// Deletes a backend (absent is fine).
    pub fn remove_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        match self.backends.remove(&id) {
            Ok(()) => Ok(()),
            Err(e) => remove_err(map_names::BACKENDS, e).map_or(Ok(()), Err),
        }
    }

    /// Every entry of `skiff_lb_svc`.
    pub fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DatapathError> {
        collect(self.services.iter(), map_names::SERVICES)
    }

    /// Every entry of `skiff_lb_be`.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>, DatapathError> {
        collect(self.backends.iter(), map_names::BACKENDS)
    }

    /// Every entry of `skiff_lb_aff`.
    pub fn affinity(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, DatapathError> {
        collect(self.affinity.iter(), map_names::AFFINITY)
    }

    /// Packets and bytes forwarded for frontend `service_id`, summed over CPUs.
    pub fn stats(&self, service_id: u32) -> Result<MetricsValue, DatapathError> {
        let per_cpu = self
            .stats
            .get(&service_id, 0)
            .map_err(|source| DatapathError::Map {
                op: "read",
                map: map_names::SERVICE_STATS.to_string(),
                source: Box::new(source),
            })?;
        Ok(per_cpu
            .iter()
            .fold(MetricsValue::default(), |a, v| MetricsValue {
                packets: a.packets + v.packets,
                bytes: a.bytes + v.bytes,
            }))
    }

    /// Zeroes the counters of `service_id` (before the id names another frontend).
    pub fn reset_stats(&mut self, service_id: u32) -> Result<(), DatapathError> {
        let zero = aya::maps::PerCpuValues::try_from(vec![
            MetricsValue::default();
            aya::util::nr_cpus().map_err(
                |(_, e)| DatapathError::Bpffs {
                    op: "count possible CPUs",
                    path: "/sys/devices/system/cpu/possible".into(),
                    source: e,
                }
            )?
        ])
        .map_err(|e| DatapathError::Bpffs {
            op: "build per-CPU zero values",
            path: map_names::SERVICE_STATS.into(),
            source: e,
        })?;
        self.stats
            .set(service_id, zero, 0)
            .map_err(|e| update_err(map_names::SERVICE_STATS, e))
    }

    /// Deletes the affinity entries of `service_id` whose backend is not in `keep`.
    pub fn prune_affinity(
        &mut self,
        service_id: u32,
        keep: &dyn Fn(u32) -> bool,
    ) -> Result<(), DatapathError> {
        for (k, v) in self.affinity()? {
            if k.service_id == service_id
                && !keep(v.backend_id)
                && let Err(e) = self.affinity.remove(&k)
                && let Some(e) = remove_err(map_names::AFFINITY, e)
            {
                return Err(e);
            }
        }
        Ok(())
    }
}

pub(crate) fn collect<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
    map: &'static str,
) -> Result<Vec<(K, V)>, DatapathError> {
    iter.collect::<Result<Vec<_>, _>>()
        .map_err(|source| DatapathError::Map {
            op: "iterate",
            map: map.to_string(),
            source: Box::new(source),
        })
}

/// How the CLI and the metrics name an IP protocol.
pub fn proto_name(p: u8) -> String {
    match p {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        other => format!("proto-{other}"),
    }
}

/// Every connection-tracking entry of the node in `pins`.
pub fn ct_entries(pins: &PinDir) -> Result<Vec<(CtKey, CtEntry)>, DatapathError> {
    let ct: HashMap<MapData, CtKey, CtEntry> = pins.open_map(map_names::CT)?;
    collect(ct.iter(), map_names::CT)
}

/// `CLOCK_MONOTONIC` now in ns: the clock connection-tracking and affinity times use.
pub fn monotonic_now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}
