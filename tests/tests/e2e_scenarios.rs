//! The seed scenarios, end to end: a control plane and three real nodes in network
//! namespaces on a test LAN, pods on containerd, the real kubectl, service traffic and cluster
//! DNS through the eBPF data path. Each scenario is what a user types and what they see.

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
