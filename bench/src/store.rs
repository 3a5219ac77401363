//! The store benchmark (see the crate docs).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use skiff_store::{RangeRequest, Txn, client::StoreClient};

/// Options of `skiff-bench store`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `skiff-control` binary to benchmark.
    #[arg(long)]
    skiff_control: PathBuf,
    /// `etcd` binary to compare with.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Directory for the members' data (must be on a real disk: fsync is what is measured).
    #[arg(long)]
    data_dir: PathBuf,
    /// Seconds per workload.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Cluster sizes to run, for both systems (the closing ratio needs 3).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 3])]
    members: Vec<usize>,
    /// Rounds of the ratio's workload (3 members, 64 writing clients), skiff and etcd in turn
    /// on fresh clusters; the first is the table's run. The ratio is the median round's.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const VALUE_BYTES: usize = 256;

/// One system under test, with its clients.
#[derive(Clone)]
enum Target {
    Skiff(Vec<StoreClient>),
    Etcd(Vec<etcd_client::Client>),
}

impl Target {
    async fn put(&mut self, i: usize, key: String, value: Vec<u8>) -> Result<()> {
        match self {
            Target::Skiff(c) => {
                let n = c.len();
                c[i % n].txn(&Txn::put(key, value)).await?;
            }
            Target::Etcd(c) => {
                let n = c.len();
                c[i % n].put(key, value, None).await?;
            }
        }
        Ok(())
    }

    async fn get(&mut self, i: usize, key: String) -> Result<()> {
        match self {
            Target::Skiff(c) => {
                let n = c.len();
                let r = c[i % n].range(RangeRequest::key(key)).await?;
                if r.kvs.is_empty() {
                    bail!("key missing");
                }
            }
            Target::Etcd(c) => {
                let n = c.len();
                // etcd's default range is linearizable.
                let r = c[i % n].get(key, None).await?;
                if r.kvs().is_empty() {
                    bail!("key missing");
                }
            }
        }
        Ok(())
    }
}

/// Processes started for one system; killed (by PID) on drop.
struct Cluster {
    children: Vec<Child>,
}

/// CPU seconds (user + system) process `pid` (or `self`) has used so far.
fn cpu_seconds(pid: &str) -> Result<f64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces): state is field 3, utime and
    // stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("{path}: no CPU time in field {}", i + 3))
    };
    Ok((ticks(11)? + ticks(12)?) / tick)
}

impl Cluster {
    /// CPU seconds the members have used so far.
    fn cpu_seconds(&self) -> Result<f64> {
        self.children
            .iter()
            .map(|c| cpu_seconds(&c.id().to_string()))
            .sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_addrs(n: usize) -> Result<Vec<SocketAddr>> {
    let ls = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(ls
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<_>>()?)
}

fn fresh_dir(d: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(d);
    std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))
}

async fn start_skiff(args: &Args, members: usize) -> Result<(Cluster, Vec<StoreClient>)> {
    let addrs = free_addrs(members * 2)?;
    let peers = (0..members)
        .map(|i| format!("{}={}", i + 1, addrs[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut children = Vec::new();
    let mut clients = Vec::new();
    for i in 0..members {
        let dir = args.data_dir.join(format!("skiff-{members}-{}", i + 1));
        fresh_dir(&dir)?;
        let mut cmd = Command::new(&args.skiff_control);
        cmd.arg("--data-dir")
            .arg(&dir)
            .args(["--node-id", &(i + 1).to_string()])
            .args(["--peer-listen", &addrs[i].to_string()])
            .args(["--client-listen", &addrs[members + i].to_string()])
            .arg("--store-only")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if members > 1 {
            cmd.args(["--peers", &peers]);
        }
        children.push(cmd.spawn().context("starting skiff-control")?);
        clients.push(StoreClient::new(addrs[members + i]));
    }
    let cluster = Cluster { children };
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in &clients {
        while !c.status().await.is_ok_and(|s| s.leader.is_some()) {
            if Instant::now() > deadline {
                bail!("skiff members did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok((cluster, clients))
}

async fn start_etcd(args: &Args, members: usize) -> Result<(Cluster, Vec<etcd_client::Client>)> {
    let addrs = free_addrs(members * 2)?;
    let initial = (0..members)
        .map(|i| format!("e{}=http://{}", i + 1, addrs[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut children = Vec::new();
    for i in 0..members {
        let dir = args.data_dir.join(format!("etcd-{members}-{}", i + 1));
        fresh_dir(&dir)?;
        let child = Command::new(&args.etcd)
            .args(["--name", &format!("e{}", i + 1)])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen-peer-urls", &format!("http://{}", addrs[i])])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}", addrs[i]),
            ])
            .args([
                "--listen-client-urls",
                &format!("http://{}", addrs[members + i]),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://{}", addrs[members + i]),
            ])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (cargo xtask setup installs etcd-server)",
                    args.etcd.display()
                )
            })?;
        children.push(child);
    }
    let cluster = Cluster { children };
    let mut clients = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..members {
        let url = format!("http://{}", addrs[members + i]);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([url.clone()], None).await
                && c.put("bench-ready", "1", None).await.is_ok()
            {
                clients.push(c);
                break;
            }
            if Instant::now() > deadline {
                bail!("etcd did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok((cluster, clients))
}

/// The two systems compared.
#[derive(Clone, Copy)]
enum System {
    Skiff,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Skiff => "skiff",
            System::Etcd => "etcd",
        }
    }
}

/// Starts `members` members of `system` on fresh data and connects a client to each.
async fn start(args: &Args, system: System, members: usize) -> Result<(Cluster, Target)> {
    Ok(match system {
        System::Skiff => {
            let (cluster, clients) = start_skiff(args, members).await?;
            (cluster, Target::Skiff(clients))
        }
        System::Etcd => {
            let (cluster, clients) = start_etcd(args, members).await?;
            (cluster, Target::Etcd(clients))
        }
    })
}

/// Result of one workload.
struct Row {
    ops_per_sec: f64,
    /// The members' CPU time per operation (all members together), in microseconds.
    cpu_us_per_op: f64,
    /// The load generator's CPU time per operation, in microseconds.
    load_us_per_op: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Write,
    Read,
}

/// Runs `clients` concurrent loops for `secs` seconds and collects latencies.
async fn drive(
    cluster: &Cluster,
    target: &Target,
    workload: Workload,
    clients: usize,
    secs: u64,
) -> Result<Row> {
    let (members_cpu, own_cpu) = (cluster.cpu_seconds()?, cpu_seconds("self")?);
    let next = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut t = target.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let value = vec![b'v'; VALUE_BYTES];
            while Instant::now() < end {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                match workload {
                    Workload::Write => t.put(c, format!("/bench/{n:012}"), value.clone()).await?,
                    Workload::Read => t.get(c, format!("/bench/read/{:04}", n % 1000)).await?,
                }
                lat.push(t0.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let ops = all.len().max(1) as f64;
    Ok(Row {
        ops_per_sec: all.len() as f64 / elapsed,
        cpu_us_per_op: (cluster.cpu_seconds()? - members_cpu) * 1e6 / ops,
        load_us_per_op: (cpu_seconds("self")? - own_cpu) * 1e6 / ops,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}

/// Runs the workloads against one started system.
async fn workloads(
    name: &str,
    cluster: &Cluster,
    target: &Target,
    secs: u64,
) -> Result<Vec<(String, Row)>> {
    let mut out = Vec::new();
    let mut seed = target.clone();
    for i in 0..1000 {
        seed.put(i, format!("/bench/read/{i:04}"), vec![b'r'; VALUE_BYTES])
            .await
            .context("seeding keys for the read workload")?;
    }
    for (label, workload, clients) in [
        ("write, 1 client", Workload::Write, 1),
        ("write, 64 clients", Workload::Write, 64),
        ("linearizable read, 64 clients", Workload::Read, 64),
    ] {
        let row = drive(cluster, target, workload, clients, secs).await?;
        eprintln!(
            "  {name:<16} {label:<30} {:>10.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  \
             members' cpu {:>5.0} µs/op  load generator's {:>4.0} µs/op",
            row.ops_per_sec, row.p50_ms, row.p99_ms, row.cpu_us_per_op, row.load_us_per_op
        );
        out.push((format!("{name} | {label}"), row));
    }
    Ok(out)
}

/// `skiff-bench store`.
pub async fn run(args: Args) -> Result<()> {
    let mut rows: Vec<(String, Row)> = Vec::new();
    for system in [System::Skiff, System::Etcd] {
        for &members in &args.members {
            eprintln!("{} with {members} member(s)", system.name());
            let (cluster, target) = start(&args, system, members).await?;
            let name = format!("{} ×{members}", system.name());
            rows.extend(workloads(&name, &cluster, &target, args.seconds).await?);
        }
    }
    println!("| system | workload | ops/s | p50 ms | p99 ms | members' CPU µs/op |");
    println!("|---|---|---:|---:|---:|---:|");
    for (name, r) in &rows {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.0} |",
            r.ops_per_sec, r.p50_ms, r.p99_ms, r.cpu_us_per_op
        );
    }
    let find = |name: &str| {
        rows.iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.ops_per_sec)
    };
    if !args.members.contains(&3) {
        return Ok(());
    }
    let first = (
        find("skiff ×3 | write, 64 clients").context("skiff row")?,
        find("etcd ×3 | write, 64 clients").context("etcd row")?,
    );
    // This machine's speed drifts by several percent within minutes (other tenants), so the
    // ratio comes from rounds that alternate the two systems, each on fresh members.
    let mut rounds = vec![first];
    for round in 2..=args.rounds {
        eprintln!("round {round}: skiff ×3 then etcd ×3, 64 writing clients");
        let mut writes = [0.0; 2];
        for (w, system) in writes.iter_mut().zip([System::Skiff, System::Etcd]) {
            let (cluster, target) = start(&args, system, 3).await?;
            *w = drive(&cluster, &target, Workload::Write, 64, args.seconds)
                .await?
                .ops_per_sec;
        }
        rounds.push((writes[0], writes[1]));
    }
    println!();
    println!("| round | skiff ×3 writes/s | etcd ×3 writes/s | ratio |");
    println!("|---:|---:|---:|---:|");
    for (i, (skiff, etcd)) in rounds.iter().enumerate() {
        println!(
            "| {} | {skiff:.0} | {etcd:.0} | {:.2} |",
            i + 1,
            skiff / etcd
        );
    }
    let mut ratios: Vec<f64> = rounds.iter().map(|(s, e)| s / e).collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "store/etcd write ratio (64 clients, 3 nodes): {:.2}",
        ratios[ratios.len() / 2]
    );
    Ok(())
}
