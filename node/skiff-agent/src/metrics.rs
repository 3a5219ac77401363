//! The agent's Prometheus endpoint (`--metrics-addr`, plain HTTP `GET /metrics`, like
//! kube-proxy's `:10249/metrics` and Cilium's agent port): the data path's per-CPU counters
//! (summed at scrape time from the pinned maps), per-Service packet counters, and the service
//! sync's own metrics, including `skiff_network_programming_duration_seconds` (kube-proxy's
//! `network_programming_duration_seconds`: from an EndpointSlice change seen by the agent to the
//! maps updated).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use skiff_datapath::{PinDir, lb::LbMaps, metrics::Verdict};

use crate::{policy::flows::FlowMetrics, services::desired::FrontendOwner};

/// The service sync's metrics.
#[derive(Debug)]
pub struct LbMetrics {
    /// Seconds from an EndpointSlice change seen by the agent to the maps updated.
    pub programming_duration: Histogram,
    /// Frontends in the maps.
    pub frontends: Gauge,
    /// Backends in the maps.
    pub backends: Gauge,
    /// Frontends that could not be written, by cause (`map_full`, `error`).
    pub sync_errors: Family<Vec<(String, String)>, Counter>,
    /// Who each service id belongs to, for the per-Service counters.
    pub owners: Mutex<BTreeMap<u32, (FrontendOwner, String)>>,
}

impl Default for LbMetrics {
    fn default() -> Self {
        LbMetrics {
            // 0.5 ms … ~16 s.
            programming_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            sync_errors: Family::default(),
            owners: Mutex::new(BTreeMap::new()),
        }
    }
}

/// Reads the data path's maps at scrape time.
#[derive(Debug)]
struct DatapathCollector {
    pins: PinDir,
    lb: Arc<LbMetrics>,
}

/// Reads the flow ring's lost-event counter at scrape time.
#[derive(Debug)]
struct FlowsLostCollector {
    pins: PinDir,
}

impl Collector for FlowsLostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Ok((full, limited)) = skiff_datapath::policy::flows_lost(&self.pins) {
            let mut lost = encoder.encode_descriptor(
                "skiff_policy_flow_events_lost",
                "Flow events the data path did not write (their packets were judged as usual), \
                 by cause: ring_full, rate_limited (drop events over the per-CPU budget)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (cause, n) in [("ring_full", full), ("rate_limited", limited)] {
                let labels = vec![("cause".to_string(), cause.to_string())];
                ConstCounter::new(n).encode(lost.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Ok(rows) = skiff_datapath::metrics::read(&self.pins) {
            let mut packets = encoder.encode_descriptor(
                "skiff_datapath_packets",
                "Packets seen by the data path, by hook and verdict (drops by stable reason)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for r in &rows {
                let labels = row_labels(r);
                ConstCounter::new(r.packets).encode(packets.encode_family(&labels)?)?;
            }
            let mut bytes = encoder.encode_descriptor(
                "skiff_datapath_bytes",
                "Bytes seen by the data path, by hook and verdict",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for r in &rows {
                let labels = row_labels(r);
                ConstCounter::new(r.bytes).encode(bytes.encode_family(&labels)?)?;
            }
        }
        let owners = self
            .lb
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if owners.is_empty() {
            return Ok(());
        }
        let Ok(maps) = LbMaps::open(&self.pins) else {
            return Ok(());
        };
        let mut svc = encoder.encode_descriptor(
            "skiff_service_packets",
            "Packets translated for a Service frontend (both directions)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (id, (owner, frontend)) in &owners {
            let Ok(v) = maps.stats(*id) else { continue };
            let labels = vec![
                ("namespace".to_string(), owner.namespace.clone()),
                ("service".to_string(), owner.name.clone()),
                ("port".to_string(), owner.port_name.clone()),
                ("frontend".to_string(), frontend.clone()),
            ];
            ConstCounter::new(v.packets).encode(svc.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn row_labels(r: &skiff_datapath::metrics::MetricsRow) -> Vec<(String, String)> {
    let hook = r.hook.map_or_else(
        || format!("unknown_{}", r.hook_code),
        |h| h.name().to_string(),
    );
    let (verdict, reason) = match r.verdict {
        Verdict::Forwarded => ("forwarded".to_string(), String::new()),
        Verdict::Redirected => ("redirected".to_string(), String::new()),
        other => ("dropped".to_string(), other.name()),
    };
    vec![
        ("hook".to_string(), hook),
        ("verdict".to_string(), verdict),
        ("reason".to_string(), reason),
    ]
}

/// The registry of everything the agent exports.
pub fn registry(pins: PinDir, lb: Arc<LbMetrics>, flows: &FlowMetrics) -> Registry {
    let mut r = Registry::default();
    r.register(
        "skiff_policy_verdicts",
        "New connections of isolated endpoints decided by policy, by direction and verdict \
         (allowed, dropped, audit)",
        flows.verdicts.clone(),
    );
    r.register(
        "skiff_policy_denials",
        "Dropped (and audit-mode would-be-dropped) new connections by isolating policy: a \
         connection is counted once for each policy isolating its endpoint in that direction",
        flows.denials.clone(),
    );
    r.register_collector(Box::new(FlowsLostCollector { pins: pins.clone() }));
    r.register(
        "skiff_network_programming_duration_seconds",
        "From an EndpointSlice change seen by the agent to the service maps updated",
        lb.programming_duration.clone(),
    );
    r.register(
        "skiff_lb_frontends",
        "Service frontends in the maps",
        lb.frontends.clone(),
    );
    r.register(
        "skiff_lb_backends",
        "Service backends in the maps",
        lb.backends.clone(),
    );
    r.register(
        "skiff_lb_sync_errors",
        "Service frontends that could not be written, by cause",
        lb.sync_errors.clone(),
    );
    r.register_collector(Box::new(DatapathCollector { pins, lb }));
    r
}

/// Serves `GET /metrics` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, registry: Registry) -> anyhow::Result<()> {
    let registry = Arc::new(registry);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                if encode(&mut body, &registry).is_err() {
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "encoding metrics failed\n",
                    )
                        .into_response();
                }
                let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                ([(header::CONTENT_TYPE, kind)], body).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics endpoint {addr}: {e}"))?;
    tracing::info!(%addr, "metrics endpoint listening");
    axum::serve(listener, app).await?;
    Ok(())
}
