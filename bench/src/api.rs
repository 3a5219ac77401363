//! The API server benchmark: a release `skiff-control` (single-member store on the workspace's
//! disk, so every write is fsynced) driven through HTTPS with the `kube` crate's typed client,
//! as controllers and kubectl drive it. Workloads: pod creates and gets with N concurrent
//! clients, lists of 1k and 30k pods in one namespace (one request, and in kubectl's pages of
//! 500), and watch fan-out (100 watchers, latency from a create's acknowledgement to each
//! watcher's event). The peer is upstream's published API call latency SLO (mutating and
//! single-object calls p99 ≤ 1 s, namespace-scoped lists p99 ≤ 5 s); skiff's aim on this
//! machine is ≤ 50 ms for creates.

use std::{
    future::Future,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{ListParams, PostParams, WatchEvent, WatchParams},
};

use crate::common::{Control, free_addr, rss_mib, start_control};

/// Options of `skiff-bench api`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `skiff-control` binary to benchmark.
    #[arg(long)]
    skiff_control: PathBuf,
    /// Directory for its data (a real disk: writes are fsynced).
    #[arg(long)]
    data_dir: PathBuf,
    /// Seconds per create/get workload.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Pods in the large list workload.
    #[arg(long, default_value_t = 30_000)]
    large: usize,
}

async fn start(args: &Args) -> Result<Control> {
    let _ = std::fs::remove_dir_all(&args.data_dir);
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create {}", args.data_dir.display()))?;
    let log = args.data_dir.join("control.log");
    let (control, _) = start_control(
        &args.skiff_control,
        &args.data_dir,
        free_addr()?,
        &log,
        Duration::from_millis(100),
    )
    .await?;
    Ok(control)
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": "bench"}},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "command": ["sleep", "3600"]}]}
    }))
    .unwrap_or_default()
}

/// Latencies of one workload.
struct Row {
    name: String,
    ops: usize,
    secs: f64,
    lat: Vec<Duration>,
    slo_ms: f64,
}

impl Row {
    fn pct(&self, p: f64) -> f64 {
        let mut l = self.lat.clone();
        l.sort();
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }

    fn print(&self) {
        eprintln!(
            "  {:<40} {:>9.0} ops/s  p50 {:>8.2} ms  p99 {:>8.2} ms",
            self.name,
            self.ops as f64 / self.secs,
            self.pct(0.5),
            self.pct(0.99)
        );
    }
}

/// `clients` loops running `op(i)` for `secs` seconds.
async fn timed<F, Fut>(name: &str, clients: usize, secs: u64, slo_ms: f64, op: F) -> Result<Row>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                op(i).await?;
                lat.push(t0.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let row = Row {
        name: name.to_string(),
        ops: lat.len(),
        secs: started.elapsed().as_secs_f64(),
        lat,
        slo_ms,
    };
    row.print();
    Ok(row)
}

async fn make_namespace(client: &Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

/// Creates `n` pods in `ns` with 64 concurrent clients.
async fn fill(client: &Client, ns: &str, n: usize) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &pod(&format!("p{i:06}")))
                    .await
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Lists every pod of `ns` `times` times, in one request or in pages of `page`.
async fn lists(
    client: &Client,
    ns: &str,
    expect: usize,
    page: Option<u32>,
    times: usize,
    name: &str,
) -> Result<Row> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut lat = Vec::new();
    let started = Instant::now();
    for _ in 0..times {
        let t0 = Instant::now();
        let mut got = 0;
        let mut token: Option<String> = None;
        loop {
            let mut lp = ListParams::default();
            if let Some(p) = page {
                lp = lp.limit(p);
            }
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let l = api.list(&lp).await?;
            got += l.items.len();
            token = l.metadata.continue_.filter(|c| !c.is_empty());
            if token.is_none() {
                break;
            }
        }
        if got != expect {
            bail!("listed {got} pods, expected {expect}");
        }
        lat.push(t0.elapsed());
    }
    let row = Row {
        name: name.to_string(),
        ops: times,
        secs: started.elapsed().as_secs_f64(),
        lat,
        slo_ms: 5000.0,
    };
    row.print();
    Ok(row)
}

/// 100 watchers on a namespace; `events` creates; latency from each create's request to each
/// watcher's ADDED (the write's commit plus the delivery).
async fn fan_out(client: &Client, watchers: usize, events: usize) -> Result<Row> {
    make_namespace(client, "bench-watch").await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), "bench-watch");
    let rv = api
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let sent: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let mut w = api
            .watch(&WatchParams::default().timeout(120), &rv)
            .await?
            .boxed();
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while lat.len() < events {
                match w.try_next().await? {
                    Some(WatchEvent::Added(p)) => {
                        let seen = Instant::now();
                        let name = p.metadata.name.unwrap_or_default();
                        let at = sent.lock().ok().and_then(|m| m.get(&name).copied());
                        let Some(at) = at else {
                            bail!("event for a pod never sent: {name}")
                        };
                        lat.push(seen.saturating_duration_since(at));
                    }
                    Some(_) => {}
                    None => bail!("watch ended early"),
                }
            }
            anyhow::Ok(lat)
        }));
    }
    let started = Instant::now();
    for i in 0..events {
        let name = format!("w{i:05}");
        if let Ok(mut m) = sent.lock() {
            m.insert(name.clone(), Instant::now());
        }
        api.create(&PostParams::default(), &pod(&name)).await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let row = Row {
        name: format!("watch fan-out: {watchers} watchers × {events} creates (request → event)"),
        ops: lat.len(),
        secs: started.elapsed().as_secs_f64(),
        lat,
        slo_ms: 5000.0,
    };
    row.print();
    Ok(row)
}

/// `skiff-bench api`.
pub async fn run(args: Args) -> Result<()> {
    let server = start(&args).await?;
    let client = server.client.clone();
    let mut rows = Vec::new();
    make_namespace(&client, "bench").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bench");
    for clients in [1usize, 64] {
        let api = pods.clone();
        rows.push(
            timed(
                &format!("create pod, {clients} clients"),
                clients,
                args.seconds,
                1000.0,
                move |i| {
                    let api = api.clone();
                    async move {
                        api.create(&PostParams::default(), &pod(&format!("c{clients}-{i:07}")))
                            .await?;
                        Ok(())
                    }
                },
            )
            .await?,
        );
    }
    let names: Arc<Vec<String>> = Arc::new(
        pods.list(&ListParams::default().limit(1000))
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect(),
    );
    let api = pods.clone();
    rows.push(
        timed("get pod, 64 clients", 64, args.seconds, 1000.0, move |i| {
            let (api, names) = (api.clone(), names.clone());
            async move {
                api.get(&names[i as usize % names.len()]).await?;
                Ok(())
            }
        })
        .await?,
    );
    make_namespace(&client, "bench-1k").await?;
    fill(&client, "bench-1k", 1000).await?;
    rows.push(
        lists(
            &client,
            "bench-1k",
            1000,
            None,
            20,
            "list 1k pods (one request)",
        )
        .await?,
    );
    make_namespace(&client, "bench-large").await?;
    let t0 = Instant::now();
    fill(&client, "bench-large", args.large).await?;
    eprintln!(
        "  created {} pods in {:.1} s",
        args.large,
        t0.elapsed().as_secs_f64()
    );
    rows.push(
        lists(
            &client,
            "bench-large",
            args.large,
            None,
            3,
            &format!("list {}k pods (one request)", args.large / 1000),
        )
        .await?,
    );
    rows.push(
        lists(
            &client,
            "bench-large",
            args.large,
            Some(500),
            3,
            &format!("list {}k pods (pages of 500)", args.large / 1000),
        )
        .await?,
    );
    rows.push(fan_out(&client, 100, 200).await?);
    let rss = rss_mib(server.proc.pid());

    println!("| workload | ops/s | p50 ms | p99 ms | upstream SLO p99 ms |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.0} |",
            r.name,
            r.ops as f64 / r.secs,
            r.pct(0.5),
            r.pct(0.99),
            r.slo_ms
        );
    }
    if let Some(rss) = rss {
        println!("\nskiff-control resident memory after the run: {rss:.0} MiB");
    }
    let create64 = rows
        .iter()
        .find(|r| r.name == "create pod, 64 clients")
        .context("create row")?;
    println!("api create p99 ms (64 clients): {:.2}", create64.pct(0.99));
    Ok(())
}
