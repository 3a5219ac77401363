//! NetworkPolicy on real nodes: two `skiff-node` agents on a test LAN, real pods on containerd,
//! the real kubectl; connections are real TCP from inside pods, enforced by the eBPF programs
//! on the pods' interfaces from the maps the agents keep.

use skiff_tests::{
    control::{ControlPlane, listener_pod},
    node::LanCluster,
    privileged,
};

/// `kubectl get <what…> -o jsonpath=<path>`.
fn get(cp: &ControlPlane, what: &[&str], path: &str) -> String {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    cp.jsonpath(&args, path)
}

/// Whether `pod` (namespace `ns`) opens a TCP connection to `ip:port` within 2 s.
fn reaches(cp: &ControlPlane, ns: &str, pod: &str, ip: &str, port: u16) -> bool {
    cp.kubectl(&[
        "-n",
        ns,
        "exec",
        pod,
        "--",
        "nc",
        "-w",
        "2",
        ip,
        &port.to_string(),
    ])
    .status
    .success()
}

#[test]
fn policies_isolate_pods_allow_what_they_say_and_go_away_cleanly() {
    if !privileged("policies_isolate_pods_allow_what_they_say_and_go_away_cleanly") {
        return;
    }
    LanCluster::run(2, |c| {
        let cp = &c.cp;
        let (n1, n2) = (c.agents[0].name.clone(), c.agents[1].name.clone());
        cp.ok(&["create", "namespace", "alpha"]);
        cp.ok(&["create", "namespace", "beta"]);
        let manifests = [
            listener_pod("alpha", "server", "app: server", &n1),
            // Clients: one allowed by label on each node, one not, one in another namespace.
            listener_pod("alpha", "ok-local", "role: ok", &n1),
            listener_pod("alpha", "ok-remote", "role: ok", &n2),
            listener_pod("alpha", "nope", "role: blocked", &n2),
            listener_pod("beta", "other", "role: ok", &n2),
        ]
        .concat();
        cp.ok_stdin(&["apply", "-f", "-"], &manifests);
        for (ns, p) in [
            ("alpha", "server"),
            ("alpha", "ok-local"),
            ("alpha", "ok-remote"),
            ("alpha", "nope"),
            ("beta", "other"),
        ] {
            cp.ok(&[
                "-n",
                ns,
                "wait",
                "--for=condition=Ready",
                &format!("pod/{p}"),
                "--timeout=90s",
            ]);
        }
        let server = get(cp, &["-n", "alpha", "pod", "server"], "{.status.podIP}");
        // No policy: everyone reaches it.
        for (ns, p) in [
            ("alpha", "ok-local"),
            ("alpha", "ok-remote"),
            ("alpha", "nope"),
            ("beta", "other"),
        ] {
            assert!(
                reaches(cp, ns, p, &server, 80),
                "{ns}/{p} before any policy"
            );
        }

        // Only role=ok pods of the same namespace, only on the named port http (80).
        cp.ok_stdin(
            &["apply", "-f", "-"],
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-ok, namespace: alpha}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: ok}}}]
    ports: [{port: http}]
"#,
        );
        cp.eventually(15, "the policy enforced", || {
            !reaches(cp, "alpha", "nope", &server, 80)
        });
        assert!(
            reaches(cp, "alpha", "ok-local", &server, 80),
            "allowed, same node"
        );
        assert!(
            reaches(cp, "alpha", "ok-remote", &server, 80),
            "allowed, other node"
        );
        assert!(
            !reaches(cp, "alpha", "ok-remote", &server, 81),
            "only the named port"
        );
        assert!(
            !reaches(cp, "beta", "other", &server, 80),
            "another namespace's role=ok"
        );
        // The server's own connections out are not isolated (ingress only), replies pass.
        let ok_ip = get(cp, &["-n", "alpha", "pod", "ok-remote"], "{.status.podIP}");
        assert!(reaches(cp, "alpha", "server", &ok_ip, 81));

        // Labels change: the pod loses its permission for new connections.
        cp.ok(&[
            "-n",
            "alpha",
            "label",
            "pod",
            "ok-remote",
            "role=blocked",
            "--overwrite",
        ]);
        cp.eventually(15, "the relabelled pod denied", || {
            !reaches(cp, "alpha", "ok-remote", &server, 80)
        });

        // The policy deleted: everyone again.
        cp.ok(&["-n", "alpha", "delete", "networkpolicy", "server-from-ok"]);
        cp.eventually(15, "isolation lifted", || {
            reaches(cp, "alpha", "nope", &server, 80)
        });
        assert!(reaches(cp, "beta", "other", &server, 80));
        // A pod created where a policy already selects it: egress only to the server.
        cp.ok_stdin(
            &["apply", "-f", "-"],
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: late-out, namespace: alpha}
spec:
  podSelector: {matchLabels: {role: late}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: server}}}]
"#,
        );
        cp.ok_stdin(
            &["apply", "-f", "-"],
            &listener_pod("alpha", "late", "role: late", &n1),
        );
        cp.ok(&[
            "-n",
            "alpha",
            "wait",
            "--for=condition=Ready",
            "pod/late",
            "--timeout=90s",
        ]);
        let local_ip = get(cp, &["-n", "alpha", "pod", "ok-local"], "{.status.podIP}");
        cp.eventually(15, "the new pod's allowed egress", || {
            reaches(cp, "alpha", "late", &server, 80)
        });
        assert!(
            !reaches(cp, "alpha", "late", &local_ip, 80),
            "egress elsewhere"
        );
        // Identities were allocated through the API.
        assert!(!cp.ok(&["get", "securityidentities"]).is_empty());
    });
}
