//! The HTTPS listener: routes, bearer-token authentication, TLS (rustls) and the objects every
//! cluster starts with.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use axum::{
    Router,
    extract::{Path, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use skiff_apimachinery::cluster::{CLUSTER_DNS_IP, DNS_SERVICE_NAME, DNS_SERVICE_NAMESPACE};
use skiff_store::StoreNode;
use tokio::net::TcpListener;

use crate::{
    alloc::KUBERNETES_SERVICE_IP,
    api::{self, Api},
    discovery,
    error::ApiError,
    openapi,
    pki::Pki,
    resources,
    storage::Objects,
};

/// How to run the API server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to listen on (HTTPS).
    pub listen: SocketAddr,
    /// Where certificates, tokens and the admin kubeconfig live.
    pub data_dir: PathBuf,
    /// Extra names and IPs for the serving certificate.
    pub extra_names: Vec<String>,
    /// The server URL written into the admin kubeconfig; `None` uses the bound address.
    pub advertise_url: Option<String>,
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    kubeconfig: PathBuf,
    node_kubeconfig: PathBuf,
    admin_token: String,
    ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct AppState {
    api: Arc<Api>,
    pki: Pki,
    address: String,
}

impl ApiServer {
    /// Loads or creates credentials, writes the admin kubeconfig, creates the initial objects
    /// and starts serving.
    pub async fn start(cfg: ServerConfig, node: StoreNode) -> Result<ApiServer> {
        let pki = Pki::load_or_create(&cfg.data_dir, &cfg.extra_names)?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("bind the API listener on {}", cfg.listen))?;
        let addr = listener.local_addr().context("API listener address")?;
        // A wildcard bind is reached through loopback from this machine.
        let local = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        let url = cfg
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("https://{local}"));
        let kubeconfig = pki.write_kubeconfig(&cfg.data_dir.join("admin.kubeconfig"), &url)?;
        let node_kubeconfig =
            pki.write_node_kubeconfig(&cfg.data_dir.join("node.kubeconfig"), &url)?;
        let api = Arc::new(Api {
            objects: Objects::new(node),
            node_token: pki.bootstrap_token.clone(),
        });
        // Where pods reach this API server through the `kubernetes` Service: the advertised
        // URL's address, else the bound one (a loopback or wildcard address is no use to pods).
        let advertise = cfg
            .advertise_url
            .as_deref()
            .and_then(url_ipv4)
            .or(match addr.ip() {
                std::net::IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => {
                    Some((ip, addr.port()))
                }
                _ => None,
            });
        bootstrap(&api, addr.port(), advertise)
            .await
            .context("create the initial objects")?;
        let (admin_token, ca_pem) = (pki.admin_token.clone(), pki.ca_pem.clone());
        let tls = tokio_rustls::TlsAcceptor::from(pki.tls.clone());
        let state = Arc::new(AppState {
            api,
            pki,
            address: addr.to_string(),
        });
        let app = router(state);
        // Connections are tasks of the loop's own set: aborting it ends them too (and their
        // watches release the store).
        let task = tokio::spawn(skiff_store::tls::serve(listener, tls, app, "api"));
        Ok(ApiServer {
            addr,
            kubeconfig,
            node_kubeconfig,
            admin_token,
            ca_pem,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Path of the admin kubeconfig.
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    /// Path of the node kubeconfig (bootstrap token) for `skiff-node --kubeconfig`.
    pub fn node_kubeconfig(&self) -> &std::path::Path {
        &self.node_kubeconfig
    }

    /// The admin bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}

/// The routes: discovery, OpenAPI, health, version, then every resource path.
fn router(state: Arc<AppState>) -> Router {
    let api = state.api.clone();
    let meta = Router::new()
        .route("/version", get(|| async { json_ok(&discovery::version()) }))
        .route("/api", get(core_versions))
        .route("/apis", get(api_groups))
        .route("/apis/{group}", get(api_group))
        .route("/api/{version}", get(core_resources))
        .route("/apis/{group}/{version}", get(group_resources))
        .route("/openapi/v2", get(openapi_v2))
        .route("/openapi/v3", get(openapi_v3_root))
        .route("/openapi/v3/{*path}", get(openapi_v3))
        .with_state(state.clone());
    Router::new()
        .merge(meta)
        .fallback(api::serve)
        .with_state(api)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz).with_state(state))
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    match s.api.objects.node().read_barrier().await {
        Ok(()) => "ok".into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")).into_response(),
    }
}

/// Rejects requests without a known bearer token (401 Status).
async fn authenticate(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match token.and_then(|t| s.pki.authenticate(t)) {
        Some(user) => {
            tracing::trace!(user = %user.name, path = %req.uri().path(), "authenticated");
            next.run(req).await
        }
        None => ApiError::unauthorized().into_response(),
    }
}

fn json_ok(v: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

/// Whether the client asked for aggregated discovery (`apidiscovery.k8s.io/v2`).
fn wants_aggregated(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            a.split(',').any(|p| {
                p.contains("as=APIGroupDiscoveryList")
                    && p.contains("g=apidiscovery.k8s.io")
                    && p.contains("v=v2")
                    && !p.contains("v=v2beta1")
            })
        })
}

fn aggregated(core: bool) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
        )],
        serde_json::to_vec(&discovery::aggregated(core)).unwrap_or_default(),
    )
        .into_response()
}

async fn core_versions(State(s): State<Arc<AppState>>, h: HeaderMap) -> Response {
    if wants_aggregated(&h) {
        return aggregated(true);
    }
    json_ok(&discovery::core_versions(&s.address))
}

async fn api_groups(h: HeaderMap) -> Response {
    if wants_aggregated(&h) {
        return aggregated(false);
    }
    json_ok(&discovery::group_list())
}

async fn api_group(Path(group): Path<String>) -> Response {
    match discovery::group(&group) {
        Some(g) => json_ok(&g),
        None => ApiError::no_route().into_response(),
    }
}

async fn core_resources(Path(version): Path<String>) -> Response {
    match discovery::resource_list("", &version) {
        Some(l) => json_ok(&l),
        None => ApiError::no_route().into_response(),
    }
}

async fn group_resources(Path((group, version)): Path<(String, String)>) -> Response {
    match discovery::resource_list(&group, &version) {
        Some(l) => json_ok(&l),
        None => ApiError::no_route().into_response(),
    }
}

async fn openapi_v2(h: HeaderMap) -> Response {
    let accept = h
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !accept.is_empty() && !accept.contains("application/json") && !accept.contains("*/*") {
        // kubectl asks for the protobuf form, and uses OpenAPI v3 when that is absent.
        return ApiError::not_acceptable("only application/json is served for /openapi/v2")
            .into_response();
    }
    json_ok(&openapi::v2_document())
}

/// Documents per group version with their content hashes, built once.
fn v3_docs() -> &'static HashMap<String, (String, Vec<u8>)> {
    static DOCS: std::sync::OnceLock<HashMap<String, (String, Vec<u8>)>> =
        std::sync::OnceLock::new();
    DOCS.get_or_init(|| {
        openapi::v3_group_versions()
            .into_iter()
            .filter_map(|gv| {
                let doc = openapi::v3_document(&gv)?;
                let bytes = serde_json::to_vec(&doc).ok()?;
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in &bytes {
                    h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
                }
                Some((gv, (format!("{h:016X}"), bytes)))
            })
            .collect()
    })
}

async fn openapi_v3_root() -> Response {
    let paths: serde_json::Map<String, Value> = v3_docs()
        .iter()
        .map(|(gv, (hash, _))| {
            (
                gv.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={hash}")}),
            )
        })
        .collect();
    json_ok(&json!({"paths": paths}))
}

async fn openapi_v3(Path(path): Path<String>) -> Response {
    match v3_docs().get(path.trim_matches('/')) {
        Some((hash, bytes)) => (
            [
                (header::CONTENT_TYPE, "application/json".to_string()),
                (header::ETAG, format!("\"{hash}\"")),
            ],
            bytes.clone(),
        )
            .into_response(),
        None => ApiError::no_route().into_response(),
    }
}

/// The IPv4 address and port of an `https://a.b.c.d[:port]` URL.
fn url_ipv4(url: &str) -> Option<(std::net::Ipv4Addr, u16)> {
    let uri: axum::http::Uri = url.parse().ok()?;
    let ip = uri.host()?.parse().ok()?;
    Some((ip, uri.port_u16().unwrap_or(443)))
}

/// Creates the namespaces, the built-in priority classes, the `kubernetes` Service every
/// cluster has and the `kube-system/kube-dns` Service, if missing, and points the
/// `kubernetes` EndpointSlice at this server (`advertise`), as kube-apiserver's endpoint
/// reconciler does.
async fn bootstrap(
    api: &Api,
    port: u16,
    advertise: Option<(std::net::Ipv4Addr, u16)>,
) -> Result<()> {
    let ns = resources::find("", "v1", "namespaces").unwrap_or_else(|| unreachable!());
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        match api::create_internal(api, ns, None, obj).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(anyhow::anyhow!("namespace {name}: {e}")),
        }
    }
    // The built-in priority classes.
    let pc = resources::find("scheduling.k8s.io", "v1", "priorityclasses")
        .unwrap_or_else(|| unreachable!());
    for (name, value, what) in [
        ("system-node-critical", 2_000_001_000, "node"),
        ("system-cluster-critical", 2_000_000_000, "cluster"),
    ] {
        let obj = json!({
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": name}, "value": value,
            "description": format!("Used for system critical pods that must not be moved from their current {what}."),
        });
        match api::create_internal(api, pc, None, obj).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(anyhow::anyhow!("priority class {name}: {e}")),
        }
    }
    let svc = resources::find("", "v1", "services").unwrap_or_else(|| unreachable!());
    let obj = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default",
            "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"clusterIP": KUBERNETES_SERVICE_IP.to_string(),
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]},
    });
    match api::create_internal(api, svc, Some("default"), obj).await {
        Ok(_) => {}
        Err(e) if e.code == 409 => {}
        Err(e) => return Err(anyhow::anyhow!("service default/kubernetes: {e}")),
    }
    // Cluster DNS: every agent serves it and publishes its own address as an endpoint
    // (`kube-dns-<node>`); internalTrafficPolicy Local keeps each pod's queries on its node.
    let obj = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": DNS_SERVICE_NAME, "namespace": DNS_SERVICE_NAMESPACE,
            "labels": {"k8s-app": DNS_SERVICE_NAME, "kubernetes.io/cluster-service": "true",
                "kubernetes.io/name": "skiff-dns"}},
        "spec": {"clusterIP": CLUSTER_DNS_IP.to_string(), "internalTrafficPolicy": "Local",
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
            ]},
    });
    match api::create_internal(api, svc, Some("kube-system"), obj).await {
        Ok(_) => {}
        Err(e) if e.code == 409 => {}
        Err(e) => return Err(anyhow::anyhow!("service kube-system/kube-dns: {e}")),
    }
    let Some((ip, port)) = advertise else {
        tracing::info!("no address pods can reach: the kubernetes Service has no endpoints");
        return Ok(());
    };
    let slices = resources::find("discovery.k8s.io", "v1", "endpointslices")
        .unwrap_or_else(|| unreachable!());
    let obj = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    });
    api::put_internal(api, slices, Some("default"), obj)
        .await
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("endpointslice default/kubernetes: {e}"))
}
