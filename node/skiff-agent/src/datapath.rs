//! The pod programs (`from-pod`, `to-pod`) on pods' host-side interfaces, through TCX links
//! pinned under `<pins>/links/` so a restarted agent swaps its programs in without a gap; and
//! the node's endpoint map (`skiff_endpoints`), which lets the programs deliver to this node's
//! pods directly.

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use anyhow::Context;
use skiff_datapath::{
    LoadedProgram, PinDir, ProgramKind,
    endpoints::EndpointMap,
    program::{pinned_link_ifaces, unpin_link},
};
use skiff_ebpf_common::endpoint::EndpointInfo;
use skiff_net::pod::PodNetwork;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::{pods::PodDatapath, policy::gate::Gate};

/// The loaded pod programs of this node.
#[derive(Debug)]
pub struct PodPrograms {
    pins: PinDir,
    programs: Mutex<Vec<LoadedProgram>>,
    endpoints: Mutex<EndpointMap>,
    /// New endpoints' isolation before the policy loop has seen them.
    gate: Option<Arc<Gate>>,
}

const KINDS: [ProgramKind; 2] = [ProgramKind::FromPod, ProgramKind::ToPod];

fn ifindex(iface: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(iface).ok()
}

impl PodPrograms {
    /// Takes the loaded `from-pod` and `to-pod` programs; unpins links left for interfaces that
    /// no longer exist and forgets endpoints whose interface is gone (pods deleted while the
    /// agent was down).
    pub fn new(pins: PinDir, programs: Vec<LoadedProgram>) -> anyhow::Result<PodPrograms> {
        for kind in KINDS {
            for iface in pinned_link_ifaces(&pins, kind) {
                if ifindex(&iface).is_none() {
                    let _ = unpin_link(&pins, &iface, kind);
                }
            }
        }
        let mut endpoints = EndpointMap::open(&pins).context("open the endpoint map")?;
        let live: std::collections::HashSet<u32> = nix::net::if_::if_nameindex()
            .map(|l| l.iter().map(|i| i.index()).collect())
            .unwrap_or_default();
        for (ip, ep) in endpoints.list().context("read the endpoint map")? {
            if !live.contains(&ep.ifindex) {
                endpoints.remove(ip)?;
            }
        }
        for (index, _) in endpoints.ifaces().context("read the interface map")? {
            if !live.contains(&index) {
                endpoints.remove_iface(index)?;
            }
        }
        Ok(PodPrograms {
            pins,
            programs: Mutex::new(programs),
            endpoints: Mutex::new(endpoints),
            gate: None,
        })
    }

    /// New endpoints start with the isolation `gate` gives them (the node's policy loop's).
    pub fn with_policy_gate(mut self, gate: Arc<Gate>) -> PodPrograms {
        self.gate = Some(gate);
        self
    }
}

impl PodDatapath for PodPrograms {
    fn attach(&self, net: &PodNetwork, pod: &Pod) -> anyhow::Result<()> {
        let mut programs = self.programs.lock().unwrap_or_else(|p| p.into_inner());
        for p in programs.iter_mut().filter(|p| KINDS.contains(&p.kind())) {
            p.attach_pinned(&net.host_if, &self.pins)?;
        }
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let index = ifindex(&net.host_if)
            .with_context(|| format!("interface {} has no index", net.host_if))?;
        // Only the pod's own address leaves its interface.
        endpoints.set_iface(index, net.ip)?;
        let Some(mac) = net.mac else {
            // Reached through the node's stack instead.
            tracing::warn!(host_if = %net.host_if, "pod MAC unknown: no same-node delivery");
            endpoints.remove(net.ip)?;
            return Ok(());
        };
        // Policy flags are the policy loop's: a re-attach (agent restart) keeps them; a new
        // endpoint starts with the isolation the policies give it (`policy::gate`).
        let flags = match endpoints.get(net.ip) {
            Some(e) => e.flags,
            None => self.gate.as_ref().map_or(0, |g| {
                g.initial_flags(&pod.namespace().unwrap_or_default(), pod.labels())
            }),
        };
        endpoints.set(
            net.ip,
            EndpointInfo {
                ifindex: index,
                flags,
                mac,
                node_mac: net.host_mac,
            },
        )?;
        Ok(())
    }

    fn detach(&self, host_if: &str, ip: Option<Ipv4Addr>) {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ip) = ip
            && let Err(e) = endpoints.remove(ip)
        {
            tracing::warn!(%ip, error = %e, "forgetting a pod endpoint failed");
        }
        // By address when known: the interface (and its index) may be gone already.
        let forgotten = match (ip, ifindex(host_if)) {
            (Some(ip), _) => endpoints.remove_ifaces_of(ip),
            (None, Some(index)) => endpoints.remove_iface(index),
            (None, None) => Ok(()),
        };
        if let Err(e) = forgotten {
            tracing::warn!(host_if, error = %e, "forgetting a pod interface failed");
        }
        drop(endpoints);
        for kind in KINDS {
            if let Err(e) = unpin_link(&self.pins, host_if, kind) {
                tracing::warn!(host_if, error = %e, "unpinning a pod link failed");
            }
        }
    }
}
