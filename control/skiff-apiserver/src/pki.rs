//! The cluster's certificates and tokens, made on first start and reused after.
//!
//! `<dir>/pki/ca.{crt,key}`: the cluster CA (rcgen, ECDSA P-256, 10 years).
//! `<dir>/pki/apiserver.{crt,key}`: the serving certificate, signed by the CA, for localhost,
//! 127.0.0.1, the `kubernetes` Service names and IP, the host name and any configured names. It
//! is re-issued when the configured names change. `<dir>/tokens.csv`: bearer tokens in
//! kube-apiserver's static token file format (`token,user,uid,"group1,group2"`), one admin
//! (`system:masters`) and one node bootstrap token (`system:bootstrappers`).
//! `<dir>/admin.kubeconfig`: a kubeconfig for the admin token, usable by kubectl as is.
//!
//! Files holding secrets are written 0600, atomically (temp file, fsync, rename).

use std::{
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::alloc::KUBERNETES_SERVICE_IP;

/// A user a token authenticates as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// User name.
    pub name: String,
    /// Uid.
    pub uid: String,
    /// Groups.
    pub groups: Vec<String>,
}

/// Loaded credentials.
#[derive(Debug)]
pub struct Pki {
    /// CA certificate (PEM).
    pub ca_pem: String,
    /// Serving certificate chain and key, ready for rustls.
    pub tls: Arc<rustls::ServerConfig>,
    /// Token → user.
    pub tokens: Vec<(String, User)>,
    /// Admin token.
    pub admin_token: String,
    /// Node bootstrap token.
    pub bootstrap_token: String,
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "skiff-ca");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = time_now();
    p.not_after = time_now() + time::Duration::days(10 * 365);
    p
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// The names the serving certificate must cover.
pub fn serving_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = vec![
        "localhost".into(),
        "127.0.0.1".into(),
        KUBERNETES_SERVICE_IP.to_string(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ];
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
    {
        names.push(h.to_string());
    }
    for e in extra {
        if !names.contains(e) {
            names.push(e.clone());
        }
    }
    names
}

fn serving_cert(names: &[String], ca: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kube-apiserver");
    p.distinguished_name = dn;
    p.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .with_context(|| format!("{n:?} is not a valid DNS name")),
        })
        .collect::<Result<_>>()?;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = time_now();
    p.not_after = time_now() + time::Duration::days(365);
    let key = KeyPair::generate().context("generate serving key")?;
    let cert = p.signed_by(&key, ca).context("sign serving certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The members' CA and each member's peer certificate, for mutual TLS between store members
/// (`skiff-control --peer-cert-file …`). Under `dir`: `peer-ca.{crt,key}` (made once, reused
/// after), and `member-<id>.{crt,key}` for each of `members` (id, host of its peer address),
/// valid as server and client, naming the host (IP or DNS name). Returns the files written.
pub fn peer_certs(dir: &Path, members: &[(u64, String)]) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let (ca_crt, ca_key) = (dir.join("peer-ca.crt"), dir.join("peer-ca.key"));
    let mut written = Vec::new();
    if !ca_crt.exists() {
        let key = KeyPair::generate().context("generate the peer CA key")?;
        let mut params = ca_params();
        params
            .distinguished_name
            .push(DnType::CommonName, "skiff-peer-ca");
        let cert = params.self_signed(&key).context("self-sign the peer CA")?;
        write_private(&ca_key, key.serialize_pem().as_bytes())?;
        write_private(&ca_crt, cert.pem().as_bytes())?;
        written.extend([ca_crt.clone(), ca_key.clone()]);
    }
    let ca_pem = read(&ca_crt)?;
    let ca_key_pair = KeyPair::from_pem(&read(&ca_key)?)
        .with_context(|| format!("{} is not a PEM private key", ca_key.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key_pair)
        .with_context(|| format!("{} is not a PEM CA certificate", ca_crt.display()))?;
    for (id, host) in members {
        if host.contains(':') || host.is_empty() {
            bail!("member {id}: {host:?} is not a host (give the address without its port)");
        }
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("skiff-member-{id}"));
        p.distinguished_name = dn;
        p.subject_alt_names = vec![match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.clone()
                    .try_into()
                    .with_context(|| format!("{host:?} is not an IP address or DNS name"))?,
            ),
        }];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // Backdated a little: a member whose clock is behind still accepts it.
        p.not_before = time_now() - time::Duration::hours(1);
        p.not_after = time_now() + time::Duration::days(365);
        let key = KeyPair::generate().context("generate a member key")?;
        let cert = p
            .signed_by(&key, &issuer)
            .context("sign a member certificate")?;
        let (crt, key_path) = (
            dir.join(format!("member-{id}.crt")),
            dir.join(format!("member-{id}.key")),
        );
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_private(&crt, cert.pem().as_bytes())?;
        written.extend([crt, key_path]);
    }
    Ok(written)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn parse_tokens(text: &str, path: &Path) -> Result<Vec<(String, User)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.splitn(4, ',');
        let (Some(token), Some(name), Some(uid)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!(
                "{}:{}: expected token,user,uid[,\"groups\"]",
                path.display(),
                i + 1
            );
        };
        let groups = parts
            .next()
            .map(|g| {
                g.trim_matches('"')
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            token.to_string(),
            User {
                name: name.to_string(),
                uid: uid.to_string(),
                groups,
            },
        ));
    }
    Ok(out)
}

impl Pki {
    /// Loads the credentials under `dir`, creating what is missing. Existing but unreadable
    /// files are an error (never silently replaced: clients trust them).
    pub fn load_or_create(dir: &Path, extra_names: &[String]) -> Result<Pki> {
        let pki = dir.join("pki");
        fs::create_dir_all(&pki).with_context(|| format!("create {}", pki.display()))?;
        fs::set_permissions(&pki, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod {}", pki.display()))?;
        let (ca_crt, ca_key) = (pki.join("ca.crt"), pki.join("ca.key"));
        if !ca_crt.exists() {
            let key = KeyPair::generate().context("generate CA key")?;
            let cert = ca_params().self_signed(&key).context("self-sign CA")?;
            write_private(&ca_key, key.serialize_pem().as_bytes())?;
            write_private(&ca_crt, cert.pem().as_bytes())?;
        }
        let ca_pem = read(&ca_crt)?;
        let ca_key_pair = KeyPair::from_pem(&read(&ca_key)?)
            .with_context(|| format!("{} is not a PEM private key", ca_key.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key_pair)
            .with_context(|| format!("{} is not a PEM CA certificate", ca_crt.display()))?;

        let names = serving_names(extra_names);
        let (srv_crt, srv_key, srv_names) = (
            pki.join("apiserver.crt"),
            pki.join("apiserver.key"),
            pki.join("apiserver.names"),
        );
        let recorded = fs::read_to_string(&srv_names).unwrap_or_default();
        if !srv_crt.exists() || recorded != names.join("\n") {
            let (crt, key) = serving_cert(&names, &issuer)?;
            write_private(&srv_key, key.as_bytes())?;
            write_private(&srv_crt, format!("{crt}{ca_pem}").as_bytes())?;
            write_private(&srv_names, names.join("\n").as_bytes())?;
        }
        let tls = server_config(&read(&srv_crt)?, &read(&srv_key)?)?;

        let tokens_path = dir.join("tokens.csv");
        if !tokens_path.exists() {
            let admin = random_token(32);
            let boot_id = random_token(6);
            let bootstrap = format!("{boot_id}.{}", random_token(16));
            let text = format!(
                "{admin},admin,admin,\"system:masters\"\n{bootstrap},system:bootstrap:{boot_id},bootstrap-{boot_id},\"system:bootstrappers,system:bootstrappers:skiff:default-node-token\"\n"
            );
            write_private(&tokens_path, text.as_bytes())?;
        }
        let tokens = parse_tokens(&read(&tokens_path)?, &tokens_path)?;
        let admin_token = tokens
            .iter()
            .find(|(_, u)| u.groups.iter().any(|g| g == "system:masters"))
            .map(|(t, _)| t.clone())
            .with_context(|| format!("{} has no system:masters token", tokens_path.display()))?;
        let bootstrap_token = tokens
            .iter()
            .find(|(_, u)| u.groups.iter().any(|g| g == "system:bootstrappers"))
            .map(|(t, _)| t.clone())
            .unwrap_or_default();
        Ok(Pki {
            ca_pem,
            tls,
            tokens,
            admin_token,
            bootstrap_token,
        })
    }

    /// Writes an admin kubeconfig for `server` (`https://127.0.0.1:6443`) to `path`.
    pub fn write_kubeconfig(&self, path: &Path, server: &str) -> Result<PathBuf> {
        self.write_kubeconfig_for(path, server, "skiff-admin", &self.admin_token)
    }

    /// Writes a kubeconfig with the node bootstrap token, for `skiff-node --kubeconfig`.
    pub fn write_node_kubeconfig(&self, path: &Path, server: &str) -> Result<PathBuf> {
        self.write_kubeconfig_for(path, server, "skiff-node", &self.bootstrap_token)
    }

    fn write_kubeconfig_for(
        &self,
        path: &Path,
        server: &str,
        user: &str,
        token: &str,
    ) -> Result<PathBuf> {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: skiff\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: skiff\n  context:\n    cluster: skiff\n    user: {user}\n    namespace: default\ncurrent-context: skiff\n"
        );
        write_private(path, text.as_bytes())?;
        Ok(path.to_path_buf())
    }

    /// The user a bearer token belongs to (constant-time comparison).
    pub fn authenticate(&self, token: &str) -> Option<&User> {
        let mut found = None;
        for (t, u) in &self.tokens {
            if constant_time_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(u);
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn server_config(chain_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>> {
    let certs = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parse serving certificate chain")?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .context("parse serving key")?
        .context("no private key in the serving key file")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("serving certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_start_creates_and_second_start_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pki::load_or_create(dir.path(), &[]).unwrap();
        let b = Pki::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.admin_token, b.admin_token);
        assert_eq!(a.authenticate(&a.admin_token).unwrap().name, "admin");
        assert!(a.authenticate("wrong").is_none());
        assert!(a.bootstrap_token.contains('.'));
        let mode = fs::metadata(dir.path().join("pki/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_ca_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        Pki::load_or_create(dir.path(), &[]).unwrap();
        fs::write(dir.path().join("pki/ca.crt"), "garbage").unwrap();
        let err = Pki::load_or_create(dir.path(), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("ca.crt"));
        assert_eq!(
            fs::read_to_string(dir.path().join("pki/ca.crt")).unwrap(),
            "garbage"
        );
    }
}
