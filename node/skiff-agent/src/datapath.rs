//! The pod programs (`from-pod`, `to-pod`) on pods' host-side interfaces, through TCX links
//! pinned under `<pins>/links/` so a restarted agent swaps its programs in without a gap.

use std::sync::Mutex;

use skiff_datapath::{
    LoadedProgram, PinDir, ProgramKind,
    program::{pinned_link_ifaces, unpin_link},
};

use crate::pods::PodDatapath;

/// The loaded pod programs of this node.
#[derive(Debug)]
pub struct PodPrograms {
    pins: PinDir,
    programs: Mutex<Vec<LoadedProgram>>,
}

const KINDS: [ProgramKind; 2] = [ProgramKind::FromPod, ProgramKind::ToPod];

impl PodPrograms {
    /// Takes the loaded `from-pod` and `to-pod` programs; unpins links left for interfaces that
    /// no longer exist (pods deleted while the agent was down).
    pub fn new(pins: PinDir, programs: Vec<LoadedProgram>) -> PodPrograms {
        for kind in KINDS {
            for iface in pinned_link_ifaces(&pins, kind) {
                if nix::net::if_::if_nametoindex(iface.as_str()).is_err() {
                    let _ = unpin_link(&pins, &iface, kind);
                }
            }
        }
        PodPrograms {
            pins,
            programs: Mutex::new(programs),
        }
    }
}

impl PodDatapath for PodPrograms {
    fn attach(&self, host_if: &str) -> anyhow::Result<()> {
        let mut programs = self.programs.lock().unwrap_or_else(|p| p.into_inner());
        for p in programs.iter_mut().filter(|p| KINDS.contains(&p.kind())) {
            p.attach_pinned(host_if, &self.pins)?;
        }
        Ok(())
    }

    fn detach(&self, host_if: &str) {
        for kind in KINDS {
            if let Err(e) = unpin_link(&self.pins, host_if, kind) {
                tracing::warn!(host_if, error = %e, "unpinning a pod link failed");
            }
        }
    }
}
