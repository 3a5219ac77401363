//! The container runtime layer of `skiff-node`: containerd through its native API.
//!
//! - [`containerd`]: a supervised containerd child (generated config, CRI disabled) or an
//!   existing one, by socket.
//! - [`image`]: OCI image-layout archives imported into the content store and unpacked into
//!   overlayfs snapshots.
//! - [`container`]: containers and runc tasks from an image, with an `oci-spec` runtime spec.
//! - [`oci_layout`]: builds the small busybox image tests and the demo use.

pub mod container;
pub mod containerd;
pub mod crilog;
pub mod exec;
pub mod image;
pub mod oci_layout;
pub mod pull;

/// Go's name of this architecture, as images and Nodes use it.
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
