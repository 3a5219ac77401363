//! Workload controllers end to end, driven by the real kubectl against `skiff-control` with
//! simulated nodes (`skiff-node --simulate`): Deployments roll out, undo, scale, pause and
//! time out as `kubectl rollout` expects; ReplicaSets replace deleted pods, adopt orphans and
//! leave their pods behind on `--cascade=orphan`.

use skiff_tests::{control::ControlPlane, simulate::Simulator};

/// `(name, image, phase)` of the pods labelled `app=<app>`, not being deleted.
fn pods(cp: &ControlPlane, app: &str) -> Vec<(String, String, String)> {
    cp.jsonpath(&["get", "pods", "-l", &format!("app={app}")],
        "{range .items[*]}{.metadata.name} {.spec.containers[0].image} {.status.phase} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    )
    .lines()
    .filter_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() >= 3 && f.get(3).is_none_or(|d| d.is_empty()))
            .then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
    })
    .collect()
}

#[track_caller]
fn rollout(cp: &ControlPlane, what: &str) {
    let out = cp.kubectl(&["rollout", "status", what, "--timeout=90s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("successfully rolled out") {
        let state = cp.kubectl(&["get", "deploy,rs,pods", "-o", "wide"]);
        panic!(
            "rollout status {what}: {stdout}{}\n{}\ncontrol log tail:\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&state.stdout),
            cp.log()
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn deployments_roll_out_undo_scale_and_heal() {
    let cp = ControlPlane::start();
    let _sim = Simulator::start(&cp, 3, "100ms");
    cp.ok(&[
        "create",
        "deployment",
        "web",
        "--image=busybox:1.36",
        "--replicas=3",
        "--",
        "sleep",
        "3600",
    ]);
    rollout(&cp, "deployment/web");
    let first = pods(&cp, "web");
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(
        first
            .iter()
            .all(|(_, img, ph)| img == "busybox:1.36" && ph == "Running")
    );
    let rs1 = cp.ok(&["get", "rs", "-l", "app=web", "-o", "name"]);
    assert_eq!(rs1.lines().count(), 1, "{rs1}");
    let hash = cp.jsonpath(
        &["get", "rs", "-l", "app=web"],
        "{.items[0].metadata.labels.pod-template-hash}",
    );
    assert!(rs1.trim().ends_with(&format!("web-{hash}")), "{rs1} {hash}");
    let status = cp.jsonpath(&["get", "deployment", "web"],
        "{.status.replicas} {.status.updatedReplicas} {.status.readyReplicas} {.status.availableReplicas} {.status.conditions[?(@.type==\"Available\")].status} {.status.conditions[?(@.type==\"Progressing\")].reason}",
    );
    assert_eq!(status, "3 3 3 3 True NewReplicaSetAvailable");
    assert_eq!(
        cp.jsonpath(
            &["get", "deployment", "web"],
            "{.metadata.annotations.deployment\\.kubernetes\\.io/revision}"
        ),
        "1"
    );

    // A new template rolls out through a second ReplicaSet.
    cp.ok(&["set", "image", "deployment/web", "busybox=busybox:1.37"]);
    rollout(&cp, "deployment/web");
    cp.eventually(30, "only the new pods", || {
        let p = pods(&cp, "web");
        p.len() == 3 && p.iter().all(|(_, img, _)| img == "busybox:1.37")
    });
    let sets = cp.jsonpath(&[
            "get",
            "rs",
            "-l",
            "app=web",
            "--sort-by=.metadata.annotations.deployment\\.kubernetes\\.io/revision",
        ],
        "{range .items[*]}{.metadata.annotations.deployment\\.kubernetes\\.io/revision}={.spec.replicas} {end}",
    );
    assert_eq!(sets.trim(), "1=0 2=3");
    let events = cp.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=Deployment",
    ]);
    assert!(
        events.contains("ScalingReplicaSet") && events.contains("Scaled down replica set web-"),
        "{events}"
    );

    // Undo brings the first template back as revision 3.
    cp.ok(&["rollout", "undo", "deployment/web"]);
    rollout(&cp, "deployment/web");
    cp.eventually(30, "the first image back", || {
        let p = pods(&cp, "web");
        p.len() == 3 && p.iter().all(|(_, img, _)| img == "busybox:1.36")
    });
    let history = cp.ok(&["rollout", "history", "deployment/web"]);
    let revisions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<u32>().is_ok())
        .collect();
    assert_eq!(revisions, ["2", "3"], "{history}");
    assert_eq!(
        cp.ok(&["get", "rs", "-l", "app=web", "-o", "name"])
            .lines()
            .count(),
        2
    );

    // Scale up and down.
    cp.ok(&["scale", "deployment/web", "--replicas=5"]);
    rollout(&cp, "deployment/web");
    assert_eq!(pods(&cp, "web").len(), 5);
    cp.ok(&["scale", "deployment/web", "--replicas=1"]);
    cp.eventually(30, "one pod left", || pods(&cp, "web").len() == 1);
    rollout(&cp, "deployment/web");

    // A deleted pod is replaced.
    let (victim, _, _) = pods(&cp, "web").remove(0);
    cp.ok(&["delete", "pod", &victim, "--wait=false"]);
    cp.eventually(30, "a replacement pod", || {
        let p = pods(&cp, "web");
        p.len() == 1 && p[0].0 != victim && p[0].2 == "Running"
    });

    // Deleting the Deployment takes its sets and pods.
    cp.ok(&["delete", "deployment", "web"]);
    cp.eventually(30, "the sets and pods gone", || {
        cp.ok(&["get", "rs,pods", "-l", "app=web", "-o", "name"])
            .is_empty()
    });
}

#[test]
fn recreate_pause_resume_and_progress_deadline() {
    let cp = ControlPlane::start();
    let _sim = Simulator::start(&cp, 2, "100ms");
    cp.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: db}
spec:
  replicas: 2
  strategy: {type: Recreate}
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: db, image: "busybox:1.36"}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: stuck}
spec:
  replicas: 1
  progressDeadlineSeconds: 3
  selector: {matchLabels: {app: stuck}}
  template:
    metadata: {labels: {app: stuck}}
    spec:
      containers:
      - name: c
        image: "busybox:1.36"
        readinessProbe: {initialDelaySeconds: 3600, exec: {command: ["true"]}}
"#,
    );
    rollout(&cp, "deployment/db");

    // Recreate: the old set goes to zero before the new one starts.
    cp.ok(&["set", "image", "deployment/db", "db=busybox:1.37"]);
    rollout(&cp, "deployment/db");
    let p = pods(&cp, "db");
    assert!(
        p.len() == 2 && p.iter().all(|(_, img, _)| img == "busybox:1.37"),
        "{p:?}"
    );
    let events = cp.jsonpath(
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=db,reason=ScalingReplicaSet",
            "--sort-by=.firstTimestamp",
        ],
        "{range .items[*]}{.message}{\"\\n\"}{end}",
    );
    let down = events.find("Scaled down replica set db-").expect(&events);
    let up = events.rfind("from 0 to 2").expect(&events);
    assert!(down < up, "scaled down before up:\n{events}");

    // Paused: a template change waits; resumed: it rolls out.
    cp.ok(&["rollout", "pause", "deployment/db"]);
    cp.ok(&["set", "image", "deployment/db", "db=busybox:1.38"]);
    cp.eventually(10, "the pause recorded", || {
        cp.jsonpath(
            &["get", "deployment", "db"],
            "{.status.conditions[?(@.type==\"Progressing\")].reason}",
        ) == "DeploymentPaused"
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(
        cp.ok(&["get", "rs", "-l", "app=db", "-o", "name"])
            .lines()
            .count(),
        2
    );
    cp.ok(&["rollout", "resume", "deployment/db"]);
    rollout(&cp, "deployment/db");
    assert!(
        pods(&cp, "db")
            .iter()
            .all(|(_, img, _)| img == "busybox:1.38")
    );
    // Three templates so far; a history limit of one keeps the current set and one old one.
    assert_eq!(
        cp.ok(&["get", "rs", "-l", "app=db", "-o", "name"])
            .lines()
            .count(),
        3
    );
    cp.ok(&[
        "patch",
        "deployment",
        "db",
        "--type=merge",
        "-p",
        r#"{"spec":{"revisionHistoryLimit":1}}"#,
    ]);
    cp.eventually(30, "the oldest set pruned", || {
        cp.ok(&["get", "rs", "-l", "app=db", "-o", "name"])
            .lines()
            .count()
            == 2
    });

    // A rollout that cannot become available exceeds its deadline, and rollout status says so.
    let out = cp.kubectl(&["rollout", "status", "deployment/stuck", "--timeout=60s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exceeded its progress deadline"), "{err}");
    assert_eq!(
        cp.jsonpath(
            &["get", "deployment", "stuck"],
            "{.status.conditions[?(@.type==\"Progressing\")].status}"
        ),
        "False"
    );
}

#[test]
fn replicasets_replace_adopt_and_orphan() {
    let cp = ControlPlane::start();
    let _sim = Simulator::start(&cp, 2, "100ms");
    // An orphan that matches is adopted and counts toward the replicas.
    cp.ok(&[
        "run",
        "stray",
        "--image=busybox:1.36",
        "--labels=app=cache",
        "--restart=Never",
    ]);
    cp.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: cache}
spec:
  replicas: 2
  selector: {matchLabels: {app: cache}}
  template:
    metadata: {labels: {app: cache}}
    spec: {containers: [{name: c, image: "busybox:1.36"}]}
"#,
    );
    cp.eventually(30, "two ready replicas", || {
        cp.jsonpath(&["get", "rs", "cache"], "{.status.readyReplicas}") == "2"
    });
    assert_eq!(pods(&cp, "cache").len(), 2);
    assert_eq!(
        cp.jsonpath(
            &["get", "pod", "stray"],
            "{.metadata.ownerReferences[0].name}"
        ),
        "cache"
    );
    let status = cp.jsonpath(&["get", "rs", "cache"],
        "{.status.replicas} {.status.fullyLabeledReplicas} {.status.availableReplicas} {.status.observedGeneration}",
    );
    assert_eq!(status, "2 2 2 1");

    // A deleted pod is replaced; a pod relabelled out of the set is released and replaced.
    cp.ok(&["delete", "pod", "stray", "--wait=false"]);
    cp.eventually(30, "a replacement", || {
        let p = pods(&cp, "cache");
        p.len() == 2 && p.iter().all(|(n, _, ph)| n != "stray" && ph == "Running")
    });
    let (moved, _, _) = pods(&cp, "cache").remove(0);
    cp.ok(&["label", "pod", &moved, "app=elsewhere", "--overwrite"]);
    cp.eventually(30, "the relabelled pod released and replaced", || {
        pods(&cp, "cache").len() == 2
            && cp
                .jsonpath(&["get", "pod", &moved], "{.metadata.ownerReferences}")
                .is_empty()
    });

    // Events name the pods created.
    let events = cp.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=cache",
    ]);
    assert!(
        events.contains("SuccessfulCreate") && events.contains("Created pod: cache-"),
        "{events}"
    );

    // --cascade=orphan leaves the pods, without an owner.
    cp.ok(&["delete", "rs", "cache", "--cascade=orphan"]);
    cp.eventually(30, "the set gone", || {
        cp.ok(&["get", "rs", "-o", "name"]).is_empty()
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    let left = pods(&cp, "cache");
    assert_eq!(left.len(), 2, "{left:?}");
    for (name, _, _) in left {
        assert_eq!(
            cp.jsonpath(&["get", "pod", &name], "{.metadata.ownerReferences}"),
            ""
        );
    }
}

#[test]
fn endpoint_slices_follow_pods_and_readiness() {
    let cp = ControlPlane::start();
    let _sim = Simulator::start(&cp, 2, "100ms");
    cp.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, image: "busybox:1.36", ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: slow, labels: {app: web}}
spec:
  containers:
  - name: c
    image: "busybox:1.36"
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {initialDelaySeconds: 4, exec: {command: ["true"]}}
"#,
    );
    let slice_path =
        "{range .items[*].endpoints[*]}{.targetRef.name}={.conditions.ready}{\"\\n\"}{end}";
    let endpoints = |cp: &ControlPlane| -> Vec<String> {
        let mut v: Vec<String> = cp
            .jsonpath(
                &[
                    "get",
                    "endpointslices",
                    "-l",
                    "kubernetes.io/service-name=web",
                ],
                slice_path,
            )
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    cp.eventually(30, "four endpoints, the slow one not ready", || {
        let e = endpoints(&cp);
        e.len() == 4
            && e.contains(&"slow=false".to_string())
            && e.iter().filter(|x| x.ends_with("=true")).count() == 3
    });
    assert_eq!(
        cp.jsonpath(&[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=web"
            ],
            "{.items[0].ports[0].port} {.items[0].addressType} {.items[0].metadata.labels.endpointslice\\.kubernetes\\.io/managed-by}"
        ),
        "8080 IPv4 endpointslice-controller.k8s.io"
    );
    let legacy = cp.jsonpath(&["get", "endpoints", "web"],
        "{.subsets[0].addresses[*].ip} | {.subsets[0].notReadyAddresses[*].targetRef.name} | {.subsets[0].ports[0].port}",
    );
    let parts: Vec<&str> = legacy.split(" | ").collect();
    assert_eq!(parts[0].split(' ').count(), 3, "{legacy}");
    assert_eq!(&parts[1..], ["slow", "8080"], "{legacy}");
    cp.eventually(30, "the slow pod ready in the slice", || {
        endpoints(&cp).contains(&"slow=true".to_string())
    });

    // Unchanged pods leave the slice alone (no rewrite loop).
    let rv = cp.jsonpath(
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
        ],
        "{.items[0].metadata.resourceVersion}",
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        cp.jsonpath(
            &[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=web"
            ],
            "{.items[0].metadata.resourceVersion}"
        ),
        rv
    );

    // A deleted pod leaves; 150 endpoints need two slices.
    cp.ok(&["delete", "pod", "slow"]);
    cp.eventually(30, "three endpoints", || endpoints(&cp).len() == 3);
    cp.ok(&["scale", "deployment/web", "--replicas=150"]);
    cp.eventually(90, "150 endpoints in two slices", || {
        endpoints(&cp).len() == 150
            && cp
                .ok(&[
                    "get",
                    "endpointslices",
                    "-l",
                    "kubernetes.io/service-name=web",
                    "-o",
                    "name",
                ])
                .lines()
                .count()
                == 2
    });

    // A new namespace gets its default ServiceAccount.
    cp.ok(&["create", "namespace", "team"]);
    cp.eventually(30, "the default ServiceAccount", || {
        cp.kubectl(&["get", "serviceaccount", "default", "-n", "team"])
            .status
            .success()
    });

    // The Service's slices and Endpoints go with it.
    cp.ok(&["delete", "service", "web"]);
    cp.eventually(30, "the slices and endpoints gone", || {
        cp.ok(&["get", "endpointslices,endpoints", "-o", "name"])
            .lines()
            .all(|l| !l.contains("web"))
    });
}

#[test]
fn jobs_complete_or_fail_and_cronjobs_fire() {
    let cp = ControlPlane::start();
    let _sim = Simulator::start(&cp, 2, "100ms");
    cp.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: batch/v1
kind: Job
metadata: {name: work}
spec:
  completions: 3
  parallelism: 2
  ttlSecondsAfterFinished: 600
  template:
    metadata: {annotations: {skiff.dev/simulate-exit-after: 1s}}
    spec: {restartPolicy: Never, containers: [{name: c, image: "busybox:1.36"}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: doomed}
spec:
  backoffLimit: 1
  template:
    metadata: {annotations: {skiff.dev/simulate-exit-after: 500ms, skiff.dev/simulate-exit-code: "1"}}
    spec: {restartPolicy: Never, containers: [{name: c, image: "busybox:1.36"}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: indexed}
spec:
  completions: 3
  parallelism: 3
  completionMode: Indexed
  template:
    metadata: {annotations: {skiff.dev/simulate-exit-after: 500ms}}
    spec: {restartPolicy: Never, containers: [{name: c, image: "busybox:1.36"}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: tick}
spec:
  schedule: "* * * * *"
  jobTemplate:
    spec:
      template:
        metadata: {annotations: {skiff.dev/simulate-exit-after: 500ms}}
        spec: {restartPolicy: Never, containers: [{name: c, image: "busybox:1.36"}]}
"#,
    );
    cp.ok(&[
        "wait",
        "--for=condition=complete",
        "job/work",
        "--timeout=60s",
    ]);
    assert_eq!(
        cp.jsonpath(&["get", "job", "work"],
            "{.status.succeeded} {.status.failed} {.status.conditions[?(@.type==\"Complete\")].reason}"
        ),
        "3 0 CompletionsReached"
    );
    // Never more than two at once: the third pod was created after one of the first finished.
    let created = cp.jsonpath(&[
            "get",
            "pods",
            "-l",
            "job-name=work",
            "--sort-by=.metadata.creationTimestamp",
        ],
        "{range .items[*]}{.metadata.creationTimestamp} {.status.containerStatuses[0].state.terminated.finishedAt}{\"\\n\"}{end}",
    );
    let rows: Vec<Vec<&str>> = created.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(rows.len(), 3, "{created}");
    let first_done = rows[..2].iter().map(|r| r[1]).min().unwrap_or("");
    assert!(
        rows[2][0] >= first_done,
        "the third started before a slot was free:\n{created}"
    );

    cp.ok(&[
        "wait",
        "--for=condition=complete",
        "job/indexed",
        "--timeout=60s",
    ]);
    assert_eq!(
        cp.jsonpath(&["get", "job", "indexed"], "{.status.completedIndexes}"),
        "0-2"
    );
    let mut indexes: Vec<String> = cp.jsonpath(&["get", "pods", "-l", "job-name=indexed"],
        "{range .items[*]}{.metadata.annotations.batch\\.kubernetes\\.io/job-completion-index}{\"\\n\"}{end}",
    )
    .lines()
    .map(str::to_string)
    .collect();
    indexes.sort();
    assert_eq!(indexes, ["0", "1", "2"]);

    // One failure, a replacement after the 10 s backoff, a second failure: over the limit.
    cp.ok(&[
        "wait",
        "--for=condition=failed",
        "job/doomed",
        "--timeout=90s",
    ]);
    assert_eq!(
        cp.jsonpath(
            &["get", "job", "doomed"],
            "{.status.failed} {.status.conditions[?(@.type==\"Failed\")].reason}"
        ),
        "2 BackoffLimitExceeded"
    );

    // The CronJob fires at the next minute and its Job completes.
    cp.eventually(75, "the CronJob's first Job complete", || {
        !cp.jsonpath(&["get", "cronjob", "tick"], "{.status.lastSuccessfulTime}")
            .is_empty()
    });
    let jobs = cp.jsonpath(
        &["get", "jobs"],
        "{range .items[*]}{.metadata.name} {.metadata.ownerReferences[0].kind}{\"\\n\"}{end}",
    );
    assert!(
        jobs.lines()
            .any(|l| l.starts_with("tick-") && l.ends_with(" CronJob")),
        "{jobs}"
    );
    assert!(
        !cp.jsonpath(&["get", "cronjob", "tick"], "{.status.lastScheduleTime}")
            .is_empty()
    );

    // A finished Job with a TTL is deleted with its pods.
    cp.ok(&[
        "patch",
        "job",
        "work",
        "--type=merge",
        "-p",
        r#"{"spec":{"ttlSecondsAfterFinished":1}}"#,
    ]);
    cp.eventually(30, "the finished Job deleted after its TTL", || {
        !cp.kubectl(&["get", "job", "work"]).status.success()
    });
}

#[test]
fn a_silent_node_goes_unknown_and_its_pods_move() {
    let cp = ControlPlane::start();
    let _stays = Simulator::start_named(&cp, "stays", 1, "100ms");
    let mut goes = Simulator::start_named(&cp, "goes", 1, "100ms");
    // Two replicas, one per node; they tolerate an unreachable node for 2 s only.
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
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - {weight: 100, podAffinityTerm: {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: web}}}}
      tolerations:
      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      - {key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      containers: [{name: c, image: "busybox:1.36"}]
"#,
    );
    rollout(&cp, "deployment/web");
    let placed = cp.jsonpath(
        &["get", "pods", "-l", "app=web"],
        "{.items[*].spec.nodeName}",
    );
    assert!(
        placed.contains("goes-0") && placed.contains("stays-0"),
        "{placed}"
    );

    goes.stop();
    // 40 s of silence, then Unknown and tainted.
    cp.eventually(90, "goes-0 Unknown", || {
        cp.jsonpath(
            &["get", "node", "goes-0"],
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        ) == "Unknown"
    });
    let taints = cp.jsonpath(
        &["get", "node", "goes-0"],
        "{range .spec.taints[*]}{.key}:{.effect} {end}",
    );
    assert!(
        taints.contains("node.kubernetes.io/unreachable:NoSchedule")
            && taints.contains("node.kubernetes.io/unreachable:NoExecute"),
        "{taints}"
    );
    // After the toleration, the pod there is evicted and replaced on the other node.
    // (The evicted pod stays Terminating: its node is gone and cannot confirm, as upstream.)
    cp.eventually(60, "both live replicas Running on stays-0", || {
        let live = cp.jsonpath(&["get", "pods", "-l", "app=web"],
            "{range .items[*]}{.spec.nodeName} {.status.phase} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        );
        let live: Vec<&str> = live.lines().filter(|l| l.split(' ').nth(2).is_none_or(str::is_empty)).collect();
        live.len() == 2 && live.iter().all(|l| l.starts_with("stays-0 Running"))
    });
    let events = cp.ok(&[
        "get",
        "events",
        "--field-selector",
        "reason=TaintManagerEviction",
    ]);
    assert!(
        events.contains("Marking for deletion Pod default/web-"),
        "{events}"
    );
}

#[test]
fn daemonsets_cover_every_node_and_roll() {
    let cp = ControlPlane::start();
    let _sim = Simulator::start(&cp, 2, "100ms");
    cp.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec: {containers: [{name: c, image: "busybox:1.36"}]}
"#,
    );
    rollout(&cp, "daemonset/agent");
    let nodes = |cp: &ControlPlane| -> Vec<String> {
        let mut v: Vec<String> = pods(cp, "agent")
            .iter()
            .map(|(name, _, _)| cp.jsonpath(&["get", "pod", name], "{.spec.nodeName}"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(nodes(&cp), ["sim-0", "sim-1"]);
    assert_eq!(
        cp.jsonpath(&["get", "ds", "agent"],
            "{.status.desiredNumberScheduled} {.status.currentNumberScheduled} {.status.numberReady} {.status.updatedNumberScheduled}"
        ),
        "2 2 2 2"
    );

    // A node added later gets its pod.
    let _late = Simulator::start_named(&cp, "late", 1, "100ms");
    cp.eventually(30, "a pod on the new node", || {
        nodes(&cp) == ["late-0", "sim-0", "sim-1"]
    });
    rollout(&cp, "daemonset/agent");

    // A new template rolls over every node; the history has both.
    cp.ok(&["set", "image", "ds/agent", "c=busybox:1.37"]);
    rollout(&cp, "daemonset/agent");
    cp.eventually(30, "every pod updated", || {
        let p = pods(&cp, "agent");
        p.len() == 3 && p.iter().all(|(_, img, _)| img == "busybox:1.37")
    });
    let history = cp.ok(&["rollout", "history", "ds/agent"]);
    assert!(
        history
            .lines()
            .filter(|l| l.trim_start().starts_with(['1', '2']))
            .count()
            == 2,
        "{history}"
    );

    // A NoSchedule taint keeps new pods off but does not evict; a NoExecute one does.
    cp.ok(&["taint", "node", "sim-0", "dedicated=x:NoSchedule"]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(nodes(&cp).len(), 3);
    cp.ok(&["taint", "node", "sim-1", "evict=now:NoExecute"]);
    cp.eventually(30, "the pod off sim-1", || {
        !nodes(&cp).contains(&"sim-1".to_string())
    });
}

#[test]
fn statefulsets_keep_names_order_and_claims() {
    let cp = ControlPlane::start();
    let _sim = Simulator::start(&cp, 2, "100ms");
    cp.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 3
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
      - name: c
        image: "busybox:1.36"
        readinessProbe: {initialDelaySeconds: 1, exec: {command: ["true"]}}
  volumeClaimTemplates:
  - metadata: {name: data}
    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
"#,
    );
    let out = cp.ok(&["rollout", "status", "sts/db", "--timeout=90s"]);
    assert!(
        out.contains("partitioned roll out complete") || out.contains("roll out complete"),
        "{out}"
    );
    // In order: each pod was created after the one before it was Ready.
    let rows = cp.jsonpath(
        &[
            "get",
            "pods",
            "-l",
            "app=db",
            "--sort-by=.metadata.creationTimestamp",
        ],
        "{range .items[*]}{.metadata.name} {.spec.hostname} {.spec.subdomain}{\"\\n\"}{end}",
    );
    assert_eq!(
        rows.trim(),
        "db-0 db-0 db\ndb-1 db-1 db\ndb-2 db-2 db",
        "{rows}"
    );
    let events = cp.jsonpath(
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=db,involvedObject.kind=StatefulSet",
            "--sort-by=.firstTimestamp",
        ],
        "{range .items[*]}{.message}{\"\\n\"}{end}",
    );
    let order: Vec<&str> = events
        .lines()
        .filter(|l| l.starts_with("create Pod"))
        .collect();
    assert_eq!(order.len(), 3, "{events}");
    assert!(
        order[0].contains("db-0") && order[1].contains("db-1") && order[2].contains("db-2"),
        "{events}"
    );
    let claims = cp.ok(&["get", "pvc", "-o", "name"]);
    assert_eq!(claims.lines().count(), 3, "{claims}");
    assert!(
        claims.contains("data-db-0") && claims.contains("data-db-2"),
        "{claims}"
    );

    // A deleted pod comes back under its name.
    let uid = cp.jsonpath(&["get", "pod", "db-1"], "{.metadata.uid}");
    // (Not waiting: kubectl's wait can miss a deletion when the same name is back within
    // milliseconds, as with simulated nodes.)
    cp.ok(&["delete", "pod", "db-1", "--wait=false"]);
    cp.eventually(30, "db-1 back", || {
        let now = cp.kubectl(&[
            "get",
            "pod",
            "db-1",
            "-o",
            "jsonpath={.metadata.uid} {.status.phase}",
        ]);
        let now = String::from_utf8_lossy(&now.stdout).to_string();
        now.ends_with("Running") && !now.starts_with(&uid)
    });

    // A rolling update replaces every pod; the revisions then agree.
    cp.ok(&["set", "image", "sts/db", "c=busybox:1.37"]);
    let out = cp.ok(&["rollout", "status", "sts/db", "--timeout=90s"]);
    assert!(out.contains("complete"), "{out}");
    cp.eventually(30, "every pod updated and the revisions equal", || {
        let p = pods(&cp, "db");
        let revs = cp.jsonpath(
            &["get", "sts", "db"],
            "{.status.currentRevision} {.status.updateRevision} {.status.updatedReplicas}",
        );
        let r: Vec<&str> = revs.split(' ').collect();
        p.len() == 3
            && p.iter().all(|(_, img, _)| img == "busybox:1.37")
            && r.len() == 3
            && r[0] == r[1]
            && r[2] == "3"
    });

    // A partition keeps the ordinals below it on the old template.
    cp.ok(&[
        "patch",
        "sts",
        "db",
        "--type=merge",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":2}},"template":{"spec":{"containers":[{"name":"c","image":"busybox:1.38"}]}}}}"#,
    ]);
    cp.eventually(60, "only db-2 on the new template", || {
        let mut p = pods(&cp, "db");
        p.sort();
        p.len() == 3
            && p.iter().all(|(_, _, ph)| ph == "Running")
            && p.iter()
                .map(|(n, img, _)| format!("{n}={img}"))
                .collect::<Vec<_>>()
                == [
                    "db-0=busybox:1.37",
                    "db-1=busybox:1.37",
                    "db-2=busybox:1.38",
                ]
    });
    let out = cp.ok(&["rollout", "status", "sts/db", "--timeout=60s"]);
    assert!(
        out.contains("partitioned roll out complete: 1 new pods have been updated"),
        "{out}"
    );

    // Scaling down removes the highest ordinals; the claims stay.
    cp.ok(&["scale", "sts/db", "--replicas=1"]);
    cp.eventually(60, "only db-0 left", || {
        pods(&cp, "db")
            .iter()
            .map(|(n, _, _)| n.clone())
            .collect::<Vec<_>>()
            == ["db-0"]
    });
    assert_eq!(cp.ok(&["get", "pvc", "-o", "name"]).lines().count(), 3);
}

#[test]
fn one_replica_leads_and_another_takes_over() {
    use skiff_controllers::leader::{Elector, LEASE_DURATION};
    let cp = ControlPlane::start();
    // skiff-control's own controllers hold the controller-manager Lease.
    cp.eventually(30, "the controller-manager lease held", || {
        !cp.jsonpath(
            &[
                "get",
                "lease",
                "-n",
                "kube-system",
                "skiff-controller-manager",
            ],
            "{.spec.holderIdentity}",
        )
        .is_empty()
    });
    // Two candidates for another Lease, through the real API server.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = skiff_controllers::client_from_kubeconfig(&cp.kubeconfig())
            .await
            .expect("client");
        let mut a = Elector::new(client.clone(), "election-test", "a".into());
        let mut b = Elector::new(client, "election-test", "b".into());
        assert!(a.try_acquire_or_renew().await.expect("a"));
        assert!(
            !b.try_acquire_or_renew().await.expect("b"),
            "one leader at a time"
        );
        assert!(a.try_acquire_or_renew().await.expect("a renews"));
        // a stops renewing: b waits out the lease duration, by its own clock, then takes over.
        let start = std::time::Instant::now();
        while !b.try_acquire_or_renew().await.expect("b") {
            assert!(start.elapsed() < LEASE_DURATION * 3, "b never took over");
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        assert!(
            start.elapsed() >= LEASE_DURATION,
            "took over before the lease ran out"
        );
        assert!(
            !a.try_acquire_or_renew().await.expect("a"),
            "a lost the lease"
        );
    });
    assert_eq!(
        cp.jsonpath(
            &["get", "lease", "-n", "kube-system", "election-test"],
            "{.spec.holderIdentity} {.spec.leaseTransitions}"
        ),
        "b 1"
    );
}
