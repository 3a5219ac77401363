//! Loading one of skiff's programs: its maps are created or reused from the node's pin
//! directory, checked against the layouts this binary expects, then the program goes through
//! the verifier.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapType},
    programs::{
        Program, TcAttachType, TestRun, TestRunOptions, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, qdisc_add_clsact},
    },
};
use skiff_ebpf_common::{
    MetricsKey, MetricsValue,
    ct::{CtEntry, CtKey},
    endpoint::EndpointInfo,
    lb::{AffinityKey, AffinityValue, Backend, LbConfig, ServiceKey, ServiceValue},
    map_names,
    policy::{FragKey, IpcacheValue, PctEntry, PctKey, PolicyKey, PolicyValue, TokenBucket},
};

use crate::{DatapathError, PinDir, ProgramKind};

/// The kernel-side shape of a pinned map, as this binary expects it.
struct MapSpec {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
}

const MAP_SPECS: &[MapSpec] = &[
    MapSpec {
        name: map_names::METRICS,
        map_type: MapType::PerCpuHash,
        key_size: size_of::<MetricsKey>(),
        value_size: size_of::<MetricsValue>(),
    },
    MapSpec {
        name: map_names::SERVICES,
        map_type: MapType::Hash,
        key_size: size_of::<ServiceKey>(),
        value_size: size_of::<ServiceValue>(),
    },
    MapSpec {
        name: map_names::BACKENDS,
        map_type: MapType::Hash,
        key_size: size_of::<u32>(),
        value_size: size_of::<Backend>(),
    },
    MapSpec {
        name: map_names::AFFINITY,
        map_type: MapType::LruHash,
        key_size: size_of::<AffinityKey>(),
        value_size: size_of::<AffinityValue>(),
    },
    MapSpec {
        name: map_names::SERVICE_STATS,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<MetricsValue>(),
    },
    MapSpec {
        name: map_names::LB_CONFIG,
        map_type: MapType::Array,
        key_size: size_of::<u32>(),
        value_size: size_of::<LbConfig>(),
    },
    MapSpec {
        name: map_names::CT,
        map_type: MapType::LruHash,
        key_size: size_of::<CtKey>(),
        value_size: size_of::<CtEntry>(),
    },
    MapSpec {
        name: map_names::ENDPOINTS,
        map_type: MapType::Hash,
        key_size: size_of::<u32>(),
        value_size: size_of::<EndpointInfo>(),
    },
    MapSpec {
        name: map_names::IPCACHE,
        map_type: MapType::LpmTrie,
        key_size: 4 + 4,
        value_size: size_of::<IpcacheValue>(),
    },
    MapSpec {
        name: map_names::CIDR,
        map_type: MapType::LpmTrie,
        key_size: 4 + 4,
        value_size: size_of::<IpcacheValue>(),
    },
    MapSpec {
        name: map_names::POLICY,
        map_type: MapType::LpmTrie,
        key_size: 4 + size_of::<PolicyKey>(),
        value_size: size_of::<PolicyValue>(),
    },
    MapSpec {
        name: map_names::PCT,
        map_type: MapType::LruHash,
        key_size: size_of::<PctKey>(),
        value_size: size_of::<PctEntry>(),
    },
    MapSpec {
        name: map_names::FLOWS,
        map_type: MapType::RingBuf,
        key_size: 0,
        value_size: 0,
    },
    MapSpec {
        name: map_names::FLOWS_LOST,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<u64>(),
    },
    MapSpec {
        name: map_names::FLOW_RATE,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<TokenBucket>(),
    },
    MapSpec {
        name: map_names::FRAGS,
        map_type: MapType::LruHash,
        key_size: size_of::<FragKey>(),
        value_size: size_of::<u64>(),
    },
    MapSpec {
        name: map_names::IFACES,
        map_type: MapType::Hash,
        key_size: size_of::<u32>(),
        value_size: size_of::<u32>(),
    },
];

/// A program loaded into the kernel (verified), with its maps pinned.
#[derive(Debug)]
pub struct LoadedProgram {
    kind: ProgramKind,
    ebpf: Ebpf,
}

/// What one BPF_PROG_RUN execution returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    /// The program's return value (e.g. `TC_ACT_SHOT`, `XDP_PASS`).
    pub verdict: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
}

impl LoadedProgram {
    /// Loads `kind`, creating its maps under `pins` or reusing the ones already pinned there.
    pub fn load(kind: ProgramKind, pins: &PinDir) -> Result<LoadedProgram, DatapathError> {
        let bytes = kind.object()?;
        check_pinned_layouts(pins)?;
        let mut loader = EbpfLoader::new();
        for spec in MAP_SPECS {
            loader.map_pin_path(spec.name, pins.map_path(spec.name));
        }
        let mut ebpf = loader.load(bytes).map_err(|source| DatapathError::Object {
            object: kind.object_name(),
            source: Box::new(source),
        })?;
        let prog_err = |source| DatapathError::Program {
            program: kind.program_name(),
            source: Box::new(source),
        };
        match program_mut(&mut ebpf, kind)? {
            Program::SchedClassifier(p) => p.load().map_err(prog_err)?,
            Program::Xdp(p) => p.load().map_err(prog_err)?,
            _ => unreachable!("ProgramKind only names TC and XDP programs"),
        }
        tracing::debug!(program = kind.program_name(), pins = %pins.path().display(), "loaded");
        Ok(LoadedProgram { kind, ebpf })
    }

    /// Which program this is.
    pub fn kind(&self) -> ProgramKind {
        self.kind
    }

    /// Runs the program once on `packet` with BPF_PROG_RUN and returns its verdict and the
    /// packet as it left the program. Map side effects are real (the pinned maps are used).
    pub fn test_run(&self, packet: &[u8]) -> Result<RunOutcome, DatapathError> {
        self.prog_run(packet, 1, None).map(|(outcome, _)| outcome)
    }

    /// [`test_run`](Self::test_run) for an XDP program, as if the packet arrived on interface
    /// `ingress_ifindex` of the calling thread's network namespace.
    pub fn test_run_xdp(
        &self,
        packet: &[u8],
        ingress_ifindex: u32,
    ) -> Result<RunOutcome, DatapathError> {
        // `struct xdp_md`: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex (the kernel wants data 0 and data_end the packet's length).
        let md: [u32; 6] = [0, packet.len() as u32, 0, ingress_ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.prog_run(packet, 1, Some(&ctx))
            .map(|(outcome, _)| outcome)
    }

    /// Runs the program `repeat` times on `packet` with BPF_PROG_RUN and returns the kernel's
    /// average time per run (for benchmarks).
    pub fn bench_run(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration, DatapathError> {
        self.prog_run(packet, repeat, None).map(|(_, d)| d)
    }

    fn prog_run(
        &self,
        packet: &[u8],
        repeat: u32,
        ctx_in: Option<&[u8]>,
    ) -> Result<(RunOutcome, std::time::Duration), DatapathError> {
        // Room for programs that grow the packet (ICMP rejects, encapsulation later on).
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in,
            repeat,
            ..TestRunOptions::default()
        };
        let prog_err = |source| DatapathError::Program {
            program: self.kind.program_name(),
            source: Box::new(source),
        };
        let program = self
            .ebpf
            .program(self.kind.program_name())
            .expect("checked at load");
        let result = match program {
            Program::SchedClassifier(p) => p.test_run(opts).map_err(prog_err)?,
            Program::Xdp(p) => p.test_run(opts).map_err(prog_err)?,
            _ => unreachable!("ProgramKind only names TC and XDP programs"),
        };
        out.truncate(result.data_size_out as usize);
        let outcome = RunOutcome {
            verdict: result.return_value,
            packet: out,
        };
        Ok((outcome, result.duration))
    }

    /// Attaches the program to `iface` in the calling thread's network namespace: TC programs
    /// on their side (adding the clsact qdisc if needed), XDP in the mode the driver
    /// supports. The attachment lasts as long as this value.
    pub fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.attach_mode(iface, XdpMode::Default)
    }

    /// [`attach`](Self::attach) with XDP in generic (skb) mode. For veth uplinks: a frame a
    /// native XDP program sends back out (`XDP_TX`) is dropped unless the veth's peer runs XDP
    /// or GRO itself, which the node does not control; generic XDP transmits through the
    /// stack and works with any peer.
    pub fn attach_generic(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.attach_mode(iface, XdpMode::Skb)
    }

    fn attach_mode(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        let kind = self.kind;
        let prog_err = |source| DatapathError::Program {
            program: kind.program_name(),
            source: Box::new(source),
        };
        match program_mut(&mut self.ebpf, kind)? {
            Program::SchedClassifier(p) => {
                add_clsact(iface)?;
                p.attach(iface, tc_side(kind)).map_err(prog_err)?;
            }
            Program::Xdp(p) => {
                p.attach(iface, mode).map_err(prog_err)?;
            }
            _ => unreachable!("ProgramKind only names TC and XDP programs"),
        }
        tracing::info!(program = kind.program_name(), iface, ?mode, "attached");
        Ok(())
    }
}

/// Which side of an interface a TC program runs on.
fn tc_side(kind: ProgramKind) -> TcAttachType {
    match kind {
        ProgramKind::ToPod => TcAttachType::Egress,
        _ => TcAttachType::Ingress,
    }
}

impl LoadedProgram {
    /// Attaches this TC program to `iface` through a TCX link pinned at
    /// `<pins>/links/<iface>-<object>` (bpffs names cannot hold dots), so the attachment outlives the agent: a restarted agent
    /// swaps its freshly loaded program into the pinned link atomically (no packet sees the
    /// interface without a program), and a link left by a deleted interface is replaced.
    pub fn attach_pinned(&mut self, iface: &str, pins: &PinDir) -> Result<(), DatapathError> {
        let kind = self.kind;
        let path = link_pin_path(pins, iface, kind);
        let prog_err = |source| DatapathError::Program {
            program: kind.program_name(),
            source: Box::new(source),
        };
        let Program::SchedClassifier(p) = program_mut(&mut self.ebpf, kind)? else {
            unreachable!("attach_pinned is for TC programs")
        };
        if path.exists() {
            let replaced = PinnedLink::from_pin(&path)
                .ok()
                .map(FdLink::from)
                .and_then(|l| SchedClassifierLink::try_from(l).ok())
                .map(|link| p.attach_to_link(link));
            if let Some(Ok(id)) = replaced {
                // The pin keeps the link; our fd can go.
                drop(p.take_link(id));
                tracing::debug!(
                    program = kind.program_name(),
                    iface,
                    "program replaced in pinned link"
                );
                return Ok(());
            }
            // The link could not be updated (its interface is gone, or it is not a TCX link):
            // a new link is attached first and the old pin removed after, so a live interface
            // never goes without a program.
        }
        let id = p.attach(iface, tc_side(kind)).map_err(prog_err)?;
        let link = p.take_link(id).map_err(prog_err)?;
        if path.exists() {
            let _ = std::fs::remove_file(&path);
        }
        let fd = FdLink::try_from(link).map_err(|e| DatapathError::Link {
            op: "take the TCX link of",
            path: path.clone(),
            detail: chain(&e),
        })?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::Bpffs {
                op: "create link pin directory",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        fd.pin(&path).map_err(|e| DatapathError::Link {
            op: "pin",
            path: path.clone(),
            detail: chain(&e),
        })?;
        tracing::debug!(
            program = kind.program_name(),
            iface,
            "attached, link pinned"
        );
        Ok(())
    }
}

/// An error with its sources, `outer: inner: …`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Removes the pinned link of `kind` on `iface` (detaching the program if the interface still
/// exists). Missing pins are fine.
pub fn unpin_link(pins: &PinDir, iface: &str, kind: ProgramKind) -> Result<(), DatapathError> {
    let path = link_pin_path(pins, iface, kind);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Bpffs {
            op: "unpin link",
            path,
            source,
        }),
    }
}

fn link_pin_path(pins: &PinDir, iface: &str, kind: ProgramKind) -> PathBuf {
    pins.path()
        .join("links")
        .join(format!("{iface}-{}", kind.object_name()))
}

/// The interfaces that have a pinned link of `kind` (for cleaning up after deleted pods).
pub fn pinned_link_ifaces(pins: &PinDir, kind: ProgramKind) -> Vec<String> {
    let suffix = format!("-{}", kind.object_name());
    let dir: &Path = &pins.path().join("links");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(&suffix).map(str::to_string))
        })
        .collect()
}

fn program_mut(ebpf: &mut Ebpf, kind: ProgramKind) -> Result<&mut Program, DatapathError> {
    ebpf.program_mut(kind.program_name())
        .ok_or(DatapathError::ObjectMissing {
            object: kind.object_name(),
        })
}

/// Adds the clsact qdisc; TCX attachment (kernel ≥ 6.6) does not need it, but the netlink
/// fallback does, and an existing one is fine.
fn add_clsact(iface: &str) -> Result<(), DatapathError> {
    match qdisc_add_clsact(iface) {
        Ok(()) => Ok(()),
        Err(aya::programs::tc::TcError::AlreadyAttached) => Ok(()),
        Err(source) => Err(DatapathError::Qdisc {
            iface: iface.to_string(),
            source: Box::new(source),
        }),
    }
}

/// Counter maps whose number of slots grew since an earlier version, with the number now: a
/// pinned one with another number holds only counters, and is made anew.
const RESIZED_COUNTERS: &[(&str, u32)] = &[(map_names::FLOWS_LOST, 2)];

/// Refuses to reuse a pinned map whose type or sizes differ from what this binary expects.
fn check_pinned_layouts(pins: &PinDir) -> Result<(), DatapathError> {
    for (name, slots) in RESIZED_COUNTERS {
        let path: PathBuf = pins.map_path(name);
        let Ok(map) = MapData::from_pin(&path) else {
            continue;
        };
        if map.info().is_ok_and(|i| i.max_entries() != *slots) {
            tracing::info!(map = %path.display(), "counter map resized: made anew");
            let _ = std::fs::remove_file(&path);
        }
    }
    for spec in MAP_SPECS {
        let path: PathBuf = pins.map_path(spec.name);
        if !path.exists() {
            continue;
        }
        let map = MapData::from_pin(&path).map_err(|source| DatapathError::Map {
            op: "open pinned",
            map: path.display().to_string(),
            source: Box::new(source),
        })?;
        let info = map.info().map_err(|source| DatapathError::Map {
            op: "read info of",
            map: path.display().to_string(),
            source: Box::new(source),
        })?;
        let map_type = info.map_type().map_err(|source| DatapathError::Map {
            op: "read type of",
            map: path.display().to_string(),
            source: Box::new(source),
        })?;
        let (k, v) = (info.key_size() as usize, info.value_size() as usize);
        if map_type != spec.map_type || k != spec.key_size || v != spec.value_size {
            return Err(DatapathError::IncompatiblePin {
                path,
                detail: format!(
                    "found {map_type:?} key {k} value {v}, expected {:?} key {} value {}",
                    spec.map_type, spec.key_size, spec.value_size
                ),
            });
        }
    }
    Ok(())
}
