//! Mutual TLS between members, as etcd's `--peer-cert-file`, `--peer-key-file`,
//! `--peer-trusted-ca-file` and `--peer-client-cert-auth`: each member serves its peer listener
//! with its certificate and accepts only clients presenting a certificate the members' CA
//! signed; as a client it presents the same certificate and trusts only servers the CA signed,
//! named as the peer address's host. `skiff-control peer-certs` makes such a CA and the
//! members' certificates (docs/store.md).

use std::{path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
};

use crate::StoreError;

/// A member's TLS settings for its peer listener and its connections to the others.
#[derive(Clone, Debug)]
pub struct PeerTls {
    /// The listener's: client certificates required.
    pub server: Arc<ServerConfig>,
    /// The connections': this member's certificate presented.
    pub client: ClientConfig,
}

fn invalid(path: &Path, what: &str) -> StoreError {
    StoreError::Invalid(format!("{}: {what}", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(path, &format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "holds no certificate"));
    }
    Ok(certs)
}

impl PeerTls {
    /// Loads this member's certificate chain `cert` and key `key`, and the members' CA `ca`
    /// (all PEM).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<PeerTls, StoreError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let chain = certs(cert)?;
        let key_pem = read(key)?;
        let key_der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| invalid(key, &format!("not a PEM private key: {e}")))?
            .ok_or_else(|| invalid(key, "holds no private key"))?;
        let mut roots = RootCertStore::empty();
        for c in certs(ca)? {
            roots
                .add(c)
                .map_err(|e| invalid(ca, &format!("not a CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder(roots.clone())
            .build()
            .map_err(|e| invalid(ca, &format!("client verifier: {e}")))?;
        let server = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key_der.clone_key())
            .map_err(|e| invalid(cert, &format!("does not match its key: {e}")))?;
        let client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| invalid(cert, &format!("does not match its key: {e}")))?;
        Ok(PeerTls {
            server: Arc::new(server),
            client,
        })
    }
}

/// Serves `app` over TLS on `listener` until aborted (HTTP/1.1 and 2, with upgrades); each
/// connection is a task of a set owned here, so aborting the loop ends them too. `what`
/// names the listener in logs.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    app: axum::Router,
    what: &'static str,
) {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::conn::auto,
        service::TowerToHyperService,
    };
    use std::time::Duration;
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (tls, app) = (tls.clone(), app.clone());
        conns.spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                // Visible by default, as upstream's API server logs TLS handshake errors: a
                // refused client (no or another CA's certificate) is worth an operator's look.
                Ok(Err(e)) => {
                    tracing::warn!(listener = what, %peer, error = %e, "refused: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(listener = what, %peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(listener = what, %peer, error = %e, "connection ended with an error");
            }
        });
    }
}
