//! Building a small OCI image-layout archive from a static binary (Debian's `busybox-static`):
//! the test and demo image, since no registry is reachable. One uncompressed layer with
//! `/bin/busybox`, a symlink per common applet, `/etc/passwd` and `/etc/group`; image types from
//! `oci-spec`.

use std::{io::Write, path::Path, str::FromStr};

use anyhow::{Context, Result};
use oci_spec::image::{
    ConfigBuilder, Descriptor, Digest, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};

/// Applets linked in `/bin` (what tests and the demo use, and what a shell user expects).
#[rustfmt::skip]
const APPLETS: &[&str] = &[
    "sh", "ash", "ls", "cat", "echo", "sleep", "httpd", "wget", "true", "false", "env", "hostname",
    "ip", "ps", "id", "nc", "mkdir", "rm", "kill", "seq", "head", "tail", "grep", "date", "test",
    "[", "printf", "wc", "stat", "dd", "yes", "uname", "pwd", "touch", "ln", "cp", "mv", "chmod",
    "sync", "which", "nslookup", "ping", "tee", "sort", "uniq", "cut", "tr", "sed", "awk",
    "timeout", "mount", "df", "du", "find", "xargs", "expr", "basename", "dirname", "readlink",
    "free", "top", "vi", "less", "watch", "ifconfig", "route", "netstat", "tar", "gzip", "gunzip",
    "zcat", "md5sum", "sha256sum", "base64", "od", "tty", "stty", "clear", "reset", "mktemp",
    "rmdir", "whoami", "nproc", "uptime", "pidof", "killall", "diff", "more", "mkfifo", "tac",
];

fn digest_of(data: &[u8]) -> Result<Digest> {
    Digest::from_str(&format!("sha256:{}", hex::encode(Sha256::digest(data))))
        .context("sha256 digest")
}

fn header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    let _ = h.set_path(path);
    h
}

/// The layer tar: directories, busybox, its applet links, passwd and group.
fn layer(busybox: &[u8]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (dir, mode) in [
        ("bin/", 0o755),
        ("etc/", 0o755),
        ("dev/", 0o755),
        ("proc/", 0o555),
        ("sys/", 0o555),
        ("root/", 0o700),
        ("tmp/", 0o1777),
        ("var/", 0o755),
        ("var/www/", 0o755),
    ] {
        let mut h = header(dir, 0, mode, tar::EntryType::Directory);
        h.set_cksum();
        b.append(&h, std::io::empty())?;
    }
    let mut h = header(
        "bin/busybox",
        busybox.len() as u64,
        0o755,
        tar::EntryType::Regular,
    );
    h.set_cksum();
    b.append(&h, busybox)?;
    let mut seen = Vec::new();
    for a in APPLETS {
        if seen.contains(a) {
            continue;
        }
        seen.push(*a);
        let mut h = header(&format!("bin/{a}"), 0, 0o777, tar::EntryType::Symlink);
        h.set_link_name("busybox")?;
        h.set_cksum();
        b.append(&h, std::io::empty())?;
    }
    for (path, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnobody:x:65534:\n"),
        ("var/www/index.html", "hello from skiff\n"),
    ] {
        let mut h = header(path, text.len() as u64, 0o644, tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, text.as_bytes())?;
    }
    Ok(b.into_inner()?)
}

/// The image name an OCI layout archive carries (`org.opencontainers.image.ref.name` of its
/// first manifest).
pub fn ref_name(archive: &Path) -> Result<String> {
    let f = std::fs::File::open(archive).with_context(|| format!("open {}", archive.display()))?;
    let mut ar = tar::Archive::new(f);
    for entry in ar.entries()? {
        let mut e = entry?;
        if e.path()?.to_string_lossy().trim_start_matches("./") == "index.json" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text)?;
            let index: serde_json::Value = serde_json::from_str(&text).context("index.json")?;
            return index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("{}: the manifest has no ref name", archive.display()));
        }
    }
    anyhow::bail!("{} has no index.json", archive.display())
}

/// Writes an OCI image-layout archive for image `name` built from `busybox` (a static binary)
/// to `out`.
pub fn build_busybox_archive(busybox: &Path, name: &str, out: &Path) -> Result<()> {
    let bin = std::fs::read(busybox).with_context(|| format!("read {}", busybox.display()))?;
    let layer = layer(&bin)?;
    let layer_digest = digest_of(&layer)?;
    let config = ImageConfigurationBuilder::default()
        .architecture(crate::arch())
        .os("linux")
        .config(
            ConfigBuilder::default()
                .env(vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
                ])
                .cmd(vec!["sh".to_string()])
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![layer_digest.to_string()])
                .build()?,
        )
        .build()?;
    let config_bytes = config.to_string()?.into_bytes();
    let config_desc = Descriptor::new(
        MediaType::ImageConfig,
        config_bytes.len() as u64,
        digest_of(&config_bytes)?,
    );
    let layer_desc = Descriptor::new(MediaType::ImageLayer, layer.len() as u64, layer_digest);
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(vec![layer_desc])
        .build()?;
    let manifest_bytes = manifest.to_string()?.into_bytes();
    let mut manifest_desc = Descriptor::new(
        MediaType::ImageManifest,
        manifest_bytes.len() as u64,
        digest_of(&manifest_bytes)?,
    );
    manifest_desc.set_annotations(Some(
        [(
            "org.opencontainers.image.ref.name".to_string(),
            name.to_string(),
        )]
        .into(),
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()?;
    let index_bytes = index.to_string()?.into_bytes();

    let mut ar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| -> Result<()> {
        let mut h = header(path, data.len() as u64, 0o644, tar::EntryType::Regular);
        h.set_cksum();
        ar.append(&h, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index_bytes)?;
    for data in [&layer, &config_bytes, &manifest_bytes] {
        let d = digest_of(data)?;
        add(&format!("blobs/sha256/{}", d.digest()), data)?;
    }
    let bytes = ar.into_inner()?;
    let tmp = out.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, out).with_context(|| format!("write {}", out.display()))?;
    Ok(())
}
