//! The `healthCheckNodePort` of Services with externalTrafficPolicy=Local, answered as
//! kube-proxy's health check server does (`pkg/proxy/healthcheck/service_health.go`): `200`
//! while this node has a ready endpoint of the Service, `503` otherwise, with a JSON body
//! naming the Service and the count, so a load balancer sends traffic only to nodes that can
//! serve it locally.

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
use serde_json::json;

use super::desired::HealthCheck;

/// The listeners, one per health check port, following the desired set.
#[derive(Debug, Default)]
pub struct HealthServers {
    running: BTreeMap<u16, (Arc<Mutex<HealthCheck>>, tokio::task::JoinHandle<()>)>,
}

impl HealthServers {
    /// Starts, updates and stops listeners so that exactly `want` is served.
    pub fn sync(&mut self, want: &BTreeMap<u16, HealthCheck>) {
        let gone: Vec<u16> = self
            .running
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        for p in gone {
            if let Some((_, task)) = self.running.remove(&p) {
                task.abort();
            }
        }
        for (port, hc) in want {
            if let Some((state, _)) = self.running.get(port) {
                *state.lock().unwrap_or_else(|p| p.into_inner()) = hc.clone();
                continue;
            }
            let state = Arc::new(Mutex::new(hc.clone()));
            let task = tokio::spawn(serve(*port, state.clone()));
            self.running.insert(*port, (state, task));
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for (_, task) in self.running.values() {
            task.abort();
        }
    }
}

async fn serve(port: u16, state: Arc<Mutex<HealthCheck>>) {
    let app = Router::new().fallback(get(move || {
        let hc = state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        async move {
            let code = if hc.local_endpoints > 0 {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = json!({
                "service": {"namespace": hc.namespace, "name": hc.name},
                "localEndpoints": hc.local_endpoints,
                "serviceProxyHealthy": true,
            });
            (
                code,
                [
                    (header::CONTENT_TYPE, "application/json".to_string()),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
                    (
                        header::HeaderName::from_static("x-load-balancing-endpoint-weight"),
                        hc.local_endpoints.to_string(),
                    ),
                ],
                body.to_string(),
            )
                .into_response()
        }
    }));
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            if let Err(e) = axum::serve(l, app).await {
                tracing::warn!(port, error = %e, "health check listener stopped");
            }
        }
        Err(e) => tracing::error!(port, error = %e, "health check node port cannot be served"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_200_with_local_endpoints_and_503_without() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let mut servers = HealthServers::default();
        let mut want = BTreeMap::from([(
            port,
            HealthCheck {
                namespace: "default".into(),
                name: "web".into(),
                local_endpoints: 2,
            },
        )]);
        servers.sync(&want);
        let get = || async {
            for _ in 0..50 {
                if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await {
                    let code = r.status().as_u16();
                    return (code, r.text().await.unwrap_or_default());
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            panic!("health check port never answered")
        };
        let (code, body) = get().await;
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["service"]["name"], "web");
        want.get_mut(&port).expect("present").local_endpoints = 0;
        servers.sync(&want);
        assert_eq!(get().await.0, 503);
        servers.sync(&BTreeMap::new());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            reqwest::get(format!("http://127.0.0.1:{port}/"))
                .await
                .is_err(),
            "stopped"
        );
    }
}
