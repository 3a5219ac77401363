//! The `kube` crate's typed API (the client Rust controllers use) against `skiff-control`:
//! list, watch, the three patch types, and concurrent Service creates that must never share a
//! ClusterIP or NodePort.

use std::collections::BTreeMap;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use skiff_tests::control::ControlPlane;

async fn client(cp: &ControlPlane) -> Client {
    skiff_controllers::client_from_kubeconfig(&cp.kubeconfig())
        .await
        .expect("client from the admin kubeconfig")
}

fn cm(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.name = Some(name.into());
    c.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    );
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_list_watch_and_patch() {
    let cp = ControlPlane::start();
    let client = client(&cp).await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..5 {
        api.create(
            &PostParams::default(),
            &cm(&format!("c{i}"), &[("i", &i.to_string())]),
        )
        .await
        .expect("create");
    }
    // Paged list: 2 per page, 3 pages, one consistent snapshot.
    let first = api
        .list(&ListParams::default().limit(2))
        .await
        .expect("list");
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("continue token");
    let second = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(second.items.len(), 2);
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    let all = api.list(&ListParams::default()).await.expect("list all");
    let names: Vec<_> = all
        .items
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);

    // Metadata-only lists (what controllers' metadata watchers use) carry PartialObjectMetadata.
    let meta = api
        .list_metadata(&ListParams::default())
        .await
        .expect("list metadata");
    assert_eq!(meta.items.len(), 5);
    assert_eq!(
        meta.items[0].types.as_ref().map(|t| t.kind.as_str()),
        Some("PartialObjectMetadata")
    );
    assert_eq!(meta.items[0].metadata.name.as_deref(), Some("c0"));
    let one = api.get_metadata("c1").await.expect("get metadata");
    assert_eq!(
        one.types.map(|t| t.kind),
        Some("PartialObjectMetadata".into())
    );

    // Watch from the list's resourceVersion sees exactly what happens next, in order.
    let rv = all.metadata.resource_version.clone().expect("rv");
    let mut events = api
        .watch(&WatchParams::default().timeout(20), &rv)
        .await
        .expect("watch")
        .boxed();
    let strategic = serde_json::json!({"data": {"extra": "1"}});
    api.patch("c0", &PatchParams::default(), &Patch::Strategic(&strategic))
        .await
        .expect("strategic patch");
    let merge = serde_json::json!({"data": {"i": null}});
    api.patch("c0", &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .expect("merge patch");
    let json_patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "replace", "path": "/data/extra", "value": "2"}
    ]))
    .expect("json patch");
    api.patch(
        "c0",
        &PatchParams::default(),
        &Patch::Json::<()>(json_patch),
    )
    .await
    .expect("json patch");
    api.delete("c1", &Default::default()).await.expect("delete");
    let mut seen = Vec::new();
    while seen.len() < 4 {
        match events
            .try_next()
            .await
            .expect("watch event")
            .expect("stream open")
        {
            WatchEvent::Modified(c) => seen.push(format!("M {:?}", c.data.unwrap_or_default())),
            WatchEvent::Deleted(c) => {
                seen.push(format!("D {}", c.metadata.name.unwrap_or_default()))
            }
            WatchEvent::Added(c) => seen.push(format!("A {}", c.metadata.name.unwrap_or_default())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            r#"M {"extra": "1", "i": "0"}"#,
            r#"M {"extra": "1"}"#,
            r#"M {"extra": "2"}"#,
            "D c1",
        ]
    );
    // A stale resourceVersion is a 409 the typed client reports as such.
    let mut stale = all.items[2].clone();
    api.patch(
        "c2",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"data": {"x": "y"}})),
    )
    .await
    .expect("bump");
    stale.data = Some(BTreeMap::from([("i".to_string(), "changed".to_string())]));
    match api.replace("c2", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(e)) => assert_eq!((e.code, e.reason.as_str()), (409, "Conflict")),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_service_creates_never_share_an_ip_or_port() {
    let cp = ControlPlane::start();
    let client = client(&cp).await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let creates = (0..40).map(|i| {
        let api = api.clone();
        async move {
            let svc: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("s{i}")},
                "spec": {"type": "NodePort", "ports": [{"port": 80}]}
            }))
            .expect("service");
            api.create(&PostParams::default(), &svc)
                .await
                .expect("create service")
        }
    });
    let made: Vec<Service> = futures::stream::iter(creates)
        .buffer_unordered(16)
        .collect()
        .await;
    let mut ips = std::collections::HashSet::new();
    let mut ports = std::collections::HashSet::new();
    for s in &made {
        let spec = s.spec.as_ref().expect("spec");
        let ip = spec.cluster_ip.clone().expect("clusterIP");
        assert!(ip.starts_with("10."), "{ip}");
        assert!(ips.insert(ip.clone()), "duplicate ClusterIP {ip}");
        let np = spec.ports.as_ref().expect("ports")[0]
            .node_port
            .expect("nodePort");
        assert!((30000..=32767).contains(&np));
        assert!(ports.insert(np), "duplicate NodePort {np}");
    }
    // Asking for a taken IP is a 422 that names the field.
    let taken = made[0]
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .expect("ip");
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "dup"},
        "spec": {"clusterIP": taken, "ports": [{"port": 80}]}
    }))
    .expect("service");
    match api.create(&PostParams::default(), &svc).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422);
            assert!(e.message.contains("already allocated"), "{}", e.message);
        }
        other => panic!("expected 422, got {other:?}"),
    }
    // Deleting a Service frees its IP for a new one that asks for it.
    let holder = made[0].metadata.name.clone().expect("name");
    api.delete(&holder, &Default::default())
        .await
        .expect("delete");
    api.create(&PostParams::default(), &svc)
        .await
        .expect("the freed IP can be taken");
}

/// Security identities (`skiff.dev/v1`): served like any kind, validated, and allocated so that
/// nodes allocating one set of labels at once agree on one number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_identities_are_allocated_once_per_label_set() {
    use skiff_apimachinery::identity::{IdentityLabels, SecurityIdentity, allocate};
    let cp = ControlPlane::start();
    let client = client(&cp).await;
    let api: Api<SecurityIdentity> = Api::all(client);
    let labels = |ns: &str, app: &str| {
        IdentityLabels::of(
            ns,
            &BTreeMap::from([("app".to_string(), app.to_string())]),
            &BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.to_string())]),
        )
    };
    // Eight allocators (agents) of the same labels at once, none knowing the others' result.
    let web = labels("shop", "web");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (api, web) = (api.clone(), web.clone());
        tasks.push(tokio::spawn(async move { allocate(&api, &[], &web).await }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.expect("task").expect("allocate"));
    }
    assert_eq!(ids.len(), 1, "one number for one label set: {ids:?}");
    let id = *ids.first().expect("an id");
    let all = api.list(&ListParams::default()).await.expect("list").items;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].labels, web);
    // Other labels, another number; a known identity is reused without a request.
    let db = allocate(&api, &all, &labels("shop", "db"))
        .await
        .expect("db");
    assert_ne!(db, id);
    assert_eq!(allocate(&api, &all, &web).await.expect("again"), id);
    // A number taken by other labels: the allocator moves on (the preferred one is taken here
    // by an identity made to collide).
    let other = labels("x", "y");
    api.create(
        &PostParams::default(),
        &SecurityIdentity::new(other.preferred(), labels("z", "collides")),
    )
    .await
    .expect("squat the preferred number");
    let got = allocate(&api, &[], &other).await.expect("allocate past it");
    assert_ne!(got, other.preferred());

    // Validation: the name is a number in the cluster range; labels never change.
    let bad = api
        .create(
            &PostParams::default(),
            &SecurityIdentity::new(7, web.clone()),
        )
        .await
        .expect_err("reserved number");
    assert!(matches!(bad, kube::Error::Api(e) if e.code == 422));
    let mut changed = api.get(&id.to_string()).await.expect("get");
    changed.labels.namespace = "elsewhere".into();
    let bad = api
        .replace(&id.to_string(), &PostParams::default(), &changed)
        .await
        .expect_err("labels are immutable");
    assert!(matches!(bad, kube::Error::Api(e) if e.code == 422));
    // kubectl sees the kind (discovery, table, short name).
    let out = cp.ok(&["get", "sid"]);
    assert!(out.contains(&id.to_string()), "{out}");
    let explained = cp.ok(&["explain", "securityidentity.labels"]);
    assert!(explained.contains("podLabels"), "{explained}");
}

/// The identity GC (grace 2 s here) deletes identities no pod carries, and keeps the ones a
/// pod does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_identities_no_pod_carries_are_collected() {
    use skiff_apimachinery::identity::{IdentityLabels, SecurityIdentity, allocate};
    let cp = ControlPlane::start_with(
        std::net::Ipv4Addr::LOCALHOST,
        &["--identity-gc-seconds", "2"],
    );
    let client = client(&cp).await;
    let api: Api<SecurityIdentity> = Api::all(client.clone());
    let labels = |app: &str| {
        IdentityLabels::of(
            "default",
            &BTreeMap::from([("app".to_string(), app.to_string())]),
            &BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                "default".to_string(),
            )]),
        )
    };
    // A pod (pending: no nodes) carrying app=web.
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]},
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let used = allocate(&api, &[], &labels("web")).await.expect("web");
    let unused = allocate(&api, &[], &labels("gone")).await.expect("gone");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let names: Vec<String> = api
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .iter()
            .map(|i| i.metadata.name.clone().unwrap_or_default())
            .collect();
        assert!(
            names.contains(&used.to_string()),
            "the carried identity went: {names:?}"
        );
        if !names.contains(&unused.to_string()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "identity {unused} never collected; log:\n{}",
            cp.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // Seen twice more, the carried one stays.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(api.get(&used.to_string()).await.is_ok());
}
