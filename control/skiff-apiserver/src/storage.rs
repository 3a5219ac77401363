//! Objects in the store: keys, encoding, and the reads and conditional writes the verbs use.
//!
//! Layout: `/registry/<group>/<resource>/<namespace>/<name>` (`core` for the core group; no
//! namespace segment for cluster-scoped kinds). The value is the object's JSON without
//! `metadata.resourceVersion`: the resourceVersion is the key's mod revision, set on read, so
//! it can never disagree with the store.

use base64::Engine;
use serde_json::{Value, json};
use skiff_store::{
    Compare, KeyValue, Op, OpResult, RangeRequest, Revision, StoreNode, Txn, TxnResponse,
};

use crate::{
    error::{ApiError, ApiResult},
    resources::ResourceDef,
};

/// The key of one object.
pub fn key(def: &ResourceDef, namespace: Option<&str>, name: &str) -> String {
    match namespace.filter(|_| def.namespaced) {
        Some(ns) => format!(
            "/registry/{}/{}/{ns}/{name}",
            def.storage_group(),
            def.plural
        ),
        None => format!("/registry/{}/{}/{name}", def.storage_group(), def.plural),
    }
}

/// The prefix of a resource's objects, in one namespace or all.
pub fn prefix(def: &ResourceDef, namespace: Option<&str>) -> String {
    match namespace.filter(|_| def.namespaced) {
        Some(ns) => format!("/registry/{}/{}/{ns}/", def.storage_group(), def.plural),
        None => format!("/registry/{}/{}/", def.storage_group(), def.plural),
    }
}

/// Encodes an object for storage (without its resourceVersion).
pub fn encode(obj: &Value) -> Vec<u8> {
    let mut obj = obj.clone();
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    serde_json::to_vec(&obj).unwrap_or_default()
}

/// Decodes a stored object and sets its resourceVersion. A value that is not JSON is damage in
/// the store, reported as an internal error naming the key.
pub fn decode(kv: &KeyValue) -> ApiResult<Value> {
    decode_at(&kv.key, &kv.value, kv.mod_revision)
}

/// Decodes `value` stored at `key` and stamps `revision` as its resourceVersion.
pub fn decode_at(key: &[u8], value: &[u8], revision: Revision) -> ApiResult<Value> {
    let mut obj: Value = serde_json::from_slice(value).map_err(|e| {
        ApiError::internal(format!(
            "stored object {} is not valid JSON: {e}",
            String::from_utf8_lossy(key)
        ))
    })?;
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), json!(revision.to_string()));
    }
    Ok(obj)
}

/// An object as read, with its mod revision for conditional writes.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The object (resourceVersion set).
    pub obj: Value,
    /// Its mod revision.
    pub revision: Revision,
}

/// A page of a list.
#[derive(Debug)]
pub struct Page {
    /// Matching objects.
    pub items: Vec<Value>,
    /// Revision the list was read at.
    pub revision: Revision,
    /// Token for the next page, if more keys remain.
    pub continue_token: Option<String>,
}

/// Reads and writes objects through the replicated store.
#[derive(Clone, Debug)]
pub struct Objects {
    node: StoreNode,
}

impl Objects {
    /// Objects in `node`'s store.
    pub fn new(node: StoreNode) -> Objects {
        Objects { node }
    }

    /// The store member.
    pub fn node(&self) -> &StoreNode {
        &self.node
    }

    /// A linearizable read of one object.
    pub async fn get(&self, key: &str) -> ApiResult<Option<Stored>> {
        let r = self.node.range(RangeRequest::key(key)).await?;
        match r.kvs.first() {
            None => Ok(None),
            Some(kv) => Ok(Some(Stored {
                obj: decode(kv)?,
                revision: kv.mod_revision,
            })),
        }
    }

    /// Lists keys under `prefix` at `revision` (0 = latest, linearizable), keeping objects
    /// `keep` accepts, until `limit` (0 = all) are found. Paging continues from a token.
    pub async fn list(
        &self,
        prefix: &str,
        revision: Revision,
        limit: usize,
        continue_token: Option<&str>,
        keep: &(dyn Fn(&Value) -> bool + Sync),
    ) -> ApiResult<Page> {
        let mut req = RangeRequest::prefix(prefix.as_bytes().to_vec());
        let mut revision = revision;
        if let Some(token) = continue_token {
            let (rv, start) = decode_continue(token)?;
            if !start.starts_with(prefix.as_bytes()) {
                return Err(ApiError::bad_request(
                    "continue key is not valid: it does not belong to this list",
                ));
            }
            revision = rv;
            req.start = start;
        }
        if revision == 0 {
            self.node.read_barrier().await?;
        }
        let chunk = if limit == 0 { 0 } else { limit.max(64) };
        let mut items = Vec::new();
        loop {
            let page = self
                .node
                .range_local(RangeRequest {
                    revision,
                    limit: chunk,
                    ..req.clone()
                })
                .await
                .map_err(|e| match e {
                    skiff_store::StoreError::Compacted { .. } if continue_token.is_some() => {
                        ApiError::gone("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.")
                    }
                    other => other.into(),
                })?;
            revision = page.revision;
            let mut last_key = None;
            for kv in &page.kvs {
                last_key = Some(kv.key.clone());
                let obj = decode(kv)?;
                if keep(&obj) {
                    items.push(obj);
                    if limit != 0 && items.len() == limit {
                        let more = page.more
                            || kv.key != page.kvs.last().map(|k| k.key.clone()).unwrap_or_default();
                        let token = more.then(|| encode_continue(revision, &next_key(&kv.key)));
                        return Ok(Page {
                            items,
                            revision,
                            continue_token: token,
                        });
                    }
                }
            }
            match (page.more, last_key) {
                (true, Some(k)) => req.start = next_key(&k),
                _ => {
                    return Ok(Page {
                        items,
                        revision,
                        continue_token: None,
                    });
                }
            }
        }
    }

    /// Runs a transaction.
    pub async fn txn(&self, txn: Txn) -> ApiResult<TxnResponse> {
        Ok(self.node.txn(txn).await?)
    }

    /// Creates `key` (with `extra` writes in the same transaction, each of which must not
    /// exist either). Returns the new revision, or `None` with the conflicting key if one exists.
    pub async fn create(
        &self,
        key: &str,
        obj: &Value,
        extra: Vec<(String, Vec<u8>)>,
    ) -> ApiResult<Result<Revision, String>> {
        let mut txn = Txn::create(key.as_bytes().to_vec(), encode(obj));
        for (k, v) in &extra {
            txn.compare.push(Compare {
                key: k.as_bytes().to_vec(),
                mod_revision: 0,
            });
            txn.success.push(Op::Put {
                key: k.as_bytes().to_vec(),
                value: v.clone(),
            });
            txn.failure.push(Op::Get {
                key: k.as_bytes().to_vec(),
            });
        }
        let r = self.txn(txn).await?;
        if r.succeeded {
            return Ok(Ok(r.revision));
        }
        // Name the first key that exists.
        let mut keys = std::iter::once(key.to_string()).chain(extra.into_iter().map(|(k, _)| k));
        let existing = r
            .results
            .iter()
            .zip(&mut keys)
            .find_map(|(res, k)| match res {
                OpResult::Get { kv: Some(_) } => Some(k),
                _ => None,
            });
        Ok(Err(existing.unwrap_or_else(|| key.to_string())))
    }

    /// Replaces `key` if its mod revision is still `expected`; `Ok(None)` when it changed.
    pub async fn update(
        &self,
        key: &str,
        obj: &Value,
        expected: Revision,
    ) -> ApiResult<Option<Revision>> {
        let r = self
            .txn(Txn::update(key.as_bytes().to_vec(), encode(obj), expected))
            .await?;
        Ok(r.succeeded.then_some(r.revision))
    }

    /// Deletes `key` (and `also`) if its mod revision is still `expected`; returns the delete's
    /// revision, or `None` when it changed.
    pub async fn delete(
        &self,
        key: &str,
        expected: Revision,
        also: Vec<String>,
    ) -> ApiResult<Option<Revision>> {
        let mut txn = Txn::delete(key.as_bytes().to_vec(), expected);
        for k in also {
            txn.success.push(Op::Delete {
                key: k.into_bytes(),
            });
        }
        let r = self.txn(txn).await?;
        Ok(r.succeeded.then_some(r.revision))
    }
}

/// The smallest key after `key`.
fn next_key(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

/// A continue token: the list's revision and the next key, as upstream's (base64 JSON).
pub fn encode_continue(revision: Revision, start: &[u8]) -> String {
    let body =
        json!({"v": "meta.k8s.io/v1", "rv": revision, "start": String::from_utf8_lossy(start)});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body.to_string())
}

fn decode_continue(token: &str) -> ApiResult<(Revision, Vec<u8>)> {
    let bad = || ApiError::bad_request("continue key is not valid: malformed token");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    if rv == 0 {
        return Err(bad());
    }
    Ok((rv, start.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let t = encode_continue(42, b"/registry/core/pods/default/a\0");
        assert_eq!(
            decode_continue(&t).unwrap(),
            (42, b"/registry/core/pods/default/a\0".to_vec())
        );
        assert_eq!(decode_continue("!!").unwrap_err().code, 400);
        assert_eq!(decode_continue("e30").unwrap_err().code, 400);
    }

    #[test]
    fn keys_follow_the_registry_layout() {
        let pods = crate::resources::find("", "v1", "pods").unwrap();
        let nodes = crate::resources::find("", "v1", "nodes").unwrap();
        let deploy = crate::resources::find("apps", "v1", "deployments").unwrap();
        assert_eq!(key(pods, Some("ns"), "a"), "/registry/core/pods/ns/a");
        assert_eq!(key(nodes, Some("ns"), "n"), "/registry/core/nodes/n");
        assert_eq!(prefix(deploy, None), "/registry/apps/deployments/");
    }
}
