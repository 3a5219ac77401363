//! skiff's eBPF data path, userspace side: the embedded programs, bpffs pinning, loading
//! (with the verifier log kept on failure), attaching to interfaces, and reading the maps.
//!
//! Map layouts come from `skiff-ebpf-common`, the only place they are defined.

pub mod bpffs;
pub mod endpoints;
pub mod error;
pub mod lb;
pub mod metrics;
pub mod objects;
pub mod policy;
pub mod program;

pub use bpffs::PinDir;
pub use error::DatapathError;
pub use objects::ProgramKind;
pub use program::LoadedProgram;
