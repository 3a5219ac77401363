//! Pod IP allocation from the node's pod CIDR, durable across agent restarts.
//!
//! One file per allocated address under `<dir>/<cidr>/`, named by the address and holding its
//! owner (the pod uid). Allocation creates the file with `O_EXCL`, so an address can never be
//! handed out twice, even by two agents racing on one directory; the file and the directory are
//! fsynced before the address is used. The network and broadcast addresses and `.1` (kept for
//! the node) are never handed out.

use std::{
    collections::HashSet,
    fs,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use crate::NetError;

/// Allocations in one pod CIDR.
#[derive(Debug)]
pub struct Ipam {
    dir: PathBuf,
    base: u32,
    prefix: u8,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NetError {
    let target = path.display().to_string();
    move |e| NetError::os(op, target, e)
}

fn sync_dir(dir: &Path) -> Result<(), NetError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}

impl Ipam {
    /// Allocations of `cidr` (`10.244.3.0/24`) kept under `dir`.
    pub fn open(dir: &Path, cidr: &str) -> Result<Ipam, NetError> {
        let bad = || NetError::Invalid(format!("{cidr:?} is not an IPv4 CIDR"));
        let (ip, prefix) = cidr.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(NetError::Invalid(format!(
                "pod CIDR {cidr} must be /8 to /30"
            )));
        }
        let mask = u32::MAX << (32 - prefix);
        let dir = dir.join(cidr.replace('/', "_"));
        fs::create_dir_all(&dir).map_err(io("create IPAM directory", &dir))?;
        Ok(Ipam {
            dir,
            base: u32::from(ip) & mask,
            prefix,
        })
    }

    /// Addresses that may be handed out.
    fn candidates(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let size = 1u32 << (32 - self.prefix);
        (2..size - 1).map(move |i| Ipv4Addr::from(self.base + i))
    }

    /// The address held by `owner`, if any.
    pub fn lookup(&self, owner: &str) -> Result<Option<Ipv4Addr>, NetError> {
        for (ip, o) in self.allocations()? {
            if o == owner {
                return Ok(Some(ip));
            }
        }
        Ok(None)
    }

    /// Every allocation: address and owner.
    pub fn allocations(&self) -> Result<Vec<(Ipv4Addr, String)>, NetError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io("list IPAM directory", &self.dir))? {
            let e = e.map_err(io("list IPAM directory", &self.dir))?;
            let Ok(ip) = e.file_name().to_string_lossy().parse::<Ipv4Addr>() else {
                continue;
            };
            let owner = fs::read_to_string(e.path()).map_err(io("read allocation", &e.path()))?;
            out.push((ip, owner.trim().to_string()));
        }
        out.sort();
        Ok(out)
    }

    /// An address for `owner`: the one it holds already, else the lowest free one.
    pub fn allocate(&self, owner: &str) -> Result<Ipv4Addr, NetError> {
        if let Some(ip) = self.lookup(owner)? {
            return Ok(ip);
        }
        let taken: HashSet<Ipv4Addr> = self.allocations()?.into_iter().map(|(ip, _)| ip).collect();
        for ip in self.candidates().filter(|ip| !taken.contains(ip)) {
            let path = self.dir.join(ip.to_string());
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(owner.as_bytes())
                        .and_then(|_| f.sync_all())
                        .map_err(io("write allocation", &path))?;
                    sync_dir(&self.dir)?;
                    return Ok(ip);
                }
                // Someone else took it between the listing and now: try the next.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io("create allocation", &path)(e)),
            }
        }
        Err(NetError::Invalid(format!(
            "pod CIDR {}/{} has no free address",
            Ipv4Addr::from(self.base),
            self.prefix
        )))
    }

    /// Releases `ip` (absent is fine).
    pub fn release(&self, ip: Ipv4Addr) -> Result<(), NetError> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("release allocation", &path)(e)),
        }
    }

    /// Releases every address whose owner is not in `alive` (orphans after a crash); returns
    /// what was released.
    pub fn collect(&self, alive: &HashSet<String>) -> Result<Vec<(Ipv4Addr, String)>, NetError> {
        let mut out = Vec::new();
        for (ip, owner) in self.allocations()? {
            if !alive.contains(&owner) {
                self.release(ip)?;
                out.push((ip, owner));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_unique_durable_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), "10.244.3.0/24").unwrap();
        let a = ipam.allocate("pod-a").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 244, 3, 2));
        assert_eq!(
            ipam.allocate("pod-a").unwrap(),
            a,
            "same owner, same address"
        );
        let b = ipam.allocate("pod-b").unwrap();
        assert_ne!(a, b);
        // A restarted agent sees the same allocations.
        let again = Ipam::open(dir.path(), "10.244.3.0/24").unwrap();
        assert_eq!(again.lookup("pod-b").unwrap(), Some(b));
        again.release(a).unwrap();
        let released = again
            .collect(&HashSet::from(["pod-c".to_string()]))
            .unwrap();
        assert_eq!(released, vec![(b, "pod-b".to_string())]);
        assert!(again.allocations().unwrap().is_empty());
    }

    #[test]
    fn a_full_range_is_an_error_and_never_hands_out_reserved_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), "10.244.9.0/29").unwrap();
        let got: Vec<Ipv4Addr> = (0..5)
            .map(|i| ipam.allocate(&format!("p{i}")).unwrap())
            .collect();
        assert_eq!(got.first(), Some(&Ipv4Addr::new(10, 244, 9, 2)));
        assert_eq!(got.last(), Some(&Ipv4Addr::new(10, 244, 9, 6)));
        assert!(ipam.allocate("one-too-many").is_err());
        assert!(Ipam::open(dir.path(), "nonsense").is_err());
    }
}
