//! Images: import from an OCI image-layout archive (`index.json`, `blobs/sha256/…`) into
//! containerd's content store, record the image, and unpack its layers into overlayfs
//! snapshots named by their chain IDs, with the garbage-collection labels containerd uses to
//! keep referenced content and snapshots alive.

use std::{collections::HashMap, io::Read, path::Path};

use anyhow::{Context, Result, bail};
use containerd_client::{
    services::v1::{
        ApplyRequest, CreateImageRequest, GetImageRequest, Image, ReadContentRequest,
        UpdateImageRequest, WriteAction, WriteContentRequest,
        content_client::ContentClient,
        diff_client::DiffClient,
        images_client::ImagesClient,
        snapshots::{
            CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
            StatSnapshotRequest, snapshots_client::SnapshotsClient,
        },
    },
    tonic::{Code, Request, transport::Channel},
    types::Descriptor,
    with_namespace,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::containerd::{NAMESPACE, create_lease, delete_lease, req};

/// The snapshotter skiff unpacks into.
pub const SNAPSHOTTER: &str = "overlayfs";

/// What running a container from an image needs.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// Its name (`busybox:1.36`).
    pub name: String,
    /// Digest of its manifest (the image ID a pod's status reports).
    pub digest: String,
    /// Chain ID of its top layer: the parent of each container's snapshot.
    pub chain_id: String,
    /// `config` of the image configuration (Entrypoint, Cmd, Env, WorkingDir, User).
    pub config: Value,
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Chain IDs of layers with these diff IDs (OCI image spec: `ChainID(L₀…Lₙ) =
/// sha256(ChainID(L₀…Lₙ₋₁) + " " + DiffID(Lₙ))`).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The files of an OCI layout archive.
fn read_archive(path: &Path) -> Result<HashMap<String, Vec<u8>>> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut ar = tar::Archive::new(f);
    let mut files = HashMap::new();
    for entry in ar
        .entries()
        .with_context(|| format!("read {}", path.display()))?
    {
        let mut e = entry.with_context(|| format!("read {}", path.display()))?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let name = e
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        files.insert(name, data);
    }
    Ok(files)
}

fn blob<'a>(files: &'a HashMap<String, Vec<u8>>, digest: &str) -> Result<&'a [u8]> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unsupported digest {digest}"))?;
    let data = files
        .get(&format!("blobs/sha256/{hex}"))
        .with_context(|| format!("the archive lacks blob {digest}"))?;
    if sha256(data) != digest {
        bail!("blob {digest} does not match its digest");
    }
    Ok(data)
}

fn descriptor(v: &Value) -> Result<Descriptor> {
    Ok(Descriptor {
        media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
        digest: v["digest"]
            .as_str()
            .context("descriptor without digest")?
            .to_string(),
        size: v["size"].as_i64().context("descriptor without size")?,
        ..Default::default()
    })
}

/// Writes one blob into the content store (a no-op if it is there).
async fn write_blob(
    ch: &Channel,
    lease: &str,
    digest: &str,
    data: &[u8],
    labels: HashMap<String, String>,
) -> Result<()> {
    let msg = WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: format!("skiff-import-{digest}"),
        total: data.len() as i64,
        expected: digest.to_string(),
        offset: 0,
        data: data.to_vec(),
        labels,
    };
    let stream = futures::stream::iter([msg]);
    let resp = ContentClient::new(ch.clone())
        .write(req(stream, lease))
        .await;
    match resp {
        Ok(mut s) => {
            while s
                .get_mut()
                .message()
                .await
                .with_context(|| format!("write {digest}"))?
                .is_some()
            {}
            Ok(())
        }
        Err(e) if e.code() == Code::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("write blob {digest}")),
    }
}

async fn snapshot_exists(ch: &Channel, key: &str) -> Result<bool> {
    let req = StatSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
    };
    match SnapshotsClient::new(ch.clone())
        .stat(with_namespace!(req, NAMESPACE))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Code::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("stat snapshot {key}")),
    }
}

/// Imports the OCI layout archive at `path` as image `name`, and unpacks it.
pub async fn import_oci_archive(ch: &Channel, path: &Path, name: &str) -> Result<ImageInfo> {
    let files = read_archive(path)?;
    import_layout(ch, &files, &path.display().to_string(), name).await
}

/// Imports the files of an OCI layout (`index.json` naming one manifest, `blobs/sha256/…`)
/// from `origin` (for messages) as image `name`.
pub(crate) async fn import_layout(
    ch: &Channel,
    files: &HashMap<String, Vec<u8>>,
    origin: &str,
    name: &str,
) -> Result<ImageInfo> {
    let lease = create_lease(ch).await?;
    let r = import_under_lease(ch, files, origin, name, &lease).await;
    delete_lease(ch, &lease).await;
    r
}

/// The image `name` as containerd already has it (e.g. pulled by an earlier run of the agent),
/// if its manifest, configuration and unpacked layers are all there.
pub async fn local(ch: &Channel, name: &str) -> Result<Option<ImageInfo>> {
    let image = match ImagesClient::new(ch.clone())
        .get(with_namespace!(
            GetImageRequest { name: name.into() },
            NAMESPACE
        ))
        .await
    {
        Ok(r) => r.into_inner().image,
        Err(e) if e.code() == Code::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("look up image {name}")),
    };
    let Some(target) = image.and_then(|i| i.target) else {
        return Ok(None);
    };
    let read = |digest: String| async move {
        let mut stream = ContentClient::new(ch.clone())
            .read(with_namespace!(
                ReadContentRequest {
                    digest,
                    ..Default::default()
                },
                NAMESPACE
            ))
            .await?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            data.extend(chunk.data);
        }
        Ok::<_, containerd_client::tonic::Status>(data)
    };
    let Ok(manifest) = read(target.digest.clone()).await else {
        return Ok(None);
    };
    let manifest: Value = serde_json::from_slice(&manifest).context("manifest")?;
    let Some(config_digest) = manifest["config"]["digest"].as_str() else {
        return Ok(None);
    };
    let Ok(config) = read(config_digest.to_string()).await else {
        return Ok(None);
    };
    let config: Value = serde_json::from_slice(&config).context("image config")?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let Some(top) = chain_ids(&diff_ids).pop() else {
        return Ok(None);
    };
    if !snapshot_exists(ch, &top).await? {
        return Ok(None);
    }
    Ok(Some(ImageInfo {
        name: name.to_string(),
        digest: target.digest,
        chain_id: top,
        config: config["config"].clone(),
    }))
}

async fn import_under_lease(
    ch: &Channel,
    files: &HashMap<String, Vec<u8>>,
    origin: &str,
    name: &str,
    lease: &str,
) -> Result<ImageInfo> {
    let index: Value = serde_json::from_slice(
        files
            .get("index.json")
            .with_context(|| format!("{origin} is not an OCI layout: no index.json"))?,
    )
    .context("index.json")?;
    let manifest_desc = index["manifests"]
        .get(0)
        .cloned()
        .with_context(|| format!("{origin}: index.json lists no manifest"))?;
    let mdesc = descriptor(&manifest_desc)?;
    let manifest_bytes = blob(files, &mdesc.digest)?;
    let manifest: Value = serde_json::from_slice(manifest_bytes).context("manifest")?;
    let cdesc = descriptor(&manifest["config"])?;
    let config_bytes = blob(files, &cdesc.digest)?;
    let config: Value = serde_json::from_slice(config_bytes).context("image config")?;
    let layers: Vec<Descriptor> = manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(descriptor)
        .collect::<Result<_>>()?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .context("config without rootfs.diff_ids")?
        .iter()
        .filter_map(|d| d.as_str().map(str::to_string))
        .collect();
    if diff_ids.len() != layers.len() {
        bail!(
            "the image has {} layers but {} diff IDs",
            layers.len(),
            diff_ids.len()
        );
    }
    let chains = chain_ids(&diff_ids);
    let top = chains.last().cloned().context("an image without layers")?;

    // Layers and config first, the manifest last, with the labels that keep them referenced.
    for l in &layers {
        write_blob(
            ch,
            lease,
            &l.digest,
            blob(files, &l.digest)?,
            HashMap::new(),
        )
        .await?;
    }
    let config_labels = HashMap::from([(
        format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
        top.clone(),
    )]);
    write_blob(ch, lease, &cdesc.digest, config_bytes, config_labels).await?;
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        cdesc.digest.clone(),
    )]);
    for (i, l) in layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    write_blob(ch, lease, &mdesc.digest, manifest_bytes, manifest_labels).await?;

    // The image record.
    let image = Image {
        name: name.to_string(),
        target: Some(mdesc.clone()),
        ..Default::default()
    };
    let mut images = ImagesClient::new(ch.clone());
    let exists = images
        .get(with_namespace!(
            GetImageRequest { name: name.into() },
            NAMESPACE
        ))
        .await
        .is_ok();
    if exists {
        images
            .update(with_namespace!(
                UpdateImageRequest {
                    image: Some(image),
                    ..Default::default()
                },
                NAMESPACE
            ))
            .await
            .with_context(|| format!("update image {name}"))?;
    } else {
        images
            .create(req(
                CreateImageRequest {
                    image: Some(image),
                    ..Default::default()
                },
                lease,
            ))
            .await
            .with_context(|| format!("create image {name}"))?;
    }

    // Unpack: one committed snapshot per layer, named by chain ID.
    for (i, layer) in layers.iter().enumerate() {
        if snapshot_exists(ch, &chains[i]).await? {
            continue;
        }
        let key = format!("skiff-extract-{}-{}", std::process::id(), &chains[i][7..19]);
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let mut snaps = SnapshotsClient::new(ch.clone());
        let mounts = snaps
            .prepare(req(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.clone(),
                    parent,
                    ..Default::default()
                },
                lease,
            ))
            .await
            .with_context(|| format!("prepare snapshot for layer {}", layer.digest))?
            .into_inner()
            .mounts;
        let applied = DiffClient::new(ch.clone())
            .apply(req(
                ApplyRequest {
                    diff: Some(layer.clone()),
                    mounts,
                    ..Default::default()
                },
                lease,
            ))
            .await;
        if let Err(e) = applied {
            let _ = snaps
                .remove(with_namespace!(
                    RemoveSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: key.clone(),
                    },
                    NAMESPACE
                ))
                .await;
            return Err(e).with_context(|| format!("apply layer {}", layer.digest));
        }
        snaps
            .commit(req(
                CommitSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    name: chains[i].clone(),
                    key,
                    ..Default::default()
                },
                lease,
            ))
            .await
            .with_context(|| format!("commit snapshot {}", chains[i]))?;
    }
    tracing::info!(image = name, digest = %mdesc.digest, "imported and unpacked");
    Ok(ImageInfo {
        name: name.to_string(),
        digest: mdesc.digest,
        chain_id: top,
        config: config["config"].clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_formula() {
        let ids = chain_ids(&["sha256:a".into(), "sha256:b".into()]);
        assert_eq!(ids[0], "sha256:a");
        assert_eq!(ids[1], sha256(b"sha256:a sha256:b"));
    }
}
