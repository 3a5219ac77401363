//! Service load balancing, the kube-proxy role: the agent follows Services and EndpointSlices
//! and keeps the node's service maps (`skiff_lb_*`) as [`desired`] computes them, writing only
//! what changed ([`programmer`]).
//!
//! Changes are batched the way kube-proxy's sync runner does, without its one-second minimum:
//! whatever events are ready when the agent wakes are applied in one pass.

pub mod desired;
pub mod health;
pub mod programmer;

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures::{FutureExt, StreamExt, stream::BoxStream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use skiff_datapath::{DatapathError, PinDir, lb::LbMaps};
use tokio::time::Instant;

use crate::metrics::LbMetrics;
use desired::NodeView;
use programmer::Programmer;

/// One kind's objects, kept from a watcher's events (re-lists replace the whole set).
struct Cache<K> {
    objects: HashMap<(String, String), K>,
    relisting: Option<HashMap<(String, String), K>>,
    ready: bool,
}

impl<K: Resource + Clone> Cache<K> {
    fn new() -> Self {
        Cache {
            objects: HashMap::new(),
            relisting: None,
            ready: false,
        }
    }

    fn key(o: &K) -> (String, String) {
        (o.namespace().unwrap_or_default(), o.name_any())
    }

    /// Applies one event; true when the visible set may have changed.
    fn apply(&mut self, ev: watcher::Event<K>) -> bool {
        match ev {
            watcher::Event::Apply(o) => {
                self.objects.insert(Self::key(&o), o);
                true
            }
            watcher::Event::Delete(o) => {
                self.objects.remove(&Self::key(&o));
                true
            }
            watcher::Event::Init => {
                self.relisting = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(o) => {
                if let Some(r) = self.relisting.as_mut() {
                    r.insert(Self::key(&o), o);
                }
                false
            }
            watcher::Event::InitDone => {
                if let Some(r) = self.relisting.take() {
                    self.objects = r;
                }
                self.ready = true;
                true
            }
        }
    }
}

fn stream<K>(client: &Client) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .boxed()
}

/// Keeps the service maps of the node whose pins are in `pins` in sync with the cluster until
/// the task is dropped.
pub async fn run(
    client: Client,
    node: NodeView,
    pins: PinDir,
    metrics: Arc<LbMetrics>,
) -> Result<()> {
    let mut maps = LbMaps::open(&pins).context("open the service maps")?;
    if let Some(addr) = node.addresses.first() {
        maps.set_config(skiff_ebpf_common::lb::LbConfig {
            node_addr: u32::from_ne_bytes(addr.octets()),
            pad: 0,
        })
        .context("write the node's address for NodePort")?;
    }
    let mut programmer = Programmer::adopt(
        &maps.services().context("read the service map")?,
        &maps.backends().context("read the backend map")?,
        &mut maps,
    );
    tracing::info!(
        frontends = programmer.frontends(),
        backends = programmer.backends(),
        "service maps adopted"
    );
    let mut services = Cache::<Service>::new();
    let mut slices = Cache::<EndpointSlice>::new();
    let mut svc_events = stream::<Service>(&client);
    let mut slice_events = stream::<EndpointSlice>(&client);
    // When each not-yet-programmed EndpointSlice change was seen.
    let mut pending: Vec<Instant> = Vec::new();
    let mut retry_at: Option<Instant> = None;
    let mut health = health::HealthServers::default();
    loop {
        let mut changed = false;
        tokio::select! {
            ev = svc_events.next() => changed |= take(ev, &mut services, None)?,
            ev = slice_events.next() => changed |= take(ev, &mut slices, Some(&mut pending))?,
            _ = sleep_until(retry_at) => { retry_at = None; changed = true; }
        }
        // Everything else already waiting joins this pass.
        while let Some(ev) = svc_events.next().now_or_never() {
            changed |= take(ev, &mut services, None)?;
        }
        while let Some(ev) = slice_events.next().now_or_never() {
            changed |= take(ev, &mut slices, Some(&mut pending))?;
        }
        if !changed || !services.ready || !slices.ready {
            continue;
        }
        let want = desired::desired(services.objects.values(), slices.objects.values(), &node);
        let report = programmer.apply(&want.frontends, &mut maps);
        health.sync(&want.health);
        let now = Instant::now();
        for seen in pending.drain(..) {
            metrics
                .programming_duration
                .observe((now - seen).as_secs_f64());
        }
        metrics.frontends.set(programmer.frontends() as i64);
        metrics.backends.set(programmer.backends() as i64);
        {
            let mut owners = metrics.owners.lock().unwrap_or_else(|p| p.into_inner());
            owners.clear();
            for (k, id) in programmer.service_ids() {
                if let Some(o) = want.owners.get(k) {
                    let proto = if k.proto == 17 { "UDP" } else { "TCP" };
                    let scope = if k.scope == skiff_ebpf_common::lb::SCOPE_INTERNAL {
                        " (internal)"
                    } else {
                        ""
                    };
                    owners.insert(
                        id,
                        (o.clone(), format!("{}:{}/{proto}{scope}", k.addr, k.port)),
                    );
                }
            }
        }
        if report.written + report.removed > 0 {
            tracing::debug!(
                written = report.written,
                removed = report.removed,
                "service maps updated"
            );
        }
        for (k, e) in &report.errors {
            let cause = if matches!(e, DatapathError::MapFull { .. }) {
                "map_full"
            } else {
                "error"
            };
            metrics
                .sync_errors
                .get_or_create(&vec![("cause".to_string(), cause.to_string())])
                .inc();
            tracing::error!(
                frontend = %format!("{}:{}/{}", k.addr, k.port, k.proto),
                error = %e,
                "service frontend not programmed; retrying"
            );
        }
        if !report.errors.is_empty() {
            retry_at = Some(Instant::now() + Duration::from_secs(1));
        }
    }
}

/// Applies one watcher item; the streams retry on their own, so errors are only logged.
fn take<K: Resource + Clone>(
    ev: Option<Result<watcher::Event<K>, watcher::Error>>,
    cache: &mut Cache<K>,
    pending: Option<&mut Vec<Instant>>,
) -> Result<bool> {
    match ev {
        None => anyhow::bail!("watch stream ended"),
        Some(Ok(ev)) => {
            let changed = cache.apply(ev);
            if changed && let Some(p) = pending {
                p.push(Instant::now());
            }
            Ok(changed)
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "service watch failed; retrying");
            Ok(false)
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
