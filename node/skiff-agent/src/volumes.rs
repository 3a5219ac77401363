//! Pod volumes and the files the kubelet manages in every container.
//!
//! Per pod, under `<data-dir>/podstate/<uid>/`: `volumes/<name>/` for each volume, and `hosts`,
//! `hostname`, `resolv.conf` bind-mounted over the container's `/etc/…`.
//!
//! - `emptyDir`: a directory, or a tmpfs (`medium: Memory`, sized by `sizeLimit`).
//! - `hostPath`: the node's path, checked or created per `type`.
//! - `configMap`, `secret`, `downwardAPI`, `projected`: files written the way the kubelet's
//!   atomic writer lays them out — the payload in a `..<timestamp>` directory, `..data` a
//!   symlink to it (swapped with a rename), and a symlink per top-level entry through `..data`
//!   — mounted read-only. Modes from `defaultMode`/`mode` (0644 unless set).
//!
//! Containers mount volumes at `mountPath` (with `subPath`, read-only when asked). A missing
//! ConfigMap or Secret that is not optional keeps the pod in `ContainerCreating` with the
//! reason, retried, as upstream's `FailedMount`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::unix::fs::PermissionsExt,
    path::{Component, Path, PathBuf},
};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume,
};
use kube::{Api, Client, ResourceExt};
use skiff_runtime::container::Mount;

/// The file mode of projected files unless set.
const DEFAULT_MODE: u32 = 0o644;
/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Files of one volume: relative path → (content, mode).
type Payload = BTreeMap<String, (Vec<u8>, u32)>;

/// A pod's prepared volumes.
#[derive(Clone, Debug, Default)]
pub struct PodVolumes {
    /// Volume name → host path and whether it is always read-only.
    volumes: HashMap<String, (PathBuf, bool)>,
    /// `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf` sources.
    etc: Vec<(PathBuf, &'static str)>,
}

/// The pod's state directory.
pub fn pod_root(data_dir: &Path, uid: &str) -> PathBuf {
    data_dir.join("podstate").join(uid)
}

fn relative(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if path.is_empty()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "invalid path {path:?}: must be relative and must not contain '..'"
        ));
    }
    Ok(p.to_path_buf())
}

/// Writes `files` into `dir` with the kubelet's atomic-writer layout; a second call swaps the
/// whole payload at once and removes what is no longer there.
pub fn atomic_write(dir: &Path, files: &Payload) -> std::io::Result<()> {
    let io = |e: String| std::io::Error::other(e);
    std::fs::create_dir_all(dir)?;
    let stamp = format!(
        "..{}",
        k8s_openapi::chrono::Utc::now().format("%Y_%m_%d_%H_%M_%S.%9f")
    );
    let payload = dir.join(&stamp);
    std::fs::create_dir(&payload)?;
    let mut tops = BTreeSet::new();
    for (path, (data, mode)) in files {
        let rel = relative(path).map_err(io)?;
        if let Some(first) = rel.components().next() {
            tops.insert(first.as_os_str().to_os_string());
        }
        let target = payload.join(&rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, data)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode & 0o7777))?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for top in &tops {
        let link = dir.join(top);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)?.filter_map(Result::ok) {
        let name = entry.file_name();
        let s = name.to_string_lossy();
        if s == "..data" || s == stamp {
            continue;
        }
        if s.starts_with("..") {
            std::fs::remove_dir_all(entry.path())?;
        } else if !tops.contains(&name) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn mode_of(m: Option<i32>, default: u32) -> u32 {
    m.and_then(|m| u32::try_from(m).ok()).unwrap_or(default)
}

/// Where a volume's keys come from.
#[derive(Clone, Copy, Debug)]
enum KeySource<'a> {
    ConfigMap(&'a str),
    Secret(&'a str),
}

impl KeySource<'_> {
    /// The object's keys (a ConfigMap's `data` and `binaryData`, a Secret's `data`); `None`
    /// when it is absent and `optional`.
    async fn keys(
        self,
        client: &Client,
        ns: &str,
        optional: bool,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        let found = match self {
            KeySource::ConfigMap(name) => Api::<ConfigMap>::namespaced(client.clone(), ns)
                .get_opt(name)
                .await
                .map(|cm| {
                    cm.map(|cm| {
                        let mut data: BTreeMap<String, Vec<u8>> = cm
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.into_bytes()))
                            .collect();
                        data.extend(
                            cm.binary_data
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(k, v)| (k, v.0)),
                        );
                        data
                    })
                }),
            // The API server keeps no `stringData`: it merges it into `data` on write.
            KeySource::Secret(name) => Api::<Secret>::namespaced(client.clone(), ns)
                .get_opt(name)
                .await
                .map(|s| {
                    s.map(|s| {
                        s.data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0))
                            .collect()
                    })
                }),
        };
        match found {
            Ok(Some(data)) => Ok(Some(data)),
            Ok(None) if optional => Ok(None),
            Ok(None) => Err(format!("{self} not found")),
            Err(e) => Err(format!("{self}: {e}")),
        }
    }

    /// Adds its keys as files to `out`: all of them, or the listed `items` (a listed key that
    /// is missing fails unless `optional`).
    async fn add(
        self,
        client: &Client,
        ns: &str,
        items: Option<&Vec<KeyToPath>>,
        optional: bool,
        mode: u32,
        out: &mut Payload,
    ) -> Result<(), String> {
        let Some(data) = self.keys(client, ns, optional).await? else {
            return Ok(());
        };
        let Some(items) = items else {
            out.extend(data.into_iter().map(|(k, v)| (k, (v, mode))));
            return Ok(());
        };
        for it in items {
            match data.get(&it.key) {
                Some(v) => {
                    out.insert(it.path.clone(), (v.clone(), mode_of(it.mode, mode)));
                }
                None if optional => {}
                None => {
                    return Err(format!(
                        "configuration of {self}: key {:?} does not exist",
                        it.key
                    ));
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for KeySource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::ConfigMap(n) => write!(f, "configmap {n:?}"),
            KeySource::Secret(n) => write!(f, "secret {n:?}"),
        }
    }
}

/// `key="value"` lines, sorted, as the downward API writes labels and annotations.
fn key_values(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={}\n", serde_json::Value::String(v.clone())))
        .collect()
}

fn downward_files(
    pod: &Pod,
    rt: &crate::env::Runtime,
    items: &[DownwardAPIVolumeFile],
    mode: u32,
    out: &mut Payload,
) -> Result<(), String> {
    for it in items {
        let value = if let Some(f) = &it.field_ref {
            match f.field_path.as_str() {
                "metadata.labels" => key_values(pod.labels()),
                "metadata.annotations" => key_values(pod.annotations()),
                p => crate::env::field(pod, rt, p)?,
            }
        } else if let Some(r) = &it.resource_field_ref {
            crate::env::resource_field(pod, rt, r, None)?
        } else {
            return Err(format!("downward API file {:?} has no source", it.path));
        };
        out.insert(
            it.path.clone(),
            (value.into_bytes(), mode_of(it.mode, mode)),
        );
    }
    Ok(())
}

/// The payload of a configMap, secret, downwardAPI or projected volume; `None` for other kinds.
async fn payload(
    client: &Client,
    pod: &Pod,
    rt: &crate::env::Runtime,
    v: &Volume,
) -> Result<Option<Payload>, String> {
    let ns = pod.namespace().unwrap_or_default();
    let mut out = Payload::new();
    if let Some(cm) = &v.config_map {
        let mode = mode_of(cm.default_mode, DEFAULT_MODE);
        KeySource::ConfigMap(&cm.name)
            .add(
                client,
                &ns,
                cm.items.as_ref(),
                cm.optional == Some(true),
                mode,
                &mut out,
            )
            .await?;
    } else if let Some(sv) = &v.secret {
        let mode = mode_of(sv.default_mode, DEFAULT_MODE);
        let name = sv.secret_name.as_deref().unwrap_or_default();
        KeySource::Secret(name)
            .add(
                client,
                &ns,
                sv.items.as_ref(),
                sv.optional == Some(true),
                mode,
                &mut out,
            )
            .await?;
    } else if let Some(d) = &v.downward_api {
        let mode = mode_of(d.default_mode, DEFAULT_MODE);
        downward_files(pod, rt, d.items.as_deref().unwrap_or(&[]), mode, &mut out)?;
    } else if let Some(p) = &v.projected {
        let mode = mode_of(p.default_mode, DEFAULT_MODE);
        for src in p.sources.as_deref().unwrap_or(&[]) {
            if let Some(cm) = &src.config_map {
                KeySource::ConfigMap(&cm.name)
                    .add(
                        client,
                        &ns,
                        cm.items.as_ref(),
                        cm.optional == Some(true),
                        mode,
                        &mut out,
                    )
                    .await?;
            } else if let Some(sp) = &src.secret {
                KeySource::Secret(&sp.name)
                    .add(
                        client,
                        &ns,
                        sp.items.as_ref(),
                        sp.optional == Some(true),
                        mode,
                        &mut out,
                    )
                    .await?;
            } else if let Some(d) = &src.downward_api {
                downward_files(pod, rt, d.items.as_deref().unwrap_or(&[]), mode, &mut out)?;
            } else if src.service_account_token.is_some() {
                return Err(
                    "serviceAccountToken projections are not supported yet (skiff issues no \
                     service account tokens)"
                        .into(),
                );
            } else {
                return Err("unsupported projected volume source".into());
            }
        }
    } else {
        return Ok(None);
    }
    Ok(Some(out))
}

fn host_path(path: &str, ty: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::FileTypeExt;
    let p = PathBuf::from(path);
    let meta = std::fs::metadata(&p);
    let fail = |what: &str| Err(format!("hostPath type check failed: {path} is not {what}"));
    match ty {
        "" => {}
        "DirectoryOrCreate" => {
            if meta.is_err() {
                std::fs::create_dir_all(&p).map_err(|e| format!("create {path}: {e}"))?;
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
            } else if !meta.as_ref().is_ok_and(|m| m.is_dir()) {
                return fail("a directory");
            }
        }
        "Directory" if !meta.as_ref().is_ok_and(|m| m.is_dir()) => return fail("a directory"),
        "FileOrCreate" => {
            if meta.is_err() {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&p)
                    .map_err(|e| format!("create {path}: {e}"))?;
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644));
            } else if !meta.as_ref().is_ok_and(|m| m.is_file()) {
                return fail("a file");
            }
        }
        "File" if !meta.as_ref().is_ok_and(|m| m.is_file()) => return fail("a file"),
        "Socket" if !meta.as_ref().is_ok_and(|m| m.file_type().is_socket()) => {
            return fail("a socket file");
        }
        "CharDevice" if !meta.as_ref().is_ok_and(|m| m.file_type().is_char_device()) => {
            return fail("a character device");
        }
        "BlockDevice" if !meta.as_ref().is_ok_and(|m| m.file_type().is_block_device()) => {
            return fail("a block device");
        }
        "Directory" | "File" | "Socket" | "CharDevice" | "BlockDevice" => {}
        other => return Err(format!("unsupported hostPath type {other:?}")),
    }
    Ok(p)
}

/// Quantity of bytes for a tmpfs `size=` option (`sizeLimit`), when set.
fn tmpfs_size(
    limit: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
) -> Option<u64> {
    limit
        .and_then(|q| crate::quantity::parse(&q.0).ok())
        .and_then(|v| {
            let b = v.ceil();
            (b >= 1.0).then_some(b as u64)
        })
}

/// The pod's `/etc/hosts`, as the kubelet writes it.
pub fn hosts_file(pod: &Pod, ip: &str) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    let host = hostname(pod);
    let spec = pod.spec.as_ref();
    match spec
        .and_then(|s| s.subdomain.clone())
        .filter(|d| !d.is_empty())
    {
        Some(sub) => s.push_str(&format!(
            "{ip}\t{host}.{sub}.{}.svc.{CLUSTER_DOMAIN}\t{host}\n",
            pod.namespace().unwrap_or_default()
        )),
        None => s.push_str(&format!("{ip}\t{host}\n")),
    }
    let aliases = spec
        .and_then(|s| s.host_aliases.clone())
        .unwrap_or_default();
    if !aliases.is_empty() {
        s.push_str("\n# Entries added by HostAliases.\n");
        for a in aliases {
            s.push_str(&format!(
                "{}\t{}\n",
                a.ip,
                a.hostnames.unwrap_or_default().join("\t")
            ));
        }
    }
    s
}

/// The pod's hostname: `spec.hostname`, else its name (at most 63 characters).
pub fn hostname(pod: &Pod) -> String {
    let h = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| pod.name_any());
    h.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches(['-', '.'])
        .to_string()
}

/// The node's resolver configuration for pods: `/etc/resolv.conf`, or systemd-resolved's
/// upstream list when that names only its loopback stub (unreachable from a pod).
pub fn node_resolv_conf() -> String {
    let etc = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let stub_only = etc
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .all(|ns| ns.trim().starts_with("127."));
    if stub_only && let Ok(up) = std::fs::read_to_string("/run/systemd/resolve/resolv.conf") {
        return up;
    }
    etc
}

/// The pod's `/etc/resolv.conf` from the node's, the pod's `dnsPolicy`/`dnsConfig` and the
/// cluster DNS address, as the kubelet writes it: `ClusterFirst` (the default) points at the
/// cluster DNS with the search path `<ns>.svc.<domain> svc.<domain> <domain>` (then the
/// node's) and `ndots:5` — or resolves as `Default` for host-network pods (unless
/// `ClusterFirstWithHostNet`) and when no cluster DNS is configured; `Default` is the node's
/// configuration; `None` only the pod's `dnsConfig`. Host-network pods do not pass the pod
/// programs that translate the cluster DNS Service, so `ClusterFirstWithHostNet` names the
/// node's own DNS server (`host_dns`, when the agent runs one) instead.
pub fn resolv_conf(
    pod: &Pod,
    node: &str,
    cluster_dns: Option<&str>,
    host_dns: Option<&str>,
) -> String {
    let spec = pod.spec.as_ref();
    let policy = spec
        .and_then(|s| s.dns_policy.clone())
        .unwrap_or_else(|| "ClusterFirst".into());
    let host_network = spec.and_then(|s| s.host_network) == Some(true);
    let cluster = match policy.as_str() {
        "ClusterFirstWithHostNet" if host_network => host_dns.or(cluster_dns),
        "ClusterFirstWithHostNet" => cluster_dns,
        "ClusterFirst" if !host_network => cluster_dns,
        _ => None,
    };
    let (mut servers, mut searches, mut options) = (Vec::new(), Vec::new(), Vec::new());
    if policy != "None" {
        for line in node.lines() {
            let mut w = line.split_whitespace();
            match w.next() {
                Some("nameserver") => servers.extend(w.map(str::to_string)),
                Some("search" | "domain") => searches.extend(w.map(str::to_string)),
                Some("options") => options.extend(w.map(str::to_string)),
                _ => {}
            }
        }
    }
    if let Some(dns) = cluster {
        let ns = pod.namespace().unwrap_or_else(|| "default".into());
        servers = vec![dns.to_string()];
        let mut s = vec![
            format!("{ns}.svc.{CLUSTER_DOMAIN}"),
            format!("svc.{CLUSTER_DOMAIN}"),
            CLUSTER_DOMAIN.to_string(),
        ];
        s.append(&mut searches);
        searches = s;
        options = vec!["ndots:5".to_string()];
    }
    if let Some(c) = spec.and_then(|s| s.dns_config.clone()) {
        servers.extend(c.nameservers.unwrap_or_default());
        searches.extend(c.searches.unwrap_or_default());
        for o in c.options.unwrap_or_default() {
            let Some(name) = o.name else { continue };
            options.retain(|x: &String| x.split(':').next() != Some(name.as_str()));
            options.push(match o.value {
                Some(v) => format!("{name}:{v}"),
                None => name,
            });
        }
    }
    let mut seen = BTreeSet::new();
    servers.retain(|s| seen.insert(s.clone()));
    servers.truncate(3);
    let mut seen = BTreeSet::new();
    searches.retain(|s| seen.insert(s.clone()));
    searches.truncate(32);
    let mut out = String::new();
    if !searches.is_empty() {
        out.push_str(&format!("search {}\n", searches.join(" ")));
    }
    for s in servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

/// Prepares the pod's volumes and `/etc` files under `root`; an error is the user-facing
/// reason (the pod stays `ContainerCreating` and this is retried).
pub async fn prepare(
    client: &Client,
    pod: &Pod,
    rt: &crate::env::Runtime,
    root: &Path,
) -> Result<PodVolumes, String> {
    let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    let vol_dir = root.join("volumes");
    std::fs::create_dir_all(&vol_dir).map_err(|e| io(&vol_dir, e))?;
    let mut out = PodVolumes::default();
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
    {
        let failed = |e: String| format!("MountVolume.SetUp failed for volume {:?}: {e}", v.name);
        let dir = vol_dir.join(&v.name);
        if let Some(h) = &v.host_path {
            let p = host_path(&h.path, h.type_.as_deref().unwrap_or("")).map_err(failed)?;
            out.volumes.insert(v.name.clone(), (p, false));
        } else if let Some(e) = &v.empty_dir {
            std::fs::create_dir_all(&dir).map_err(|e| failed(io(&dir, e)))?;
            if e.medium.as_deref() == Some("Memory") && !is_mountpoint(&dir) {
                let opts = tmpfs_size(e.size_limit.as_ref())
                    .map(|b| format!("size={b},mode=0777"))
                    .unwrap_or_else(|| "mode=0777".into());
                nix::mount::mount(
                    Some("tmpfs"),
                    &dir,
                    Some("tmpfs"),
                    nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                    Some(opts.as_str()),
                )
                .map_err(|e| failed(format!("mount a tmpfs on {}: {e}", dir.display())))?;
            } else {
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
            }
            out.volumes.insert(v.name.clone(), (dir, false));
        } else {
            match payload(client, pod, rt, &v).await.map_err(failed)? {
                Some(files) => {
                    atomic_write(&dir, &files).map_err(|e| failed(io(&dir, e)))?;
                    out.volumes.insert(v.name.clone(), (dir, true));
                }
                None => {
                    return Err(failed(
                        "this volume type is not supported by skiff yet (emptyDir, hostPath, \
                         configMap, secret, downwardAPI and projected are)"
                            .into(),
                    ));
                }
            }
        }
    }
    let ip = rt.pod_ip.as_str();
    for (name, content, target) in [
        ("hosts", hosts_file(pod, ip), "/etc/hosts"),
        ("hostname", format!("{}\n", hostname(pod)), "/etc/hostname"),
        (
            "resolv.conf",
            resolv_conf(
                pod,
                &node_resolv_conf(),
                rt.cluster_dns.as_deref(),
                rt.host_dns.as_deref(),
            ),
            "/etc/resolv.conf",
        ),
    ] {
        let p = root.join(name);
        std::fs::write(&p, content).map_err(|e| io(&p, e))?;
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644));
        out.etc.push((p, target));
    }
    Ok(out)
}

/// The files under `dir`'s current payload (`..data`), by relative path.
fn current_payload(dir: &Path) -> Payload {
    fn walk(base: &Path, at: &Path, out: &mut Payload) {
        let Ok(entries) = std::fs::read_dir(at) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            if path.is_dir() {
                walk(base, &path, out);
            } else if let (Ok(data), Ok(meta), Ok(rel)) = (
                std::fs::read(&path),
                std::fs::metadata(&path),
                path.strip_prefix(base),
            ) {
                out.insert(
                    rel.display().to_string(),
                    (data, meta.permissions().mode() & 0o7777),
                );
            }
        }
    }
    let data = dir.join("..data");
    let mut out = Payload::new();
    walk(&data, &data, &mut out);
    out
}

/// Brings the pod's configMap, secret, downwardAPI and projected volumes up to date (a changed
/// ConfigMap or Secret, new labels), swapping each changed payload at once as the kubelet's
/// sync does; returns the names of the volumes it rewrote. `subPath` mounts keep what they
/// had (as upstream: they bind one file, not the payload's symlinks).
pub async fn refresh(
    client: &Client,
    pod: &Pod,
    rt: &crate::env::Runtime,
    root: &Path,
) -> Vec<String> {
    let mut changed = Vec::new();
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
    {
        let Ok(Some(files)) = payload(client, pod, rt, &v).await else {
            continue;
        };
        let dir = root.join("volumes").join(&v.name);
        if current_payload(&dir) == files {
            continue;
        }
        match atomic_write(&dir, &files) {
            Ok(()) => changed.push(v.name.clone()),
            Err(e) => tracing::warn!(volume = %v.name, error = %e, "updating a volume failed"),
        }
    }
    changed
}

fn is_mountpoint(dir: &Path) -> bool {
    mounts_under(dir).iter().any(|m| m == dir)
}

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Unmounts what was mounted under the pod's `root` and removes it.
pub fn teardown(root: &Path) {
    for m in mounts_under(root) {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %m.display(), error = %e, "unmounting a pod volume failed");
        }
    }
    if let Err(e) = std::fs::remove_dir_all(root)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %root.display(), error = %e, "removing a pod's state failed");
    }
}

impl PodVolumes {
    /// The bind mounts of container `c`: its volume mounts, then the `/etc` files it does not
    /// mount itself.
    pub fn mounts(&self, c: &Container) -> Result<Vec<Mount>, String> {
        let mut out = Vec::new();
        for m in c.volume_mounts.as_deref().unwrap_or(&[]) {
            let (src, always_ro) = self.volumes.get(&m.name).ok_or_else(|| {
                format!(
                    "volume {:?} of mount {:?} is not defined",
                    m.name, m.mount_path
                )
            })?;
            let mut source = src.clone();
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                source = source.join(relative(sub)?);
                if !*always_ro && std::fs::symlink_metadata(&source).is_err() {
                    std::fs::create_dir_all(&source)
                        .map_err(|e| format!("create subPath {}: {e}", source.display()))?;
                }
            }
            out.push(Mount {
                source,
                destination: m.mount_path.clone(),
                readonly: *always_ro || m.read_only == Some(true),
            });
        }
        for (src, target) in &self.etc {
            if !out.iter().any(|m| m.destination == *target) {
                out.push(Mount {
                    source: src.clone(),
                    destination: (*target).to_string(),
                    readonly: false,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writer_layout_and_swap() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("v");
        let mut files = Payload::new();
        files.insert("a".into(), (b"1".to_vec(), 0o644));
        files.insert("sub/b".into(), (b"2".to_vec(), 0o400));
        atomic_write(&dir, &files).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(dir.join("sub/b")).unwrap(), "2");
        assert!(dir.join("a").symlink_metadata().unwrap().is_symlink());
        let mode = std::fs::metadata(dir.join("sub/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        // The new payload replaces the old one entirely.
        let mut files = Payload::new();
        files.insert("c".into(), (b"3".to_vec(), 0o644));
        atomic_write(&dir, &files).unwrap();
        assert!(dir.join("a").symlink_metadata().is_err());
        assert!(dir.join("sub").symlink_metadata().is_err());
        assert_eq!(std::fs::read_to_string(dir.join("c")).unwrap(), "3");
        let stamps = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("..2"))
            .count();
        assert_eq!(stamps, 1);
        let mut bad = Payload::new();
        bad.insert("../escape".into(), (b"x".to_vec(), 0o644));
        assert!(atomic_write(&dir, &bad).is_err());
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn hosts_and_resolv_conf_as_the_kubelet_writes_them() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "web-0", "namespace": "shop"},
            "spec": {"containers": [], "hostname": "web-0", "subdomain": "web",
                     "hostAliases": [{"ip": "10.1.2.3", "hostnames": ["db", "db.local"]}],
                     "dnsConfig": {"searches": ["x.example"], "options": [{"name": "ndots", "value": "2"}]}}
        }));
        let h = hosts_file(&p, "10.244.0.5");
        assert!(h.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"));
        assert!(h.contains("10.244.0.5\tweb-0.web.shop.svc.cluster.local\tweb-0\n"));
        assert!(h.ends_with("# Entries added by HostAliases.\n10.1.2.3\tdb\tdb.local\n"));
        let node = "nameserver 192.0.2.53\nsearch lan\noptions ndots:1 edns0\n";
        // Without cluster DNS, ClusterFirst is the node's configuration.
        assert_eq!(
            resolv_conf(&p, node, None, None),
            "search lan x.example\nnameserver 192.0.2.53\noptions edns0 ndots:2\n"
        );
        // With it: the cluster search path first, ndots:5 unless the pod sets it.
        assert_eq!(
            resolv_conf(&p, node, Some("10.96.0.10"), None),
            "search shop.svc.cluster.local svc.cluster.local cluster.local lan x.example\n\
             nameserver 10.96.0.10\noptions ndots:2\n"
        );
        let plain = pod(serde_json::json!({
            "metadata": {"name": "p", "namespace": "team"}, "spec": {"containers": []}
        }));
        assert_eq!(
            resolv_conf(&plain, node, Some("10.96.0.10"), None),
            "search team.svc.cluster.local svc.cluster.local cluster.local lan\n\
             nameserver 10.96.0.10\noptions ndots:5\n"
        );
        // Host-network pods resolve as the node does, unless ClusterFirstWithHostNet.
        let host = pod(serde_json::json!({
            "metadata": {"name": "h", "namespace": "team"},
            "spec": {"containers": [], "hostNetwork": true}
        }));
        assert_eq!(
            resolv_conf(&host, node, Some("10.96.0.10"), Some("10.0.0.5")),
            "search lan\nnameserver 192.0.2.53\noptions ndots:1 edns0\n"
        );
        let mut with_net = host.clone();
        with_net.spec.as_mut().unwrap().dns_policy = Some("ClusterFirstWithHostNet".into());
        // … at the node's own DNS server (the Service's translation is for pod interfaces).
        assert!(
            resolv_conf(&with_net, node, Some("10.96.0.10"), Some("10.0.0.5"))
                .contains("search team.svc.cluster.local svc.cluster.local cluster.local lan\nnameserver 10.0.0.5\n")
        );
        let none = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [], "dnsPolicy": "None",
                     "dnsConfig": {"nameservers": ["1.1.1.1"]}}
        }));
        assert_eq!(
            resolv_conf(&none, "nameserver 192.0.2.53\n", Some("10.96.0.10"), None),
            "nameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn labels_are_written_as_key_quoted_value_lines() {
        let mut m = BTreeMap::new();
        m.insert("b".to_string(), "two \"2\"".to_string());
        m.insert("a".to_string(), "1".to_string());
        assert_eq!(key_values(&m), "a=\"1\"\nb=\"two \\\"2\\\"\"\n");
    }

    #[test]
    fn host_path_types() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("made");
        assert!(host_path(dir.to_str().unwrap(), "Directory").is_err());
        host_path(dir.to_str().unwrap(), "DirectoryOrCreate").unwrap();
        assert!(dir.is_dir());
        let f = d.path().join("f");
        host_path(f.to_str().unwrap(), "FileOrCreate").unwrap();
        assert!(f.is_file());
        assert!(host_path(f.to_str().unwrap(), "Directory").is_err());
        assert!(host_path(dir.to_str().unwrap(), "File").is_err());
        assert!(host_path("/nonexistent/x", "").is_ok());
    }

    #[test]
    fn paths_must_stay_inside() {
        assert!(relative("a/b").is_ok());
        assert!(relative("../a").is_err());
        assert!(relative("/etc").is_err());
        assert!(relative("").is_err());
    }
}
