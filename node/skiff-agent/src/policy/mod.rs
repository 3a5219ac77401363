//! NetworkPolicy, enforced by the eBPF data path (issue: identity-based enforcement with drop
//! attribution and a flow log). [`rules`] holds the semantics: an endpoint's rules from the
//! policies, resolved into the keys the data path looks up.

pub mod rules;
