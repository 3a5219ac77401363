//! Real containerd, started and supervised by skiff's runtime layer: a busybox image built from
//! Debian's `busybox-static`, imported from its OCI layout archive and unpacked; containers run
//! to completion with their output and exit status; a long-running one is stopped by signal;
//! everything is removed afterwards.

use std::path::Path;

use futures::FutureExt;
use skiff_runtime::{
    container::{self, ContainerConfig},
    containerd::{self, Supervised},
    image, oci_layout,
};
use skiff_tests::{privileged, unique_name};

const BUSYBOX: &str = "/bin/busybox";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_image_runs_containers_with_output_and_exit_status() {
    if !privileged("busybox_image_runs_containers_with_output_and_exit_status") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("skr")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let archive = dir.path().join("busybox.tar");
    oci_layout::build_busybox_archive(Path::new(BUSYBOX), "skiff.test/busybox:1", &archive)
        .expect("build the image archive");
    let sup = Supervised::start(
        Path::new("containerd"),
        &dir.path().join("data"),
        &dir.path().join("run"),
    )
    .await
    .expect("start containerd");
    let ch = containerd::connect(sup.socket()).await.expect("connect");
    assert!(
        containerd::version(&ch)
            .await
            .expect("version")
            .starts_with("1.")
    );

    let img = image::import_oci_archive(&ch, &archive, "skiff.test/busybox:1")
        .await
        .expect("import");
    assert!(img.digest.starts_with("sha256:"));
    // Importing again is a no-op that yields the same image.
    let again = image::import_oci_archive(&ch, &archive, "skiff.test/busybox:1")
        .await
        .expect("re-import");
    assert_eq!(again.chain_id, img.chain_id);

    let logs = dir.path().join("logs");
    let prefix = unique_name("ctr");
    let id = |name: &str| format!("{prefix}-{name}");
    let ids: Vec<String> = ["ok", "fail", "long", "stuck", "missing"]
        .iter()
        .map(|n| id(n))
        .collect();
    let runc_root = dir.path().join("run/runc");
    let run = |name: &str, args: &[&str]| ContainerConfig {
        id: id(name),
        runc_root: Some(runc_root.clone()),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["GREETING=hello".into()],
        hostname: "box".into(),
        log: container::log_path(&logs, &id(name)),
        log_driver: skiff_tests::bin("skiff-node"),
        ..Default::default()
    };
    // Always clean up, then report: a failed assertion must not leave containers behind.
    let outcome = std::panic::AssertUnwindSafe(async {
        let ok = run(
            "ok",
            &[
                "sh",
                "-c",
                "echo $GREETING from $(hostname); ls /bin/httpd; echo oops >&2",
            ],
        );
        container::start(&ch, &ok, &img).await.expect("start ok");
        assert_eq!(container::wait(&ch, &ok.id).await.expect("wait"), 0);
        // The logging binary writes CRI records, each stream in its own order (how the two
        // interleave is not defined); it may still be writing the last when the exit status is
        // reported.
        let mut log = String::new();
        for _ in 0..50 {
            log = std::fs::read_to_string(&ok.log).expect("log");
            if log.lines().count() >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let records: Vec<(String, String)> = log
            .lines()
            .map(|l| {
                let r = skiff_runtime::crilog::parse(l.as_bytes()).expect("a CRI record");
                (
                    r.stream.to_string(),
                    String::from_utf8_lossy(r.content).into_owned(),
                )
            })
            .collect();
        let of = |stream: &str| -> Vec<String> {
            records
                .iter()
                .filter(|(s, _)| s == stream)
                .map(|(_, c)| c.clone())
                .collect()
        };
        assert_eq!(of("stdout"), ["hello from box", "/bin/httpd"], "{log}");
        assert_eq!(of("stderr"), ["oops"], "{log}");

        let fail = run("fail", &["sh", "-c", "exit 3"]);
        container::start(&ch, &fail, &img)
            .await
            .expect("start fail");
        assert_eq!(container::wait(&ch, &fail.id).await.expect("wait"), 3);

        // A process that handles SIGTERM exits with its own status.
        let long = run(
            "long",
            &[
                "sh",
                "-c",
                "trap 'exit 7' TERM; while true; do sleep 1; done",
            ],
        );
        container::start(&ch, &long, &img)
            .await
            .expect("start long");
        let waiter = {
            let (ch, id) = (ch.clone(), long.id.clone());
            tokio::spawn(async move { container::wait(&ch, &id).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        container::kill(&ch, &long.id, 15).await.expect("SIGTERM");
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("the trap ends it")
            .expect("join")
            .expect("wait");
        assert_eq!(status, 7);
        // PID 1 without a handler ignores SIGTERM (why termination ends with SIGKILL).
        let stuck = run("stuck", &["sleep", "600"]);
        container::start(&ch, &stuck, &img)
            .await
            .expect("start stuck");
        let waiter = {
            let (ch, id) = (ch.clone(), stuck.id.clone());
            tokio::spawn(async move { container::wait(&ch, &id).await })
        };
        container::kill(&ch, &stuck.id, 15).await.expect("SIGTERM");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "sleep as PID 1 ignores SIGTERM");
        container::kill(&ch, &stuck.id, 9).await.expect("SIGKILL");
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("SIGKILL ends it")
            .expect("join")
            .expect("wait");
        assert_eq!(status, 128 + 9);

        // A missing binary is an error from start, not a hang, and cleanup still works.
        let missing = run("missing", &["/no/such/binary"]);
        assert!(container::start(&ch, &missing, &img).await.is_err());
    })
    .catch_unwind()
    .await;
    for id in &ids {
        container::kill(&ch, id, 9).await.expect("kill");
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), container::wait(&ch, id)).await;
        container::remove(&ch, id).await.expect("remove");
    }
    drop(sup);
    if let Err(panic) = outcome {
        let log = std::fs::read_to_string(dir.path().join("run/containerd/containerd.log"));
        eprintln!("containerd log:\n{}", log.unwrap_or_default());
        std::panic::resume_unwind(panic);
    }
    // No shim or container process is left behind.
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .expect("ps");
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines()
            .any(|l| l.contains(&dir.path().display().to_string())),
        "leftover processes:\n{ps}"
    );
}
