//! Pods on a real node: `skiff-node` in a node namespace with its own containerd, joined to
//! `skiff-control`, runs what `kubectl run` creates: the pod gets an IP from the node's pod
//! CIDR and serves HTTP on it; a crashing container backs off (CrashLoopBackOff); a pod with
//! `restartPolicy: Never` completes; an unknown image is `ErrImagePull`/`ImagePullBackOff`;
//! deleting a pod removes its containers, namespace, interface and IP before the object goes.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use skiff_tests::{
    control::ControlPlane,
    node::{LanCluster, NodeAgent, NodeNs},
    privileged,
};

fn jsonpath(cp: &ControlPlane, what: &[&str], path: &str) -> String {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    let expr = format!("jsonpath={path}");
    args.extend_from_slice(&["-o", &expr]);
    String::from_utf8_lossy(&cp.kubectl(&args).stdout).into_owned()
}

/// Runs `body` with a control plane and one node agent in its own namespace (the busybox image
/// imported); prints the agent's log if it fails, and cleans up either way.
fn on_one_node(test: &str, body: impl FnOnce(&NodeNs, &ControlPlane, &mut NodeAgent)) {
    on_one_node_with(
        test,
        |_, _, archive| (vec![archive], Vec::new(), ()),
        |node_ns, cp, agent, ()| body(node_ns, cp, agent),
    );
}

/// [`on_one_node`] where `prepare` (given the busybox archive) decides the agent's images and
/// extra arguments before it starts, and hands `body` what it made.
fn on_one_node_with<S>(
    test: &str,
    prepare: impl FnOnce(&NodeNs, &ControlPlane, PathBuf) -> (Vec<PathBuf>, Vec<String>, S),
    body: impl FnOnce(&NodeNs, &ControlPlane, &mut NodeAgent, S),
) {
    if !privileged(test) {
        return;
    }
    let node_ns = NodeNs::new();
    let cp = ControlPlane::start_on(node_ns.host_ip);
    let archive = cp.busybox_archive();
    let (images, extra, made) = prepare(&node_ns, &cp, archive);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut agent = NodeAgent::start_with(
        &node_ns,
        &cp.scratch().join("data/node.kubeconfig"),
        cp.scratch(),
        &images,
        &extra,
    );
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        body(&node_ns, &cp, &mut agent, made)
    }));
    if outcome.is_err() {
        eprintln!("agent log:\n{}", agent.log());
    }
    agent.stop();
    drop(agent);
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn kubectl_run_pods_run_serve_restart_complete_and_clean_up() {
    on_one_node(
        "kubectl_run_pods_run_serve_restart_complete_and_clean_up",
        |node_ns, cp, agent| {
            let name = agent.name.clone();
            cp.eventually(60, "the node to be Ready", || {
                jsonpath(
                    cp,
                    &["node", &name],
                    "{.status.conditions[?(@.type==\"Ready\")].status}",
                ) == "True"
            });
            let runtime = jsonpath(
                cp,
                &["node", &name],
                "{.status.nodeInfo.containerRuntimeVersion}",
            );
            assert!(runtime.starts_with("containerd://1."), "{runtime}");

            // A web server: Running with an IP from the node's pod CIDR, serving on it.
            cp.ok(&[
                "run",
                "web",
                "--image=busybox:1.36",
                "--port=8080",
                "--",
                "httpd",
                "-f",
                "-p",
                "8080",
                "-h",
                "/var/www",
            ]);
            cp.eventually(60, "pod web Running", || {
                jsonpath(cp, &["pod", "web"], "{.status.phase}") == "Running"
            });
            let ip = jsonpath(cp, &["pod", "web"], "{.status.podIP}");
            let cidr = jsonpath(cp, &["node", &name], "{.spec.podCIDR}");
            let prefix = cidr.trim_end_matches("0/24");
            assert!(
                ip.starts_with(prefix),
                "pod IP {ip} outside the node's {cidr}"
            );
            let pods = cp.ok(&["get", "pods", "-o", "wide"]);
            let row = pods
                .lines()
                .find(|l| l.starts_with("web"))
                .expect("web row");
            assert!(
                row.contains("1/1")
                    && row.contains("Running")
                    && row.contains(&ip)
                    && row.contains(&name),
                "{pods}"
            );
            let addr: SocketAddrV4 = format!("{ip}:8080").parse().expect("addr");
            let body = node_ns
                .ns
                .run(move || -> std::io::Result<String> {
                    let mut c = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
                    c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                    let mut out = String::new();
                    c.read_to_string(&mut out)?;
                    Ok(out)
                })
                .expect("enter the node")
                .expect("the pod answers on its IP");
            assert!(body.contains("hello from skiff"), "{body}");

            // kubectl logs, through the API server's proxy to the agent (pinned certificate).
            cp.ok(&[
                "run",
                "talker",
                "--image=busybox:1.36",
                "--",
                "sh",
                "-c",
                "for i in 1 2 3; do echo line $i; done; sleep 600",
            ]);
            cp.eventually(60, "talker's output", || {
                cp.kubectl(&["logs", "talker"]).stdout == b"line 1\nline 2\nline 3\n"
            });
            assert_eq!(cp.ok(&["logs", "talker", "--tail=1"]), "line 3\n");
            let mut follow = cp
                .kubectl_cmd(&["logs", "-f", "talker"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("kubectl logs -f");
            let mut out = follow.stdout.take().expect("stdout");
            let mut first = [0u8; 21];
            out.read_exact(&mut first).expect("followed output");
            assert_eq!(&first, b"line 1\nline 2\nline 3\n");
            let _ = follow.kill();
            let _ = follow.wait();
            let err = cp.fails(&["logs", "talker", "-c", "nope"]);
            assert!(err.contains("container nope is not valid"), "{err}");
            // Both streams, a line longer than one log record, timestamps, --since, --limit-bytes.
            cp.ok(&[
            "run",
            "chatty",
            "--image=busybox:1.36",
            "--",
            "sh",
            "-c",
            "echo out; sleep 0.2; echo err >&2; sleep 0.2; head -c 20000 /dev/zero | tr '\\0' x; echo; sleep 600",
        ]);
            let long = "x".repeat(20000);
            let want = format!("out\nerr\n{long}\n");
            cp.eventually(60, "chatty's output", || {
                cp.kubectl(&["logs", "chatty"]).stdout == want.as_bytes()
            });
            let stamped = cp.ok(&["logs", "chatty", "--timestamps"]);
            let lines: Vec<&str> = stamped.lines().collect();
            assert_eq!(lines.len(), 3, "{stamped:.200}");
            for (line, content) in lines.iter().zip(["out", "err", long.as_str()]) {
                let (ts, rest) = line.split_once(' ').expect("a timestamp");
                assert!(
                    ts.len() >= 20 && ts.ends_with('Z') && ts.contains('T'),
                    "{ts}"
                );
                assert_eq!(rest, content);
            }
            assert_eq!(cp.ok(&["logs", "chatty", "--since=1h"]), want);
            assert_eq!(
                cp.ok(&["logs", "chatty", "--since-time=2099-01-01T00:00:00Z"]),
                ""
            );
            assert_eq!(cp.ok(&["logs", "chatty", "--tail=1"]), format!("{long}\n"));
            assert_eq!(cp.ok(&["logs", "chatty", "--limit-bytes=5"]), "out\ne");

            // The environment: configMap and secret keys, the downward API, service variables; a
            // missing configMap is CreateContainerConfigError.
            cp.ok(&[
                "create",
                "configmap",
                "settings",
                "--from-literal=mode=fast",
            ]);
            cp.ok(&[
                "create",
                "secret",
                "generic",
                "creds",
                "--from-literal=token=s3cret",
            ]);
            let manifest = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "envy"},
          "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox:1.36",
            "command": ["sh", "-c", "echo $MODE $TOKEN $ME $(test -n \"$MY_IP\" && echo ip) $KUBERNETES_SERVICE_HOST $GREETING"],
            "env": [
              {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
              {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
              {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
              {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
              {"name": "GREETING", "value": "hi-$(ME)"}]}]}}"#;
            cp.ok_stdin(&["create", "-f", "-"], manifest);
            cp.eventually(60, "pod envy Succeeded", || {
                jsonpath(cp, &["pod", "envy"], "{.status.phase}") == "Succeeded"
            });
            assert_eq!(
                cp.ok(&["logs", "envy"]),
                "fast s3cret envy ip 10.96.0.1 hi-envy\n"
            );
            let broken = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "broken"},
          "spec": {"containers": [{"name": "c", "image": "busybox:1.36",
            "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}}]}]}}"#;
            cp.ok_stdin(&["create", "-f", "-"], broken);
            cp.eventually(30, "CreateContainerConfigError", || {
                jsonpath(
                    cp,
                    &["pod", "broken"],
                    "{.status.containerStatuses[0].state.waiting.reason}",
                ) == "CreateContainerConfigError"
            });

            // A crashing container backs off.
            cp.ok(&[
                "run",
                "crash",
                "--image=busybox:1.36",
                "--",
                "sh",
                "-c",
                "echo dying; exit 3",
            ]);
            cp.eventually(60, "CrashLoopBackOff", || {
                jsonpath(
                    cp,
                    &["pod", "crash"],
                    "{.status.containerStatuses[0].state.waiting.reason}",
                ) == "CrashLoopBackOff"
            });
            let last = jsonpath(
                cp,
                &["pod", "crash"],
                "{.status.containerStatuses[0].lastState.terminated.exitCode} {.status.containerStatuses[0].restartCount}",
            );
            assert_eq!(last, "3 1");
            assert!(
                cp.ok(&["get", "pods"])
                    .lines()
                    .any(|l| l.starts_with("crash") && l.contains("CrashLoopBackOff"))
            );
            // The delays grow: 10 s after the first failure, 20 s after the second.
            let waiting = |cp: &ControlPlane| {
                jsonpath(
                    cp,
                    &["pod", "crash"],
                    "{.status.containerStatuses[0].state.waiting.message}",
                )
            };
            assert!(waiting(cp).contains("back-off 10s"), "{}", waiting(cp));
            cp.eventually(40, "the second back-off", || {
                waiting(cp).contains("back-off 20s")
            });
            assert_eq!(
                jsonpath(
                    cp,
                    &["pod", "crash"],
                    "{.status.containerStatuses[0].restartCount}"
                ),
                "2"
            );

            // restartPolicy Never: the pod completes.
            cp.ok(&[
                "run",
                "once",
                "--restart=Never",
                "--image=busybox:1.36",
                "--",
                "true",
            ]);
            cp.eventually(60, "pod once Succeeded", || {
                jsonpath(cp, &["pod", "once"], "{.status.phase}") == "Succeeded"
            });

            // An image the node does not have.
            cp.ok(&["run", "missing", "--image=nosuch/image:1"]);
            cp.eventually(60, "ErrImagePull", || {
                let r = jsonpath(
                    cp,
                    &["pod", "missing"],
                    "{.status.containerStatuses[0].state.waiting.reason}",
                );
                r == "ErrImagePull" || r == "ImagePullBackOff"
            });

            // Deleting removes the containers, network and IP before the object.
            let host_if =
                skiff_net::pod::host_if(&jsonpath(cp, &["pod", "web"], "{.metadata.uid}"));
            cp.ok(&["delete", "pod", "web", "--grace-period=2", "--timeout=60s"]);
            assert!(cp.fails(&["get", "pod", "web"]).contains("NotFound"));
            let links = std::process::Command::new("ip")
                .args([
                    "-n",
                    node_ns.ns.path().file_name().unwrap().to_str().unwrap(),
                    "link",
                ])
                .output()
                .expect("ip link");
            assert!(
                !String::from_utf8_lossy(&links.stdout).contains(&host_if),
                "veth {host_if} left behind"
            );
            let ipam = std::fs::read_dir(agent.data_dir.join("ipam").join(cidr.replace('/', "_")))
                .expect("ipam dir")
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>();
            assert!(!ipam.contains(&ip), "IP {ip} still allocated: {ipam:?}");
            cp.ok(&[
                "delete",
                "pods",
                "--all",
                "--grace-period=1",
                "--timeout=60s",
            ]);
            cp.eventually(60, "every pod gone", || {
                cp.ok(&["get", "pods", "-o", "name"]).trim().is_empty()
            });
        },
    );
}

#[test]
fn a_pod_reaches_a_pod_on_another_node_by_its_ip() {
    if !privileged("a_pod_reaches_a_pod_on_another_node_by_its_ip") {
        return;
    }
    LanCluster::run(2, |c| {
        let cp = &c.cp;
        let (name1, name2) = (c.agents[0].name.clone(), c.agents[1].name.clone());
        let on = |node: &str| format!(r#"{{"apiVersion":"v1","spec":{{"nodeName":"{node}"}}}}"#);
        cp.ok(&[
            "run",
            "server",
            "--image=busybox:1.36",
            &format!("--overrides={}", on(&name2)),
            "--",
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/var/www",
        ]);
        cp.eventually(60, "server Running", || {
            jsonpath(cp, &["pod", "server"], "{.status.phase}") == "Running"
        });
        let ip = jsonpath(cp, &["pod", "server"], "{.status.podIP}");
        let cidr2 = jsonpath(cp, &["node", &name2], "{.spec.podCIDR}");
        assert!(
            ip.starts_with(cidr2.trim_end_matches("0/24")),
            "{ip} not in {cidr2}"
        );
        cp.ok(&[
            "run",
            "client",
            "--restart=Never",
            "--image=busybox:1.36",
            &format!("--overrides={}", on(&name1)),
            "--",
            "sh",
            "-c",
            &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 8080 | tail -n 1"),
        ]);
        cp.eventually(60, "the client to finish", || {
            matches!(
                jsonpath(cp, &["pod", "client"], "{.status.phase}").as_str(),
                "Succeeded" | "Failed"
            )
        });
        let phase = jsonpath(cp, &["pod", "client"], "{.status.phase}");
        assert_eq!(
            phase,
            "Succeeded",
            "client output: {:?}, state: {}",
            cp.kubectl(&["logs", "client"]),
            jsonpath(
                cp,
                &["pod", "client"],
                "{.status.containerStatuses[0].state}"
            )
        );
        assert_eq!(cp.ok(&["logs", "client"]), "hello from skiff\n");
        cp.ok(&[
            "delete",
            "pods",
            "--all",
            "--grace-period=1",
            "--timeout=60s",
        ]);
    });
}

#[test]
fn kubectl_exec_streams_stdio_exit_codes_and_a_terminal() {
    on_one_node(
        "kubectl_exec_streams_stdio_exit_codes_and_a_terminal",
        |_node_ns, cp, agent| {
            let exec_dir = agent.run_dir.join("exec");
            cp.ok(&[
                "run",
                "box",
                "--image=busybox:1.36",
                "--env=GREETING=hello",
                "--",
                "sleep",
                "3600",
            ]);
            cp.eventually(90, "pod box Running", || {
                jsonpath(cp, &["pod", "box"], "{.status.phase}") == "Running"
            });

            // stdout and stderr kept apart, the container's environment, the exit code.
            let out = cp.kubectl(&[
                "exec",
                "box",
                "--",
                "sh",
                "-c",
                "echo out; echo err >&2; echo $GREETING; exit 3",
            ]);
            let (stdout, stderr) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            assert_eq!(
                out.status.code(),
                Some(3),
                "stdout {stdout:?} stderr {stderr:?}"
            );
            assert_eq!(stdout, "out\nhello\n");
            assert!(stderr.starts_with("err\n"), "{stderr:?}");
            assert!(
                stderr.contains("command terminated with exit code 3"),
                "{stderr:?}"
            );
            assert_eq!(cp.ok(&["exec", "box", "--", "hostname"]), "box\n");

            // stdin to its end: a MiB through cat comes back byte for byte.
            let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
            let mut child = cp
                .kubectl_cmd(&["exec", "-i", "box", "--", "cat"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("kubectl exec -i");
            let mut stdin = child.stdin.take().expect("stdin");
            let input = data.clone();
            let writer = std::thread::spawn(move || stdin.write_all(&input));
            let out = child.wait_with_output().expect("kubectl exec -i output");
            writer.join().expect("writer").expect("write stdin");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.stdout == data, "{} bytes came back", out.stdout.len());

            // kubectl cp (tar over exec) in both directions.
            let local = cp.scratch().join("greeting.txt");
            std::fs::write(&local, "copied\n").expect("write a local file");
            cp.ok(&["cp", &local.display().to_string(), "box:/tmp/greeting.txt"]);
            assert_eq!(
                cp.ok(&["exec", "box", "--", "cat", "/tmp/greeting.txt"]),
                "copied\n"
            );
            let back = cp.scratch().join("back.txt");
            cp.ok(&["cp", "box:/tmp/greeting.txt", &back.display().to_string()]);
            assert_eq!(
                std::fs::read_to_string(&back).expect("copied back"),
                "copied\n"
            );

            // A terminal of the client's size (kubectl under `script`, which gives it one).
            let kubeconfig = cp.kubeconfig();
            let shell = format!(
                "stty cols 123 rows 45; kubectl --kubeconfig {} exec -it box -- sh -c 'tty; echo $TERM; stty size'",
                kubeconfig.display()
            );
            // script's own input stays open: at its end kubectl would close the terminal's input,
            // and a terminal whose input is closed goes away (as with containerd's CRI).
            let mut child = std::process::Command::new("script")
                .args(["-qec", &shell, "/dev/null"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("script");
            let input = child.stdin.take();
            let out = child.wait_with_output().expect("script output");
            drop(input);
            let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
            assert!(out.status.success(), "{text}");
            assert!(text.contains("/dev/pts/"), "{text:?}");
            assert!(text.contains("xterm\n"), "{text:?}");
            assert!(text.contains("45 123"), "{text:?}");

            // Errors users see.
            let err = cp.fails(&["exec", "box", "--", "no-such-command"]);
            assert!(err.contains("no-such-command"), "{err}");
            // ... also while input is arriving, which the agent reads to the end of the session.
            let mut child = cp
                .kubectl_cmd(&["exec", "-i", "box", "--", "no-such-command"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("kubectl exec -i");
            let mut stdin = child.stdin.take().expect("stdin");
            let writer = std::thread::spawn(move || stdin.write_all(&vec![b'x'; 256 * 1024]));
            let out = child.wait_with_output().expect("kubectl exec output");
            let _ = writer.join();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(
                err.contains("executable file not found") && !err.contains("1006"),
                "{err}"
            );
            let err = cp.fails(&["exec", "box", "-c", "nope", "--", "true"]);
            assert!(
                err.contains("container nope is not valid for pod box"),
                "{err}"
            );
            let err = cp.fails(&["exec", "missing", "--", "true"]);
            assert!(err.contains("pods \"missing\" not found"), "{err}");

            // A client that goes away takes its process with it.
            let mut gone = cp
                .kubectl_cmd(&["exec", "box", "--", "sleep", "300"])
                .spawn()
                .expect("kubectl exec");
            cp.eventually(30, "the exec'd sleep to run", || {
                cp.ok(&["exec", "box", "--", "ps"]).contains("sleep 300")
            });
            gone.kill().expect("kill kubectl");
            let _ = gone.wait();
            cp.eventually(30, "the exec'd sleep to end", || {
                !cp.ok(&["exec", "box", "--", "ps"]).contains("sleep 300")
            });

            // Every exec was removed from containerd and left no FIFOs behind.
            let leftovers = || -> Vec<std::ffi::OsString> {
                std::fs::read_dir(&exec_dir)
                    .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
                    .unwrap_or_default()
            };
            cp.eventually(15, "exec sessions to be cleaned up", || {
                leftovers().is_empty()
            });
            cp.ok(&["delete", "pod", "box", "--grace-period=1", "--timeout=60s"]);
        },
    );
}

#[test]
fn volumes_and_kubelet_managed_files_reach_containers() {
    on_one_node(
        "volumes_and_kubelet_managed_files_reach_containers",
        |_node_ns, cp, agent| {
            let host_dir = cp.scratch().join("hostdir");
            let manifest = format!(
                r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data: {{mode: fast, app.conf: "port=8080\n"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
stringData: {{password: s3cret}}
---
apiVersion: v1
kind: Pod
metadata: {{name: vols, labels: {{app: vols, tier: backend}}}}
spec:
  hostname: vol-host
  hostAliases: [{{ip: 10.9.9.9, hostnames: [db.internal]}}]
  containers:
  - name: main
    image: busybox:1.36
    command: [sh, -c, "echo hello > /cache/from-main; sleep 3600"]
    resources: {{limits: {{memory: 64Mi}}}}
    volumeMounts:
    - {{name: settings, mountPath: /etc/settings}}
    - {{name: creds, mountPath: /etc/creds}}
    - {{name: info, mountPath: /etc/info}}
    - {{name: cache, mountPath: /cache}}
    - {{name: mem, mountPath: /mem}}
    - {{name: host, mountPath: /host}}
    - {{name: all, mountPath: /all}}
    - {{name: settings, mountPath: /app.conf, subPath: app.conf}}
  - name: side
    image: busybox:1.36
    command: [sleep, "3600"]
    volumeMounts: [{{name: cache, mountPath: /shared, readOnly: true}}]
  volumes:
  - {{name: settings, configMap: {{name: settings}}}}
  - {{name: creds, secret: {{secretName: creds, defaultMode: 0400}}}}
  - name: info
    downwardAPI:
      items:
      - {{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}
      - {{path: name, fieldRef: {{fieldPath: metadata.name}}}}
      - {{path: mem_limit, resourceFieldRef: {{containerName: main, resource: limits.memory, divisor: 1Mi}}}}
  - {{name: cache, emptyDir: {{}}}}
  - {{name: mem, emptyDir: {{medium: Memory, sizeLimit: 16Mi}}}}
  - {{name: host, hostPath: {{path: {host}, type: DirectoryOrCreate}}}}
  - name: all
    projected:
      sources:
      - configMap: {{name: settings, items: [{{key: mode, path: cfg/mode}}]}}
      - secret: {{name: creds}}
      - downwardAPI: {{items: [{{path: ns, fieldRef: {{fieldPath: metadata.namespace}}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: waiting}}
spec:
  containers:
  - {{name: main, image: "busybox:1.36", command: [sleep, "3600"], volumeMounts: [{{name: c, mountPath: /c}}]}}
  volumes: [{{name: c, configMap: {{name: later}}}}]
"#,
                host = host_dir.display()
            );
            cp.ok_stdin(&["apply", "-f", "-"], &manifest);
            cp.eventually(90, "pod vols Running", || {
                jsonpath(cp, &["pod", "vols"], "{.status.phase}") == "Running"
            });
            let exec = |container: &str, cmd: &str| -> String {
                cp.ok(&["exec", "vols", "-c", container, "--", "sh", "-c", cmd])
            };
            // configMap (whole and by subPath), secret with its mode, downward API, projected.
            assert_eq!(exec("main", "cat /etc/settings/mode"), "fast");
            assert_eq!(exec("main", "cat /app.conf"), "port=8080\n");
            assert_eq!(exec("main", "cat /etc/creds/password"), "s3cret");
            assert_eq!(exec("main", "stat -L -c %a /etc/creds/password"), "400\n");
            assert_eq!(
                exec("main", "cat /etc/info/labels"),
                "app=\"vols\"\ntier=\"backend\"\n"
            );
            assert_eq!(exec("main", "cat /etc/info/name"), "vols");
            assert_eq!(exec("main", "cat /etc/info/mem_limit"), "64");
            assert_eq!(
                exec("main", "cat /all/cfg/mode /all/password /all/ns"),
                "fasts3cretdefault"
            );
            // Read-only where upstream makes them so.
            let out = cp.kubectl(&[
                "exec",
                "vols",
                "-c",
                "main",
                "--",
                "touch",
                "/etc/settings/x",
            ]);
            assert!(!out.status.success(), "configMap volumes are read-only");
            // emptyDir shared between containers (read-only for one), tmpfs for medium Memory.
            assert_eq!(exec("side", "cat /shared/from-main"), "hello\n");
            let out = cp.kubectl(&["exec", "vols", "-c", "side", "--", "touch", "/shared/x"]);
            assert!(!out.status.success(), "a readOnly mount is read-only");
            let mounts = exec("main", "grep ' /mem ' /proc/mounts");
            assert!(mounts.starts_with("tmpfs /mem tmpfs"), "{mounts}");
            assert!(mounts.contains("size=16384k"), "{mounts}");
            // hostPath, created as asked, shared with the node.
            exec("main", "echo from-pod > /host/f");
            assert_eq!(
                std::fs::read_to_string(host_dir.join("f")).expect("hostPath file"),
                "from-pod\n"
            );
            // The kubelet's files: hostname, /etc/hosts with the pod IP and aliases.
            let ip = jsonpath(cp, &["pod", "vols"], "{.status.podIP}");
            assert_eq!(
                exec("main", "hostname; cat /etc/hostname"),
                "vol-host\nvol-host\n"
            );
            let hosts = exec("main", "cat /etc/hosts");
            assert!(
                hosts.starts_with("# Kubernetes-managed hosts file.\n"),
                "{hosts}"
            );
            assert!(hosts.contains(&format!("{ip}\tvol-host\n")), "{hosts}");
            assert!(hosts.contains("10.9.9.9\tdb.internal\n"), "{hosts}");

            // A changed configMap and new labels reach the mounted files (not the subPath one).
            cp.ok(&[
                "patch",
                "configmap",
                "settings",
                "-p",
                r#"{"data":{"mode":"slow"}}"#,
            ]);
            cp.ok(&["label", "pod", "vols", "extra=yes"]);
            cp.eventually(30, "the configMap update in the volume", || {
                exec("main", "cat /etc/settings/mode") == "slow"
            });
            cp.eventually(30, "the new label in the downward API file", || {
                exec("main", "cat /etc/info/labels").contains("extra=\"yes\"")
            });
            assert_eq!(exec("main", "cat /app.conf"), "port=8080\n");

            // A missing configMap keeps the pod ContainerCreating with the reason, until it exists.
            cp.eventually(30, "the waiting pod's reason", || {
                jsonpath(
                    cp,
                    &["pod", "waiting"],
                    "{.status.containerStatuses[0].state.waiting.message}",
                )
                .contains("configmap \"later\" not found")
            });
            assert_eq!(
                jsonpath(cp, &["pod", "waiting"], "{.status.phase}"),
                "Pending"
            );
            cp.ok(&["create", "configmap", "later", "--from-literal=k=v"]);
            cp.eventually(90, "pod waiting Running", || {
                jsonpath(cp, &["pod", "waiting"], "{.status.phase}") == "Running"
            });
            assert_eq!(cp.ok(&["exec", "waiting", "--", "cat", "/c/k"]), "v");

            // Deleting the pods unmounts and removes their volumes.
            let uid = jsonpath(cp, &["pod", "vols"], "{.metadata.uid}");
            let root = agent.data_dir.join("podstate").join(&uid);
            assert!(root.join("volumes/mem").is_dir());
            cp.ok(&[
                "delete",
                "pods",
                "--all",
                "--grace-period=1",
                "--timeout=60s",
            ]);
            assert!(!root.exists(), "{} is left", root.display());
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
            assert!(
                !mounts.contains(&agent.data_dir.display().to_string()),
                "mounts left: {mounts}"
            );
        },
    );
}

/// A container's cgroup v1 (or v2) file, from the host.
fn cgroup_file(container_id: &str, v1: &str, v2: &str) -> String {
    let id = container_id.trim_start_matches("containerd://");
    std::fs::read_to_string(format!("/sys/fs/cgroup/{v1}"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/skiff/{id}/{v2}")))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| panic!("cgroup file {v1} / {v2} of {id}: {e}"))
}

#[test]
fn limits_reach_the_cgroup_and_an_oom_kill_is_reported() {
    on_one_node(
        "limits_reach_the_cgroup_and_an_oom_kill_is_reported",
        |_node_ns, cp, _agent| {
            cp.ok_stdin(
                &["apply", "-f", "-"],
                r#"
apiVersion: v1
kind: Pod
metadata: {name: limited}
spec:
  containers:
  - name: main
    image: busybox:1.36
    command: [sleep, "3600"]
    resources:
      requests: {cpu: 250m, memory: 32Mi}
      limits: {cpu: 500m, memory: 64Mi}
---
apiVersion: v1
kind: Pod
metadata: {name: hog}
spec:
  restartPolicy: Never
  containers:
  - name: hog
    image: busybox:1.36
    command: [tail, /dev/zero]
    resources: {limits: {memory: 32Mi}}
"#,
            );
            cp.eventually(90, "pod limited Running", || {
                jsonpath(cp, &["pod", "limited"], "{.status.phase}") == "Running"
            });
            assert_eq!(
                jsonpath(cp, &["pod", "limited"], "{.status.qosClass}"),
                "Burstable"
            );
            let id = jsonpath(
                cp,
                &["pod", "limited"],
                "{.status.containerStatuses[0].containerID}",
            );
            let short = id.trim_start_matches("containerd://");
            let memory = cgroup_file(
                &id,
                &format!("memory/skiff/{short}/memory.limit_in_bytes"),
                "memory.max",
            );
            assert_eq!(memory, "67108864");
            let quota = cgroup_file(
                &id,
                &format!("cpu/skiff/{short}/cpu.cfs_quota_us"),
                "cpu.max",
            );
            assert!(quota == "50000" || quota == "50000 100000", "{quota}");
            let shares =
                std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/skiff/{short}/cpu.shares"));
            if let Ok(shares) = shares {
                assert_eq!(shares.trim(), "256");
            }

            cp.eventually(90, "the hog to be OOM-killed", || {
                jsonpath(cp, &["pod", "hog"], "{.status.phase}") == "Failed"
            });
            let terminated = |f: &str| {
                jsonpath(
                    cp,
                    &["pod", "hog"],
                    &format!("{{.status.containerStatuses[0].state.terminated.{f}}}"),
                )
            };
            assert_eq!(terminated("reason"), "OOMKilled");
            assert_eq!(terminated("exitCode"), "137");
            let pods = cp.ok(&["get", "pod", "hog"]);
            assert!(pods.contains("OOMKilled"), "{pods}");
            cp.ok(&[
                "delete",
                "pods",
                "--all",
                "--grace-period=1",
                "--timeout=60s",
            ]);
        },
    );
}

#[test]
fn probes_restart_unhealthy_containers_and_gate_readiness() {
    on_one_node(
        "probes_restart_unhealthy_containers_and_gate_readiness",
        |_node_ns, cp, _agent| {
            cp.ok_stdin(
                &["apply", "-f", "-"],
                r#"
apiVersion: v1
kind: Pod
metadata: {name: live}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox:1.36
    command: [sh, -c, "touch /tmp/healthy; sleep 2; rm /tmp/healthy; sleep 3600"]
    livenessProbe:
      exec: {command: [cat, /tmp/healthy]}
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Pod
metadata: {name: chatty-probe}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox:1.36
    command: [sleep, "3600"]
    readinessProbe:
      exec: {command: [sh, -c, "head -c 1000000 /dev/zero"]}
      periodSeconds: 1
      timeoutSeconds: 10
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox:1.36
    command: [sh, -c, "mkdir -p /www; exec httpd -f -p 8080 -h /www"]
    ports: [{name: http, containerPort: 8080}]
    startupProbe:
      tcpSocket: {port: http}
      periodSeconds: 1
      failureThreshold: 30
    livenessProbe:
      tcpSocket: {port: 8080}
      periodSeconds: 1
    readinessProbe:
      httpGet: {path: /ready, port: http}
      periodSeconds: 1
      failureThreshold: 1
"#,
            );
            let ready = |pod: &str| {
                jsonpath(
                    cp,
                    &["pod", pod],
                    "{.status.conditions[?(@.type==\"Ready\")].status}",
                )
            };
            // Readiness follows the HTTP probe; the startup and liveness TCP probes pass.
            cp.eventually(90, "web Running and started", || {
                jsonpath(
                    cp,
                    &["pod", "web"],
                    "{.status.containerStatuses[0].started}",
                ) == "true"
            });
            assert_eq!(ready("web"), "False");
            let since = |ty: &str| {
                jsonpath(
                    cp,
                    &["pod", "web"],
                    &format!("{{.status.conditions[?(@.type==\"{ty}\")].lastTransitionTime}}"),
                )
            };
            let (scheduled, not_ready) = (since("Initialized"), since("Ready"));
            cp.ok(&["exec", "web", "--", "sh", "-c", "echo ok > /www/ready"]);
            cp.eventually(30, "web Ready", || ready("web") == "True");
            assert_eq!(
                jsonpath(cp, &["pod", "web"], "{.status.containerStatuses[0].ready}"),
                "true"
            );
            // An exec probe that writes more than a pipe holds still finishes (and passes).
            cp.eventually(60, "chatty-probe Ready", || ready("chatty-probe") == "True");
            cp.ok(&["exec", "web", "--", "rm", "/www/ready"]);
            cp.eventually(30, "web not Ready again", || ready("web") == "False");
            // Transition times move only with their condition's status.
            assert_eq!(since("Initialized"), scheduled);
            assert!(
                since("Ready") > not_ready,
                "Ready changed twice since {not_ready}"
            );
            assert_eq!(
                jsonpath(
                    cp,
                    &["pod", "web"],
                    "{.status.containerStatuses[0].restartCount}"
                ),
                "0"
            );

            // A failing liveness probe restarts the container, with the events upstream records.
            cp.eventually(90, "live restarted", || {
                jsonpath(
                    cp,
                    &["pod", "live"],
                    "{.status.containerStatuses[0].restartCount}",
                )
                .parse::<u32>()
                .is_ok_and(|n| n >= 1)
            });
            assert_eq!(
                jsonpath(
                    cp,
                    &["pod", "live"],
                    "{.status.containerStatuses[0].lastState.terminated.reason}"
                ),
                "Error"
            );
            let describe = cp.ok(&["describe", "pod", "live"]);
            for want in [
                "Liveness probe failed",
                "failed liveness probe, will be restarted",
                "Started container main",
                "Created container main",
            ] {
                assert!(describe.contains(want), "{want:?} missing in\n{describe}");
            }
            let events = cp.ok(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=web",
            ]);
            assert!(events.contains("Readiness probe failed"), "{events}");
            cp.ok(&[
                "delete",
                "pods",
                "--all",
                "--grace-period=1",
                "--timeout=60s",
            ]);
        },
    );
}

#[test]
fn an_agent_restart_keeps_pods_running_and_collects_what_is_gone() {
    on_one_node(
        "an_agent_restart_keeps_pods_running_and_collects_what_is_gone",
        |node_ns, cp, agent| {
            cp.ok(&[
                "run",
                "web",
                "--image=busybox:1.36",
                "--",
                "httpd",
                "-f",
                "-p",
                "8080",
                "-h",
                "/var/www",
            ]);
            cp.ok(&[
                "run",
                "doomed",
                "--image=busybox:1.36",
                "--",
                "sleep",
                "3600",
            ]);
            for p in ["web", "doomed"] {
                cp.eventually(90, "both pods Running", || {
                    jsonpath(cp, &["pod", p], "{.status.phase}") == "Running"
                });
            }
            let field = |pod: &str, path: &str| jsonpath(cp, &["pod", pod], path);
            let web_id = field("web", "{.status.containerStatuses[0].containerID}");
            let web_ip = field("web", "{.status.podIP}");
            let doomed_uid = field("doomed", "{.metadata.uid}");
            let doomed_ip = field("doomed", "{.status.podIP}");
            let fetch = || {
                let addr: SocketAddrV4 = format!("{web_ip}:8080").parse().expect("addr");
                node_ns
                    .ns
                    .run(move || -> std::io::Result<String> {
                        let mut c =
                            TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
                        c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                        let mut out = String::new();
                        c.read_to_string(&mut out)?;
                        Ok(out)
                    })
                    .expect("enter the node")
            };

            // The agent crashes; its containers keep serving.
            agent.kill();
            assert!(fetch().expect("web answers").contains("hello from skiff"));
            // A pod force-deleted meanwhile leaves its container, network and address behind.
            cp.ok(&["delete", "pod", "doomed", "--force", "--grace-period=0"]);

            agent.restart(node_ns);
            let runc_list = || {
                std::process::Command::new("runc")
                    .arg("--root")
                    .arg(agent.run_dir.join("runc/k8s.io"))
                    .args(["list", "-q"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            let netns = agent.run_dir.join(format!("netns/pod-{doomed_uid}"));
            let address = agent.data_dir.join(format!("ipam/{doomed_ip}"));
            cp.eventually(60, "the doomed pod's leftovers collected", || {
                !netns.exists() && !address.exists() && !runc_list().contains(&doomed_uid[..8])
            });
            // The web pod was adopted: the same container, no restart, still serving, reachable
            // through the new agent.
            cp.eventually(30, "exec into the adopted container", || {
                cp.kubectl(&["exec", "web", "--", "true"]).status.success()
            });
            assert_eq!(
                field("web", "{.status.containerStatuses[0].containerID}"),
                web_id
            );
            assert_eq!(
                field("web", "{.status.containerStatuses[0].restartCount}"),
                "0"
            );
            assert_eq!(field("web", "{.status.phase}"), "Running");
            assert_eq!(field("web", "{.status.podIP}"), web_ip);
            assert!(fetch().expect("web answers").contains("hello from skiff"));
            let log = agent.log();
            assert!(
                log.contains("adopted a container of an earlier run"),
                "{log}"
            );
            // The crashed agent's containerd ended with it (its death signal); the new one
            // reconnected to the running containers.
            assert!(!log.contains("reusing the containerd"), "{log}");

            // And it is still managed: deleting it removes it.
            let web_uid = field("web", "{.metadata.uid}");
            cp.ok(&["delete", "pod", "web", "--grace-period=1", "--timeout=60s"]);
            assert!(!agent.run_dir.join(format!("netns/pod-{web_uid}")).exists());
            assert!(!runc_list().contains(&web_uid[..8]));
        },
    );
}

/// Debian's `docker-registry` (distribution) serving on `addr` from `dir`, ended by PID on drop.
struct Registry {
    child: std::process::Child,
}

impl Registry {
    fn start(addr: &str, dir: &Path) -> Registry {
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )
        .expect("registry config");
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).expect("registry log"))
            .spawn()
            .expect("start docker-registry (installed by `cargo xtask setup`)");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the registry did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Registry { child }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        skiff_tests::stop_child(&mut self.child, Duration::from_secs(5));
    }
}

#[test]
fn images_are_pulled_from_a_registry_per_pull_policy() {
    let prepare = |node_ns: &NodeNs, cp: &ControlPlane, archive: PathBuf| {
        // The registry listens on the host side of the node's link, where the agent reaches it.
        let port = std::net::TcpListener::bind((node_ns.host_ip, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let registry = format!("{}:{port}", node_ns.host_ip);
        let reg_dir = cp.scratch().join("registry");
        std::fs::create_dir_all(&reg_dir).expect("registry dir");
        let server = Registry::start(&registry, &reg_dir);
        let pushed = std::process::Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{registry}/tools/busybox:1.36"))
            .output()
            .expect("run skopeo");
        assert!(
            pushed.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&pushed.stderr)
        );
        // No image imported: everything comes from the registry.
        let extra = vec!["--insecure-registry".to_string(), registry.clone()];
        (Vec::new(), extra, (registry, server))
    };
    on_one_node_with(
        "images_are_pulled_from_a_registry_per_pull_policy",
        prepare,
        |_node_ns, cp, _agent, (registry, _server)| {
            let image = format!("{registry}/tools/busybox:1.36");
            cp.ok(&[
                "run",
                "pulled",
                &format!("--image={image}"),
                "--",
                "sleep",
                "3600",
            ]);
            cp.eventually(90, "pod pulled Running", || {
                jsonpath(cp, &["pod", "pulled"], "{.status.phase}") == "Running"
            });
            let image_id = jsonpath(
                cp,
                &["pod", "pulled"],
                "{.status.containerStatuses[0].imageID}",
            );
            assert!(image_id.starts_with("sha256:"), "{image_id}");
            assert_eq!(
                cp.ok(&["exec", "pulled", "--", "echo", "from", "the", "registry"]),
                "from the registry\n"
            );
            let events = cp.ok(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=pulled",
            ]);
            assert!(
                events.contains(&format!("Pulling image \"{image}\"")),
                "{events}"
            );
            assert!(events.contains("Successfully pulled image"), "{events}");

            // A second pod with IfNotPresent uses what is there.
            cp.ok(&[
                "run",
                "again",
                &format!("--image={image}"),
                "--image-pull-policy=IfNotPresent",
                "--",
                "sleep",
                "3600",
            ]);
            cp.eventually(60, "pod again Running", || {
                jsonpath(cp, &["pod", "again"], "{.status.phase}") == "Running"
            });
            let events = cp.ok(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=again",
            ]);
            assert!(events.contains("already present on machine"), "{events}");

            // A tag the registry lacks, and an absent image with pull policy Never.
            cp.ok(&[
                "run",
                "lacking",
                &format!("--image={registry}/tools/busybox:9.9"),
            ]);
            cp.eventually(60, "lacking ErrImagePull", || {
                let r = jsonpath(
                    cp,
                    &["pod", "lacking"],
                    "{.status.containerStatuses[0].state.waiting.reason}",
                );
                r == "ErrImagePull" || r == "ImagePullBackOff"
            });
            let events = cp.ok(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=lacking",
            ]);
            assert!(events.contains("Failed to pull image"), "{events}");
            cp.ok(&[
                "run",
                "never",
                "--image=absent/image:1",
                "--image-pull-policy=Never",
            ]);
            cp.eventually(60, "never ErrImageNeverPull", || {
                jsonpath(
                    cp,
                    &["pod", "never"],
                    "{.status.containerStatuses[0].state.waiting.reason}",
                ) == "ErrImageNeverPull"
            });
            cp.ok(&[
                "delete",
                "pods",
                "--all",
                "--grace-period=1",
                "--timeout=60s",
            ]);
        },
    );
}

#[test]
fn init_containers_run_in_order_and_lifecycle_hooks_run() {
    on_one_node(
        "init_containers_run_in_order_and_lifecycle_hooks_run",
        |_node_ns, cp, _agent| {
            let hooks = cp.scratch().join("hooks");
            let manifest = format!(
                r#"
apiVersion: v1
kind: Pod
metadata: {{name: initialized}}
spec:
  terminationGracePeriodSeconds: 10
  initContainers:
  - {{name: prepare, image: "busybox:1.36", command: [sh, -c, "echo prepared > /work/state"], volumeMounts: [{{name: work, mountPath: /work}}]}}
  - {{name: second, image: "busybox:1.36", command: [sh, -c, "echo second >> /work/state"], volumeMounts: [{{name: work, mountPath: /work}}]}}
  containers:
  - name: main
    image: busybox:1.36
    command: [sh, -c, "trap 'exit 0' TERM; while true; do sleep 1; done"]
    volumeMounts: [{{name: work, mountPath: /work}}, {{name: host, mountPath: /host}}]
    lifecycle:
      postStart: {{exec: {{command: [sh, -c, "echo started >> /work/state"]}}}}
      preStop: {{exec: {{command: [sh, -c, "cat /work/state > /host/prestop; echo stopping >> /host/prestop"]}}}}
  volumes:
  - {{name: work, emptyDir: {{}}}}
  - {{name: host, hostPath: {{path: {hooks}, type: DirectoryOrCreate}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: failing-init}}
spec:
  restartPolicy: Never
  initContainers: [{{name: boom, image: "busybox:1.36", command: [sh, -c, "exit 7"]}}]
  containers: [{{name: main, image: "busybox:1.36", command: [sleep, "3600"]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: retrying-init}}
spec:
  initContainers: [{{name: flaky, image: "busybox:1.36", command: [sh, -c, "exit 1"]}}]
  containers: [{{name: main, image: "busybox:1.36", command: [sleep, "3600"]}}]
"#,
                hooks = hooks.display()
            );
            cp.ok_stdin(&["apply", "-f", "-"], &manifest);
            cp.eventually(90, "pod initialized Running", || {
                jsonpath(cp, &["pod", "initialized"], "{.status.phase}") == "Running"
            });
            // The init containers ran in order, to completion, before main (and its postStart).
            cp.eventually(30, "the postStart hook's line", || {
                cp.kubectl(&["exec", "initialized", "--", "cat", "/work/state"])
                    .stdout
                    == b"prepared\nsecond\nstarted\n"
            });
            assert_eq!(
                jsonpath(
                    cp,
                    &["pod", "initialized"],
                    "{.status.initContainerStatuses[*].state.terminated.reason}"
                ),
                "Completed Completed"
            );
            assert_eq!(
                jsonpath(
                    cp,
                    &["pod", "initialized"],
                    "{.status.conditions[?(@.type==\"Initialized\")].status}"
                ),
                "True"
            );

            // restartPolicy Never: a failed init container fails the pod; main never starts.
            cp.eventually(60, "failing-init Failed", || {
                jsonpath(cp, &["pod", "failing-init"], "{.status.phase}") == "Failed"
            });
            let row = cp.ok(&["get", "pod", "failing-init"]);
            assert!(row.contains("Init:Error"), "{row}");
            assert_eq!(
                jsonpath(
                    cp,
                    &["pod", "failing-init"],
                    "{.status.containerStatuses[0].state.waiting.reason}"
                ),
                "PodInitializing"
            );
            // Otherwise it is retried with back-off, the pod Pending meanwhile.
            cp.eventually(60, "retrying-init restarted", || {
                jsonpath(
                    cp,
                    &["pod", "retrying-init"],
                    "{.status.initContainerStatuses[0].restartCount}",
                )
                .parse::<u32>()
                .is_ok_and(|n| n >= 1)
            });
            assert_eq!(
                jsonpath(cp, &["pod", "retrying-init"], "{.status.phase}"),
                "Pending"
            );
            let row = cp.ok(&["get", "pod", "retrying-init"]);
            assert!(
                row.contains("Init:CrashLoopBackOff") || row.contains("Init:Error"),
                "{row}"
            );

            // Deleting runs preStop before SIGTERM.
            cp.ok(&["delete", "pod", "initialized", "--timeout=60s"]);
            assert_eq!(
                std::fs::read_to_string(hooks.join("prestop")).expect("the preStop hook's file"),
                "prepared\nsecond\nstarted\nstopping\n"
            );
            cp.ok(&[
                "delete",
                "pods",
                "--all",
                "--grace-period=1",
                "--timeout=60s",
            ]);
        },
    );
}

#[test]
fn a_deployment_rolls_out_on_a_real_node_and_its_service_lists_it() {
    on_one_node(
        "a_deployment_rolls_out_on_a_real_node_and_its_service_lists_it",
        |_, cp, _| {
            cp.ok_stdin(
            &["apply", "-f", "-"],
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - {name: web, image: "busybox:1.36", command: [sh, -c, "echo ready > /tmp/r; exec sleep 3600"],
         ports: [{name: http, containerPort: 8080}],
         readinessProbe: {exec: {command: [cat, /tmp/r]}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: http}]}
"#,
        );
            let out = cp.ok(&["rollout", "status", "deployment/web", "--timeout=120s"]);
            assert!(out.contains("successfully rolled out"), "{out}");
            // The chain of events, Deployment to container.
            let events = cp.ok(&[
                "get",
                "events",
                "-o",
                "jsonpath={range .items[*]}{.involvedObject.kind} {.reason}{\"\\n\"}{end}",
            ]);
            for want in [
                "Deployment ScalingReplicaSet",
                "ReplicaSet SuccessfulCreate",
                "Pod Scheduled",
                "Pod Started",
            ] {
                assert!(
                    events.lines().any(|l| l == want),
                    "no {want:?} in:\n{events}"
                );
            }
            // Both pods run on the node with their own addresses, and the Service lists them.
            let ips = cp.ok(&[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={.items[*].status.podIP}",
            ]);
            let ips: Vec<&str> = ips.split(' ').filter(|s| !s.is_empty()).collect();
            assert_eq!(ips.len(), 2);
            cp.eventually(30, "the slice to list both pods ready on port 8080", || {
            let s = cp.ok(&[
                "get", "endpointslices", "-l", "kubernetes.io/service-name=web", "-o",
                "jsonpath={range .items[*].endpoints[*]}{.addresses[0]}={.conditions.ready}{\"\\n\"}{end}{.items[0].ports[0].port}",
            ]);
            ips.iter().all(|ip| s.contains(&format!("{ip}=true"))) && s.ends_with("8080")
        });
            // A rolling update replaces them, on containerd.
            cp.ok(&["set", "env", "deployment/web", "GENERATION=2"]);
            let out = cp.ok(&["rollout", "status", "deployment/web", "--timeout=120s"]);
            assert!(out.contains("successfully rolled out"), "{out}");
            cp.eventually(60, "only new pods left", || {
                let env = cp.ok(&[
                    "get",
                    "pods",
                    "-l",
                    "app=web",
                    "-o",
                    "jsonpath={range .items[*]}{.spec.containers[0].env[0].value}{\"\\n\"}{end}",
                ]);
                env.lines().count() == 2 && env.lines().all(|l| l == "2")
            });
            cp.ok(&["delete", "deployment", "web", "--wait=false"]);
            cp.eventually(60, "the pods gone", || {
                cp.ok(&["get", "pods", "-o", "name"]).is_empty()
            });
        },
    );
}

/// `skiff-node reset` removes what a stopped agent left on the machine: its running
/// containers, its containerd and their shims, the mounts under its directories, its pinned
/// maps and its run directory; the data directory stays unless `--purge`.
#[test]
fn reset_removes_what_a_stopped_agent_left() {
    on_one_node("reset_removes_what_a_stopped_agent_left", |_, cp, agent| {
        cp.ok(&["run", "left", "--image=busybox:1.36", "--", "sleep", "3600"]);
        cp.eventually(90, "pod left Running", || {
            jsonpath(cp, &["pod", "left"], "{.status.phase}") == "Running"
        });
        // Stopping the agent leaves its pods running, as a kubelet does.
        agent.stop();
        let under = |dirs: &[&Path]| -> Vec<String> {
            std::fs::read_to_string("/proc/self/mounts")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
                .filter(|m| dirs.iter().any(|d| Path::new(m).starts_with(d)))
                .collect()
        };
        let dirs = [agent.run_dir.as_path(), agent.data_dir.as_path()];
        assert!(!under(&dirs).is_empty(), "the pod's mounts are there");
        let pins = skiff_tests::bpffs().join("skiff").join(&agent.name);
        assert!(pins.exists());

        let out = agent.reset_command().output().expect("skiff-node reset");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("containers removed: 1"), "{stdout}");
        assert!(under(&dirs).is_empty(), "mounts left: {:?}", under(&dirs));
        assert!(!pins.exists(), "pins left");
        assert!(!agent.run_dir.exists(), "run directory left");
        assert!(
            agent.data_dir.exists(),
            "the data directory stays without --purge"
        );
        let marker = agent.run_dir.display().to_string();
        let survivors: Vec<String> = std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(Result::ok)
            .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&marker))
            .collect();
        assert!(survivors.is_empty(), "processes left: {survivors:?}");
    });
}
