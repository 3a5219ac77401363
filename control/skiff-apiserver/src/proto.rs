//! Decoding of `application/vnd.kubernetes.protobuf` request bodies into JSON objects.
//!
//! kubectl's typed commands (`create namespace`, `create deployment`, `run`, …) send protobuf.
//! The body is `k8s\0` followed by a `runtime.Unknown` envelope whose `raw` is the object's
//! message. Field numbers and types come from `proto/fields.txt` (extracted from the `k8s-pb`
//! crate, which is generated from upstream's `.proto` files); JSON names come from the OpenAPI
//! definitions of the same types, so the two never need a hand-kept mapping. Go's embedded
//! structs (proto fields with no JSON property of their own) are flattened into their parent, as
//! Go's JSON encoding does. Responses are always JSON (clients accept both).

use std::{collections::HashMap, sync::OnceLock};

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::{error::ApiError, openapi};

const TABLE: &str = include_str!("../proto/fields.txt");
/// The magic prefix of Kubernetes protobuf bodies.
pub const MAGIC: &[u8] = b"k8s\0";
/// Deepest message nesting accepted (a hostile body could nest without end).
const MAX_DEPTH: usize = 64;

#[derive(Debug)]
struct Field {
    tag: u64,
    rust: &'static str,
    kind: &'static str,
    label: &'static str,
    target: &'static str,
}

fn table() -> &'static HashMap<&'static str, Vec<Field>> {
    static T: OnceLock<HashMap<&'static str, Vec<Field>>> = OnceLock::new();
    T.get_or_init(|| {
        let mut out: HashMap<&str, Vec<Field>> = HashMap::new();
        let mut current = "";
        for line in TABLE.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["M", name] => {
                    current = name;
                    out.entry(name).or_default();
                }
                ["F", tag, rust, kind, label, target] => {
                    if let (Ok(tag), Some(fields)) = (tag.parse(), out.get_mut(current)) {
                        fields.push(Field {
                            tag,
                            rust,
                            kind,
                            label,
                            target,
                        });
                    }
                }
                _ => {}
            }
        }
        out
    })
}

fn bad(msg: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("the protobuf request body is malformed: {msg}"))
}

/// A protobuf reader over one message's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ApiError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| bad("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("varint longer than 10 bytes"))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ApiError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| bad("field runs past the end of its message"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

/// One raw field value.
enum Raw<'a> {
    Varint(u64),
    Fixed64(u64),
    /// 32-bit fields (no served type has one; read to skip them).
    Fixed32,
    Bytes(&'a [u8]),
}

fn fields_of(buf: &[u8]) -> Result<Vec<(u64, Raw<'_>)>, ApiError> {
    let mut r = Reader { buf, pos: 0 };
    let mut out = Vec::new();
    while !r.done() {
        let key = r.varint()?;
        let (tag, wire) = (key >> 3, key & 7);
        let raw = match wire {
            0 => Raw::Varint(r.varint()?),
            1 => {
                let b = r.bytes(8)?;
                Raw::Fixed64(u64::from_le_bytes(b.try_into().map_err(bad)?))
            }
            2 => {
                let n = usize::try_from(r.varint()?).map_err(bad)?;
                Raw::Bytes(r.bytes(n)?)
            }
            5 => {
                r.bytes(4)?;
                Raw::Fixed32
            }
            other => return Err(bad(format!("unsupported wire type {other}"))),
        };
        out.push((tag, raw));
    }
    Ok(out)
}

fn norm(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The JSON property of `rust` in the OpenAPI definition of `message`, if it has one.
fn json_name(message: &str, rust: &str) -> Option<String> {
    let def = openapi::definitions().get(&format!("io.k8s.{message}"))?;
    let want = norm(rust);
    def.get("properties")?
        .as_object()?
        .keys()
        .find(|k| norm(k) == want)
        .cloned()
}

fn scalar(kind: &str, raw: &Raw<'_>) -> Result<Value, ApiError> {
    Ok(match (kind, raw) {
        ("string", Raw::Bytes(b)) => {
            json!(std::str::from_utf8(b).map_err(|_| bad("a string field is not UTF-8"))?)
        }
        ("bytes", Raw::Bytes(b)) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
        ("bool", Raw::Varint(v)) => json!(*v != 0),
        // int32 is sign-extended to 64 bits on the wire.
        ("int32", Raw::Varint(v)) => json!((*v as i64) as i32),
        ("int64", Raw::Varint(v)) => json!(*v as i64),
        ("double", Raw::Fixed64(v)) => json!(f64::from_bits(*v)),
        _ => return Err(bad(format!("field of type {kind} has the wrong wire type"))),
    })
}

/// Splits a packed repeated scalar field.
fn unpack(kind: &str, b: &[u8]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    let mut r = Reader { buf: b, pos: 0 };
    while !r.done() {
        let raw = if kind == "double" {
            let x = r.bytes(8)?;
            Raw::Fixed64(u64::from_le_bytes(x.try_into().map_err(bad)?))
        } else {
            Raw::Varint(r.varint()?)
        };
        out.push(scalar(kind, &raw)?);
    }
    Ok(out)
}

fn format_time(seconds: i64, nanos: i64, micro: bool) -> Value {
    match chrono::DateTime::from_timestamp(seconds, u32::try_from(nanos).unwrap_or(0)) {
        Some(t) if micro => json!(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()),
        Some(t) => json!(t.format("%Y-%m-%dT%H:%M:%SZ").to_string()),
        None => Value::Null,
    }
}

fn go_duration(nanos: i64) -> String {
    let neg = nanos < 0;
    let mut n = nanos.unsigned_abs();
    let h = n / 3_600_000_000_000;
    n %= 3_600_000_000_000;
    let m = n / 60_000_000_000;
    n %= 60_000_000_000;
    let s = n as f64 / 1e9;
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if h > 0 {
        out.push_str(&format!("{h}h{m}m"));
    } else if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{s}s"));
    out
}

/// Decodes one message of type `name` into its JSON form.
fn message(name: &str, buf: &[u8], depth: usize) -> Result<Value, ApiError> {
    if depth > MAX_DEPTH {
        return Err(bad("messages nested too deeply"));
    }
    let raw = fields_of(buf)?;
    let int = |tag: u64| -> i64 {
        raw.iter()
            .find_map(|(t, r)| match (t, r) {
                (t, Raw::Varint(v)) if *t == tag => Some(*v as i64),
                _ => None,
            })
            .unwrap_or(0)
    };
    let bytes = |tag: u64| -> Option<&[u8]> {
        raw.iter().find_map(|(t, r)| match (t, r) {
            (t, Raw::Bytes(b)) if *t == tag => Some(*b),
            _ => None,
        })
    };
    // Types whose JSON form is not an object.
    match name {
        "apimachinery.pkg.apis.meta.v1.Time" => {
            let (s, n) = (int(1), int(2));
            return Ok(if s == 0 && n == 0 {
                Value::Null
            } else {
                format_time(s, n, false)
            });
        }
        "apimachinery.pkg.apis.meta.v1.MicroTime" => {
            let (s, n) = (int(1), int(2));
            return Ok(if s == 0 && n == 0 {
                Value::Null
            } else {
                format_time(s, n, true)
            });
        }
        "apimachinery.pkg.apis.meta.v1.Duration" => return Ok(json!(go_duration(int(1)))),
        "apimachinery.pkg.api.resource.Quantity" => {
            let s = bytes(1).map(String::from_utf8_lossy).unwrap_or_default();
            return Ok(json!(s));
        }
        "apimachinery.pkg.util.intstr.IntOrString" => {
            return Ok(if int(1) == 1 {
                json!(bytes(3).map(String::from_utf8_lossy).unwrap_or_default())
            } else {
                json!(int(2) as i32)
            });
        }
        "apimachinery.pkg.runtime.RawExtension" | "apimachinery.pkg.apis.meta.v1.FieldsV1" => {
            return Ok(match bytes(1) {
                Some(b) if !b.is_empty() => serde_json::from_slice(b)
                    .map_err(|e| bad(format!("embedded object is not JSON: {e}")))?,
                _ => Value::Null,
            });
        }
        _ => {}
    }
    let fields = table()
        .get(name)
        .ok_or_else(|| bad(format!("no protobuf schema for {name}")))?;
    let mut out = Map::new();
    for (tag, r) in &raw {
        // Unknown fields are skipped, as proto2 readers do.
        let Some(f) = fields.iter().find(|f| f.tag == *tag) else {
            continue;
        };
        let value = match (f.kind, r) {
            ("message", Raw::Bytes(b)) => message(f.target, b, depth + 1)?,
            ("map", Raw::Bytes(b)) => {
                let entry = fields_of(b)?;
                let mut key = String::new();
                let mut val = Value::Null;
                let value_kind = f.label.split(',').nth(1).unwrap_or("string");
                for (t, er) in &entry {
                    match (t, er) {
                        (1, Raw::Bytes(k)) => {
                            key = String::from_utf8(k.to_vec())
                                .map_err(|_| bad("a map key is not UTF-8"))?;
                        }
                        (2, Raw::Bytes(vb)) if value_kind == "message" => {
                            val = message(f.target, vb, depth + 1)?;
                        }
                        (2, er) => val = scalar(value_kind, er)?,
                        _ => {}
                    }
                }
                if val.is_null() {
                    val = match value_kind {
                        "string" | "bytes" => json!(""),
                        _ => Value::Null,
                    };
                }
                let entry_map = out
                    .entry(json_name(name, f.rust).unwrap_or_else(|| f.rust.to_string()))
                    .or_insert_with(|| json!({}));
                if let Some(m) = entry_map.as_object_mut() {
                    m.insert(key, val);
                }
                continue;
            }
            (kind, Raw::Bytes(b))
                if f.label == "repeated" && kind != "string" && kind != "bytes" =>
            {
                // Packed repeated scalars.
                let vals = unpack(kind, b)?;
                let key = json_name(name, f.rust).unwrap_or_else(|| f.rust.to_string());
                let arr = out.entry(key).or_insert_with(|| json!([]));
                if let Some(a) = arr.as_array_mut() {
                    a.extend(vals);
                }
                continue;
            }
            (kind, r) => scalar(kind, r)?,
        };
        match json_name(name, f.rust) {
            Some(key) if f.label == "repeated" => {
                let arr = out.entry(key).or_insert_with(|| json!([]));
                if let Some(a) = arr.as_array_mut() {
                    a.push(value);
                }
            }
            Some(key) => {
                // Go omits empty strings (omitempty); a present-but-empty string means unset.
                if value.as_str() == Some("") || value.is_null() || zero_means_unset(&key, &value) {
                    continue;
                }
                out.insert(key, value);
            }
            // An embedded struct: its fields are the parent's.
            None => {
                if let Value::Object(inner) = value {
                    for (k, v) in inner {
                        out.entry(k).or_insert(v);
                    }
                }
            }
        }
    }
    Ok(Value::Object(out))
}

/// Fields whose zero value (`false`, `0`) is a setting of its own, unlike their absence: Go
/// pointer fields such as `replicas: 0`, `backoffLimit: 0`, `runAsUser: 0`,
/// `automountServiceAccountToken: false`, `gracePeriodSeconds: 0`.
const ZERO_IS_A_VALUE: &[&str] = &[
    "activeDeadlineSeconds",
    "allocateLoadBalancerNodePorts",
    "allowPrivilegeEscalation",
    "automountServiceAccountToken",
    "backoffLimit",
    "backoffLimitPerIndex",
    "collisionCount",
    "completions",
    "defaultMode",
    "deletionGracePeriodSeconds",
    "enableServiceLinks",
    "expirationSeconds",
    "failedJobsHistoryLimit",
    "fsGroup",
    "gracePeriodSeconds",
    "hostUsers",
    "leaseTransitions",
    "maxFailedIndexes",
    "mode",
    "parallelism",
    "priority",
    "progressDeadlineSeconds",
    "ready",
    "replicas",
    "revisionHistoryLimit",
    "runAsGroup",
    "runAsUser",
    "serving",
    "startingDeadlineSeconds",
    "successfulJobsHistoryLimit",
    "terminating",
    "terminationGracePeriodSeconds",
    "ttlSecondsAfterFinished",
];

/// Whether a decoded scalar is a zero that JSON would not carry. Go's protobuf encoding writes
/// every non-pointer field, zeros included, where its JSON encoding omits them (`omitempty`):
/// `stdin: false` and `generation: 0` are "unset". Zeros of the fields in
/// [`ZERO_IS_A_VALUE`] are kept; for other pointer fields, zero and unset mean the same.
fn zero_means_unset(key: &str, value: &Value) -> bool {
    let zero = value == &json!(false) || value.as_i64() == Some(0) || value.as_f64() == Some(0.0);
    zero && !ZERO_IS_A_VALUE.contains(&key)
}

/// Whether a content type is Kubernetes protobuf.
pub fn is_protobuf(content_type: &str) -> bool {
    content_type.split(';').next().map(str::trim) == Some("application/vnd.kubernetes.protobuf")
}

/// Decodes a protobuf request body (magic, `runtime.Unknown`, object) into its JSON form with
/// `apiVersion` and `kind` set.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("missing the k8s\\0 prefix"))?;
    let envelope = fields_of(rest)?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (tag, r) in &envelope {
        match (tag, r) {
            (1, Raw::Bytes(tm)) => {
                for (t, tr) in fields_of(tm)? {
                    if let Raw::Bytes(s) = tr {
                        let s = String::from_utf8_lossy(s).into_owned();
                        match t {
                            1 => api_version = s,
                            2 => kind = s,
                            _ => {}
                        }
                    }
                }
            }
            (2, Raw::Bytes(b)) => raw = b,
            (3, Raw::Bytes(enc)) if !enc.is_empty() => {
                return Err(bad("content encodings are not supported"));
            }
            _ => {}
        }
    }
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version.as_str()),
    };
    let schema = openapi::definitions()
        .iter()
        .find(|(_, d)| {
            d.get("x-kubernetes-group-version-kind")
                .and_then(Value::as_array)
                .is_some_and(|l| {
                    l.iter().any(|g| {
                        g["group"] == group && g["version"] == version && g["kind"] == kind.as_str()
                    })
                })
        })
        .map(|(n, _)| n.clone())
        .ok_or_else(|| bad(format!("unknown type {api_version:?} {kind:?}")))?;
    let name = schema.strip_prefix("io.k8s.").unwrap_or(&schema);
    let mut obj = message(name, raw, 0)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use k8s_pb::{
        api::{apps::v1 as apps, core::v1 as core},
        apimachinery::pkg::{
            api::resource::Quantity,
            apis::meta::v1::{LabelSelector, ObjectMeta, Time},
            runtime::{TypeMeta, Unknown},
            util::intstr::IntOrString,
        },
    };
    use prost::Message;

    use super::*;

    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let u = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut out = MAGIC.to_vec();
        out.extend(u.encode_to_vec());
        out
    }

    fn meta(name: &str) -> Option<ObjectMeta> {
        Some(ObjectMeta {
            name: Some(name.into()),
            namespace: Some(String::new()),
            creation_timestamp: Some(Time {
                seconds: Some(0),
                nanos: Some(0),
            }),
            labels: [("app".to_string(), "web".to_string())].into(),
            ..Default::default()
        })
    }

    #[test]
    fn secret_with_bytes_and_maps() {
        let s = core::Secret {
            metadata: meta("s"),
            data: [("k".to_string(), b"\x00\xff".to_vec())].into(),
            r#type: Some("Opaque".into()),
            ..Default::default()
        };
        let v = decode(&envelope("v1", "Secret", s.encode_to_vec())).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": "s", "labels": {"app": "web"}}, "data": {"k": "AP8="}})
        );
    }

    #[test]
    fn deployment_with_embedded_special_types() {
        let container = core::Container {
            name: Some("web".into()),
            image: Some("busybox".into()),
            ports: vec![core::ContainerPort {
                container_port: Some(8080),
                ..Default::default()
            }],
            resources: Some(core::ResourceRequirements {
                limits: [(
                    "cpu".to_string(),
                    Quantity {
                        string: Some("500m".into()),
                    },
                )]
                .into(),
                ..Default::default()
            }),
            env_from: vec![core::EnvFromSource {
                secret_ref: Some(core::SecretEnvSource {
                    local_object_reference: Some(core::LocalObjectReference {
                        name: Some("creds".into()),
                    }),
                    optional: Some(true),
                }),
                ..Default::default()
            }],
            stdin: Some(false),
            tty: Some(false),
            security_context: Some(core::SecurityContext {
                run_as_user: Some(0),
                privileged: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let d = apps::Deployment {
            metadata: meta("web"),
            spec: Some(apps::DeploymentSpec {
                replicas: Some(0),
                selector: Some(LabelSelector {
                    match_labels: [("app".to_string(), "web".to_string())].into(),
                    ..Default::default()
                }),
                template: Some(core::PodTemplateSpec {
                    metadata: meta("t"),
                    spec: Some(core::PodSpec {
                        containers: vec![container],
                        ..Default::default()
                    }),
                }),
                strategy: Some(apps::DeploymentStrategy {
                    r#type: Some("RollingUpdate".into()),
                    rolling_update: Some(apps::RollingUpdateDeployment {
                        max_surge: Some(IntOrString {
                            r#type: Some(0),
                            int_val: Some(2),
                            str_val: None,
                        }),
                        max_unavailable: Some(IntOrString {
                            r#type: Some(1),
                            int_val: None,
                            str_val: Some("10%".into()),
                        }),
                    }),
                }),
                ..Default::default()
            }),
            status: None,
        };
        let v = decode(&envelope("apps/v1", "Deployment", d.encode_to_vec())).unwrap();
        assert_eq!(v["spec"]["replicas"], 0);
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        // Go writes every non-pointer field; their zeros are "unset", as in JSON. Zeros that
        // are settings of their own stay.
        assert!(c.get("stdin").is_none() && c.get("tty").is_none(), "{c}");
        assert_eq!(c["securityContext"], json!({"runAsUser": 0}));
        assert_eq!(c["ports"][0]["containerPort"], 8080);
        assert_eq!(c["resources"]["limits"]["cpu"], "500m");
        assert_eq!(
            c["envFrom"][0]["secretRef"],
            json!({"name": "creds", "optional": true})
        );
        let ru = &v["spec"]["strategy"]["rollingUpdate"];
        assert_eq!(ru["maxSurge"], 2);
        assert_eq!(ru["maxUnavailable"], "10%");
        // What the typed form accepts is what the server stores.
        let def = crate::resources::find("apps", "v1", "deployments").unwrap();
        (def.canonicalize)(v).unwrap();
    }

    #[test]
    fn garbage_is_a_400() {
        assert_eq!(decode(b"nope").unwrap_err().code, 400);
        let mut b = MAGIC.to_vec();
        b.extend([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(decode(&b).unwrap_err().code, 400);
        let s = core::ConfigMap::default();
        assert_eq!(
            decode(&envelope("v1", "Widget", s.encode_to_vec()))
                .unwrap_err()
                .code,
            400
        );
    }
}
