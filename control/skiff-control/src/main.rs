//! `skiff-control`: the control plane.
//!
//! It runs the replicated store (etcd's role) — with no flags an embedded single-member store in
//! `--data-dir`, with `--peers` one member of a 3- or 5-member cluster — and the Kubernetes API
//! server over it (HTTPS on `--api-listen`, bearer tokens, an admin kubeconfig written to
//! `<data-dir>/admin.kubeconfig`), and the scheduler and controllers, on the replica that holds
//! the `kube-system/skiff-controller-manager` Lease.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use skiff_apiserver::{ApiServer, ServerConfig};
use skiff_store::{NodeConfig, StoreNode};

/// jemalloc instead of the C library's allocator: the store allocates and frees small buffers
/// on every request (HTTP bodies, log entries, redb pages); glibc's malloc was about a tenth of
/// the members' CPU under write load (measured in docs/benchmarks.md, chosen in
/// docs/dependencies.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(name = "skiff-control", version, about, long_about = None)]
struct Cli {
    /// Where the store keeps its files (state.redb, raft-log.redb).
    #[arg(long, env = "SKIFF_DATA_DIR", default_value = "/var/lib/skiff/control")]
    data_dir: PathBuf,

    /// This member's id in the store cluster (unique, never reused).
    #[arg(long, default_value_t = 1)]
    node_id: u64,

    /// Address the store's peer listener binds (Raft traffic between members).
    #[arg(long, default_value = "127.0.0.1:2380")]
    peer_listen: SocketAddr,

    /// Address the store's client listener binds (etcd's client port; loopback, no auth:
    /// for tools, tests and benchmarks on this machine).
    #[arg(long, default_value = "127.0.0.1:2379")]
    client_listen: SocketAddr,

    /// Address other members use to reach this one (default: the bound peer address).
    #[arg(long)]
    advertise_peer: Option<String>,

    /// Initial members of a new cluster, `ID=HOST:PORT,…`, the same list on every member.
    /// Empty: a single-member store.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,

    /// Start as a new member of an existing cluster: do not create one; wait to be added
    /// (see docs/store.md).
    #[arg(long)]
    join: bool,

    /// Seconds of history the store keeps before compacting (reads and watches from older
    /// revisions get 410 Gone).
    #[arg(long, default_value_t = 300)]
    history_seconds: u64,

    /// Seconds a SecurityIdentity no pod carries stays before the identity GC deletes it.
    #[arg(long, default_value_t = 300)]
    identity_gc_seconds: u64,

    /// This member's certificate (PEM chain) for mutual TLS with the other members (with
    /// --peer-key-file and --peer-trusted-ca-file; `skiff-control peer-certs` makes them).
    /// Without them, peer traffic is plain HTTP: keep it on loopback or a network only members
    /// reach.
    #[arg(long, requires_all = ["peer_key_file", "peer_trusted_ca_file"])]
    peer_cert_file: Option<PathBuf>,

    /// This member's private key (PEM).
    #[arg(long, requires_all = ["peer_cert_file", "peer_trusted_ca_file"])]
    peer_key_file: Option<PathBuf>,

    /// The members' CA (PEM): only members presenting a certificate it signed are accepted,
    /// and only those are trusted.
    #[arg(long, requires_all = ["peer_cert_file", "peer_key_file"])]
    peer_trusted_ca_file: Option<PathBuf>,

    /// Run only the store member (no API server, no controllers): a dedicated store member,
    /// as an external etcd would be.
    #[arg(long)]
    store_only: bool,

    /// Address the Kubernetes API server (HTTPS) binds.
    #[arg(long, default_value = "127.0.0.1:6443")]
    api_listen: SocketAddr,

    /// Extra DNS names or IPs for the API server's certificate (repeatable).
    #[arg(long = "tls-san")]
    tls_sans: Vec<String>,

    /// Server URL written into the admin kubeconfig (default: https://<api-listen>).
    #[arg(long)]
    api_advertise_url: Option<String>,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Make the members' CA (once) and a peer certificate for each member, for
    /// --peer-cert-file/--peer-key-file/--peer-trusted-ca-file.
    PeerCerts {
        /// Where the files go (`peer-ca.{crt,key}`, `member-<id>.{crt,key}`).
        #[arg(long)]
        out: PathBuf,
        /// `ID=HOST`: a member and the host of its peer address (repeatable).
        #[arg(long = "member", value_name = "ID=HOST", required = true)]
        members: Vec<String>,
    },
    /// Inspect or change the store's members through a running member's client listener.
    Member {
        /// Client listener of any running member.
        #[arg(long, default_value = "127.0.0.1:2379")]
        endpoint: SocketAddr,
        #[command(subcommand)]
        action: MemberAction,
    },
}

#[derive(Debug, clap::Subcommand)]
enum MemberAction {
    /// List members.
    List,
    /// Add a started `--join` member as a learner; returns once it has caught up.
    AddLearner {
        /// Its member id (never reuse one).
        #[arg(long)]
        id: u64,
        /// Its peer address.
        #[arg(long)]
        peer: String,
    },
    /// Make learners voters.
    Promote {
        /// Learner ids.
        #[arg(long = "id", required = true)]
        ids: Vec<u64>,
    },
    /// Remove members.
    Remove {
        /// Member ids.
        #[arg(long = "id", required = true)]
        ids: Vec<u64>,
    },
}

async fn member_command(endpoint: SocketAddr, action: MemberAction) -> Result<()> {
    use skiff_store::{MemberChange, client::StoreClient};
    let client = StoreClient::new(endpoint);
    let members = match action {
        MemberAction::List => client.members().await?,
        MemberAction::AddLearner { id, peer } => {
            client
                .change_members(&MemberChange::AddLearner { id, addr: peer })
                .await?
        }
        MemberAction::Promote { ids } => {
            client
                .change_members(&MemberChange::Promote { ids })
                .await?
        }
        MemberAction::Remove { ids } => {
            client.change_members(&MemberChange::Remove { ids }).await?
        }
    };
    println!("{:<6} {:<8} PEER", "ID", "ROLE");
    for m in members {
        let role = if m.voter { "voter" } else { "learner" };
        println!("{:<6} {:<8} {}", m.id, role, m.addr);
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_peers(peers: &[String]) -> Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for p in peers.iter().filter(|p| !p.is_empty()) {
        let (id, addr) = p
            .split_once('=')
            .with_context(|| format!("--peers entry {p:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .parse()
            .with_context(|| format!("--peers entry {p:?}: {id:?} is not a member id"))?;
        if out.insert(id, addr.to_string()).is_some() {
            bail!("--peers names member {id} twice");
        }
    }
    Ok(out)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(Cmd::PeerCerts { out, members }) = &cli.command {
        let mut parsed = Vec::new();
        for m in members {
            let (id, host) = m
                .split_once('=')
                .with_context(|| format!("--member {m:?} is not ID=HOST"))?;
            let id: u64 = id
                .parse()
                .with_context(|| format!("--member {m:?}: {id:?} is not a member id"))?;
            parsed.push((id, host.to_string()));
        }
        for f in skiff_apiserver::pki::peer_certs(out, &parsed)? {
            println!("{}", f.display());
        }
        return Ok(());
    }
    if let Some(Cmd::Member { endpoint, action }) = cli.command {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(member_command(endpoint, action));
    }
    let members = parse_peers(&cli.peers)?;
    if !members.is_empty() && !members.contains_key(&cli.node_id) && !cli.join {
        bail!(
            "--node-id {} is not in --peers; list it there, or pass --join to be added later",
            cli.node_id
        );
    }
    let cfg = NodeConfig {
        id: cli.node_id,
        data_dir: cli.data_dir.clone(),
        peer_listen: cli.peer_listen,
        advertise: cli.advertise_peer.clone(),
        members,
        join: cli.join,
        history: Duration::from_secs(cli.history_seconds),
        compact_every: Duration::from_secs(cli.history_seconds.clamp(1, 30)),
        snapshot_every: 20_000,
        peer_tls: match (
            &cli.peer_cert_file,
            &cli.peer_key_file,
            &cli.peer_trusted_ca_file,
        ) {
            (Some(cert), Some(key), Some(ca)) => Some(
                skiff_store::tls::PeerTls::load(cert, key, ca)
                    .context("loading the peer TLS files")?,
            ),
            _ => None,
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            "skiff-control starting"
        );
        let store = StoreNode::start(cfg)
            .await
            .with_context(|| format!("starting the store in {}", cli.data_dir.display()))?;
        let client = tokio::net::TcpListener::bind(cli.client_listen)
            .await
            .with_context(|| format!("binding the store client listener {}", cli.client_listen))?;
        let client_addr = client.local_addr()?;
        let served = store.clone();
        let client_task = tokio::spawn(async move {
            if let Err(e) = skiff_store::client::serve(client, served).await {
                tracing::error!(error = %e, "store client listener stopped");
            }
        });
        tracing::info!(
            member = store.id(),
            peer = %store.peer_addr(),
            client = %client_addr,
            "store ready"
        );
        let (api, controllers) = if cli.store_only {
            tracing::info!("store-only member: no API server or controllers");
            (None, None)
        } else {
            let api = ApiServer::start(
                ServerConfig {
                    listen: cli.api_listen,
                    data_dir: cli.data_dir.clone(),
                    extra_names: cli.tls_sans.clone(),
                    advertise_url: cli.api_advertise_url.clone(),
                },
                store.clone(),
            )
            .await
            .context("starting the API server")?;
            tracing::info!(listen = %api.addr(), kubeconfig = %api.kubeconfig().display(), "API server ready");
            let kubeconfig = api.kubeconfig().to_path_buf();
            let identity = format!(
                "{}_{}_{}",
                nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "skiff-control".into()),
                api.addr(),
                std::process::id()
            );
            let identity_gc_seconds = cli.identity_gc_seconds;
            let controllers = tokio::spawn(async move {
                // Controllers are clients of the API like any other. With several replicas, the
                // one holding the Lease runs them (see skiff_controllers::leader); a failure is
                // logged and the set restarted (they are level-triggered, so nothing is lost).
                let mut attempt = 0;
                let client = loop {
                    match skiff_controllers::client_from_kubeconfig(&kubeconfig).await {
                        Ok(c) => break c,
                        Err(e) => tracing::error!(error = format!("{e:#}"), "controller client"),
                    }
                    attempt += 1;
                    tokio::time::sleep(skiff_controllers::backoff(attempt)).await;
                };
                let options = skiff_controllers::Options {
                    identity_gc_grace: Duration::from_secs(identity_gc_seconds),
                };
                skiff_controllers::leader::run(client.clone(), identity, move || {
                    skiff_controllers::run(client.clone(), options.clone())
                })
                .await;
            });
            println!(
                "skiff-control: API server on https://{}\nadmin kubeconfig: {}\n  export KUBECONFIG={}\n  kubectl get namespaces",
                api.addr(),
                api.kubeconfig().display(),
                api.kubeconfig().display()
            );
            (Some(api), Some(controllers))
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
        // Close client connections (and their watches) first: they hold store handles.
        if let Some(c) = controllers {
            c.abort();
            let _ = c.await;
        }
        drop(api);
        client_task.abort();
        let _ = client_task.await;
        store.shutdown().await;
        anyhow::Ok(())
    })
}
