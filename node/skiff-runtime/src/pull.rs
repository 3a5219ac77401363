//! Pulling images from registries (the OCI distribution API, through `oci-client`): the
//! manifest (an index resolved to this machine's platform), the configuration and the layers,
//! each checked against its digest, then imported and unpacked like an OCI layout.
//!
//! Registries are reached over HTTPS, except those listed as insecure and loopback ones, which
//! use plain HTTP (as containerd treats `localhost`). Credentials come from the caller (the
//! agent reads them from a pod's `imagePullSecrets`); without them the pull is anonymous, with
//! the registry's bearer-token handshake done by the client.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use containerd_client::tonic::transport::Channel;
use oci_client::{Client, Reference, client::ClientConfig, client::ClientProtocol};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use oci_client::secrets::RegistryAuth;

use crate::image::ImageInfo;

/// Manifest media types accepted, preferred first.
const ACCEPTED: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The registry (`host[:port]`) of a normalised image reference.
pub fn registry_of(image: &str) -> String {
    image.split('/').next().unwrap_or_default().to_string()
}

fn is_loopback(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

/// Pulls `name` (a normalised reference, `registry/repository:tag` or `@digest`) into
/// containerd. `insecure` lists registries (`host:port`) served over plain HTTP.
pub async fn pull(
    ch: &Channel,
    name: &str,
    auth: &RegistryAuth,
    insecure: &[String],
) -> Result<ImageInfo> {
    let reference: Reference = name
        .parse()
        .with_context(|| format!("{name:?} is not a valid image reference"))?;
    let registry = registry_of(name);
    let mut http: Vec<String> = insecure.to_vec();
    if is_loopback(&registry) {
        http.push(registry.clone());
    }
    // reqwest's rustls needs a process-wide provider; ring is the one skiff uses everywhere.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(http),
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    });
    let (mut bytes, mut digest) = client
        .pull_manifest_raw(&reference, auth, &ACCEPTED)
        .await
        .with_context(|| format!("resolve {name}"))?;
    let mut manifest: Value = serde_json::from_slice(&bytes).context("the image manifest")?;
    if let Some(list) = manifest.get("manifests").and_then(Value::as_array) {
        let arch = crate::arch();
        let entry = list
            .iter()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
            .with_context(|| format!("{name} has no image for linux/{arch}"))?;
        let d = entry["digest"]
            .as_str()
            .context("an index entry without a digest")?
            .to_string();
        let by_digest = Reference::with_digest(
            reference.registry().to_string(),
            reference.repository().to_string(),
            d,
        );
        (bytes, digest) = client
            .pull_manifest_raw(&by_digest, auth, &ACCEPTED)
            .await
            .with_context(|| format!("fetch the linux/{arch} manifest of {name}"))?;
        manifest = serde_json::from_slice(&bytes).context("the image manifest")?;
    }
    if sha256(&bytes) != digest {
        bail!("the manifest of {name} does not match its digest {digest}");
    }
    let media_type = manifest["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_string();
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let blob_path = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let mut wanted: Vec<String> = vec![
        manifest["config"]["digest"]
            .as_str()
            .context("a manifest without a config")?
            .to_string(),
    ];
    for l in manifest["layers"].as_array().into_iter().flatten() {
        wanted.push(
            l["digest"]
                .as_str()
                .context("a layer without a digest")?
                .to_string(),
        );
    }
    for d in wanted {
        let mut data = Vec::new();
        client
            .pull_blob(&reference, d.as_str(), &mut data)
            .await
            .with_context(|| format!("fetch blob {d} of {name}"))?;
        if sha256(&data) != d {
            bail!("blob {d} of {name} does not match its digest");
        }
        files.insert(blob_path(&d), data);
    }
    files.insert(
        "index.json".into(),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": media_type, "digest": digest, "size": bytes.len()}],
        }))?,
    );
    files.insert(blob_path(&digest), bytes.to_vec());
    crate::image::import_layout(ch, &files, &format!("registry {registry}"), name).await
}

/// Credentials for `registry` from a `.dockerconfigjson` document (the data of a
/// `kubernetes.io/dockerconfigjson` Secret): `username`/`password`, or `auth` (base64 of
/// `user:password`); keys may carry a scheme and a path (`https://index.docker.io/v1/`).
pub fn auth_from_docker_config(config: &[u8], registry: &str) -> Option<RegistryAuth> {
    use base64::Engine;
    let v: Value = serde_json::from_slice(config).ok()?;
    let want = if registry == "docker.io" {
        "index.docker.io"
    } else {
        registry
    };
    let (_, entry) = v["auths"].as_object()?.iter().find(|(k, _)| {
        let host = k
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        host == want || (registry == "docker.io" && host == "docker.io")
    })?;
    if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
        return Some(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry["auth"].as_str()?)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some(RegistryAuth::Basic(u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_credentials() {
        let cfg = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
            "registry.example:5000": {"username": "a", "password": "b"}}}"#;
        let got = |r: &str| match auth_from_docker_config(cfg, r) {
            Some(RegistryAuth::Basic(u, p)) => Some((u, p)),
            _ => None,
        };
        assert_eq!(got("docker.io"), Some(("user".into(), "pass".into())));
        assert_eq!(got("registry.example:5000"), Some(("a".into(), "b".into())));
        assert_eq!(got("other.example"), None);
    }

    #[test]
    fn loopback_registries_are_plain_http() {
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(!is_loopback("10.0.0.1:5000"));
        assert_eq!(
            registry_of("10.0.0.1:5000/tools/busybox:1.36"),
            "10.0.0.1:5000"
        );
    }
}
