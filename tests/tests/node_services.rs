//! Services on real nodes: two `skiff-node` agents in their own namespaces on a test LAN, real
//! pods on containerd, the real kubectl. Service traffic from pods is translated by the eBPF
//! programs on the pods' interfaces; no iptables or nftables rule is involved.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::{SocketAddrV4, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use skiff_datapath::{
    PinDir,
    endpoints::EndpointMap,
    lb::{LbMaps, ct_entries},
};
use skiff_ebpf_common::ct::CT_REPLY;
use skiff_net::NetNs;
use skiff_tests::{
    bpffs,
    control::ControlPlane,
    node::{LanCluster, NodeNs},
    privileged,
};

const MANIFESTS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 60
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector: {matchLabels: {app: web}}
      containers:
      - name: web
        image: busybox:1.36
        # Ignores SIGTERM, so a deleted pod keeps serving through its grace period (draining).
        command: ["sh", "-c", "trap '' TERM; mkdir -p /tmp/www; hostname > /tmp/www/index.html; nc -ll -p 9000 -e /bin/cat & httpd -f -p 8080 -h /tmp/www & wait"]
        ports:
        - {name: http, containerPort: 8080}
        - {name: echo, containerPort: 9000}
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: echo, port: 9000, targetPort: echo}
---
apiVersion: v1
kind: Service
metadata: {name: nothing}
spec:
  selector: {app: nothing-matches}
  ports:
  - {port: 80}
"#;

/// `kubectl get <what> -o jsonpath=<path>`; empty when the object does not exist (yet).
fn get(cp: &ControlPlane, what: &[&str], path: &str) -> String {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    let expr = format!("jsonpath={path}");
    args.extend_from_slice(&["-o", &expr]);
    String::from_utf8_lossy(&cp.kubectl(&args).stdout).into_owned()
}

/// A long-lived TCP connection opened from inside a pod's network namespace (so it leaves
/// through the pod's interface and meets the pod programs, as the pod's own traffic does).
struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    fn open(pod_ns: &NetNs, to: SocketAddrV4) -> Conn {
        let stream = pod_ns
            .run(|| TcpStream::connect_timeout(&to.into(), Duration::from_secs(5)))
            .expect("enter pod netns")
            .expect("connect through the service");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        Conn {
            stream: BufReader::new(stream),
        }
    }

    fn local_port(&self) -> u16 {
        self.stream.get_ref().local_addr().expect("addr").port()
    }

    /// Sends a line and reads its echo.
    fn echo(&mut self, line: &str) -> std::io::Result<String> {
        self.stream
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())?;
        let mut back = String::new();
        self.stream.read_line(&mut back)?;
        Ok(back.trim_end().to_string())
    }
}

/// One HTTP/1.0 GET to `addr` from the test's own namespace; the body's last line.
fn http_get(addr: SocketAddrV4) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).ok()?;
    body.lines().last().map(str::to_string)
}

/// The status line and body of `GET /` to `addr`.
fn http_status_and_body(addr: SocketAddrV4) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut all = String::new();
    std::io::Read::read_to_string(&mut s, &mut all).ok()?;
    Some(all)
}

/// The pod names that answered `n` HTTP requests to `addr` (`ip port`) from the client pod.
/// (`nc`, not the image's static `wget`, which needs NSS to look up the `http` port.)
fn hostnames(cp: &ControlPlane, addr: &str, n: usize) -> Vec<String> {
    let script = format!(
        "for i in $(seq {n}); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {addr} | tail -n 1 || echo FAILED; done"
    );
    cp.ok(&["exec", "client", "--", "sh", "-c", &script])
        .lines()
        .map(str::to_string)
        .collect()
}

fn pod_ip_to_name(cp: &ControlPlane) -> Vec<(String, String)> {
    get(
        cp,
        &["pods", "-l", "app=web"],
        r#"{range .items[*]}{.status.podIP}={.metadata.name}{"\n"}{end}"#,
    )
    .lines()
    .filter_map(|l| l.split_once('='))
    .map(|(ip, name)| (ip.to_string(), name.to_string()))
    .collect()
}

/// Ready and terminating endpoint counts of the `web` Service's slices.
fn slice_counts(cp: &ControlPlane) -> (usize, usize) {
    let out = get(
        cp,
        &["endpointslices", "-l", "kubernetes.io/service-name=web"],
        r#"{range .items[*].endpoints[*]}{.conditions.ready}/{.conditions.terminating}{"\n"}{end}"#,
    );
    let ready = out.lines().filter(|l| l.starts_with("true/")).count();
    let terminating = out.lines().filter(|l| l.ends_with("/true")).count();
    (ready, terminating)
}

/// Ready backends of frontend `vip:port` in a node's maps.
fn programmed_ready(pins: &PinDir, vip: std::net::Ipv4Addr, port: u16) -> Option<u16> {
    let maps = LbMaps::open(pins).ok()?;
    maps.services().ok()?.into_iter().find_map(|(k, v)| {
        (k.slot == 0
            && k.address == u32::from_ne_bytes(vip.octets())
            && k.port == port.to_be()
            && k.proto == 6)
            .then_some(v.count)
    })
}

/// The backend address the forward CT entry of a connection from local port `port` names.
fn backend_of(pins: &PinDir, port: u16) -> std::net::Ipv4Addr {
    let ct = ct_entries(pins).expect("ct");
    let (_, e) = ct
        .iter()
        .find(|(k, e)| k.sport == port.to_be() && e.flags & CT_REPLY == 0)
        .expect("the connection is tracked");
    std::net::Ipv4Addr::from(e.to_addr.to_ne_bytes())
}

fn in_ns(node: &NodeNs, program: &str, args: &[&str]) -> String {
    let out = node
        .ns
        .run(|| Command::new(program).args(args).output())
        .expect("enter node netns")
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cluster_ip_services_are_routed_by_ebpf_across_nodes() {
    if !privileged("cluster_ip_services_are_routed_by_ebpf_across_nodes") {
        return;
    }
    LanCluster::run(2, |c| {
        let LanCluster {
            nodes, agents, cp, ..
        } = c;
        let cp = &*cp;
        let (n1, n2) = (&nodes[0], &nodes[1]);
        let (name1, name2) = (agents[0].name.clone(), agents[1].name.clone());
        cp.ok_stdin(&["apply", "-f", "-"], MANIFESTS);
        let on1 = format!(
            r#"{{"apiVersion":"v1","spec":{{"nodeName":"{name1}","terminationGracePeriodSeconds":0}}}}"#
        );
        cp.ok(&[
            "run",
            "client",
            "--image=busybox:1.36",
            &format!("--overrides={on1}"),
            "--",
            "sleep",
            "3600",
        ]);
        cp.eventually(90, "web available and client running", || {
            get(cp, &["deployment", "web"], "{.status.availableReplicas}") == "2"
                && get(cp, &["pod", "client"], "{.status.phase}") == "Running"
        });
        let web_nodes: BTreeSet<String> =
            get(cp, &["pods", "-l", "app=web"], "{.items[*].spec.nodeName}")
                .split_whitespace()
                .map(str::to_string)
                .collect();
        assert_eq!(web_nodes.len(), 2, "one backend per node: {web_nodes:?}");
        let vip: std::net::Ipv4Addr = get(cp, &["service", "web"], "{.spec.clusterIP}")
            .parse()
            .expect("cluster IP");
        let pins1 = PinDir::open(&bpffs(), &name1).expect("node 1 pins");
        cp.eventually(10, "the frontend programmed on node 1", || {
            programmed_ready(&pins1, vip, 80) == Some(2)
        });

        // Requests from a pod reach both backends, one on each node.
        let answers = hostnames(cp, &format!("{vip} 80"), 30);
        let seen: BTreeSet<&String> = answers.iter().collect();
        let names: BTreeSet<String> = pod_ip_to_name(cp).into_iter().map(|(_, n)| n).collect();
        assert_eq!(
            seen.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
            names,
            "30 requests spread over both backends: {answers:?}"
        );

        // Node 1 delivers to its own pods directly: its endpoint map holds exactly them.
        let node1_pods: BTreeSet<String> = get(
            cp,
            &[
                "pods",
                "--field-selector",
                &format!("spec.nodeName={name1}"),
            ],
            "{.items[*].status.podIP}",
        )
        .split_whitespace()
        .map(str::to_string)
        .collect();
        let endpoints: BTreeSet<String> = EndpointMap::open(&pins1)
            .and_then(|m| m.list())
            .expect("node 1 endpoint map")
            .into_iter()
            .map(|(ip, _)| ip.to_string())
            .collect();
        assert_eq!(endpoints, node1_pods, "node 1's endpoint map");

        // The `kubernetes` Service's EndpointSlice names the address the API server listens
        // on (pods reach it through 10.96.0.1 where the API server's machine routes back to
        // the pod network: the test host has no route to it).
        let api_ep = get(
            cp,
            &["endpointslice", "kubernetes"],
            "{.endpoints[0].addresses[0]}:{.ports[0].port}",
        );
        assert_eq!(
            api_ep.split(':').next(),
            Some(n1.host_ip.to_string().as_str()),
            "kubernetes endpoints: {api_ep}"
        );

        // A Service without endpoints refuses at once instead of timing out.
        let nothing = get(cp, &["service", "nothing"], "{.spec.clusterIP}");
        let started = Instant::now();
        let refused = cp.kubectl(&["exec", "client", "--", "nc", "-w", "10", &nothing, "80"]);
        assert!(!refused.status.success());
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("refused"),
            "{refused:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "rejected, not timed out"
        );

        // Nothing of this is in iptables or nftables.
        for n in [n1, n2] {
            for (program, args) in [
                ("iptables-save", &[][..]),
                ("nft", &["list", "ruleset"][..]),
            ] {
                let rules = in_ns(n, program, args);
                assert!(
                    !rules.contains(&vip.to_string()) && !rules.to_lowercase().contains("skiff"),
                    "{program} in a node namespace mentions the service: {rules}"
                );
            }
        }

        // A long-lived connection through the Service, from the client pod's namespace.
        let client_uid = get(cp, &["pod", "client"], "{.metadata.uid}");
        let client_ns = NetNs::open(&agents[0].run_dir.join(format!("netns/pod-{client_uid}")))
            .expect("client pod netns");
        let mut long = Conn::open(&client_ns, SocketAddrV4::new(vip, 9000));
        assert_eq!(long.echo("hello").expect("echo"), "hello");
        let drained_ip = backend_of(&pins1, long.local_port()).to_string();
        let by_ip = pod_ip_to_name(cp);
        let drained = by_ip
            .iter()
            .find(|(ip, _)| *ip == drained_ip)
            .map(|(_, n)| n.clone())
            .expect("the backend is a web pod");

        // Its backend terminates (and keeps serving through its grace period): the connection
        // goes on, new connections go to the other backend.
        cp.ok(&["delete", "pod", &drained, "--wait=false"]);
        cp.eventually(30, "the deleted pod's endpoint terminating", || {
            let (_, terminating) = slice_counts(cp);
            terminating == 1
        });
        cp.eventually(10, "node 1 stops sending new connections to it", || {
            programmed_ready(&pins1, vip, 80)
                == Some(u16::try_from(slice_counts(cp).0).expect("small"))
        });
        for a in hostnames(cp, &format!("{vip} 80"), 15) {
            assert_ne!(
                a, drained,
                "a new connection went to the terminating backend"
            );
        }
        assert_eq!(
            long.echo("still there").expect("echo while draining"),
            "still there"
        );

        // Scaling: once the slices list the new endpoints, node 1 routes to them within a second.
        cp.ok(&["scale", "deployment", "web", "--replicas=4"]);
        cp.eventually(90, "4 ready endpoints", || slice_counts(cp).0 == 4);
        let listed = Instant::now();
        while programmed_ready(&pins1, vip, 80) != Some(4) {
            assert!(
                listed.elapsed() < Duration::from_secs(1),
                "routing not updated within a second of the EndpointSlice change"
            );
            std::thread::sleep(Duration::from_millis(10));
        }

        // NodePort from outside the cluster (the test's own namespace, on the LAN): through
        // node 1's address to backends on both nodes (those on node 2 source-translated).
        cp.ok(&[
            "patch",
            "service",
            "web",
            "-p",
            r#"{"spec":{"type":"NodePort","ports":[{"name":"http","port":80,"targetPort":"http","nodePort":30080},{"name":"echo","port":9000,"targetPort":"echo","nodePort":30090}]}}"#,
        ]);
        let node_port = SocketAddrV4::new(n1.node_ip, 30080);
        let mut from_outside = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while from_outside.len() < 4 && Instant::now() < deadline {
            if let Some(name) = http_get(node_port) {
                from_outside.insert(name);
            } else {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let on_node2: BTreeSet<String> = get(
            cp,
            &[
                "pods",
                "-l",
                "app=web",
                "--field-selector",
                &format!("spec.nodeName={name2}"),
            ],
            "{.items[*].metadata.name}",
        )
        .split_whitespace()
        .map(str::to_string)
        .collect();
        assert!(
            from_outside.iter().any(|n| on_node2.contains(n))
                && from_outside.iter().any(|n| !on_node2.contains(n)),
            "NodePort on node 1 reaches backends on both nodes: {from_outside:?} (node 2: {on_node2:?})"
        );
        // The uplinks here are veths: XDP runs in generic mode, where the fast path stays
        // off (a locally sent skb's checksum may be a partial seed) and `from-netdev` does
        // NodePort; nothing went out from XDP.
        let rows = skiff_datapath::metrics::read(&pins1).expect("node 1 metrics");
        let xdp =
            |v| skiff_datapath::metrics::packets(&rows, skiff_ebpf_common::Hook::XdpUplink, v);
        assert!(
            xdp(skiff_datapath::metrics::Verdict::Forwarded) > 0,
            "{rows:?}"
        );
        assert_eq!(
            xdp(skiff_datapath::metrics::Verdict::Redirected),
            0,
            "{rows:?}"
        );

        // ClientIP affinity: one backend for every request of the client.
        cp.ok(&[
            "patch",
            "service",
            "web",
            "-p",
            r#"{"spec":{"sessionAffinity":"ClientIP"}}"#,
        ]);
        cp.eventually(10, "affinity programmed", || {
            LbMaps::open(&pins1)
                .and_then(|m| m.services())
                .is_ok_and(|s| {
                    s.iter().any(|(k, v)| {
                        k.slot == 0
                            && k.address == u32::from_ne_bytes(vip.octets())
                            && v.affinity_timeout == 10_800
                    })
                })
        });
        let answers = hostnames(cp, &format!("{vip} 80"), 15);
        assert_eq!(
            answers.iter().collect::<BTreeSet<_>>().len(),
            1,
            "affinity holds: {answers:?}"
        );

        // A long-lived connection to a backend that stays (the drained one may be gone by now).
        drop(long);
        let mut long = Conn::open(&client_ns, SocketAddrV4::new(vip, 9000));
        assert_eq!(long.echo("before").expect("echo"), "before");
        // An agent restart leaves the connection alone: programs stay attached through their
        // pinned links, connection tracking lives in pinned maps.
        agents[0].stop();
        assert_eq!(
            long.echo("agent down").expect("echo, agent stopped"),
            "agent down"
        );
        agents[0].restart(n1);
        cp.eventually(30, "the restarted agent's service sync", || {
            agents[0].log().matches("service maps adopted").count() >= 2
        });
        assert_eq!(
            long.echo("agent back").expect("echo after restart"),
            "agent back"
        );
        assert_eq!(hostnames(cp, &format!("{vip} 80"), 3).len(), 3);

        // The agent's metrics: programming latency and per-Service counters.
        let metrics = in_ns(
            n1,
            "busybox",
            &["wget", "-q", "-O", "-", "http://127.0.0.1:10249/metrics"],
        );
        assert!(
            metrics.contains("skiff_network_programming_duration_seconds_count"),
            "{metrics}"
        );
        assert!(metrics.contains(r#"service="web""#), "{metrics}");

        // externalTrafficPolicy=Local: traffic from outside stays on the node it arrives at,
        // and the health check node port tells load balancers which nodes have endpoints.
        cp.ok(&[
            "patch",
            "service",
            "web",
            "-p",
            r#"{"spec":{"type":"LoadBalancer","externalTrafficPolicy":"Local","sessionAffinity":"None"}}"#,
        ]);
        let hc: u16 = get(cp, &["service", "web"], "{.spec.healthCheckNodePort}")
            .parse()
            .expect("a health check node port");
        let mut answer = String::new();
        cp.eventually(10, "the health check port answering 200", || {
            answer = http_status_and_body(SocketAddrV4::new(n1.node_ip, hc)).unwrap_or_default();
            answer.starts_with("HTTP/1.1 200")
        });
        assert!(
            answer.contains(r#""name":"web""#) && answer.contains(r#""localEndpoints":"#),
            "{answer}"
        );
        cp.eventually(10, "local-only NodePort routing", || {
            (0..10).all(|_| http_get(node_port).is_some_and(|n| !on_node2.contains(&n)))
        });

        assert_eq!(
            get(
                cp,
                &["pod", "client"],
                "{.status.containerStatuses[0].restartCount}"
            ),
            "0",
            "the agent restart left the client's container alone"
        );
        // (The drained pod may be gone already.)
        cp.kubectl(&[
            "delete",
            "pod",
            &drained,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ]);
        cp.ok(&["delete", "deployment", "web", "--wait=false"]);
        cp.ok(&[
            "delete",
            "pods",
            "--all",
            "--grace-period=0",
            "--force",
            "--timeout=60s",
        ]);
    });
}
