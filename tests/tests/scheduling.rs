//! The scheduler end to end, with the real kubectl against `skiff-control` and simulated nodes
//! (32 CPUs each): a pod that fits nowhere stays Pending with upstream's reason and schedules
//! as soon as room appears; node selectors, taints and anti-affinity place pods; a
//! higher-priority pod preempts a lower-priority one.

use skiff_tests::{control::ControlPlane, simulate::Simulator};

fn pod_yaml(name: &str, cpu: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {name}}}}}\nspec:\n  containers: [{{name: c, image: \"busybox:1.36\", resources: {{requests: {{cpu: \"{cpu}\"}}}}}}]\n{extra}"
    )
}

fn scheduled_reason(cp: &ControlPlane, pod: &str) -> String {
    cp.jsonpath(&["get", "pod", pod],
        "{.status.conditions[?(@.type==\"PodScheduled\")].status} {.status.conditions[?(@.type==\"PodScheduled\")].reason}: {.status.conditions[?(@.type==\"PodScheduled\")].message}",
    )
}

fn node_of(cp: &ControlPlane, pod: &str) -> String {
    cp.jsonpath(&["get", "pod", pod], "{.spec.nodeName}")
}

#[test]
fn unschedulable_pods_say_why_and_schedule_when_room_appears() {
    let cp = ControlPlane::start();
    let _sim = Simulator::start(&cp, 2, "100ms");

    // More CPU than any node has.
    cp.ok_stdin(&["apply", "-f", "-"], &pod_yaml("huge", "40", ""));
    cp.eventually(30, "huge to be reported unschedulable", || {
        scheduled_reason(&cp, "huge").starts_with("False Unschedulable")
    });
    let why = scheduled_reason(&cp, "huge");
    assert!(
        why.contains("0/2 nodes are available: 2 Insufficient cpu.")
            && why.contains("preemption: 0/2 nodes are available: 2 No preemption victims found for incoming pod."),
        "{why}"
    );
    let events = cp.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=huge,reason=FailedScheduling",
    ]);
    assert!(events.contains("Insufficient cpu"), "{events}");
    cp.ok(&["delete", "pod", "huge", "--wait=false"]);

    // Room appears when a pod goes: 20 + 20 CPUs taken, a 16-CPU pod waits until one leaves.
    cp.ok_stdin(
        &["apply", "-f", "-"],
        &format!(
            "{}---\n{}",
            pod_yaml("hog-a", "20", ""),
            pod_yaml("hog-b", "20", "")
        ),
    );
    cp.eventually(30, "the hogs placed", || {
        let (a, b) = (node_of(&cp, "hog-a"), node_of(&cp, "hog-b"));
        !a.is_empty() && !b.is_empty()
    });
    assert_ne!(
        node_of(&cp, "hog-a"),
        node_of(&cp, "hog-b"),
        "least allocated spreads them"
    );
    cp.ok_stdin(&["apply", "-f", "-"], &pod_yaml("wide", "16", ""));
    cp.eventually(30, "wide to wait for cpu", || {
        scheduled_reason(&cp, "wide").contains("2 Insufficient cpu")
    });
    let freed = node_of(&cp, "hog-a");
    cp.ok(&["delete", "pod", "hog-a"]);
    cp.eventually(30, "wide scheduled where hog-a was", || {
        node_of(&cp, "wide") == freed
    });

    // A selector no node matches waits; labelling a node lets it run there.
    cp.ok_stdin(
        &["apply", "-f", "-"],
        &pod_yaml("picky", "1", "  nodeSelector: {disk: ssd}\n"),
    );
    cp.eventually(30, "picky to be unschedulable", || {
        scheduled_reason(&cp, "picky")
            .contains("2 node(s) didn't match Pod's node affinity/selector")
    });
    cp.ok(&["label", "node", "sim-1", "disk=ssd"]);
    cp.eventually(30, "picky on sim-1", || node_of(&cp, "picky") == "sim-1");
    cp.eventually(30, "picky Running", || {
        cp.jsonpath(&["get", "pod", "picky"], "{.status.phase}") == "Running"
    });
    let events = cp.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=picky,reason=Scheduled",
    ]);
    assert!(
        events.contains("Successfully assigned default/picky to sim-1"),
        "{events}"
    );

    // A tainted node takes only pods that tolerate the taint.
    cp.ok(&["taint", "node", "sim-0", "dedicated=infra:NoSchedule"]);
    for i in 0..4 {
        cp.ok_stdin(
            &["apply", "-f", "-"],
            &pod_yaml(&format!("plain-{i}"), "100m", ""),
        );
    }
    cp.ok_stdin(
        &["apply", "-f", "-"],
        &pod_yaml(
            "tolerant",
            "100m",
            "  nodeSelector: {kubernetes.io/hostname: sim-0}\n  tolerations: [{key: dedicated, operator: Equal, value: infra, effect: NoSchedule}]\n",
        ),
    );
    cp.eventually(30, "the plain pods on sim-1 only", || {
        (0..4).all(|i| node_of(&cp, &format!("plain-{i}")) == "sim-1")
    });
    cp.eventually(30, "the tolerant pod on sim-0", || {
        node_of(&cp, "tolerant") == "sim-0"
    });
}

#[test]
fn anti_affinity_spreads_and_priority_preempts() {
    let cp = ControlPlane::start();
    let _sim = Simulator::start(&cp, 2, "100ms");

    // One replica per node: the third waits, saying why.
    cp.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: solo}
spec:
  replicas: 3
  selector: {matchLabels: {app: solo}}
  template:
    metadata: {labels: {app: solo}}
    spec:
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: solo}}}
      containers: [{name: c, image: "busybox:1.36"}]
"#,
    );
    cp.eventually(30, "two solo pods placed and one waiting", || {
        let nodes = cp.jsonpath(
            &["get", "pods", "-l", "app=solo"],
            "{range .items[*]}{.spec.nodeName}{\"\\n\"}{end}",
        );
        let mut placed: Vec<&str> = nodes.lines().filter(|l| !l.is_empty()).collect();
        placed.sort();
        placed == ["sim-0", "sim-1"] && nodes.lines().count() == 3
    });
    cp.eventually(30, "the third solo pod to say why it waits", || {
        cp.jsonpath(
            &[
                "get",
                "pods",
                "-l",
                "app=solo",
                "--field-selector",
                "spec.nodeName=",
            ],
            "{.items[0].status.conditions[?(@.type==\"PodScheduled\")].message}",
        )
        .contains("2 node(s) didn't match pod anti-affinity rules")
    });
    cp.ok(&["delete", "deployment", "solo"]);

    // Priority classes; the pods without one get priority 0, those with one its value.
    cp.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {name: batch}
value: 10
---
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {name: urgent}
value: 1000
"#,
    );
    let classes = cp.ok(&["get", "priorityclasses"]);
    assert!(
        classes.contains("system-node-critical") && classes.contains("urgent"),
        "{classes}"
    );
    let err = cp.fails(&[
        "run",
        "nope",
        "--image=busybox:1.36",
        "--overrides={\"spec\":{\"priorityClassName\":\"missing\"}}",
    ]);
    assert!(
        err.contains("no PriorityClass with name missing was found"),
        "{err}"
    );

    // Fill both nodes with low-priority pods, then a high-priority one needs room.
    let low = "  priorityClassName: batch\n";
    cp.ok_stdin(
        &["apply", "-f", "-"],
        &format!(
            "{}---\n{}",
            pod_yaml("low-a", "30", low),
            pod_yaml("low-b", "30", low)
        ),
    );
    cp.eventually(30, "the low pods placed", || {
        !node_of(&cp, "low-a").is_empty() && !node_of(&cp, "low-b").is_empty()
    });
    assert_eq!(
        cp.jsonpath(&["get", "pod", "low-a"], "{.spec.priority}"),
        "10"
    );
    cp.ok_stdin(
        &["apply", "-f", "-"],
        &pod_yaml("vip", "8", "  priorityClassName: urgent\n"),
    );
    cp.eventually(60, "vip scheduled after preempting", || {
        !node_of(&cp, "vip").is_empty()
    });
    let node = node_of(&cp, "vip");
    assert_eq!(
        cp.jsonpath(&["get", "pod", "vip"], "{.status.nominatedNodeName}"),
        node
    );
    let left = cp.ok(&["get", "pods", "-l", "app in (low-a,low-b)", "-o", "name"]);
    assert_eq!(left.lines().count(), 1, "one victim evicted: {left}");
    let events = cp.ok(&["get", "events", "--field-selector", "reason=Preempted"]);
    assert!(events.contains(&format!("on node {node}")), "{events}");
}
