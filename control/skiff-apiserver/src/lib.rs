//! skiff's Kubernetes-compatible API server.
//!
//! What the real `kubectl` and client libraries rely on, served over HTTPS with bearer tokens:
//! discovery (legacy and aggregated), OpenAPI v2/v3 generated from the `k8s-openapi` types,
//! every verb on the built-in resources with upstream's semantics (resourceVersion
//! preconditions, generateName, generation, finalizers, graceful pod deletion, label and field
//! selectors, paging, watch with bookmarks, the three patch types), server-side tables, and
//! `metav1.Status` errors.
//!
//! Objects live in the skiff store ([`skiff_store::StoreNode`]) as JSON under
//! `/registry/<group>/<resource>/<namespace>/<name>`; the store's revision is the
//! resourceVersion. See `docs/api-server.md`.

pub mod alloc;
pub mod api;
pub mod discovery;
pub mod error;
pub mod kinds;
pub mod meta;
pub mod openapi;
pub mod patch;
pub mod pki;
pub mod proto;
pub mod proxy;
pub mod resources;
pub mod selectors;
pub mod server;
pub mod storage;
pub mod tables;

pub use server::{ApiServer, ServerConfig};
