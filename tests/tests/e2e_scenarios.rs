//! The seed scenarios, end to end: a control plane and three real nodes in network
//! namespaces on a test LAN, pods on containerd, the real kubectl, service traffic and cluster
//! DNS through the eBPF data path. Each scenario is what a user types and what they see.

use std::time::Duration;

use skiff_tests::{control::ControlPlane, node::LanCluster, privileged};

/// The demo web server: busybox httpd serving its hostname.
const HTTPD: &str = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www";

/// `kubectl get <what…> -o jsonpath=<path>`.
fn get(cp: &ControlPlane, what: &[&str], path: &str) -> String {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    cp.jsonpath(&args, path)
}

/// `kubectl exec <pod> -- <cmd…>`: its stdout, or `None` when it failed.
fn exec(cp: &ControlPlane, pod: &str, cmd: &[&str]) -> Option<String> {
    let mut args = vec!["exec", pod, "--"];
    args.extend_from_slice(cmd);
    let out = cp.kubectl(&args);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until `cmd` in `pod` succeeds with output containing `want`; its output.
fn exec_until(cp: &ControlPlane, pod: &str, cmd: &[&str], want: &str, secs: u64) -> String {
    let mut last = String::new();
    let what = format!("`{}` in {pod} to print {want:?}", cmd.join(" "));
    cp.eventually(secs, &what, || match exec(cp, pod, cmd) {
        Some(out) if out.contains(want) => {
            last = out;
            true
        }
        _ => false,
    });
    last
}

#[test]
fn run_expose_and_reach_a_pod_by_ip_then_by_service_name() {
    if !privileged("run_expose_and_reach_a_pod_by_ip_then_by_service_name") {
        return;
    }
    LanCluster::run(3, |c| {
        let cp = &c.cp;
        cp.ok(&[
            "run",
            "server",
            "--image=busybox:1.36",
            "--",
            "sh",
            "-c",
            HTTPD,
        ]);
        cp.ok(&[
            "run",
            "client",
            "--image=busybox:1.36",
            "--",
            "sleep",
            "3600",
        ]);
        cp.ok(&[
            "wait",
            "--for=condition=Ready",
            "pod/server",
            "pod/client",
            "--timeout=90s",
        ]);
        let ip = get(cp, &["pod", "server"], "{.status.podIP}");
        exec_until(
            cp,
            "client",
            &["wget", "-qO-", &format!("http://{ip}")],
            "server",
            30,
        );

        cp.ok(&["expose", "pod", "server", "--port=80"]);
        // By name: the pod's resolv.conf sends `server` through the search path to the
        // cluster DNS at 10.96.0.10, itself reached through the eBPF load balancer.
        exec_until(
            cp,
            "client",
            &["wget", "-qO-", "http://server"],
            "server",
            30,
        );
        let resolv = exec(cp, "client", &["cat", "/etc/resolv.conf"]).expect("resolv.conf");
        assert!(
            resolv.contains("nameserver 10.96.0.10")
                && resolv
                    .contains("search default.svc.cluster.local svc.cluster.local cluster.local")
                && resolv.contains("ndots:5"),
            "{resolv}"
        );
        let vip = get(cp, &["service", "server"], "{.spec.clusterIP}");
        let looked_up = exec(
            cp,
            "client",
            &["nslookup", "server.default.svc.cluster.local"],
        )
        .expect("nslookup");
        assert!(looked_up.contains(&vip), "{looked_up}");
    });
}

const DNS_OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, labels: {app: db}}
spec:
  hostname: db-0
  subdomain: db
  terminationGracePeriodSeconds: 0
  containers:
  - {name: db, image: "busybox:1.36", command: ["sleep", "3600"], ports: [{name: pg, containerPort: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: nothing}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: alias}
spec:
  type: ExternalName
  externalName: web.default.svc.cluster.local
"#;

#[test]
fn cluster_dns_answers_services_headless_pods_ports_and_addresses() {
    if !privileged("cluster_dns_answers_services_headless_pods_ports_and_addresses") {
        return;
    }
    LanCluster::run(3, |c| {
        let cp = &c.cp;
        cp.ok_stdin(&["apply", "-f", "-"], DNS_OBJECTS);
        cp.ok(&[
            "run",
            "client",
            "--image=busybox:1.36",
            "--",
            "sleep",
            "3600",
        ]);
        cp.ok(&[
            "wait",
            "--for=condition=Ready",
            "pod/db-0",
            "pod/client",
            "--timeout=90s",
        ]);
        // Every node serves DNS for its own pods.
        cp.eventually(30, "a kube-dns endpoint per node", || {
            cp.jsonpath(
                &[
                    "get",
                    "endpointslices",
                    "-n",
                    "kube-system",
                    "-l",
                    "kubernetes.io/service-name=kube-dns",
                ],
                "{.items[*].endpoints[0].nodeName}",
            )
            .split_whitespace()
            .count()
                == 3
        });
        let db_ip = get(cp, &["pod", "db-0"], "{.status.podIP}");
        let web_ip = get(cp, &["service", "web"], "{.spec.clusterIP}");
        let lookup = |args: &[&str], want: &str| {
            let mut cmd = vec!["nslookup"];
            cmd.extend_from_slice(args);
            exec_until(cp, "client", &cmd, want, 30)
        };
        // A ClusterIP Service, by its full name and through the search path.
        lookup(&["web.default.svc.cluster.local"], &web_ip);
        // A headless Service: its pods; a StatefulSet-style pod by hostname.subdomain.
        lookup(&["db.default.svc.cluster.local"], &db_ip);
        lookup(&["db-0.db.default.svc.cluster.local"], &db_ip);
        // SRV for a named port, and the reverse name of the pod.
        lookup(
            &["-type=srv", "_pg._tcp.db.default.svc.cluster.local"],
            "5432 db-0.db.default.svc.cluster.local",
        );
        lookup(&[&db_ip], "db-0.db.default.svc.cluster.local");
        // An ExternalName is a CNAME, followed.
        let alias = lookup(&["alias.default.svc.cluster.local"], &web_ip);
        assert!(alias.contains("web.default.svc.cluster.local"), "{alias}");
        // Pods by their dashed address.
        let dashed = format!("{}.default.pod.cluster.local", db_ip.replace('.', "-"));
        lookup(&[&dashed], &db_ip);
        // A name that does not exist is NXDOMAIN, at once.
        let missing = cp.kubectl(&[
            "exec",
            "client",
            "--",
            "nslookup",
            "nope.default.svc.cluster.local",
        ]);
        let text = String::from_utf8_lossy(&missing.stdout).to_string()
            + &String::from_utf8_lossy(&missing.stderr);
        assert!(text.contains("NXDOMAIN"), "{text}");
        // Deleting the Service removes its name.
        cp.ok(&["delete", "service", "web"]);
        cp.eventually(10, "web gone from DNS", || {
            let out = cp.kubectl(&[
                "exec",
                "client",
                "--",
                "nslookup",
                "web.default.svc.cluster.local",
            ]);
            String::from_utf8_lossy(&out.stdout).contains("NXDOMAIN")
                || String::from_utf8_lossy(&out.stderr).contains("NXDOMAIN")
        });
    });
}

/// A Deployment of busybox httpd pods serving their names on port 80, ready when listening,
/// gone from an unreachable node after 2 s.
fn web_deployment(name: &str, replicas: u32) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 1
      tolerations:
      - {{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}}
      - {{key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 2}}
      containers:
      - name: web
        image: busybox:1.36
        command: ["sh", "-c", "{HTTPD}"]
        ports: [{{name: http, containerPort: 80}}]
        readinessProbe:
          tcpSocket: {{port: 80}}
          periodSeconds: 1
"#
    )
}

/// The live (not terminating) pods with `selector`: (name, node).
fn live_pods(cp: &ControlPlane, selector: &str) -> Vec<(String, String)> {
    get(
        cp,
        &["pods", "-l", selector],
        "{range .items[*]}{.metadata.name} {.spec.nodeName} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    )
    .lines()
    .filter_map(|l| {
        let mut w = l.split(' ');
        let (name, node) = (w.next()?, w.next().unwrap_or(""));
        w.next()
            .is_none_or(str::is_empty)
            .then(|| (name.to_string(), node.to_string()))
    })
    .collect()
}

#[test]
fn a_deployment_heals_survives_a_node_scales_and_rolls_out() {
    if !privileged("a_deployment_heals_survives_a_node_scales_and_rolls_out") {
        return;
    }
    LanCluster::run(3, |c| {
        let cp = &c.cp;
        cp.ok_stdin(&["apply", "-f", "-"], &web_deployment("web", 2));
        cp.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
        let before = live_pods(cp, "app=web");
        assert_eq!(before.len(), 2, "{before:?}");

        // A deleted pod is replaced.
        cp.ok(&["delete", "pod", &before[0].0, "--wait=false"]);
        cp.eventually(60, "two ready replicas again, one of them new", || {
            let now = live_pods(cp, "app=web");
            now.len() == 2
                && !now.iter().any(|(n, _)| *n == before[0].0)
                && get(cp, &["deployment", "web"], "{.status.readyReplicas}") == "2"
        });

        // A stopped node: after 40 s of silence it is Unknown, its pods are evicted once their
        // 2 s toleration passes, and the Deployment is whole again on the other nodes.
        let (_, victim_node) = live_pods(cp, "app=web")[0].clone();
        let victim = c
            .agents
            .iter()
            .position(|a| a.name == victim_node)
            .expect("the node is one of ours");
        c.agents[victim].stop();
        let cp = &c.cp;
        cp.eventually(120, "two ready replicas, none on the stopped node", || {
            let now = live_pods(cp, "app=web");
            now.len() == 2
                && now.iter().all(|(_, n)| *n != victim_node)
                && get(cp, &["deployment", "web"], "{.status.readyReplicas}") == "2"
        });
        assert_eq!(
            get(
                cp,
                &["node", &victim_node],
                "{.status.conditions[?(@.type==\"Ready\")].status}"
            ),
            "Unknown"
        );

        // Scale to 5 (on the two nodes left).
        cp.ok(&["scale", "deployment/web", "--replicas=5"]);
        cp.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
        assert_eq!(live_pods(cp, "app=web").len(), 5);

        // A rolling update: a new template, rolled out pod by pod.
        cp.ok(&["set", "env", "deployment/web", "VERSION=2"]);
        let status = cp.ok(&["rollout", "status", "deployment/web", "--timeout=120s"]);
        assert!(status.contains("successfully rolled out"), "{status}");
        let envs = get(
            cp,
            &[
                "pods",
                "-l",
                "app=web",
                "--field-selector",
                "status.phase=Running",
            ],
            "{range .items[*]}{.metadata.deletionTimestamp}/{.spec.containers[0].env[0].value}{\"\\n\"}{end}",
        );
        let live: Vec<&str> = envs.lines().filter(|l| l.starts_with('/')).collect();
        assert_eq!(
            live, ["/2"; 5],
            "every live pod runs the new template:\n{envs}"
        );
        assert_eq!(
            get(cp, &["deployment", "web"], "{.status.updatedReplicas}"),
            "5"
        );
    });
}

const BATCH: &str = r#"
apiVersion: batch/v1
kind: CronJob
metadata: {name: tick}
spec:
  schedule: "* * * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: c, image: "busybox:1.36", command: ["echo", "tick"]}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: everywhere}
spec:
  selector: {matchLabels: {app: everywhere}}
  template:
    metadata: {labels: {app: everywhere}}
    spec:
      terminationGracePeriodSeconds: 0
      containers: [{name: c, image: "busybox:1.36", command: ["sleep", "3600"]}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: once}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: "busybox:1.36", command: ["sh", "-c", "echo computed $((6 * 7))"]}]
"#;

#[test]
fn a_daemonset_covers_every_node_a_job_completes_and_a_cronjob_fires() {
    if !privileged("a_daemonset_covers_every_node_a_job_completes_and_a_cronjob_fires") {
        return;
    }
    LanCluster::run(3, |c| {
        let cp = &c.cp;
        cp.ok_stdin(&["apply", "-f", "-"], BATCH);
        cp.ok(&["rollout", "status", "daemonset/everywhere", "--timeout=90s"]);
        let mut on: Vec<String> = live_pods(cp, "app=everywhere")
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        on.sort();
        let mut nodes: Vec<String> = c.agents.iter().map(|a| a.name.clone()).collect();
        nodes.sort();
        assert_eq!(on, nodes, "one pod on every node");

        cp.ok(&[
            "wait",
            "--for=condition=complete",
            "job/once",
            "--timeout=90s",
        ]);
        assert_eq!(cp.ok(&["logs", "job/once"]).trim(), "computed 42");

        // The CronJob fires at the next minute and its Job completes.
        cp.eventually(80, "the CronJob's first Job complete", || {
            !get(cp, &["cronjob", "tick"], "{.status.lastSuccessfulTime}").is_empty()
        });
        let job = get(cp, &["jobs"], "{.items[*].metadata.name}");
        let fired = job
            .split_whitespace()
            .find(|j| j.starts_with("tick-"))
            .unwrap_or_default()
            .to_string();
        assert!(!fired.is_empty(), "a Job of the CronJob: {job}");
        assert_eq!(cp.ok(&["logs", &format!("job/{fired}")]).trim(), "tick");
    });
}

/// A child process ended (by PID) when dropped, also when the test fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP/1.0 GET from inside `ns`; the body.
fn http_get_in(ns: &skiff_net::NetNs, addr: std::net::SocketAddrV4) -> Option<String> {
    use std::io::{Read, Write};
    ns.run(|| {
        let mut s =
            std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (_, body) = out.split_once("\r\n\r\n")?;
        Some(body.trim().to_string())
    })
    .ok()
    .flatten()
}

#[test]
fn nodeport_answers_from_outside_and_cluster_ip_from_every_node() {
    if !privileged("nodeport_answers_from_outside_and_cluster_ip_from_every_node") {
        return;
    }
    LanCluster::run(3, |c| {
        let cp = &c.cp;
        cp.ok_stdin(&["apply", "-f", "-"], &web_deployment("web", 2));
        cp.ok_stdin(
            &["apply", "-f", "-"],
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: probe}
spec:
  selector: {matchLabels: {app: probe}}
  template:
    metadata: {labels: {app: probe}}
    spec:
      terminationGracePeriodSeconds: 0
      containers: [{name: c, image: "busybox:1.36", command: ["sleep", "3600"]}]
"#,
        );
        cp.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
        cp.ok(&["rollout", "status", "daemonset/probe", "--timeout=90s"]);
        let backends: Vec<String> = live_pods(cp, "app=web")
            .into_iter()
            .map(|(n, _)| n)
            .collect();

        // From a machine on the LAN that is not a node: every node's NodePort answers, with
        // a backend's name (wherever that backend runs).
        let outside = c.outside();
        for node in &c.nodes {
            let addr = std::net::SocketAddrV4::new(node.node_ip, 30080);
            cp.eventually(30, &format!("NodePort on {addr} from outside"), || {
                http_get_in(&outside.ns, addr).is_some_and(|b| backends.contains(&b))
            });
        }

        // From a pod on every node: the ClusterIP, by name.
        let probes = live_pods(cp, "app=probe");
        assert_eq!(probes.len(), 3, "{probes:?}");
        for (pod, node) in &probes {
            let body = exec_until(cp, pod, &["wget", "-qO-", "http://web"], "web-", 30);
            assert!(
                backends.contains(&body.trim().to_string()),
                "{pod} on {node}: {body}"
            );
        }
    });
}

#[test]
fn events_chain_from_deployment_to_started_logs_exec_and_describe() {
    if !privileged("events_chain_from_deployment_to_started_logs_exec_and_describe") {
        return;
    }
    LanCluster::run(3, |c| {
        let cp = &c.cp;
        // `kubectl get events --watch`, running while the Deployment is created (only what
        // happens from then on: the initial list is in name order, not causal order).
        let out_path = cp.scratch().join("events-watch.txt");
        let out = std::fs::File::create(&out_path).expect("events file");
        let _watch = KillOnDrop(
            cp.kubectl_cmd(&[
                "get",
                "events",
                "--watch-only",
                "-o",
                "custom-columns=KIND:.involvedObject.kind,NAME:.involvedObject.name,REASON:.reason",
            ])
            .stdout(out)
            .spawn()
            .expect("kubectl get events --watch"),
        );
        // The watch is running once it shows an event created after it started.
        let mut n = 0;
        cp.eventually(30, "the event watch running", || {
            n += 1;
            cp.ok_stdin(
                &["create", "-f", "-"],
                &format!(
                    "{{\"apiVersion\": \"v1\", \"kind\": \"Event\", \"metadata\": {{\"name\": \"sentinel-{n}\"}}, \
                     \"involvedObject\": {{\"kind\": \"Pod\", \"name\": \"sentinel\", \"namespace\": \"default\"}}, \
                     \"reason\": \"Sentinel\", \"message\": \"the watch runs\", \"type\": \"Normal\"}}"
                ),
            );
            std::thread::sleep(Duration::from_millis(300));
            std::fs::read_to_string(&out_path).is_ok_and(|t| t.contains("Sentinel"))
        });
        cp.ok_stdin(
            &["apply", "-f", "-"],
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: talker}
spec:
  replicas: 1
  selector: {matchLabels: {app: talker}}
  template:
    metadata: {labels: {app: talker}}
    spec:
      terminationGracePeriodSeconds: 0
      containers:
      - name: talk
        image: busybox:1.36
        command: ["sh", "-c", "echo first line; echo second line; exec sleep 3600"]
"#,
        );
        let chain = [
            ("Deployment", "ScalingReplicaSet"),
            ("ReplicaSet", "SuccessfulCreate"),
            ("Pod", "Scheduled"),
            ("Pod", "Pulled"),
            ("Pod", "Created"),
            ("Pod", "Started"),
        ];
        let mut seen = String::new();
        cp.eventually(
            60,
            "the event chain in `kubectl get events --watch`",
            || {
                seen = std::fs::read_to_string(&out_path).unwrap_or_default();
                chain.iter().all(|(kind, reason)| {
                    seen.lines().any(|l| {
                        let w: Vec<&str> = l.split_whitespace().collect();
                        w.first() == Some(kind)
                            && w.get(1).is_some_and(|n| n.starts_with("talker"))
                            && w.get(2) == Some(reason)
                    })
                })
            },
        );
        // In causal order.
        let at = |reason: &str| {
            seen.lines()
                .position(|l| l.split_whitespace().nth(2) == Some(reason))
                .unwrap_or(usize::MAX)
        };
        let order: Vec<usize> = chain.iter().map(|(_, r)| at(r)).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{seen}");

        let pod = live_pods(cp, "app=talker")[0].0.clone();
        cp.ok(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "--timeout=60s",
        ]);
        // Logs.
        cp.eventually(10, "both lines in the logs", || {
            cp.kubectl(&["logs", "deployment/talker"]).stdout == b"first line\nsecond line\n"
        });
        // Exec: output and exit code.
        assert_eq!(
            cp.ok(&["exec", &pod, "--", "sh", "-c", "echo $((6 * 7))"]),
            "42\n"
        );
        let failed = cp.kubectl(&["exec", &pod, "--", "sh", "-c", "exit 3"]);
        assert_eq!(failed.status.code(), Some(3), "{failed:?}");
        // Describe: where it runs, its state and its events.
        let node = live_pods(cp, "app=talker")[0].1.clone();
        let described = cp.ok(&["describe", "pod", &pod]);
        for want in [
            format!("Node:             {node}/"),
            "Status:           Running".to_string(),
            "State:          Running".to_string(),
            "Started container talk".to_string(),
        ] {
            assert!(described.contains(&want), "no {want:?} in:\n{described}");
        }
    });
}
