//! The NetworkPolicy truth table (in the style of upstream's netpol e2e and Cyclonus): nine
//! real pods — namespaces `tt-x`, `tt-y`, `tt-z` × pods `a`, `b`, `c`, spread over two real
//! nodes — and a sequence of policy sets, upstream's scenarios among them. For each set the
//! full source × destination × port (TCP 80, 81) matrix is probed with real connections from
//! inside the pods and compared with the expected table; then every expected drop must be in
//! the flow log of the node that dropped it, with the direction and the policies that isolate
//! that end.

use std::{collections::BTreeMap, time::Duration};

use skiff_tests::{
    control::{ControlPlane, listener_pod},
    node::LanCluster,
    privileged,
};

const NAMESPACES: [&str; 3] = ["tt-x", "tt-y", "tt-z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PORTS: [u16; 2] = [80, 81];

#[derive(Clone, Debug)]
struct Pod {
    ns: &'static str,
    name: &'static str,
    ip: String,
    /// Index of its node in the cluster.
    node: usize,
}

impl Pod {
    fn id(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
}

/// What a connection should meet.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Allowed,
    /// Dropped at the source's egress, by these isolating policies (`ns/name`).
    DeniedEgress(Vec<String>),
    /// Dropped at the destination's ingress.
    DeniedIngress(Vec<String>),
}

/// One direction of a step's policies: the policies isolating a pod, and whether they allow
/// a connection (from the pod's side: the peer and the port).
struct Side {
    isolating: Box<Isolating>,
    allows: Box<Allows>,
}

/// The policies (names, in the pod's namespace) isolating a pod.
type Isolating = dyn Fn(&Pod) -> Vec<&'static str>;
/// Whether they allow the pod a connection with a peer on a port.
type Allows = dyn Fn(&Pod, &Pod, u16) -> bool;
/// Connected, by (destination, port).
type Row = BTreeMap<(String, u16), bool>;

impl Side {
    fn open() -> Side {
        Side {
            isolating: Box::new(|_| vec![]),
            allows: Box::new(|_, _, _| true),
        }
    }
}

struct Step {
    what: &'static str,
    /// Policies (YAML) in force for the step; earlier steps' are deleted first.
    manifest: String,
    /// Namespaces annotated for audit mode during the step.
    audit: &'static [&'static str],
    /// `isolating(dst)` / `allows(dst, src, port)`.
    ingress: Side,
    /// `isolating(src)` / `allows(src, dst, port)`.
    egress: Side,
}

impl Step {
    /// The model: egress is decided first, at the source; then ingress, at the destination.
    /// A pod reaching itself never leaves it (upstream: loopback is always allowed).
    fn expect(&self, src: &Pod, dst: &Pod, port: u16) -> Expect {
        if src.id() == dst.id() {
            return Expect::Allowed;
        }
        let eg = (self.egress.isolating)(src);
        if !eg.is_empty() && !(self.egress.allows)(src, dst, port) {
            let mut by: Vec<String> = eg.iter().map(|p| format!("{}/{p}", src.ns)).collect();
            by.sort();
            return Expect::DeniedEgress(by);
        }
        let ing = (self.ingress.isolating)(dst);
        if !ing.is_empty() && !(self.ingress.allows)(dst, src, port) {
            let mut by: Vec<String> = ing.iter().map(|p| format!("{}/{p}", dst.ns)).collect();
            by.sort();
            return Expect::DeniedIngress(by);
        }
        Expect::Allowed
    }

    /// Whether the probe should connect (audit mode lets drops through).
    fn connects(&self, src: &Pod, dst: &Pod, port: u16) -> bool {
        match self.expect(src, dst, port) {
            Expect::Allowed => true,
            Expect::DeniedEgress(_) => self.audit.contains(&src.ns),
            Expect::DeniedIngress(_) => self.audit.contains(&dst.ns),
        }
    }
}

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )
}

/// Probes every destination × port from `src` at once, from inside the pod.
fn probe_from(cp: &ControlPlane, src: &Pod, pods: &[Pod]) -> Row {
    let targets: Vec<String> = pods
        .iter()
        .flat_map(|d| PORTS.iter().map(move |p| format!("{}:{p}", d.ip)))
        .collect();
    let script = format!(
        "for t in {}; do (nc -w 2 ${{t%:*}} ${{t#*:}} </dev/null >/dev/null 2>&1 && echo \"$t 1\" || echo \"$t 0\") & done; wait",
        targets.join(" ")
    );
    let out = cp.kubectl(&["-n", src.ns, "exec", src.name, "--", "sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut got = BTreeMap::new();
    for line in text.lines() {
        let Some((target, ok)) = line.split_once(' ') else {
            continue;
        };
        let Some((ip, port)) = target.split_once(':') else {
            continue;
        };
        if let (Some(d), Ok(port)) = (pods.iter().find(|p| p.ip == ip), port.parse()) {
            got.insert((d.id(), port), ok == "1");
        }
    }
    got
}

/// The whole matrix: (src, dst, port) → connected.
fn probe_all(cp: &ControlPlane, pods: &[Pod]) -> BTreeMap<(String, String, u16), bool> {
    let rows: Vec<(String, Row)> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|src| s.spawn(move || (src.id(), probe_from(cp, src, pods))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    rows.into_iter()
        .flat_map(|(src, row)| {
            row.into_iter()
                .map(move |((dst, port), ok)| ((src.clone(), dst, port), ok))
        })
        .collect()
}

/// The matrix as a table (`.` connects, `X` does not), one row per source, for messages.
fn table(pods: &[Pod], cell: impl Fn(&Pod, &Pod, u16) -> Option<bool>) -> String {
    let mut out = format!("{:<8}", "");
    for d in pods {
        out += &format!(" {:<5}", d.id().replace("tt-", ""));
    }
    out += "   (80 81 per cell)\n";
    for s in pods {
        out += &format!("{:<8}", s.id().replace("tt-", ""));
        for d in pods {
            let c: String = PORTS
                .iter()
                .map(|p| match cell(s, d, *p) {
                    Some(true) => '.',
                    Some(false) => 'X',
                    None => '?',
                })
                .collect();
            out += &format!(" {c:<5}");
        }
        out += "\n";
    }
    out
}

fn steps(pods: &[Pod], node_cidrs: &[String]) -> Vec<Step> {
    let ip_of = |id: &str| pods.iter().find(|p| p.id() == id).unwrap().ip.clone();
    let in_x = |p: &Pod| p.ns == "tt-x";
    let second_node = node_cidrs[1].clone();
    let y_b = ip_of("tt-y/b");
    vec![
        Step {
            what: "no policies: everything connects",
            manifest: String::new(),
            audit: &[],
            ingress: Side::open(),
            egress: Side::open(),
        },
        Step {
            what: "default deny ingress in x",
            manifest: policy(
                "tt-x",
                "s1-deny-ingress",
                "  podSelector: {}\n  policyTypes: [Ingress]",
            ),
            audit: &[],
            ingress: Side {
                isolating: Box::new(move |d| {
                    if in_x(d) {
                        vec!["s1-deny-ingress"]
                    } else {
                        vec![]
                    }
                }),
                allows: Box::new(|_, _, _| false),
            },
            egress: Side::open(),
        },
        Step {
            what: "allow from the same namespace (x)",
            manifest: policy(
                "tt-x",
                "s2-same-ns",
                "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {}}]",
            ),
            audit: &[],
            ingress: Side {
                isolating: Box::new(move |d| if in_x(d) { vec!["s2-same-ns"] } else { vec![] }),
                allows: Box::new(|_, s, _| s.ns == "tt-x"),
            },
            egress: Side::open(),
        },
        Step {
            what: "allow from a namespace by label (y into x)",
            manifest: policy(
                "tt-x",
                "s3-from-y",
                "  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: tt-y}}}]",
            ),
            audit: &[],
            ingress: Side {
                isolating: Box::new(move |d| if in_x(d) { vec!["s3-from-y"] } else { vec![] }),
                allows: Box::new(|_, s, _| s.ns == "tt-y"),
            },
            egress: Side::open(),
        },
        Step {
            what: "allow to a port only (x/a on 81, from anyone)",
            manifest: policy(
                "tt-x",
                "s4-port-81",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 81}]",
            ),
            audit: &[],
            ingress: Side {
                isolating: Box::new(|d| {
                    if d.id() == "tt-x/a" {
                        vec!["s4-port-81"]
                    } else {
                        vec![]
                    }
                }),
                allows: Box::new(|_, _, port| port == 81),
            },
            egress: Side::open(),
        },
        Step {
            what: "default deny egress in x",
            manifest: policy(
                "tt-x",
                "s5-deny-egress",
                "  podSelector: {}\n  policyTypes: [Egress]",
            ),
            audit: &[],
            ingress: Side::open(),
            egress: Side {
                isolating: Box::new(move |s| {
                    if in_x(s) {
                        vec!["s5-deny-egress"]
                    } else {
                        vec![]
                    }
                }),
                allows: Box::new(|_, _, _| false),
            },
        },
        Step {
            what: "egress to a CIDR (x/a to the second node's pods)",
            manifest: policy(
                "tt-x",
                "s6-egress-cidr",
                &format!(
                    "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: {second_node}}}}}]"
                ),
            ),
            audit: &[],
            ingress: Side::open(),
            egress: Side {
                isolating: Box::new(|s| {
                    if s.id() == "tt-x/a" {
                        vec!["s6-egress-cidr"]
                    } else {
                        vec![]
                    }
                }),
                allows: Box::new(|_, d, _| d.node == 1),
            },
        },
        Step {
            what: "ipBlock with except (into x/a from everywhere but y/b)",
            manifest: policy(
                "tt-x",
                "s7-except",
                &format!(
                    "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: 0.0.0.0/0, except: [{y_b}/32]}}}}]"
                ),
            ),
            audit: &[],
            ingress: Side {
                isolating: Box::new(|d| {
                    if d.id() == "tt-x/a" {
                        vec!["s7-except"]
                    } else {
                        vec![]
                    }
                }),
                allows: Box::new(|_, s, _| s.id() != "tt-y/b"),
            },
            egress: Side::open(),
        },
        Step {
            what: "namespace and pod selector in one peer (only y/b into x/a)",
            manifest: policy(
                "tt-x",
                "s8-one-peer",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: tt-y}}, podSelector: {matchLabels: {pod: b}}}]",
            ),
            audit: &[],
            ingress: Side {
                isolating: Box::new(|d| {
                    if d.id() == "tt-x/a" {
                        vec!["s8-one-peer"]
                    } else {
                        vec![]
                    }
                }),
                allows: Box::new(|_, s, _| s.id() == "tt-y/b"),
            },
            egress: Side::open(),
        },
        Step {
            what: "namespace and pod selector as two peers (all of y, and x/b, into x/a)",
            manifest: policy(
                "tt-x",
                "s9-two-peers",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: tt-y}}}, {podSelector: {matchLabels: {pod: b}}}]",
            ),
            audit: &[],
            ingress: Side {
                isolating: Box::new(|d| {
                    if d.id() == "tt-x/a" {
                        vec!["s9-two-peers"]
                    } else {
                        vec![]
                    }
                }),
                allows: Box::new(|_, s, _| s.ns == "tt-y" || s.id() == "tt-x/b"),
            },
            egress: Side::open(),
        },
        Step {
            what: "policies add up; egress and ingress together (z isolated both ways)",
            manifest: policy(
                "tt-z",
                "s10-deny-all",
                "  podSelector: {}\n  policyTypes: [Ingress, Egress]",
            ) + &policy(
                "tt-z",
                "s10-from-x-to-81",
                "  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: tt-x}}}]\n    ports: [{port: 81, endPort: 90}]",
            ) + &policy(
                "tt-z",
                "s10-to-z",
                "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {}}]",
            ),
            audit: &[],
            ingress: Side {
                isolating: Box::new(|d| {
                    if d.ns == "tt-z" {
                        vec!["s10-deny-all", "s10-from-x-to-81"]
                    } else {
                        vec![]
                    }
                }),
                allows: Box::new(|_, s, port| s.ns == "tt-x" && port == 81),
            },
            egress: Side {
                isolating: Box::new(|s| {
                    if s.ns == "tt-z" {
                        vec!["s10-deny-all", "s10-to-z"]
                    } else {
                        vec![]
                    }
                }),
                allows: Box::new(|_, d, _| d.ns == "tt-z"),
            },
        },
        Step {
            what: "audit mode: z denies all ingress, audited, so everything connects",
            manifest: policy(
                "tt-z",
                "s11-audited-deny",
                "  podSelector: {}\n  policyTypes: [Ingress]",
            ),
            audit: &["tt-z"],
            ingress: Side {
                isolating: Box::new(|d| {
                    if d.ns == "tt-z" {
                        vec!["s11-audited-deny"]
                    } else {
                        vec![]
                    }
                }),
                allows: Box::new(|_, _, _| false),
            },
            egress: Side::open(),
        },
    ]
}

#[test]
fn network_policy_truth_table() {
    if !privileged("network_policy_truth_table") {
        return;
    }
    LanCluster::run(2, |c| {
        let cp = &c.cp;
        let nodes: Vec<String> = c.agents.iter().map(|a| a.name.clone()).collect();
        let mut manifest = String::new();
        for ns in NAMESPACES {
            manifest += &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n---\n"
            );
        }
        for (i, ns) in NAMESPACES.iter().enumerate() {
            for (j, p) in PODS.iter().enumerate() {
                manifest += &listener_pod(ns, p, &format!("pod: {p}"), &nodes[(i + j) % 2]);
            }
        }
        cp.ok_stdin(&["apply", "-f", "-"], &manifest);
        let mut pods = Vec::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            cp.ok(&[
                "-n",
                ns,
                "wait",
                "--for=condition=Ready",
                "pod",
                "--all",
                "--timeout=120s",
            ]);
            for (j, p) in PODS.iter().enumerate() {
                let ip = cp.jsonpath(&["-n", ns, "get", "pod", p], "{.status.podIP}");
                pods.push(Pod {
                    ns,
                    name: p,
                    ip,
                    node: (i + j) % 2,
                });
            }
        }
        let node_cidrs: Vec<String> = nodes
            .iter()
            .map(|n| cp.jsonpath(&["get", "node", n], "{.spec.podCIDR}"))
            .collect();
        let mut previous: Vec<(String, String)> = Vec::new();
        for (n, step) in steps(&pods, &node_cidrs).iter().enumerate() {
            for (ns, name) in previous.drain(..) {
                cp.ok(&["-n", &ns, "delete", "networkpolicy", &name]);
            }
            for ns in NAMESPACES {
                let v = if step.audit.contains(&ns) {
                    "policy.skiff.dev/audit=true"
                } else {
                    "policy.skiff.dev/audit-"
                };
                cp.ok(&["annotate", "namespace", ns, v, "--overwrite"]);
            }
            if !step.manifest.is_empty() {
                cp.ok_stdin(&["apply", "-f", "-"], &step.manifest);
                for doc in step
                    .manifest
                    .split("---\n")
                    .filter(|d| !d.trim().is_empty())
                {
                    let meta = doc.lines().find(|l| l.starts_with("metadata:")).unwrap();
                    let name = meta
                        .split("name: ")
                        .nth(1)
                        .unwrap()
                        .split(',')
                        .next()
                        .unwrap();
                    let ns = meta
                        .split("namespace: ")
                        .nth(1)
                        .unwrap()
                        .trim_end_matches('}');
                    previous.push((ns.to_string(), name.to_string()));
                }
            }
            // Policies take effect in well under a second; the matrix is probed until it
            // matches (or 30 s have passed).
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let got = loop {
                let got = probe_all(cp, &pods);
                let matches = pods.iter().all(|s| {
                    pods.iter().all(|d| {
                        PORTS.iter().all(|p| {
                            got.get(&(s.id(), d.id(), *p)) == Some(&step.connects(s, d, *p))
                        })
                    })
                });
                if matches || std::time::Instant::now() > deadline {
                    break (matches, got);
                }
                std::thread::sleep(Duration::from_millis(300));
            };
            assert!(
                got.0,
                "step {n}: {}\nexpected:\n{}got:\n{}",
                step.what,
                table(&pods, |s, d, p| Some(step.connects(s, d, p))),
                table(&pods, |s, d, p| got.1.get(&(s.id(), d.id(), p)).copied()),
            );
            // Every expected drop is in the flow log of the node that decided it.
            let mut missing = Vec::new();
            let logged: Vec<Vec<serde_json::Value>> = c
                .agents
                .iter()
                .map(|a| {
                    a.flows(&[])
                        .into_iter()
                        .filter(|f| f["verdict"] != "ALLOWED")
                        .collect()
                })
                .collect();
            for s in &pods {
                for d in &pods {
                    for port in PORTS {
                        let (node, dir, by) = match step.expect(s, d, port) {
                            Expect::Allowed => continue,
                            Expect::DeniedEgress(by) => (s.node, "egress", by),
                            Expect::DeniedIngress(by) => (d.node, "ingress", by),
                        };
                        let verdict = if step.connects(s, d, port) {
                            "AUDIT"
                        } else {
                            "DROPPED"
                        };
                        let found = logged[node].iter().any(|f| {
                            f["source"]["ip"] == s.ip.as_str()
                                && f["destination"]["ip"] == d.ip.as_str()
                                && f["destination"]["port"] == port
                                && f["direction"] == dir
                                && f["verdict"] == verdict
                                && f["denied_by"]
                                    .as_array()
                                    .map(|a| {
                                        a.iter()
                                            .map(|p| {
                                                format!(
                                                    "{}/{}",
                                                    p["namespace"].as_str().unwrap_or(""),
                                                    p["name"].as_str().unwrap_or("")
                                                )
                                            })
                                            .collect::<Vec<_>>()
                                    })
                                    .is_some_and(|mut names| {
                                        names.sort();
                                        names == by
                                    })
                        });
                        if !found {
                            missing.push(format!(
                                "{} -> {}:{port} {dir} {verdict} by {by:?}",
                                s.id(),
                                d.id()
                            ));
                        }
                    }
                }
            }
            assert!(
                missing.is_empty(),
                "step {n}: {}: drops missing from the flow log:\n{}",
                step.what,
                missing.join("\n")
            );
        }
    });
}
