//! `pods/log`: forwarded to the agent of the pod's node over HTTPS.
//!
//! The agent's address and port come from its Node (`InternalIP`,
//! `daemonEndpoints.kubeletEndpoint.Port`), and its serving certificate is pinned by the SHA-256
//! fingerprint it published there (`skiff.dev/serving-cert-sha256`): only a holder of that
//! node's credentials could have written it. The TLS handshake still verifies the signature, so
//! the agent proves it holds the key. The API server authenticates with the node bearer token.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};

/// Node annotation with the agent's serving certificate fingerprint.
pub const FINGERPRINT_ANNOTATION: &str = "skiff.dev/serving-cert-sha256";

#[derive(Debug)]
struct Pinned {
    sha256: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if hex::encode(Sha256::digest(end_entity.as_ref())) == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the node agent's certificate does not match the fingerprint its Node published"
                    .into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How to reach a node's agent.
#[derive(Debug)]
pub struct AgentEndpoint {
    /// `https://ip:port`.
    pub base: String,
    /// Pinned certificate fingerprint.
    pub sha256: String,
}

/// The agent endpoint of `node` (its Node object).
pub fn endpoint(node_name: &str, node: &Value) -> ApiResult<AgentEndpoint> {
    let unreachable = |why: &str| {
        ApiError::unavailable(format!(
            "the agent of node {node_name:?} cannot be reached: {why}"
        ))
    };
    let ip = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
        .and_then(|x| x["address"].as_str())
        .ok_or_else(|| unreachable("it has no InternalIP"))?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .filter(|p| *p > 0)
        .ok_or_else(|| unreachable("it publishes no endpoint port"))?;
    let sha256 = node
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(FINGERPRINT_ANNOTATION))
        .and_then(Value::as_str)
        .ok_or_else(|| unreachable("it publishes no certificate fingerprint"))?
        .to_string();
    Ok(AgentEndpoint {
        base: format!("https://{ip}:{port}"),
        sha256,
    })
}

/// An HTTP/1.1 connection over TLS to the agent at `ep` that trusts exactly the pinned
/// certificate (upgrades allowed); returns the sender and the `host:port` it reached.
async fn connect(
    ep: &AgentEndpoint,
) -> ApiResult<(
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    String,
)> {
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError::unavailable(format!("the node agent at {}: {e}", ep.base))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        sha256: ep.sha256.clone(),
        provider: provider.clone(),
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ApiError::internal)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let addr = ep.base.trim_start_matches("https://").to_string();
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .map_err(|_| unavailable(&"connect timed out"))?
    .map_err(|e| unavailable(&e))?;
    let _ = tcp.set_nodelay(true);
    let host = addr
        .rsplit_once(':')
        .map_or(addr.as_str(), |(h, _)| h)
        .to_string();
    let name = ServerName::try_from(host).map_err(|e| unavailable(&e))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| unavailable(&e))?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| unavailable(&e))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok((send, addr))
}

/// Request headers an upgrade carries through the proxy.
const UPGRADE_HEADERS: [&str; 7] = [
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "x-stream-protocol-version",
];

/// Sends `method path_and_query` to the agent at `ep` with `token`, carrying the client's
/// upgrade headers from `headers` (none for a plain GET); returns the agent's response, whose
/// body streams, or whose connection is handed over on `101 Switching Protocols`.
pub async fn forward(
    ep: &AgentEndpoint,
    method: hyper::Method,
    path_and_query: &str,
    token: &str,
    headers: &hyper::HeaderMap,
) -> ApiResult<hyper::Response<hyper::body::Incoming>> {
    let (mut send, addr) = connect(ep).await?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, addr.as_str())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    for name in UPGRADE_HEADERS {
        for v in headers.get_all(name) {
            req = req.header(name, v);
        }
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(ApiError::internal)?;
    send.send_request(req)
        .await
        .map_err(|e| ApiError::unavailable(format!("the node agent at {}: {e}", ep.base)))
}
