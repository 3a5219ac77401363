//! Isolation for pods the policy loop has not seen yet. A pod's programs are attached before
//! its address is posted, and the loop learns of the pod only from that status; until its pass,
//! the pod's endpoint would carry no isolation — a new pod in a namespace whose policies
//! select it would be reachable (and reach out) unchecked. So the endpoint entry starts with
//! the isolation the policies in force give the pod's labels, under endpoint number 0, which
//! no key names: in the directions the policies isolate, nothing passes until the loop has
//! written the pod's number and keys (fail closed); the others are open, as they will stay.
//! Before the loop has listed policies and namespaces, a new pod is isolated both ways.

use std::sync::{Arc, RwLock};

use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use kube::{
    ResourceExt,
    runtime::reflector::{ObjectRef, Store},
};
use skiff_apimachinery::identity::IdentityLabels;
use skiff_ebpf_common::policy::{EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED};

use super::{
    desired::{audited, isolation_flags, subject},
    rules,
};

/// The stores the policy loop follows.
type Stores = (Store<NetworkPolicy>, Store<Namespace>);

/// What the policy loop follows, shared with the pod programs' attachment.
#[derive(Default)]
pub struct Gate {
    stores: RwLock<Option<Stores>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate the policy loop has not opened yet.
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    /// Called by the loop once its stores have listed (a restarted loop's replace the old).
    pub fn open(&self, policies: Store<NetworkPolicy>, namespaces: Store<Namespace>) {
        *self.stores.write().unwrap_or_else(|p| p.into_inner()) = Some((policies, namespaces));
    }

    /// Called when the loop stops: until it opens again, new pods are closed both ways.
    pub fn close(&self) {
        *self.stores.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The `skiff_endpoints` flags a new endpoint of pod `namespace`/`labels` starts with.
    pub fn initial_flags(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> u32 {
        let Some((policies, namespaces)) = self
            .stores
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED;
        };
        let ns = namespaces.get(&ObjectRef::new(namespace));
        // As the loop will see the pod: by its identity's labels.
        let labels = IdentityLabels::of(
            namespace,
            labels,
            &ns.as_ref().map(|n| n.labels().clone()).unwrap_or_default(),
        );
        let all = policies.state();
        let pol = rules::compute(all.iter().map(|p| &**p), &subject(&labels));
        isolation_flags(&pol, ns.is_some_and(|n| audited(&n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::desired::AUDIT_ANNOTATION;
    use kube::runtime::{reflector, watcher::Event};
    use serde_json::json;
    use skiff_ebpf_common::policy::EP_AUDIT;
    use std::collections::BTreeMap;

    fn store<K>(objects: Vec<K>) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        let (reader, mut writer) = reflector::store();
        writer.apply_watcher_event(&Event::Init);
        for o in objects {
            writer.apply_watcher_event(&Event::InitApply(o));
        }
        writer.apply_watcher_event(&Event::InitDone);
        reader
    }

    #[test]
    fn new_pods_start_isolated_as_the_policies_say() {
        let labels = |app: &str| BTreeMap::from([("app".to_string(), app.to_string())]);
        let gate = Gate::new();
        // Not synced: closed both ways.
        assert_eq!(
            gate.initial_flags("shop", &labels("web")),
            EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED
        );
        let web_in: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "web-in", "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}},
        }))
        .unwrap();
        let audited: Namespace = serde_json::from_value(json!({
            "metadata": {"name": "lab", "annotations": {AUDIT_ANNOTATION: "true"}},
        }))
        .unwrap();
        let lab_out: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "out", "namespace": "lab"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]},
        }))
        .unwrap();
        gate.open(store(vec![web_in, lab_out]), store(vec![audited]));
        assert_eq!(
            gate.initial_flags("shop", &labels("web")),
            EP_INGRESS_ISOLATED
        );
        assert_eq!(gate.initial_flags("shop", &labels("db")), 0);
        assert_eq!(
            gate.initial_flags("lab", &labels("x")),
            EP_EGRESS_ISOLATED | EP_AUDIT
        );
        // The loop stopped: closed again.
        gate.close();
        assert_eq!(
            gate.initial_flags("shop", &labels("db")),
            EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED
        );
    }
}
