//! Errors of the data-path loader. Each names the operation that failed and keeps the OS error
//! or the kernel's verifier output.

use std::{io, path::PathBuf};

/// Something went wrong loading, pinning, attaching or reading the data path.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The binary was built before `cargo xtask build-ebpf` produced the objects.
    #[error(
        "the eBPF object `{object}` is not embedded in this binary: run `cargo xtask build-ebpf`, \
         then build again"
    )]
    ObjectMissing {
        /// Object name, e.g. `from-pod`.
        object: &'static str,
    },
    /// A filesystem operation on bpffs failed.
    #[error("{op} {path}: {source}")]
    Bpffs {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Parsing the object or creating/reusing its maps failed.
    #[error("loading eBPF object `{object}`: {source}")]
    Object {
        /// Object name.
        object: &'static str,
        /// aya's error (includes the failing syscall).
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// The kernel rejected the program; the verifier log is part of the message.
    #[error("loading program `{program}`: {source}")]
    Program {
        /// Program name.
        program: &'static str,
        /// aya's error (includes the verifier log for load failures).
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// Preparing an interface for TC (adding the clsact qdisc) failed.
    #[error("adding clsact qdisc to {iface}: {source}")]
    Qdisc {
        /// Interface name.
        iface: String,
        /// aya's TC error.
        #[source]
        source: Box<aya::programs::tc::TcError>,
    },
    /// A map operation failed.
    #[error("{op} map {map}: {source}")]
    Map {
        /// What was being done.
        op: &'static str,
        /// Map name or pin path.
        map: String,
        /// aya's map error.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A map has no room for another entry.
    #[error("BPF map {map} is full: raise its size or remove entries")]
    MapFull {
        /// Map name.
        map: &'static str,
    },
    /// Taking, pinning or reusing a program link failed.
    #[error("{op} link {path}: {detail}")]
    Link {
        /// What was being done.
        op: &'static str,
        /// The link's pin path.
        path: PathBuf,
        /// aya's error.
        detail: String,
    },
    /// A pinned map exists but its layout differs from the one this binary was built for.
    /// It is reported, never silently replaced (that would drop live state).
    #[error(
        "pinned map {path} has an incompatible layout ({detail}); it was created by a different \
         skiff version. Remove it (e.g. `skiff-node bpf unpin`) once no node uses it"
    )]
    IncompatiblePin {
        /// Pin path.
        path: PathBuf,
        /// What differs.
        detail: String,
    },
}
