//! Where a node's maps live: `<bpffs>/skiff/<node>/<map>`.
//!
//! Pinning is what lets maps outlive the agent (a restart reuses them instead of recreating
//! them, so established flows keep their state) and what lets `bpftool map dump pinned …` read
//! them.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use crate::DatapathError;

/// The conventional bpffs mount point.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// A node's pin directory, `<bpffs>/skiff/<node>`.
#[derive(Clone, Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Returns the pin directory of `node` under `bpffs`, mounting bpffs there first if it is not
    /// mounted yet (as Cilium's agent does) and creating the directory.
    pub fn create(bpffs: &Path, node: &str) -> Result<PinDir, DatapathError> {
        let path = Self::path_for(bpffs, node)?;
        ensure_bpffs(bpffs)?;
        fs::create_dir_all(&path).map_err(|source| DatapathError::Bpffs {
            op: "create pin directory",
            path: path.clone(),
            source,
        })?;
        Ok(PinDir { path })
    }

    /// Returns the pin directory of `node` under `bpffs`, which must exist.
    pub fn open(bpffs: &Path, node: &str) -> Result<PinDir, DatapathError> {
        let path = Self::path_for(bpffs, node)?;
        if !path.is_dir() {
            return Err(DatapathError::Bpffs {
                op: "open pin directory (is skiff-node running with this --node-name?)",
                path,
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        Ok(PinDir { path })
    }

    fn path_for(bpffs: &Path, node: &str) -> Result<PathBuf, DatapathError> {
        let valid = !node.is_empty()
            && node.len() <= 253
            && node
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && node != "."
            && node != "..";
        if !valid {
            return Err(DatapathError::Bpffs {
                op: "node name must be a DNS-1123 subdomain for its pin directory",
                path: bpffs.join("skiff").join(node),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        Ok(bpffs.join("skiff").join(node))
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pin path of map `name`.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Opens the pinned map `name` as the aya map type `T` (which checks its kind and sizes).
    pub fn open_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
        &self,
        name: &str,
    ) -> Result<T, DatapathError> {
        let path = self.map_path(name);
        let map_err = |op| {
            let map = path.display().to_string();
            move |source| DatapathError::Map {
                op,
                map,
                source: Box::new(source),
            }
        };
        let data = aya::maps::MapData::from_pin(&path).map_err(map_err("open pinned"))?;
        let map = aya::maps::Map::from_map_data(data).map_err(map_err("open pinned"))?;
        T::try_from(map).map_err(map_err("check layout of"))
    }

    /// Unpins everything in the directory and removes it (and `skiff/` when it is left empty).
    /// Maps stay alive while a loaded program still uses them.
    pub fn remove(self) -> Result<(), DatapathError> {
        let err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| DatapathError::Bpffs { op, path, source }
        };
        let entries = match fs::read_dir(&self.path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(err("read pin directory", &self.path)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(err("read pin directory", &self.path))?;
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                // `links/`: pinned program links.
                fs::remove_dir_all(&path).map_err(err("unpin", &path))?;
            } else {
                fs::remove_file(&path).map_err(err("unpin", &path))?;
            }
        }
        fs::remove_dir(&self.path).map_err(err("remove pin directory", &self.path))?;
        if let Some(parent) = self.path.parent() {
            // Only succeeds when no other node's directory is left in it.
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }
}

/// Mounts bpffs at `path` unless one is already mounted there.
pub fn ensure_bpffs(path: &Path) -> Result<(), DatapathError> {
    let fs_err = |op| {
        let path = path.to_path_buf();
        move |source| DatapathError::Bpffs { op, path, source }
    };
    fs::create_dir_all(path).map_err(fs_err("create bpffs mount point"))?;
    let st = statfs(path).map_err(|e| fs_err("statfs")(io::Error::from(e)))?;
    if st.filesystem_type() == BPF_FS_MAGIC {
        return Ok(());
    }
    tracing::info!(path = %path.display(), "mounting bpffs");
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| fs_err("mount bpffs")(io::Error::from(e)))
}
