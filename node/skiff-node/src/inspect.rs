//! `skiff-node bpf lb list`, `bpf ct list` and `bpf endpoint list`: the service,
//! connection-tracking and endpoint maps, decoded (the `cilium bpf lb list` /
//! `cilium bpf ct list global` / `cilium bpf endpoint list` habit).

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Result;
use skiff_datapath::{
    PinDir,
    endpoints::EndpointMap,
    lb::{LbMaps, ct_entries, monotonic_now_ns, proto_name},
};
use skiff_ebpf_common::{
    ct::{CT_CLOSING, CT_HAIRPIN, CT_REPLY},
    lb::{
        BE_TERMINATING, SCOPE_INTERNAL, SVC_EXTERNAL_IP, SVC_LOCAL_ONLY, SVC_NODEPORT,
        SVC_TWO_SCOPES,
    },
};

fn addr(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

fn svc_flags(flags: u16, scope: u8) -> String {
    let mut out = Vec::new();
    if flags & SVC_NODEPORT != 0 {
        out.push("NodePort");
    }
    if flags & SVC_EXTERNAL_IP != 0 {
        out.push("ExternalIP");
    }
    if flags & (SVC_NODEPORT | SVC_EXTERNAL_IP) == 0 {
        out.push("ClusterIP");
    }
    if flags & SVC_LOCAL_ONLY != 0 {
        out.push("local-only");
    }
    if flags & SVC_TWO_SCOPES != 0 {
        out.push("two-scopes");
    }
    if scope == SCOPE_INTERNAL {
        out.push("internal");
    }
    out.join(",")
}

/// Prints every frontend and its backend slots.
pub fn lb_list(bpffs: &Path, node: &str) -> Result<()> {
    let pins = PinDir::open(bpffs, node)?;
    let maps = LbMaps::open(&pins)?;
    let backends: BTreeMap<u32, _> = maps.backends()?.into_iter().collect();
    let mut fronts = BTreeMap::new();
    let mut slots = BTreeMap::new();
    for (k, v) in maps.services()? {
        let fk = (addr(k.address), u16::from_be(k.port), k.proto, k.scope);
        if k.slot == 0 {
            fronts.insert(fk, v);
        } else {
            slots.insert((fk, k.slot), v.backend_id);
        }
    }
    println!(
        "{:<28} {:<24} {:>5} {:<12} {:>8} {:>12}",
        "FRONTEND", "BACKEND", "SLOT", "STATE", "ID", "PACKETS"
    );
    for (fk @ (a, port, p, scope), v) in &fronts {
        let front = format!("{a}:{port}/{}", proto_name(*p));
        let packets = maps.stats(v.service_id).map(|s| s.packets).unwrap_or(0);
        let state = if v.count + v.terminating == 0 {
            "no-endpoint".to_string()
        } else {
            svc_flags(v.flags, *scope)
        };
        let aff = if v.affinity_timeout > 0 {
            format!(" affinity={}s", v.affinity_timeout)
        } else {
            String::new()
        };
        println!(
            "{front:<28} {:<24} {:>5} {:<12} {:>8} {packets:>12}{aff}",
            "-",
            0,
            state,
            format!("svc {}", v.service_id)
        );
        for slot in 1..=v.count + v.terminating {
            let Some(id) = slots.get(&(*fk, slot)) else {
                println!("{:<28} {:<24} {slot:>5} {:<12}", "", "(missing slot)", "-");
                continue;
            };
            let (be, state) = match backends.get(id) {
                Some(b) => (
                    format!("{}:{}", addr(b.address), u16::from_be(b.port)),
                    if b.flags & BE_TERMINATING != 0 {
                        "terminating"
                    } else {
                        "active"
                    },
                ),
                None => ("(missing backend)".to_string(), "-"),
            };
            println!("{:<28} {be:<24} {slot:>5} {state:<12} {id:>8}", "");
        }
    }
    Ok(())
}

/// Prints every live connection-tracking entry.
pub fn ct_list(bpffs: &Path, node: &str) -> Result<()> {
    let pins = PinDir::open(bpffs, node)?;
    let now = monotonic_now_ns();
    let mut entries = ct_entries(&pins)?;
    entries.sort_by_key(|(k, _)| *k);
    println!(
        "{:<5} {:<44} {:<8} {:<44} {:>6} {:>8} FLAGS",
        "PROTO", "TUPLE", "DIR", "TRANSLATION", "SVC", "EXPIRES"
    );
    for (k, e) in entries {
        if e.expires < now {
            continue;
        }
        let tuple = format!(
            "{}:{} -> {}:{}",
            addr(k.saddr),
            u16::from_be(k.sport),
            addr(k.daddr),
            u16::from_be(k.dport)
        );
        let reply = e.flags & CT_REPLY != 0;
        let mut nat = Vec::new();
        let (to, from) = (
            format!("dst {}:{}", addr(e.to_addr), u16::from_be(e.to_port)),
            format!("src {}:{}", addr(e.from_addr), u16::from_be(e.from_port)),
        );
        if reply {
            nat.push(from);
            if e.to_addr != 0 {
                nat.push(to);
            }
        } else {
            nat.push(to);
            if e.from_addr != 0 {
                nat.push(from);
            }
        }
        let mut flags = Vec::new();
        if e.flags & CT_CLOSING != 0 {
            flags.push("closing");
        }
        if e.flags & CT_HAIRPIN != 0 {
            flags.push("hairpin");
        }
        println!(
            "{:<5} {tuple:<44} {:<8} {:<44} {:>6} {:>7}s {}",
            proto_name(k.proto),
            if reply { "reply" } else { "forward" },
            nat.join(", "),
            e.service_id,
            (e.expires - now) / 1_000_000_000,
            flags.join(",")
        );
    }
    Ok(())
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// Prints every pod of this node the programs deliver to directly.
pub fn endpoint_list(bpffs: &Path, node: &str) -> Result<()> {
    let pins = PinDir::open(bpffs, node)?;
    let mut eps = EndpointMap::open(&pins)?.list()?;
    eps.sort_by_key(|(ip, _)| *ip);
    println!(
        "{:<16} {:<16} {:>7} {:<18} GATEWAY MAC",
        "ADDRESS", "INTERFACE", "IFINDEX", "MAC"
    );
    for (ip, e) in eps {
        let iface = nix::net::if_::if_indextoname(e.ifindex)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "(gone)".to_string());
        println!(
            "{:<16} {iface:<16} {:>7} {:<18} {}",
            ip.to_string(),
            e.ifindex,
            mac(e.mac),
            mac(e.node_mac)
        );
    }
    Ok(())
}
