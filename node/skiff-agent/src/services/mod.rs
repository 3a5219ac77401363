//! Service load balancing, the kube-proxy role: the agent follows Services and EndpointSlices
//! and keeps the node's service maps (`skiff_lb_*`) as [`desired`] computes them. Work is
//! proportional to the change, not to the cluster: [`tracker`] recomputes only the Services an
//! event touched, and [`programmer`] writes only the map entries that differ.
//!
//! Changes are batched the way kube-proxy's sync runner does, without its one-second minimum:
//! whatever events are ready when the agent wakes are applied in one pass.

pub mod desired;
pub mod health;
pub mod programmer;
pub mod tracker;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures::{FutureExt, StreamExt, stream::BoxStream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
};
use skiff_datapath::{
    DatapathError, PinDir,
    lb::{LbMaps, LbTable},
};
use tokio::time::Instant;

use crate::metrics::LbMetrics;
use desired::{FrontendKey, FrontendSpec, NodeView};
use programmer::Programmer;
use tracker::Tracker;

/// A kind the [`Tracker`] follows.
trait Tracked: Sized {
    fn set(self, t: &mut Tracker);
    fn remove(&self, t: &mut Tracker);
    fn replace(all: Vec<Self>, t: &mut Tracker);
}

impl Tracked for Service {
    fn set(self, t: &mut Tracker) {
        t.set_service(self);
    }
    fn remove(&self, t: &mut Tracker) {
        t.remove_service(self);
    }
    fn replace(all: Vec<Self>, t: &mut Tracker) {
        t.replace_services(all);
    }
}

impl Tracked for EndpointSlice {
    fn set(self, t: &mut Tracker) {
        t.set_slice(self);
    }
    fn remove(&self, t: &mut Tracker) {
        t.remove_slice(self);
    }
    fn replace(all: Vec<Self>, t: &mut Tracker) {
        t.replace_slices(all);
    }
}

/// One kind's watcher events fed into the tracker (a re-list replaces the whole set once it
/// is complete).
struct Feed<K> {
    relisting: Option<Vec<K>>,
    ready: bool,
}

impl<K: Tracked> Feed<K> {
    fn new() -> Self {
        Feed {
            relisting: None,
            ready: false,
        }
    }

    /// Applies one event; true when the visible set may have changed.
    fn apply(&mut self, ev: watcher::Event<K>, t: &mut Tracker) -> bool {
        match ev {
            watcher::Event::Apply(o) => {
                o.set(t);
                true
            }
            watcher::Event::Delete(o) => {
                o.remove(t);
                true
            }
            watcher::Event::Init => {
                self.relisting = Some(Vec::new());
                false
            }
            watcher::Event::InitApply(o) => {
                if let Some(r) = self.relisting.as_mut() {
                    r.push(o);
                }
                false
            }
            watcher::Event::InitDone => {
                if let Some(r) = self.relisting.take() {
                    K::replace(r, t);
                }
                self.ready = true;
                true
            }
        }
    }
}

/// Every event of kind `K`, cluster-wide, with the watcher's default backoff.
pub(crate) fn stream<K>(
    client: &Client,
) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
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

/// Keeps the service maps of the node whose pins are in `pins` — and the cluster DNS records in
/// `zone`, when the node serves them — in sync with the cluster until the task is dropped.
pub async fn run(
    client: Client,
    node: NodeView,
    pins: PinDir,
    metrics: Arc<LbMetrics>,
    zone: Option<Arc<crate::dns::Zone>>,
) -> Result<()> {
    let mut maps = LbMaps::open(&pins).context("open the service maps")?;
    if let Some(addr) = node.addresses.first() {
        let flags = if node.xdp_fast_path {
            skiff_ebpf_common::lb::CFG_XDP_FAST_PATH
        } else {
            0
        };
        maps.set_config(skiff_ebpf_common::lb::LbConfig {
            node_addr: u32::from_ne_bytes(addr.octets()),
            flags,
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
    // A zone no longer followed must not answer from stale records as if current.
    let _unsync = Unsync(zone.clone());
    let mut tracker = Tracker::new(node);
    let mut services = Feed::<Service>::new();
    let mut slices = Feed::<EndpointSlice>::new();
    let mut svc_events = stream::<Service>(&client);
    let mut slice_events = stream::<EndpointSlice>(&client);
    // When each not-yet-programmed EndpointSlice change was seen.
    let mut pending: Vec<Instant> = Vec::new();
    // Frontends whose last write failed, retried at `retry_at`.
    let mut failed: Vec<FrontendKey> = Vec::new();
    let mut retry_at: Option<Instant> = None;
    let mut health = health::HealthServers::default();
    loop {
        let mut changed = false;
        tokio::select! {
            ev = svc_events.next() => changed |= take(ev, &mut services, &mut tracker, None)?,
            ev = slice_events.next() => {
                changed |= take(ev, &mut slices, &mut tracker, Some(&mut pending))?
            }
            _ = sleep_until(retry_at) => { retry_at = None; changed = true; }
        }
        // Everything else already waiting joins this pass.
        while let Some(ev) = svc_events.next().now_or_never() {
            changed |= take(ev, &mut services, &mut tracker, None)?;
        }
        while let Some(ev) = slice_events.next().now_or_never() {
            changed |= take(ev, &mut slices, &mut tracker, Some(&mut pending))?;
        }
        if !changed || !services.ready || !slices.ready {
            continue;
        }
        let retry = if retry_at.is_none() {
            std::mem::take(&mut failed)
        } else {
            Vec::new()
        };
        let Pass {
            touched,
            previous_ids,
            report,
            health: health_changed,
            services: recomputed,
        } = pass(&mut tracker, &mut programmer, retry, &mut maps);
        if let Some(zone) = &zone {
            for k in &recomputed {
                let (svc, slices) = tracker.service(k);
                zone.update(k, svc, &slices);
            }
            zone.set_synced(true);
        }
        if health_changed {
            health.sync(&tracker.health());
        }
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
            for id in previous_ids {
                owners.remove(&id);
            }
            for k in &touched {
                if let (Some(id), Some(o)) = (programmer.service_id(k), tracker.owner(k)) {
                    owners.insert(id, (o.clone(), frontend_label(k)));
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
            failed.extend(report.errors.iter().map(|(k, _)| *k));
            retry_at = Some(Instant::now() + Duration::from_secs(1));
        }
    }
}

/// Marks the DNS zone as no longer followed when the sync ends.
struct Unsync(Option<Arc<crate::dns::Zone>>);

impl Drop for Unsync {
    fn drop(&mut self) {
        if let Some(z) = &self.0 {
            z.set_synced(false);
        }
    }
}

/// What one [`pass`] did.
#[derive(Debug)]
pub struct Pass {
    /// The frontends it wrote, removed or left as they were (recomputed or retried).
    pub touched: Vec<FrontendKey>,
    /// The service ids those frontends had before it.
    pub previous_ids: Vec<u32>,
    /// The map writes.
    pub report: programmer::Report,
    /// The health check ports changed.
    pub health: bool,
    /// The Services recomputed.
    pub services: Vec<tracker::ObjectKey>,
}

/// One pass of the agent: the Services the events since the last pass touched are recomputed,
/// the frontends in `retry` (failed before) are tried again, and the maps brought to them.
pub fn pass(
    tracker: &mut Tracker,
    programmer: &mut Programmer,
    retry: Vec<FrontendKey>,
    table: &mut dyn LbTable,
) -> Pass {
    let changes = tracker.changes();
    let mut todo: BTreeMap<FrontendKey, Option<FrontendSpec>> =
        changes.frontends.into_iter().collect();
    for k in retry {
        todo.entry(k).or_insert_with(|| tracker.spec(&k).cloned());
    }
    let previous_ids = todo
        .keys()
        .filter_map(|k| programmer.service_id(k))
        .collect();
    let report = programmer.apply_changes(todo.iter().map(|(k, s)| (*k, s.as_ref())), table);
    Pass {
        touched: todo.into_keys().collect(),
        previous_ids,
        report,
        health: changes.health,
        services: changes.services,
    }
}

/// Applies one watcher item; the streams retry on their own, so errors are only logged.
fn take<K: Tracked>(
    ev: Option<Result<watcher::Event<K>, watcher::Error>>,
    feed: &mut Feed<K>,
    tracker: &mut Tracker,
    pending: Option<&mut Vec<Instant>>,
) -> Result<bool> {
    match ev {
        None => anyhow::bail!("watch stream ended"),
        Some(Ok(ev)) => {
            let changed = feed.apply(ev, tracker);
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

/// How metrics name a frontend: `address:port/protocol`, with ` (internal)` for the scope
/// pods use under externalTrafficPolicy=Local.
fn frontend_label(k: &FrontendKey) -> String {
    let proto = skiff_datapath::lb::proto_name(k.proto);
    let scope = if k.scope == skiff_ebpf_common::lb::SCOPE_INTERNAL {
        " (internal)"
    } else {
        ""
    };
    format!("{}:{}/{proto}{scope}", k.addr, k.port)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
