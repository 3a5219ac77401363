//! The installed `kubectl` (1.32, default flags) against `skiff-control`: every everyday
//! command a user runs, with the output checked as a user would read it.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::Duration,
};

use skiff_tests::control::ControlPlane;

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  namespace: shop
data:
  greeting: hello
---
apiVersion: v1
kind: Secret
metadata:
  name: web-secret
  namespace: shop
stringData:
  password: s3cret
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: busybox:1.36
        ports: [{containerPort: 8080}]
        env: [{name: MODE, value: blue}]
      - name: sidecar
        image: busybox:1.36
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#;

fn write(cp: &ControlPlane, name: &str, text: &str) -> String {
    let p = cp.scratch().join(name);
    std::fs::write(&p, text).expect("write manifest");
    p.display().to_string()
}

fn header(out: &str) -> Vec<String> {
    out.lines()
        .next()
        .unwrap_or("")
        .split("  ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn version_api_resources_and_explain() {
    let cp = ControlPlane::start();
    let v = cp.ok(&["version"]);
    assert!(v.contains("Server Version: v1.32"), "{v}");
    let r = cp.ok(&["api-resources"]);
    for line in [
        "pods                  po",
        "deployments           deploy       apps/v1",
        "services              svc",
        "endpointslices                     discovery.k8s.io/v1",
        "networkpolicies       netpol       networking.k8s.io/v1",
    ] {
        let want: Vec<&str> = line.split_whitespace().collect();
        assert!(
            r.lines().any(|l| l
                .split_whitespace()
                .take(want.len())
                .eq(want.iter().copied())),
            "api-resources lacks {line:?}:\n{r}"
        );
    }
    // Categories: `kubectl get all` resolves through them.
    assert!(cp.ok(&["get", "all", "-A"]).contains("service/kubernetes"));
    let e = cp.ok(&["explain", "deployment.spec.strategy"]);
    assert!(e.contains("KIND:       Deployment"), "{e}");
    assert!(e.contains("FIELD: strategy <DeploymentStrategy>"), "{e}");
    assert!(
        e.contains("rollingUpdate\t<RollingUpdateDeployment>"),
        "{e}"
    );
    assert!(e.contains("replace existing pods"), "{e}");
    let ns = cp.ok(&["get", "ns"]);
    for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(ns.contains(n), "{ns}");
    }
    let svc = cp.ok(&[
        "get",
        "svc",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert_eq!(svc, "10.96.0.1");
}

#[test]
fn apply_then_reapply_merges_three_ways() {
    let cp = ControlPlane::start();
    let file = write(&cp, "shop.yaml", MANIFEST);
    let out = cp.ok(&["apply", "-f", &file]);
    for line in [
        "namespace/shop created",
        "configmap/web-config created",
        "secret/web-secret created",
        "deployment.apps/web created",
        "service/web created",
    ] {
        assert!(out.contains(line), "{out}");
    }
    // A change made outside the manifest survives a re-apply (three-way merge).
    cp.ok(&["label", "deploy", "web", "-n", "shop", "owner=team-a"]);
    let edited = MANIFEST
        .replace("replicas: 2", "replicas: 3")
        .replace("value: blue", "value: green")
        .replace("      - name: sidecar\n        image: busybox:1.36\n", "");
    let file = write(&cp, "shop.yaml", &edited);
    let out = cp.ok(&["apply", "-f", &file]);
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    assert!(out.contains("configmap/web-config unchanged"), "{out}");
    let d: serde_json::Value =
        serde_json::from_str(&cp.ok(&["get", "deploy", "web", "-n", "shop", "-o", "json"]))
            .expect("json");
    assert_eq!(d["spec"]["replicas"], 3);
    let containers = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(
        containers.len(),
        1,
        "the removed sidecar is gone: {containers:?}"
    );
    assert_eq!(containers[0]["env"][0]["value"], "green");
    assert_eq!(d["metadata"]["labels"]["owner"], "team-a");
    assert_eq!(d["metadata"]["generation"], 2);
    // stringData was stored as data.
    let pw = cp.ok(&[
        "get",
        "secret",
        "web-secret",
        "-n",
        "shop",
        "-o",
        "jsonpath={.data.password}",
    ]);
    assert_eq!(pw, "czNjcmV0");
}

#[test]
fn get_output_formats_selectors_and_tables() {
    let cp = ControlPlane::start();
    cp.ok(&["apply", "-f", &write(&cp, "shop.yaml", MANIFEST)]);
    cp.ok(&[
        "run",
        "pod-a",
        "-n",
        "shop",
        "--image=busybox",
        "--labels=tier=front",
        "--",
        "sleep",
        "1",
    ]);
    cp.ok(&[
        "run",
        "pod-b",
        "-n",
        "shop",
        "--image=busybox",
        "--labels=tier=back",
        "--",
        "sleep",
        "1",
    ]);
    cp.eventually(30, "the Deployment's two pods", || {
        cp.ok(&["get", "pods", "-n", "shop", "-l", "app=web", "-o", "name"])
            .lines()
            .count()
            == 2
    });

    let pods = cp.ok(&["get", "pods", "-n", "shop"]);
    assert_eq!(
        header(&pods),
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{pods}"
    );
    assert!(
        pods.lines()
            .any(|l| l.starts_with("pod-a") && l.contains("0/1") && l.contains("Pending"))
    );
    let wide = cp.ok(&["get", "pods", "-n", "shop", "-o", "wide"]);
    assert_eq!(
        header(&wide),
        [
            "NAME",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "IP",
            "NODE",
            "NOMINATED NODE",
            "READINESS GATES"
        ]
    );
    let deploy = cp.ok(&["get", "deploy", "-n", "shop"]);
    assert_eq!(
        header(&deploy),
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    );
    assert!(deploy.contains("0/2"), "{deploy}");
    let svc = cp.ok(&["get", "svc", "-n", "shop", "-o", "wide"]);
    assert_eq!(
        header(&svc),
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE",
            "SELECTOR"
        ]
    );
    assert!(svc.contains("80/TCP") && svc.contains("app=web"), "{svc}");

    let yaml = cp.ok(&["get", "cm", "web-config", "-n", "shop", "-o", "yaml"]);
    assert!(
        yaml.contains("greeting: hello") && yaml.contains("resourceVersion:"),
        "{yaml}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cp.ok(&["get", "cm", "-n", "shop", "-o", "json"])).expect("json");
    assert_eq!(json["kind"], "List");
    let jp = cp.ok(&[
        "get",
        "pods",
        "-n",
        "shop",
        "-l",
        "tier",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    assert_eq!(jp, "pod-a pod-b");

    let front = cp.ok(&[
        "get",
        "pods",
        "-n",
        "shop",
        "-l",
        "tier=front",
        "-o",
        "name",
    ]);
    assert_eq!(front.trim(), "pod/pod-a");
    let set = cp.ok(&[
        "get",
        "pods",
        "-n",
        "shop",
        "-l",
        "tier in (front,back),tier!=back",
        "-o",
        "name",
    ]);
    assert_eq!(set.trim(), "pod/pod-a");
    let exists = cp.ok(&["get", "pods", "-n", "shop", "-l", "!tier", "-o", "name"]);
    // Only the Deployment's pods lack the label.
    assert!(
        exists.lines().count() == 2 && exists.lines().all(|l| l.starts_with("pod/web-")),
        "{exists}"
    );
    let by_name = cp.ok(&[
        "get",
        "pods",
        "-n",
        "shop",
        "--field-selector",
        "metadata.name=pod-b",
        "-o",
        "name",
    ]);
    assert_eq!(by_name.trim(), "pod/pod-b");
    let unscheduled = cp.ok(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName=,status.phase=Pending",
        "-o",
        "name",
    ]);
    // No nodes: the two pods and the Deployment's two all wait.
    assert_eq!(unscheduled.lines().count(), 4, "{unscheduled}");
    let err = cp.fails(&[
        "get",
        "cm",
        "-n",
        "shop",
        "--field-selector",
        "data.greeting=hello",
    ]);
    assert!(err.contains("field label not supported"), "{err}");

    let all = cp.ok(&["get", "cm", "-A"]);
    assert_eq!(header(&all), ["NAMESPACE", "NAME", "DATA", "AGE"]);
    assert!(
        all.lines()
            .any(|l| l.starts_with("shop") && l.contains("web-config"))
    );
}

#[test]
fn watch_shows_added_modified_deleted() {
    let cp = ControlPlane::start();
    cp.ok(&["create", "ns", "w"]);
    let mut watch = cp
        .kubectl_cmd(&["get", "cm", "-n", "w", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| -> String {
        rx.recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("no watch line for {what}"))
    };
    // The namespace is empty: kubectl prints the header with the first event.
    cp.ok(&["create", "cm", "c1", "-n", "w", "--from-literal=a=b"]);
    assert_eq!(
        next("header").split_whitespace().collect::<Vec<_>>(),
        ["EVENT", "NAME", "DATA", "AGE"]
    );
    assert!(next("create").starts_with("ADDED      c1"));
    cp.ok(&["label", "cm", "c1", "-n", "w", "x=y"]);
    assert!(next("label").starts_with("MODIFIED   c1"));
    cp.ok(&["delete", "cm", "c1", "-n", "w"]);
    assert!(next("delete").starts_with("DELETED    c1"));
    let pid = nix::unistd::Pid::from_raw(watch.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = watch.wait();
}

#[test]
fn describe_label_annotate_patch_edit_scale() {
    let cp = ControlPlane::start();
    cp.ok(&["apply", "-f", &write(&cp, "shop.yaml", MANIFEST)]);
    cp.ok(&["label", "deploy", "web", "-n", "shop", "tier=front"]);
    cp.ok(&["annotate", "deploy", "web", "-n", "shop", "note=hello"]);
    let d = cp.ok(&["describe", "deploy", "web", "-n", "shop"]);
    assert!(d.contains("tier=front"), "{d}");
    assert!(d.contains("note: hello"), "{d}");
    assert!(
        d.contains("RollingUpdateStrategy:  25% max unavailable, 25% max surge"),
        "{d}"
    );
    assert!(
        d.contains("MODE:  blue") || d.contains("MODE:       blue"),
        "{d}"
    );

    cp.ok(&[
        "patch",
        "deploy",
        "web",
        "-n",
        "shop",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#,
    ]);
    cp.ok(&[
        "patch",
        "deploy",
        "web",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"tier":null}}}"#,
    ]);
    cp.ok(&["patch", "deploy", "web", "-n", "shop", "-p", r#"{"spec":{"template":{"spec":{"containers":[{"name":"sidecar","image":"busybox:1.37"}]}}}}"#]);
    let d: serde_json::Value =
        serde_json::from_str(&cp.ok(&["get", "deploy", "web", "-n", "shop", "-o", "json"]))
            .expect("json");
    assert_eq!(d["spec"]["replicas"], 4);
    assert!(d["metadata"]["labels"].get("tier").is_none());
    let cs = &d["spec"]["template"]["spec"]["containers"];
    assert_eq!(
        cs[0]["image"], "busybox:1.36",
        "strategic merge kept the other container"
    );
    assert_eq!(cs[1]["image"], "busybox:1.37");

    cp.ok(&["scale", "deploy", "web", "-n", "shop", "--replicas=6"]);
    assert_eq!(
        cp.ok(&[
            "get",
            "deploy",
            "web",
            "-n",
            "shop",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "6"
    );

    // `kubectl edit` with a scripted editor.
    let editor = cp.scratch().join("editor.sh");
    std::fs::write(
        &editor,
        "#!/bin/sh\nsed -i 's/greeting: hello/greeting: edited/' \"$1\"\n",
    )
    .expect("editor");
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&editor).expect("meta").permissions(),
        0o755,
    );
    std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let out = cp
        .kubectl_cmd(&["edit", "cm", "web-config", "-n", "shop"])
        .env("KUBE_EDITOR", &editor)
        .output()
        .expect("kubectl edit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configmap/web-config edited"));
    assert_eq!(
        cp.ok(&[
            "get",
            "cm",
            "web-config",
            "-n",
            "shop",
            "-o",
            "jsonpath={.data.greeting}"
        ]),
        "edited"
    );
}

fn owned_replicaset(cp: &ControlPlane, deploy: &str) {
    cp.ok(&["create", "deploy", deploy, "-n", "shop", "--image=busybox"]);
    let uid = cp.ok(&[
        "get",
        "deploy",
        deploy,
        "-n",
        "shop",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let rs = format!(
        r#"{{"apiVersion":"apps/v1","kind":"ReplicaSet","metadata":{{"name":"{deploy}-rs","namespace":"shop","labels":{{"app":"{deploy}"}},
        "ownerReferences":[{{"apiVersion":"apps/v1","kind":"Deployment","name":"{deploy}","uid":"{uid}","controller":true,"blockOwnerDeletion":true}}]}},
        "spec":{{"selector":{{"matchLabels":{{"app":"{deploy}"}}}},"template":{{"metadata":{{"labels":{{"app":"{deploy}"}}}},
        "spec":{{"containers":[{{"name":"c","image":"busybox"}}]}}}}}}}}"#
    );
    cp.ok_stdin(&["create", "-f", "-"], &rs);
}

#[test]
fn delete_with_each_cascade_mode() {
    let cp = ControlPlane::start();
    cp.ok(&["create", "ns", "shop"]);
    for mode in ["background", "foreground", "orphan"] {
        let deploy = format!("d-{mode}");
        owned_replicaset(&cp, &deploy);
        let out = cp.ok(&[
            "delete",
            "deploy",
            &deploy,
            "-n",
            "shop",
            &format!("--cascade={mode}"),
            "--timeout=30s",
        ]);
        assert!(out.contains("deleted"), "{out}");
        assert!(
            cp.fails(&["get", "deploy", &deploy, "-n", "shop"])
                .contains("NotFound")
        );
        let rs = format!("{deploy}-rs");
        if mode == "orphan" {
            cp.eventually(10, "the orphaned replicaset to lose its owner", || {
                cp.ok(&[
                    "get",
                    "rs",
                    &rs,
                    "-n",
                    "shop",
                    "-o",
                    "jsonpath={.metadata.ownerReferences}",
                ])
                .trim()
                .is_empty()
            });
        } else {
            cp.eventually(10, "the dependent replicaset to be deleted", || {
                !cp.kubectl(&["get", "rs", &rs, "-n", "shop"])
                    .status
                    .success()
            });
        }
    }
    // Deleting a namespace empties it, then removes it.
    cp.ok(&["delete", "ns", "shop", "--timeout=30s"]);
    assert!(cp.fails(&["get", "ns", "shop"]).contains("NotFound"));
}

#[test]
fn errors_name_what_is_wrong() {
    let cp = ControlPlane::start();
    cp.ok(&["create", "ns", "e"]);
    cp.ok(&["create", "cm", "c", "-n", "e", "--from-literal=a=1"]);
    // A stale update is a 409 Conflict.
    let stale = cp.ok(&["get", "cm", "c", "-n", "e", "-o", "json"]);
    cp.ok(&["label", "cm", "c", "-n", "e", "bump=1"]);
    let mut obj: serde_json::Value = serde_json::from_str(&stale).expect("json");
    obj["data"]["a"] = "2".into();
    let file = write(&cp, "stale.json", &obj.to_string());
    let err = cp.fails(&["replace", "-f", &file]);
    assert!(
        err.contains("Conflict") && err.contains("the object has been modified"),
        "{err}"
    );
    // 404.
    let err = cp.fails(&["get", "cm", "nope", "-n", "e"]);
    assert!(
        err.contains("NotFound") && err.contains("configmaps \"nope\" not found"),
        "{err}"
    );
    let err = cp.fails(&["create", "cm", "x", "-n", "missing"]);
    assert!(err.contains("namespaces \"missing\" not found"), "{err}");
    // 409 AlreadyExists.
    let err = cp.fails(&["create", "cm", "c", "-n", "e"]);
    assert!(err.contains("configmaps \"c\" already exists"), "{err}");
    // 422 with the field named.
    let bad = r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"bad","namespace":"e"},
      "spec":{"selector":{"matchLabels":{"app":"a"}},"template":{"metadata":{"labels":{"app":"b"}},
      "spec":{"containers":[{"name":"c","image":""}]}}}}"#;
    let err = cp.fails(&["create", "-f", &write(&cp, "bad.json", bad)]);
    assert!(err.contains("is invalid"), "{err}");
    assert!(err.contains("spec.template.metadata.labels"), "{err}");
    assert!(
        err.contains("spec.template.spec.containers[0].image: Required value"),
        "{err}"
    );
    let err = cp.fails(&["create", "ns", "Bad_Name"]);
    assert!(
        err.contains("metadata.name: Invalid value: \"Bad_Name\""),
        "{err}"
    );
    // Unknown fields with kubectl's default (strict) validation.
    let unknown = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"u","namespace":"e"},"dta":{}}"#;
    let err = cp.fails(&["create", "-f", &write(&cp, "unknown.json", unknown)]);
    assert!(err.contains("unknown field \"dta\""), "{err}");
    // Anonymous and wrong tokens are 401.
    let err = cp.fails(&["get", "ns", "--token=not-a-token"]);
    assert!(err.contains("Unauthorized"), "{err}");
    // Bodies over 3 MiB are 413.
    let big = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"big"}},"data":{{"x":"{}"}}}}"#,
        "a".repeat(3 * 1024 * 1024 + 10)
    );
    let err = cp.fails(&[
        "create",
        "--raw",
        "/api/v1/namespaces/e/configmaps",
        "-f",
        &write(&cp, "big.json", &big),
    ]);
    assert!(
        err.contains("RequestEntityTooLarge") || err.contains("too large"),
        "{err}"
    );
    // Malformed JSON is 400.
    let err = cp.fails(&[
        "create",
        "--raw",
        "/api/v1/namespaces/e/configmaps",
        "-f",
        &write(&cp, "broken.json", "{\"kind\":"),
    ]);
    assert!(
        err.contains("BadRequest") || err.contains("not valid JSON"),
        "{err}"
    );
    // The server is still healthy after all of it.
    assert_eq!(cp.ok(&["get", "--raw", "/readyz"]), "ok");
}
