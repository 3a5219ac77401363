//! Kubernetes API machinery shared by skiff's controllers, scheduler and node agent.
//!
//! - [`quantity`]: resource quantities (`250m`, `64Mi`) as numbers.
//! - [`labels`]: `metav1.LabelSelector` matching.
//! - [`pod`]: pod readiness, availability, activity, owners and resource requests.
//! - [`events`]: the core/v1 Events recorder, with upstream's folding of repeats.

pub mod events;
pub mod labels;
pub mod pod;
pub mod quantity;
