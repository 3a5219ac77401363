//! `skiff-node flows` (the agent's flow log, after `hubble observe`) and `skiff-node bpf
//! policy get <pod>` (an endpoint's policy map decoded, after `cilium bpf policy get`).
//! Both talk to the running agent on its flow socket (`<run-dir>/flows.sock`); the policy map
//! itself is read from its pin, so what is printed is what the kernel holds.

use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context, Result, bail};
use skiff_agent::policy::flows::{Filter, Flow, Names, Request, Verdict, socket_path};
use skiff_datapath::{PinDir, endpoints::EndpointMap, lb::proto_name, policy::PolicyMaps};
use skiff_ebpf_common::policy::{
    DIR_INGRESS, EP_AUDIT, EP_EGRESS_ISOLATED, EP_ID_SHIFT, EP_INGRESS_ISOLATED, PREFIX_PORT_BASE,
    PREFIX_PROTO,
};

/// How `flows` prints.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Output {
    /// One aligned line per flow.
    Table,
    /// One JSON object per line.
    Json,
}

/// `--verdict`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum VerdictArg {
    Allowed,
    Dropped,
    Audit,
}

fn connect(run_dir: &Path, req: &Request) -> Result<BufReader<UnixStream>> {
    let path = socket_path(run_dir);
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!(
            "reaching the agent's flow log at {} (is the agent running, joined to a cluster, \
             with this --run-dir?)",
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    Ok(BufReader::new(s))
}

/// Parses `namespace/name` (or `name`, in `default`).
pub fn pod_ref(s: &str) -> (String, String) {
    match s.split_once('/') {
        Some((ns, n)) => (ns.to_string(), n.to_string()),
        None => ("default".to_string(), s.to_string()),
    }
}

fn print_flow(f: &Flow) {
    let time = f.time.get(11..26).unwrap_or(&f.time);
    let policy = match (f.allowed_by.first(), f.denied_by.is_empty()) {
        (Some(p), _) => format!("allowed by {p}"),
        (None, false) => {
            let names: Vec<String> = f.denied_by.iter().map(|p| p.to_string()).collect();
            format!("denied by {}", names.join(", "))
        }
        (None, true) => String::new(),
    };
    let verdict = f.verdict.to_string();
    println!(
        "{time:<15} {:<12} {:<32} {:<32} {:<5} {:<8} {verdict:<8} {policy}",
        f.node,
        f.source.to_string(),
        f.destination.to_string(),
        f.protocol,
        f.direction
    );
}

/// `skiff-node flows`.
pub fn flows(
    run_dir: &Path,
    follow: bool,
    last: usize,
    verdict: Option<VerdictArg>,
    pod: Option<&str>,
    output: Output,
) -> Result<()> {
    let filter = Filter {
        verdict: verdict.map(|v| match v {
            VerdictArg::Allowed => Verdict::Allowed,
            VerdictArg::Dropped => Verdict::Dropped,
            VerdictArg::Audit => Verdict::Audit,
        }),
        pod: pod.map(pod_ref),
    };
    let reader = connect(
        run_dir,
        &Request::Flows {
            follow,
            last,
            filter,
        },
    )?;
    if matches!(output, Output::Table) {
        println!(
            "{:<15} {:<12} {:<32} {:<32} {:<5} {:<8} {:<8} POLICY",
            "TIME", "NODE", "SOURCE", "DESTINATION", "PROTO", "DIR", "VERDICT"
        );
    }
    let mut out = std::io::stdout().lock();
    for line in reader.lines() {
        let line = line.context("reading the flow log")?;
        let value: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("the agent sent {line:?}"))?;
        if let Some(e) = value.get("error") {
            bail!("the agent refused the request: {e}");
        }
        if let Some(n) = value.get("lost") {
            eprintln!("skiff-node flows: {n} flows missed (this reader fell behind)");
            continue;
        }
        match output {
            Output::Json => {
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            Output::Table => {
                let f: Flow = serde_json::from_value(value)
                    .with_context(|| format!("the agent sent {line:?}"))?;
                print_flow(&f);
            }
        }
    }
    Ok(())
}

fn names(run_dir: &Path) -> Result<Names> {
    let mut reader = connect(run_dir, &Request::Names)?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("the agent sent {line:?}"))
}

/// The ports a key of `prefix_len` covers: `any`, one, or a block `first-last`.
fn ports(port: u16, prefix_len: u32) -> String {
    let bits = prefix_len.saturating_sub(PREFIX_PORT_BASE).min(16);
    if prefix_len <= PREFIX_PORT_BASE || bits == 0 {
        return "any".to_string();
    }
    let last = port | u16::MAX.checked_shr(bits).unwrap_or(0);
    if last == port {
        port.to_string()
    } else {
        format!("{port}-{last}")
    }
}

/// `skiff-node bpf policy get <pod>`: the endpoint's isolation and every allow key, decoded.
pub fn policy_get(bpffs: &Path, node: &str, run_dir: &Path, pod: &str) -> Result<()> {
    let pins = PinDir::open(bpffs, node)?;
    // Names from the agent; an address works without it.
    let names = names(run_dir);
    let ip: Ipv4Addr = match pod.parse() {
        Ok(ip) => ip,
        Err(_) => {
            let (ns, name) = pod_ref(pod);
            let names = names.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            names
                .endpoints
                .values()
                .find(|e| e.namespace == ns && e.pod == name)
                .and_then(|e| e.ip)
                .with_context(|| format!("pod {ns}/{name} has no endpoint on node {node}"))?
        }
    };
    let names = names.unwrap_or_default();
    let (_, info) = EndpointMap::open(&pins)?
        .list()?
        .into_iter()
        .find(|(a, _)| *a == ip)
        .with_context(|| format!("{ip} is not an endpoint of node {node}"))?;
    let endpoint = (info.flags >> EP_ID_SHIFT) as u16;
    let ep_names = names.endpoints.get(&endpoint);
    let who = ep_names.map_or_else(
        || ip.to_string(),
        |e| format!("{}/{} ({ip})", e.namespace, e.pod),
    );
    let isolation = |bit, dir: &str, list: Option<&Vec<(String, String)>>| {
        if info.flags & bit == 0 {
            format!("{dir}: not isolated")
        } else if endpoint == 0 {
            format!("{dir}: isolated, nothing allowed until the policy loop has seen the pod")
        } else {
            let by: Vec<String> = list
                .into_iter()
                .flatten()
                .map(|(ns, n)| format!("{ns}/{n}"))
                .collect();
            format!("{dir}: isolated by {}", by.join(", "))
        }
    };
    println!("endpoint {endpoint}: {who}");
    println!(
        "  {}",
        isolation(EP_INGRESS_ISOLATED, "ingress", ep_names.map(|e| &e.ingress))
    );
    println!(
        "  {}",
        isolation(EP_EGRESS_ISOLATED, "egress", ep_names.map(|e| &e.egress))
    );
    if info.flags & EP_AUDIT != 0 {
        println!("  audit mode: would-be drops are logged and allowed");
    }
    if endpoint == 0 {
        return Ok(());
    }
    let mut rows: Vec<(String, String, String, String, String)> = PolicyMaps::open(&pins)?
        .allows()?
        .into_iter()
        .filter(|((_, k), _)| u16::from_be(k.endpoint) == endpoint)
        .map(|((len, k), n)| {
            let proto = if len < PREFIX_PROTO {
                "any".to_string()
            } else {
                proto_name(k.proto)
            };
            let policy = names
                .policies
                .get(&n)
                .map_or_else(|| format!("#{n}"), |(ns, name)| format!("{ns}/{name}"));
            (
                if k.direction == DIR_INGRESS {
                    "ingress"
                } else {
                    "egress"
                }
                .to_string(),
                names.identity(u32::from_be(k.identity)),
                proto,
                ports(u16::from_be(k.port), len),
                policy,
            )
        })
        .collect();
    rows.sort();
    println!(
        "{:<8} {:<48} {:<6} {:<12} POLICY",
        "DIR", "PEER", "PROTO", "PORTS"
    );
    for (dir, peer, proto, ports, policy) in rows {
        println!("{dir:<8} {peer:<48} {proto:<6} {ports:<12} {policy}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_prefixes_print_as_ranges() {
        assert_eq!(ports(0, PREFIX_PROTO), "any");
        assert_eq!(ports(0, PREFIX_PORT_BASE), "any");
        assert_eq!(ports(80, PREFIX_PORT_BASE + 16), "80");
        assert_eq!(ports(8000, PREFIX_PORT_BASE + 13), "8000-8007");
        assert_eq!(ports(0, PREFIX_PORT_BASE + 1), "0-32767");
        assert_eq!(pod_ref("a/b"), ("a".to_string(), "b".to_string()));
        assert_eq!(pod_ref("b"), ("default".to_string(), "b".to_string()));
    }
}
