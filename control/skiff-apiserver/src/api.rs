//! The resource handlers: path parsing, verbs, admission (defaults, validation, allocation) and
//! response encoding. Every failure leaves as an [`ApiError`] (a `metav1.Status`).

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use serde_json::{Value, json};
use skiff_store::{Compare, EventKind, Op, RangeRequest, Revision, StoreError, Txn, WatchEvent};

use crate::{
    alloc,
    error::{ApiError, ApiResult, Cause},
    kinds, meta,
    meta::meta_str,
    openapi,
    patch::{self, PatchType},
    resources::{self, ResourceDef},
    selectors::{FieldSelector, LabelSelector},
    storage::{self, Objects, Stored},
    tables::{self, IncludeObject},
};

/// Largest request body accepted (upstream's limit is 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// How long a watch lasts when the client does not say (upstream picks 30–60 min).
const DEFAULT_WATCH_SECONDS: u64 = 1800;
/// How often an idle watch gets a bookmark (when the client allows them).
const BOOKMARK_EVERY: Duration = Duration::from_secs(10);
/// Attempts of a read-modify-write before giving up on contention.
const MAX_RETRIES: usize = 16;

/// Shared state of the handlers.
#[derive(Debug)]
pub struct Api {
    /// Objects in the store.
    pub objects: Objects,
    /// The bearer token node agents accept from the API server (the node bootstrap token).
    pub node_token: String,
}

/// What a request addresses.
#[derive(Debug)]
pub(crate) struct Target {
    def: &'static ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Target {
    fn key(&self) -> String {
        storage::key(
            self.def,
            self.namespace.as_deref(),
            self.name.as_deref().unwrap_or(""),
        )
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    fn not_found(&self) -> ApiError {
        ApiError::not_found(self.def.group, self.def.plural, self.name())
    }
}

fn parse_target(path: &str) -> ApiResult<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_route()),
    };
    if !resources::has_group_version(group, version) {
        return Err(ApiError::no_route());
    }
    let find =
        |plural: &str| resources::find(group, version, plural).ok_or_else(ApiError::no_route);
    let target = |def, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| Target {
        def,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        sub: sub.map(str::to_string),
    };
    match rest {
        ["namespaces", ns, res, tail @ ..] if group.is_empty() || res != &"" => {
            match resources::find(group, version, res) {
                Some(def) if def.namespaced => match tail {
                    [] => Ok(target(def, Some(ns), None, None)),
                    [name] => Ok(target(def, Some(ns), Some(name), None)),
                    [name, sub] => Ok(target(def, Some(ns), Some(name), Some(sub))),
                    _ => Err(ApiError::no_route()),
                },
                // `/api/v1/namespaces/<name>/status` and `/finalize`.
                _ if group.is_empty() && tail.is_empty() => {
                    Ok(target(find("namespaces")?, None, Some(ns), Some(res)))
                }
                _ => Err(ApiError::no_route()),
            }
        }
        [res] => Ok(target(find(res)?, None, None, None)),
        [res, name] => {
            let def = find(res)?;
            if def.namespaced {
                return Err(ApiError::no_route());
            }
            Ok(target(def, None, Some(name), None))
        }
        [res, name, sub] => {
            let def = find(res)?;
            if def.namespaced {
                return Err(ApiError::no_route());
            }
            Ok(target(def, None, Some(name), Some(sub)))
        }
        _ => Err(ApiError::no_route()),
    }
}

/// Query parameters (last value wins).
type Params = HashMap<String, String>;

fn params(uri: &axum::http::Uri) -> Params {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn flag(p: &Params, name: &str) -> bool {
    matches!(p.get(name).map(String::as_str), Some("true" | "1"))
}

/// How the client wants objects encoded.
#[derive(Clone, Copy, Debug)]
struct Accept {
    table: bool,
    /// `as=PartialObjectMetadata` / `PartialObjectMetadataList`: metadata only.
    metadata: bool,
}

/// An object reduced to `meta.k8s.io/v1` `PartialObjectMetadata`.
fn partial(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

fn accept(headers: &HeaderMap) -> ApiResult<Accept> {
    let a = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut json_ok = a.is_empty();
    let mut table = false;
    let mut metadata = false;
    for part in a.split(',') {
        let part = part.trim();
        let media = part.split(';').next().unwrap_or("").trim();
        if part.contains("as=Table") && media == "application/json" {
            table = true;
        }
        // The first acceptable form wins; metadata-only is asked for before plain JSON.
        if part.contains("as=PartialObjectMetadata") && media == "application/json" && !table {
            metadata = true;
        }
        if matches!(
            media,
            "application/json" | "*/*" | "application/*" | "application/yaml"
        ) {
            json_ok = true;
        }
    }
    if !json_ok && !table && !metadata {
        return Err(ApiError::not_acceptable(format!(
            "only the following media types are accepted: application/json (asked for {a:?})"
        )));
    }
    Ok(Accept { table, metadata })
}

/// Decodes a request body (JSON or YAML) by its content type.
fn decode_body(headers: &HeaderMap, body: &[u8]) -> ApiResult<Value> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let media = ct.split(';').next().unwrap_or("").trim();
    match media {
        "application/json" | "" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}"))),
        "application/yaml" => serde_yaml_ng::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}"))),
        "application/vnd.kubernetes.protobuf" => crate::proto::decode(body),
        _ => Err(ApiError::unsupported_media_type(ct)),
    }
}

fn json_response(code: StatusCode, v: &Value, warnings: &[String]) -> Response {
    let mut r = (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response();
    for w in warnings {
        if let Ok(h) = HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "'"))) {
            r.headers_mut().append(header::WARNING, h);
        }
    }
    r
}

/// The single entry point for resource paths.
pub async fn serve(State(api): State<Arc<Api>>, req: Request) -> Response {
    match handle(&api, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(api: &Api, req: Request) -> ApiResult<Response> {
    let (parts, body) = req.into_parts();
    let t = parse_target(parts.uri.path())?;
    if t.def.group.is_empty() && t.def.plural == "pods" && t.sub.as_deref() == Some("exec") {
        if !matches!(parts.method, Method::GET | Method::POST) {
            return Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({} pods/exec)",
                parts.method
            )));
        }
        return pod_exec(api, &t, parts).await;
    }
    let p = params(&parts.uri);
    let acc = accept(&parts.headers)?;
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::too_large(format!(
                "the request body is larger than the limit of {MAX_BODY_BYTES} bytes"
            ))
        })?;
    let method = parts.method.clone();
    if let Some(sub) = t.sub.clone() {
        if t.def.subresource(&sub).is_none() {
            return Err(ApiError::no_route());
        }
        return subresource(api, &t, &sub, &method, &parts.headers, &p, &body).await;
    }
    let verb_ok = |v: &str| {
        if t.def.verbs.contains(&v) {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({v} {})",
                t.def.qualified()
            )))
        }
    };
    match (&method, t.name.is_some()) {
        (&Method::GET, true) => {
            verb_ok("get")?;
            let s = get(api, &t).await?;
            Ok(encode_one(t.def, s.obj, acc, &p, StatusCode::OK, &[]))
        }
        (&Method::GET, false) if flag(&p, "watch") => {
            verb_ok("watch")?;
            watch(api, &t, &p, acc).await
        }
        (&Method::GET, false) => {
            verb_ok("list")?;
            list(api, &t, &p, acc).await
        }
        (&Method::POST, false) => {
            verb_ok("create")?;
            let obj = decode_body(&parts.headers, &body)?;
            let (obj, warnings) = create(api, &t, obj, &p).await?;
            Ok(encode_one(
                t.def,
                obj,
                acc,
                &p,
                StatusCode::CREATED,
                &warnings,
            ))
        }
        (&Method::PUT, true) => {
            verb_ok("update")?;
            let obj = decode_body(&parts.headers, &body)?;
            let (obj, warnings) = update(api, &t, obj, &p, Mode::Main).await?;
            Ok(encode_one(t.def, obj, acc, &p, StatusCode::OK, &warnings))
        }
        (&Method::PATCH, true) => {
            verb_ok("patch")?;
            let (obj, warnings) = patch(api, &t, &parts.headers, &body, &p, Mode::Main).await?;
            Ok(encode_one(t.def, obj, acc, &p, StatusCode::OK, &warnings))
        }
        (&Method::DELETE, true) => {
            verb_ok("delete")?;
            let opts = DeleteOptions::parse(&parts.headers, &body, &p)?;
            let (obj, code) = delete(api, &t, &opts).await?;
            Ok(encode_one(t.def, obj, acc, &p, code, &[]))
        }
        (&Method::DELETE, false) => {
            verb_ok("deletecollection")?;
            let opts = DeleteOptions::parse(&parts.headers, &body, &p)?;
            delete_collection(api, &t, &p, &opts).await
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({method} {})",
            t.def.qualified()
        ))),
    }
}

fn encode_one(
    def: &ResourceDef,
    obj: Value,
    acc: Accept,
    p: &Params,
    code: StatusCode,
    warnings: &[String],
) -> Response {
    if acc.table && obj.get("kind").and_then(Value::as_str) == Some(def.kind) {
        let include = IncludeObject::parse(p.get("includeObject").map(String::as_str));
        let rv = meta_str(&obj, "resourceVersion").unwrap_or("").to_string();
        let t = tables::table(def, &[obj], json!({"resourceVersion": rv}), include, true);
        return json_response(code, &t, warnings);
    }
    if acc.metadata && obj.get("kind").and_then(Value::as_str) == Some(def.kind) {
        return json_response(code, &partial(&obj), warnings);
    }
    json_response(code, &obj, warnings)
}

async fn get(api: &Api, t: &Target) -> ApiResult<Stored> {
    api.objects
        .get(&t.key())
        .await?
        .ok_or_else(|| t.not_found())
}

fn parse_rv(s: &str) -> ApiResult<Revision> {
    s.parse::<Revision>().map_err(|_| {
        ApiError::bad_request(format!("invalid resource version {s:?}: must be a number"))
    })
}

async fn list(api: &Api, t: &Target, p: &Params, acc: Accept) -> ApiResult<Response> {
    let labels = LabelSelector::parse(p.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(p.get("fieldSelector").map_or("", String::as_str), t.def)?;
    let limit = match p.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        None => 0,
    };
    // resourceVersion "" or "0" (and NotOlderThan) read the latest; an exact one reads history.
    let revision = match (
        p.get("resourceVersion").map(String::as_str),
        p.get("resourceVersionMatch").map(String::as_str),
    ) {
        (None | Some("" | "0"), _) => 0,
        (Some(rv), Some("Exact")) => parse_rv(rv)?,
        (Some(rv), _) => {
            parse_rv(rv)?;
            0
        }
    };
    let continue_token = p.get("continue").filter(|c| !c.is_empty());
    let keep = |o: &Value| labels.matches_object(o) && fields.matches(o);
    let page = api
        .objects
        .list(
            &storage::prefix(t.def, t.namespace.as_deref()),
            revision,
            limit,
            continue_token.map(String::as_str),
            &keep,
        )
        .await?;
    let mut meta = json!({"resourceVersion": page.revision.to_string()});
    if let Some(c) = &page.continue_token {
        meta["continue"] = json!(c);
    }
    if acc.table {
        let include = IncludeObject::parse(p.get("includeObject").map(String::as_str));
        let tbl = tables::table(t.def, &page.items, meta, include, true);
        return Ok(json_response(StatusCode::OK, &tbl, &[]));
    }
    if acc.metadata {
        let items: Vec<Value> = page.items.iter().map(partial).collect();
        let body = json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": meta,
            "items": items,
        });
        return Ok(json_response(StatusCode::OK, &body, &[]));
    }
    let body = json!({
        "kind": t.def.list_kind,
        "apiVersion": t.def.api_version(),
        "metadata": meta,
        "items": page.items,
    });
    Ok(json_response(StatusCode::OK, &body, &[]))
}

/// How unknown fields are treated (`fieldValidation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

fn field_validation(p: &Params) -> ApiResult<FieldValidation> {
    match p.get("fieldValidation").map(String::as_str) {
        None | Some("" | "Warn") => Ok(FieldValidation::Warn),
        Some("Ignore") => Ok(FieldValidation::Ignore),
        Some("Strict") => Ok(FieldValidation::Strict),
        Some(other) => Err(ApiError::bad_request(format!(
            "fieldValidation must be one of \"Ignore\", \"Warn\" or \"Strict\", got {other:?}"
        ))),
    }
}

/// Fields of `input` that the typed form dropped: unknown to the schema.
fn unknown_fields(input: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(tv) => unknown_fields(v, tv, &p, out),
                    None if v.is_null() => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                unknown_fields(x, y, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Decodes `obj` as its kind: unknown fields handled per `fieldValidation`, wrong shapes 400.
fn canonicalize(
    def: &ResourceDef,
    obj: Value,
    fv: FieldValidation,
    warnings: &mut Vec<String>,
) -> ApiResult<Value> {
    let typed = (def.canonicalize)(obj.clone()).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            def.kind, def.version, def.kind
        ))
    })?;
    if fv != FieldValidation::Ignore {
        let mut unknown = Vec::new();
        unknown_fields(&obj, &typed, "", &mut unknown);
        if !unknown.is_empty() {
            if fv == FieldValidation::Strict {
                let list: Vec<String> = unknown
                    .iter()
                    .map(|f| format!("unknown field \"{f}\""))
                    .collect();
                return Err(ApiError::bad_request(format!(
                    "strict decoding error: {}",
                    list.join(", ")
                )));
            }
            warnings.extend(unknown.iter().map(|f| format!("unknown field \"{f}\"")));
        }
    }
    Ok(typed)
}

fn invalid(def: &ResourceDef, obj: &Value, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid(
        def.group,
        def.kind,
        meta_str(obj, "name").unwrap_or(""),
        causes,
    )
}

/// Checks the namespace a namespaced object is written to exists and is not terminating.
async fn check_namespace(api: &Api, def: &ResourceDef, ns: Option<&str>) -> ApiResult<()> {
    let Some(ns) = ns.filter(|_| def.namespaced) else {
        return Ok(());
    };
    let nsdef = resources::find("", "v1", "namespaces").unwrap_or_else(|| unreachable!());
    match api.objects.get(&storage::key(nsdef, None, ns)).await? {
        None => Err(ApiError::not_found("", "namespaces", ns)),
        Some(s) if s.obj.pointer("/metadata/deletionTimestamp").is_some() => {
            Err(ApiError::forbidden(format!(
                "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                def.plural, ""
            )))
        }
        Some(_) => Ok(()),
    }
}

/// The Priority admission plugin: a pod's `priority` and `preemptionPolicy` come from its
/// `priorityClassName` (or the global default class, whose name it then gets); a pod may not
/// state a priority of its own that differs.
async fn admit_priority(api: &Api, pod: &mut Value) -> ApiResult<()> {
    let pcdef = resources::find("scheduling.k8s.io", "v1", "priorityclasses")
        .unwrap_or_else(|| unreachable!("priorityclasses are served"));
    let name = pod
        .pointer("/spec/priorityClassName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    let pod_name = meta_str(pod, "name").unwrap_or("").to_string();
    let class = match &name {
        Some(n) => match api.objects.get(&storage::key(pcdef, None, n)).await? {
            Some(s) => Some(s.obj),
            None => {
                return Err(ApiError::forbidden(format!(
                    "pods \"{pod_name}\" is forbidden: no PriorityClass with name {n} was found"
                )));
            }
        },
        None => api
            .objects
            .list(&storage::prefix(pcdef, None), 0, 0, None, &|o| {
                o.get("globalDefault") == Some(&json!(true))
            })
            .await?
            .items
            .into_iter()
            .min_by_key(|o| o.get("value").and_then(Value::as_i64).unwrap_or(0)),
    };
    let (value, policy, class_name) = match &class {
        Some(c) => (
            c.get("value").and_then(Value::as_i64).unwrap_or(0),
            c.get("preemptionPolicy")
                .and_then(Value::as_str)
                .unwrap_or("PreemptLowerPriority")
                .to_string(),
            meta_str(c, "name").map(str::to_string),
        ),
        None => (0, "PreemptLowerPriority".to_string(), None),
    };
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    if let Some(given) = spec.get("priority").and_then(Value::as_i64)
        && given != value
    {
        return Err(ApiError::forbidden(format!(
            "pods \"{pod_name}\" is forbidden: the integer value of priority ({given}) must not be provided in pod spec; priority admission controller computed {value} from the given PriorityClass name"
        )));
    }
    spec.insert("priority".into(), json!(value));
    spec.insert("preemptionPolicy".into(), json!(policy));
    if let Some(n) = class_name {
        spec.insert("priorityClassName".into(), json!(n));
    }
    Ok(())
}

fn dry_run(p: &Params) -> ApiResult<bool> {
    match p.get("dryRun").map(String::as_str) {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "dryRun must be \"All\", got {other:?}"
        ))),
    }
}

/// Creates an object. Returns it as stored and any warnings.
pub(crate) async fn create(
    api: &Api,
    t: &Target,
    mut obj: Value,
    p: &Params,
) -> ApiResult<(Value, Vec<String>)> {
    let def = t.def;
    let fv = field_validation(p)?;
    let dry = dry_run(p)?;
    let mut warnings = Vec::new();
    meta::check_type(&mut obj, def)?;
    // Decode first (400 for wrong shapes), as upstream does before admission.
    let mut obj = canonicalize(def, obj, fv, &mut warnings)?;
    meta::prepare_create(&mut obj, def, t.namespace.as_deref())?;
    if (def.group, def.kind) == ("", "Pod") {
        admit_priority(api, &mut obj).await?;
    }
    kinds::apply_defaults(def, &mut obj);
    kinds::initial_status(def, &mut obj);
    let mut causes = Vec::new();
    meta::validate_meta(&obj, def, &mut causes);
    kinds::validate(def, &obj, &mut causes);
    if !causes.is_empty() {
        return Err(invalid(def, &obj, causes));
    }
    let ns = meta_str(&obj, "namespace").map(str::to_string);
    check_namespace(api, def, ns.as_deref()).await?;
    let name = meta_str(&obj, "name").unwrap_or("").to_string();
    let key = storage::key(def, ns.as_deref(), &name);
    for _ in 0..MAX_RETRIES {
        let mut candidate = obj.clone();
        let allocs = alloc::for_create(def, &mut candidate).map_err(|c| invalid(def, &obj, c))?;
        let mut candidate = (def.canonicalize)(candidate).map_err(ApiError::internal)?;
        if dry {
            return Ok((candidate, warnings));
        }
        let extra: Vec<(String, Vec<u8>)> = allocs
            .creates
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    format!("{}/{name}", ns.as_deref().unwrap_or("")).into_bytes(),
                )
            })
            .collect();
        match api.objects.create(&key, &candidate, extra).await? {
            Ok(rev) => {
                meta::metadata_mut(&mut candidate)
                    .insert("resourceVersion".into(), json!(rev.to_string()));
                return Ok((candidate, warnings));
            }
            Err(existing) if existing == key => {
                return Err(ApiError::already_exists(def.group, def.plural, &name));
            }
            Err(taken) => {
                // A randomly chosen IP or port was taken meanwhile: choose again. A requested
                // one is the client's conflict.
                if allocs.requested.contains(&taken) {
                    return Err(invalid(def, &obj, vec![alloc::taken_cause(&taken)]));
                }
            }
        }
    }
    Err(ApiError::internal("allocation retries exhausted"))
}

/// Which part of an object a write changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Everything but status.
    Main,
    /// Only status (`/status`).
    Status,
    /// Only `spec.finalizers` of a namespace (`/finalize`).
    Finalize,
}

/// Merges what the client sent with the stored object for `mode`, defaults and validates it.
fn prepare_update(
    def: &ResourceDef,
    mut new: Value,
    old: &Value,
    mode: Mode,
    fv: FieldValidation,
    warnings: &mut Vec<String>,
) -> ApiResult<Value> {
    meta::check_type(&mut new, def)?;
    let mut new = canonicalize(def, new, fv, warnings)?;
    match mode {
        Mode::Main => {
            if def.has_status {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            if def.kind == "Namespace" {
                // spec.finalizers only change through /finalize.
                new["spec"] = old.get("spec").cloned().unwrap_or(json!({}));
            }
        }
        Mode::Status => {
            let status = new.get("status").cloned();
            let mut merged = old.clone();
            match status {
                Some(s) => merged["status"] = s,
                None => {
                    if let Some(m) = merged.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            merged["metadata"]["resourceVersion"] = new["metadata"]["resourceVersion"].clone();
            new = merged;
        }
        Mode::Finalize => {
            let finalizers = new.pointer("/spec/finalizers").cloned();
            let mut merged = old.clone();
            merged["spec"]["finalizers"] = finalizers.unwrap_or(json!([]));
            merged["metadata"]["resourceVersion"] = new["metadata"]["resourceVersion"].clone();
            new = merged;
        }
    }
    meta::prepare_update(&mut new, old, def);
    kinds::apply_defaults(def, &mut new);
    let mut causes = Vec::new();
    meta::validate_meta(&new, def, &mut causes);
    kinds::validate(def, &new, &mut causes);
    kinds::validate_update(def, &new, old, &mut causes);
    if !causes.is_empty() {
        return Err(invalid(def, &new, causes));
    }
    (def.canonicalize)(new).map_err(ApiError::internal)
}

/// Whether an object being deleted has lost its last finalizer (and so is removed now).
fn finalized(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some()
        && obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        && obj
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
}

/// Writes `new` over `old` (read at `old_rev`), with allocation changes. `Ok(None)` when the
/// object changed meanwhile.
async fn write_update(
    api: &Api,
    def: &ResourceDef,
    key: &str,
    old: &Value,
    old_rev: Revision,
    mut new: Value,
) -> ApiResult<Result<Value, Option<String>>> {
    if finalized(&new) {
        let also = alloc::held(def, old);
        return Ok(match api.objects.delete(key, old_rev, also).await? {
            Some(rev) => {
                meta::metadata_mut(&mut new)
                    .insert("resourceVersion".into(), json!(rev.to_string()));
                Ok(new)
            }
            None => Err(None),
        });
    }
    let changes = alloc::for_update(def, old, &mut new).map_err(|c| invalid(def, &new, c))?;
    let mut txn = Txn::update(key.as_bytes().to_vec(), storage::encode(&new), old_rev);
    for k in &changes.creates {
        txn.compare.push(Compare {
            key: k.as_bytes().to_vec(),
            mod_revision: 0,
        });
        txn.success.push(Op::Put {
            key: k.as_bytes().to_vec(),
            value: key.as_bytes().to_vec(),
        });
    }
    for k in &changes.releases {
        txn.success.push(Op::Delete {
            key: k.as_bytes().to_vec(),
        });
    }
    let r = api.objects.txn(txn).await?;
    if !r.succeeded {
        // Either the object changed or a chosen allocation was taken.
        let taken = changes.requested.first().cloned();
        return Ok(Err(taken));
    }
    meta::metadata_mut(&mut new).insert("resourceVersion".into(), json!(r.revision.to_string()));
    Ok(Ok(new))
}

fn conflict(t: &Target) -> ApiError {
    ApiError::conflict(
        t.def.group,
        t.def.plural,
        t.name(),
        "the object has been modified; please apply your changes to the latest version and try again",
    )
}

/// Read-modify-write: `change` builds the new object from the current one; retried on
/// contention unless the client pinned a resourceVersion.
async fn guaranteed_update<F>(api: &Api, t: &Target, dry: bool, mut change: F) -> ApiResult<Value>
where
    F: FnMut(&Value) -> ApiResult<(Value, Option<Revision>)>,
{
    let key = t.key();
    for _ in 0..MAX_RETRIES {
        let cur = get(api, t).await?;
        let (new, precondition) = change(&cur.obj)?;
        if let Some(rv) = precondition
            && rv != cur.revision
        {
            return Err(conflict(t));
        }
        let mut unchanged = new.clone();
        let mut current = cur.obj.clone();
        for o in [&mut unchanged, &mut current] {
            if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
        }
        if unchanged == current || dry {
            // A no-op write keeps the resourceVersion, as upstream.
            let mut out = new;
            meta::metadata_mut(&mut out)
                .insert("resourceVersion".into(), json!(cur.revision.to_string()));
            return Ok(out);
        }
        match write_update(api, t.def, &key, &cur.obj, cur.revision, new).await? {
            Ok(v) => return Ok(v),
            Err(Some(taken)) if precondition.is_none() => {
                tracing::debug!(key = %taken, "allocation taken, retrying");
            }
            Err(_) if precondition.is_some() => return Err(conflict(t)),
            Err(_) => {}
        }
    }
    Err(ApiError::conflict(
        t.def.group,
        t.def.plural,
        t.name(),
        "too many concurrent writers; try again",
    ))
}

fn precondition_of(obj: &Value) -> ApiResult<Option<Revision>> {
    match meta_str(obj, "resourceVersion") {
        None | Some("") => Ok(None),
        Some(rv) => parse_rv(rv).map(Some),
    }
}

/// PUT.
pub(crate) async fn update(
    api: &Api,
    t: &Target,
    obj: Value,
    p: &Params,
    mode: Mode,
) -> ApiResult<(Value, Vec<String>)> {
    let fv = field_validation(p)?;
    let dry = dry_run(p)?;
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let body_name = meta_str(&obj, "name").unwrap_or("");
    if body_name != t.name() {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({})",
            t.name()
        )));
    }
    if let Some(ns) = meta_str(&obj, "namespace")
        && t.def.namespaced
        && !ns.is_empty()
        && Some(ns) != t.namespace.as_deref()
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let precondition = precondition_of(&obj)?;
    let mut warnings = Vec::new();
    let out = guaranteed_update(api, t, dry, |old| {
        warnings.clear();
        let new = prepare_update(t.def, obj.clone(), old, mode, fv, &mut warnings)?;
        Ok((new, precondition))
    })
    .await?;
    Ok((out, warnings))
}

/// PATCH.
async fn patch(
    api: &Api,
    t: &Target,
    headers: &HeaderMap,
    body: &Bytes,
    p: &Params,
    mode: Mode,
) -> ApiResult<(Value, Vec<String>)> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ty =
        PatchType::from_content_type(ct).ok_or_else(|| ApiError::unsupported_media_type(ct))?;
    let fv = field_validation(p)?;
    let dry = dry_run(p)?;
    let schema = (t.def.schema_name)();
    let mut warnings = Vec::new();
    let out = guaranteed_update(api, t, dry, |old| {
        warnings.clear();
        let patched = patch::apply(ty, old, body, openapi::definitions(), &schema)?;
        // A resourceVersion in the patch is a precondition; the old one carried along is not.
        let precondition = match meta_str(&patched, "resourceVersion") {
            Some(rv) if Some(rv) != meta_str(old, "resourceVersion") => Some(parse_rv(rv)?),
            _ => None,
        };
        if meta_str(&patched, "name") != meta_str(old, "name") {
            return Err(ApiError::bad_request(
                "metadata.name: Invalid value: the name of a patched object cannot change",
            ));
        }
        let new = prepare_update(t.def, patched, old, mode, fv, &mut warnings)?;
        Ok((new, precondition))
    })
    .await?;
    Ok((out, warnings))
}

/// `DeleteOptions` from the body or the query.
#[derive(Debug, Default)]
pub(crate) struct DeleteOptions {
    grace: Option<i64>,
    propagation: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    dry_run: bool,
}

impl DeleteOptions {
    fn parse(headers: &HeaderMap, body: &[u8], p: &Params) -> ApiResult<DeleteOptions> {
        let mut o = DeleteOptions::default();
        if !body.is_empty() {
            let v = decode_body(headers, body)?;
            o.grace = v.get("gracePeriodSeconds").and_then(Value::as_i64);
            o.propagation = v
                .get("propagationPolicy")
                .and_then(Value::as_str)
                .map(str::to_string);
            if v.get("orphanDependents") == Some(&json!(true)) {
                o.propagation = Some("Orphan".into());
            }
            o.uid = v
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
                .map(str::to_string);
            o.resource_version = v
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_string);
            o.dry_run = v
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|d| d.iter().any(|x| x == "All"));
        }
        if let Some(g) = p.get("gracePeriodSeconds") {
            o.grace =
                Some(g.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}"))
                })?);
        }
        if let Some(pp) = p.get("propagationPolicy") {
            o.propagation = Some(pp.clone());
        }
        o.dry_run |= dry_run(p)?;
        match o.propagation.as_deref() {
            None | Some("Orphan" | "Background" | "Foreground") => Ok(o),
            Some(other) => Err(ApiError::invalid(
                "",
                "DeleteOptions",
                "",
                vec![Cause::not_supported(
                    "propagationPolicy",
                    other,
                    &["Foreground", "Background", "Orphan", "nil"],
                )],
            )),
        }
    }
}

/// DELETE of one object. Returns the object (deleted, or marked for deletion) and the code.
pub(crate) async fn delete(
    api: &Api,
    t: &Target,
    opts: &DeleteOptions,
) -> ApiResult<(Value, StatusCode)> {
    let key = t.key();
    for _ in 0..MAX_RETRIES {
        let cur = get(api, t).await?;
        let obj = &cur.obj;
        if let Some(uid) = &opts.uid
            && meta_str(obj, "uid") != Some(uid.as_str())
        {
            return Err(ApiError::conflict(
                t.def.group,
                t.def.plural,
                t.name(),
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(obj, "uid").unwrap_or("")
                ),
            ));
        }
        if let Some(rv) = &opts.resource_version
            && parse_rv(rv)? != cur.revision
        {
            return Err(ApiError::conflict(
                t.def.group,
                t.def.plural,
                t.name(),
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    cur.revision
                ),
            ));
        }
        let mut new = obj.clone();
        let mut finalizers: Vec<Value> = new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let propagation = opts.propagation.as_deref().unwrap_or("Background");
        let add = |f: &mut Vec<Value>, name: &str| {
            if !f.iter().any(|x| x == name) {
                f.push(json!(name));
            }
        };
        let dependents_possible = t.def.kind != "Namespace";
        match propagation {
            "Orphan" if dependents_possible => add(&mut finalizers, "orphan"),
            "Foreground" if dependents_possible => add(&mut finalizers, "foregroundDeletion"),
            _ => {}
        }
        let spec_finalizers = t.def.kind == "Namespace"
            && new
                .pointer("/spec/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
        // A pod running on a node is deleted gracefully: marked, and removed by its node agent
        // once its containers stopped.
        let grace = match (t.def.kind, opts.grace) {
            ("Pod", g) => {
                let bound = new
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .is_some_and(|n| !n.is_empty());
                let terminal = matches!(
                    new.pointer("/status/phase").and_then(Value::as_str),
                    Some("Succeeded" | "Failed")
                );
                let g = g.unwrap_or_else(|| {
                    new.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                        .unwrap_or(30)
                });
                if bound && !terminal && g > 0 {
                    Some(g)
                } else {
                    None
                }
            }
            _ => None,
        };
        let already_deleting = new.pointer("/metadata/deletionTimestamp").is_some();
        if finalizers.is_empty() && !spec_finalizers && grace.is_none() {
            if opts.dry_run {
                return Ok((cur.obj, StatusCode::OK));
            }
            let also = alloc::held(t.def, obj);
            match api.objects.delete(&key, cur.revision, also).await? {
                Some(rev) => {
                    meta::metadata_mut(&mut new)
                        .insert("resourceVersion".into(), json!(rev.to_string()));
                    return Ok((new, StatusCode::OK));
                }
                None => continue,
            }
        }
        // Mark for deletion: finalizers (or the node agent) finish it.
        let m = meta::metadata_mut(&mut new);
        if !finalizers.is_empty() {
            m.insert("finalizers".into(), Value::Array(finalizers));
        }
        let grace_s = grace.unwrap_or(0);
        if !already_deleting {
            let at = chrono::Utc::now() + chrono::Duration::seconds(grace_s);
            m.insert(
                "deletionTimestamp".into(),
                json!(at.format("%Y-%m-%dT%H:%M:%SZ").to_string()),
            );
            m.insert("deletionGracePeriodSeconds".into(), json!(grace_s));
        } else if let Some(g) = grace {
            // A shorter grace period shortens a pending graceful deletion.
            let cur_g = m
                .get("deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(i64::MAX);
            if g < cur_g {
                m.insert("deletionGracePeriodSeconds".into(), json!(g));
            }
        }
        if t.def.kind == "Namespace" {
            new["status"]["phase"] = json!("Terminating");
        }
        if new == cur.obj || opts.dry_run {
            return Ok((cur.obj, StatusCode::OK));
        }
        match api.objects.update(&key, &new, cur.revision).await? {
            Some(rev) => {
                meta::metadata_mut(&mut new)
                    .insert("resourceVersion".into(), json!(rev.to_string()));
                return Ok((new, StatusCode::OK));
            }
            None => continue,
        }
    }
    Err(conflict(t))
}

async fn delete_collection(
    api: &Api,
    t: &Target,
    p: &Params,
    opts: &DeleteOptions,
) -> ApiResult<Response> {
    let labels = LabelSelector::parse(p.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(p.get("fieldSelector").map_or("", String::as_str), t.def)?;
    let keep = |o: &Value| labels.matches_object(o) && fields.matches(o);
    let page = api
        .objects
        .list(
            &storage::prefix(t.def, t.namespace.as_deref()),
            0,
            0,
            None,
            &keep,
        )
        .await?;
    let mut deleted = Vec::new();
    for o in page.items {
        let target = Target {
            def: t.def,
            namespace: meta_str(&o, "namespace").map(str::to_string),
            name: meta_str(&o, "name").map(str::to_string),
            sub: None,
        };
        match delete(api, &target, opts).await {
            Ok((obj, _)) => deleted.push(obj),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let body = json!({
        "kind": t.def.list_kind,
        "apiVersion": t.def.api_version(),
        "metadata": {},
        "items": deleted,
    });
    Ok(json_response(StatusCode::OK, &body, &[]))
}

async fn subresource(
    api: &Api,
    t: &Target,
    sub: &str,
    method: &Method,
    headers: &HeaderMap,
    p: &Params,
    body: &Bytes,
) -> ApiResult<Response> {
    let ok = |v: &Value| json_response(StatusCode::OK, v, &[]);
    match (sub, method) {
        ("status", &Method::GET) => Ok(ok(&get(api, t).await?.obj)),
        ("status", &Method::PUT) => {
            let (o, w) = update(api, t, decode_body(headers, body)?, p, Mode::Status).await?;
            Ok(json_response(StatusCode::OK, &o, &w))
        }
        ("status", &Method::PATCH) => {
            let (o, w) = patch(api, t, headers, body, p, Mode::Status).await?;
            Ok(json_response(StatusCode::OK, &o, &w))
        }
        ("finalize", &Method::PUT) => {
            let (o, w) = update(api, t, decode_body(headers, body)?, p, Mode::Finalize).await?;
            Ok(json_response(StatusCode::OK, &o, &w))
        }
        ("scale", &Method::GET) => Ok(ok(&scale_of(&get(api, t).await?.obj))),
        ("scale", &Method::PUT | &Method::PATCH) => {
            let dry = dry_run(p)?;
            let is_put = method == Method::PUT;
            let put_body = if is_put {
                Some(decode_body(headers, body)?)
            } else {
                None
            };
            let ty = if is_put {
                None
            } else {
                let ct = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                Some(
                    PatchType::from_content_type(ct)
                        .ok_or_else(|| ApiError::unsupported_media_type(ct))?,
                )
            };
            let out = guaranteed_update(api, t, dry, |old| {
                let scale = scale_of(old);
                let new_scale = match (&put_body, ty) {
                    (Some(b), _) => b.clone(),
                    (None, Some(ty)) => patch::apply(
                        ty,
                        &scale,
                        body,
                        openapi::definitions(),
                        "io.k8s.api.autoscaling.v1.Scale",
                    )?,
                    (None, None) => unreachable!("a scale write is a PUT or a PATCH"),
                };
                let replicas = new_scale
                    .pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                if replicas < 0 {
                    return Err(ApiError::invalid(
                        "autoscaling",
                        "Scale",
                        t.name(),
                        vec![Cause::invalid(
                            "spec.replicas",
                            &replicas.to_string(),
                            "must be greater than or equal to 0",
                        )],
                    ));
                }
                let precondition = match meta_str(&new_scale, "resourceVersion") {
                    Some(rv) if Some(rv) != meta_str(&scale, "resourceVersion") => {
                        Some(parse_rv(rv)?)
                    }
                    _ => None,
                };
                let mut new = old.clone();
                new["spec"]["replicas"] = json!(replicas);
                meta::prepare_update(&mut new, old, t.def);
                Ok((new, precondition))
            })
            .await?;
            Ok(ok(&scale_of(&out)))
        }
        ("binding", &Method::POST) => {
            let b = decode_body(headers, body)?;
            bind(api, t, &b).await?;
            Ok(ok(
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        ("eviction", &Method::POST) => {
            let opts = DeleteOptions::default();
            delete(api, t, &opts).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                &[],
            ))
        }
        ("log", &Method::GET) => pod_log(api, t, p).await,
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({method} {}/{sub})",
            t.def.qualified()
        ))),
    }
}

/// The pod's node agent and the container a `log`/`exec` request means: the one named, or the
/// only one (upstream's messages when neither).
async fn pod_container(
    api: &Api,
    t: &Target,
    container: Option<&str>,
) -> ApiResult<(Value, String, crate::proxy::AgentEndpoint, String)> {
    let pod = get(api, t).await?.obj;
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if node.is_empty() {
        return Err(ApiError::bad_request(format!(
            "pod {} does not have a host assigned",
            t.name()
        )));
    }
    let names: Vec<String> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let container = match container.filter(|c| !c.is_empty()) {
        Some(c) if names.iter().any(|n| n == c) => c.to_string(),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {}",
                t.name()
            )));
        }
        None if names.len() == 1 => names[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {}, choose one of: [{}]",
                t.name(),
                names.join(" ")
            )));
        }
    };
    let nodes = resources::find("", "v1", "nodes").unwrap_or_else(|| unreachable!());
    let node_obj = api
        .objects
        .get(&storage::key(nodes, None, &node))
        .await?
        .ok_or_else(|| {
            ApiError::unavailable(format!("node {node:?} of pod {} is gone", t.name()))
        })?;
    let ep = crate::proxy::endpoint(&node, &node_obj.obj)?;
    Ok((pod, node, ep, container))
}

/// `pods/log`: streamed from the agent of the pod's node.
async fn pod_log(api: &Api, t: &Target, p: &Params) -> ApiResult<Response> {
    let (_, node, ep, container) =
        pod_container(api, t, p.get("container").map(String::as_str)).await?;
    // Built in a block: the serializer is not Send and must not live across an await.
    let query = {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for key in [
            "follow",
            "tailLines",
            "previous",
            "limitBytes",
            "timestamps",
            "sinceSeconds",
            "sinceTime",
        ] {
            if let Some(v) = p.get(key) {
                q.append_pair(key, v);
            }
        }
        q.finish()
    };
    let path = format!(
        "/containerLogs/{}/{}/{}?{}",
        t.namespace.as_deref().unwrap_or(""),
        t.name(),
        container,
        query
    );
    let resp =
        crate::proxy::forward(&ep, Method::GET, &path, &api.node_token, &HeaderMap::new()).await?;
    let status = resp.status();
    if !status.is_success() {
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        return Err(match status.as_u16() {
            400 | 404 => ApiError::bad_request(text),
            _ => ApiError::unavailable(format!("the agent of node {node:?}: {status}: {text}")),
        });
    }
    let mut out = Response::new(Body::new(resp.into_body()));
    out.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(out)
}

/// `pods/exec`: the client's upgrade request goes to the agent of the pod's node (as the
/// kubelet's `/exec/<ns>/<pod>/<container>`), and once the agent switches protocols the two
/// connections are spliced byte for byte, so the WebSocket stream protocol runs end to end
/// between kubectl and the agent. A refusal from the agent (a `Status`) is relayed as it is.
async fn pod_exec(
    api: &Api,
    t: &Target,
    mut parts: axum::http::request::Parts,
) -> ApiResult<Response> {
    let query = parts.uri.query().unwrap_or("").to_string();
    let container = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.into_owned());
    let (pod, _, ep, container) = pod_container(api, t, container.as_deref()).await?;
    if let Some(phase @ ("Succeeded" | "Failed")) =
        pod.pointer("/status/phase").and_then(Value::as_str)
    {
        return Err(ApiError::bad_request(format!(
            "cannot exec into a container in a completed pod; current phase is {phase}"
        )));
    }
    let path = format!(
        "/exec/{}/{}/{}?{}",
        t.namespace.as_deref().unwrap_or(""),
        t.name(),
        container,
        query
    );
    let mut resp = crate::proxy::forward(
        &ep,
        parts.method.clone(),
        &path,
        &api.node_token,
        &parts.headers,
    )
    .await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let mut out = Response::builder().status(resp.status());
        if let Some(ct) = resp.headers().get(header::CONTENT_TYPE) {
            out = out.header(header::CONTENT_TYPE, ct);
        }
        return out
            .body(Body::new(resp.into_body()))
            .map_err(ApiError::internal);
    }
    let Some(client) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(ApiError::bad_request(
            "exec needs a connection that can be upgraded (HTTP/1.1 with Upgrade)",
        ));
    };
    let mut out = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for (name, value) in resp.headers() {
        if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
            out = out.header(name, value);
        }
    }
    let agent = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (Ok(client), Ok(agent)) = (client.await, agent.await) else {
            tracing::debug!("an exec connection failed to switch protocols");
            return;
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut agent = hyper_util::rt::TokioIo::new(agent);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut agent).await {
            tracing::debug!(error = %e, "an exec connection ended with an error");
        }
    });
    out.body(Body::empty()).map_err(ApiError::internal)
}

/// Binds a pod to a node (`pods/binding`): sets `spec.nodeName` once.
async fn bind(api: &Api, t: &Target, binding: &Value) -> ApiResult<()> {
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if node.is_empty() {
        return Err(ApiError::invalid(
            "",
            "Binding",
            t.name(),
            vec![Cause::required("target.name")],
        ));
    }
    guaranteed_update(api, t, false, |old| {
        let current = old.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
        if !current.is_empty() {
            return Err(ApiError::conflict(
                "",
                "pods",
                t.name(),
                &format!("pod {} is already assigned to node {current:?}", t.name()),
            ));
        }
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::conflict("", "pods", t.name(), "pod is being deleted"));
        }
        let mut new = old.clone();
        new["spec"]["nodeName"] = json!(node);
        let conds = new["status"]
            .as_object_mut()
            .map(|s| s.entry("conditions").or_insert_with(|| json!([])));
        if let Some(Value::Array(c)) = conds {
            c.retain(|x| x.get("type") != Some(&json!("PodScheduled")));
            c.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": meta::now()}));
        }
        Ok((new, None))
    })
    .await
    .map(|_| ())
}

/// The `autoscaling/v1` `Scale` of a scalable object.
fn scale_of(obj: &Value) -> Value {
    let m = obj.get("metadata").cloned().unwrap_or(json!({}));
    // The label selector in its string form (as `kubectl get -o wide` prints it), "" if none.
    let selector =
        Some(tables::selector_string(obj.pointer("/spec/selector"))).filter(|s| s != "<none>");
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m.get("name"), "namespace": m.get("namespace"), "uid": m.get("uid"),
            "resourceVersion": m.get("resourceVersion"), "creationTimestamp": m.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector.unwrap_or_default(),
        },
    })
}

/// One watch event as JSON, or `None` when the object does not concern this watch.
fn watch_event(
    ev: &skiff_store::Event,
    keep: &dyn Fn(&Value) -> bool,
) -> ApiResult<Option<(&'static str, Value)>> {
    let prev = match &ev.prev_kv {
        Some(p) => Some(storage::decode(p)?),
        None => None,
    };
    let prev_match = prev.as_ref().is_some_and(keep);
    match ev.kind {
        EventKind::Put => {
            let cur = storage::decode(&ev.kv)?;
            let cur_match = keep(&cur);
            Ok(match (prev.is_some() && prev_match, cur_match) {
                (false, true) => Some(("ADDED", cur)),
                (true, true) => Some(("MODIFIED", cur)),
                (true, false) => {
                    // Left the selection: a DELETED with the new state, as upstream.
                    Some(("DELETED", cur))
                }
                (false, false) => None,
            })
        }
        EventKind::Delete => Ok(match prev {
            Some(p) if prev_match => {
                let mut p = p;
                meta::metadata_mut(&mut p).insert(
                    "resourceVersion".into(),
                    json!(ev.kv.mod_revision.to_string()),
                );
                Some(("DELETED", p))
            }
            _ => None,
        }),
    }
}

async fn watch(api: &Api, t: &Target, p: &Params, acc: Accept) -> ApiResult<Response> {
    let def = t.def;
    let labels = LabelSelector::parse(p.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(p.get("fieldSelector").map_or("", String::as_str), def)?;
    let bookmarks = flag(p, "allowWatchBookmarks");
    let send_initial = flag(p, "sendInitialEvents");
    let include = IncludeObject::parse(p.get("includeObject").map(String::as_str));
    let timeout = match p.get("timeoutSeconds") {
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {s:?}")))?,
        None => DEFAULT_WATCH_SECONDS,
    };
    let prefix = storage::prefix(def, t.namespace.as_deref());
    let keep = move |o: &Value| labels.matches_object(o) && fields.matches(o);
    let rv = p.get("resourceVersion").map(String::as_str).unwrap_or("");
    // "" and "0": the current state as ADDED events, then changes. An exact resourceVersion:
    // changes after it (410 Gone once compacted).
    let (initial, start) = if rv.is_empty() || rv == "0" || send_initial {
        let page = api.objects.list(&prefix, 0, 0, None, &keep).await?;
        (Some(page.items), page.revision + 1)
    } else {
        (None, parse_rv(rv)? + 1)
    };
    let mut stream = api.objects.node().watch(
        RangeRequest::prefix(prefix.into_bytes()),
        start,
        Some(BOOKMARK_EVERY),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let encode = move |ty: &str, obj: Value, first: &mut bool| -> Bytes {
        let object = if acc.table && ty != "ERROR" && ty != "BOOKMARK" {
            let t = tables::table(def, &[obj], json!({}), include, *first);
            *first = false;
            t
        } else if acc.metadata && ty != "ERROR" && ty != "BOOKMARK" {
            partial(&obj)
        } else {
            obj
        };
        let mut line =
            serde_json::to_vec(&json!({"type": ty, "object": object})).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    };
    let bookmark = move |rev: Revision, initial_end: bool| -> Value {
        let mut m = json!({"resourceVersion": rev.to_string()});
        if initial_end {
            m["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": m})
    };
    tokio::spawn(async move {
        let mut first = true;
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        if let Some(items) = initial {
            for o in items {
                if tx.send(encode("ADDED", o, &mut first)).await.is_err() {
                    return;
                }
            }
            if send_initial && bookmarks {
                let b = bookmark(start - 1, true);
                if tx.send(encode("BOOKMARK", b, &mut first)).await.is_err() {
                    return;
                }
            }
        }
        loop {
            let next = tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                n = stream.next() => n,
            };
            // The events to send, and whether the watch ends after them (after an ERROR).
            let (lines, ends): (Vec<Bytes>, bool) = match next {
                None => return,
                Some(Err(StoreError::Compacted {
                    requested,
                    compacted,
                })) => {
                    let e = ApiError::gone(format!(
                        "too old resource version: {} ({compacted})",
                        requested.saturating_sub(1)
                    ));
                    (vec![encode("ERROR", e.status(), &mut first)], true)
                }
                Some(Err(e)) => {
                    let e: ApiError = e.into();
                    (vec![encode("ERROR", e.status(), &mut first)], true)
                }
                Some(Ok(WatchEvent::Progress(rev))) => {
                    if !bookmarks {
                        continue;
                    }
                    (
                        vec![encode("BOOKMARK", bookmark(rev, false), &mut first)],
                        false,
                    )
                }
                Some(Ok(WatchEvent::Events(evs))) => {
                    let mut out = Vec::new();
                    let mut failed = false;
                    for ev in &evs {
                        match watch_event(ev, &keep) {
                            Ok(Some((ty, obj))) => out.push(encode(ty, obj, &mut first)),
                            Ok(None) => {}
                            Err(e) => {
                                out.push(encode("ERROR", e.status(), &mut first));
                                failed = true;
                                break;
                            }
                        }
                    }
                    (out, failed)
                }
            };
            for l in lines {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            if ends {
                return;
            }
        }
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    }));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(resp)
}

/// Creates an object from inside the server (bootstrap objects).
pub(crate) async fn create_internal(
    api: &Api,
    def: &'static ResourceDef,
    namespace: Option<&str>,
    obj: Value,
) -> ApiResult<Value> {
    let t = Target {
        def,
        namespace: namespace.map(str::to_string),
        name: None,
        sub: None,
    };
    create(api, &t, obj, &Params::new()).await.map(|(o, _)| o)
}

/// Creates an object from inside the server, or replaces the one there (objects the server
/// keeps as it wants them, like the `kubernetes` Service's endpoints).
pub(crate) async fn put_internal(
    api: &Api,
    def: &'static ResourceDef,
    namespace: Option<&str>,
    mut obj: Value,
) -> ApiResult<Value> {
    match create_internal(api, def, namespace, obj.clone()).await {
        Err(e) if e.code == 409 => {
            let t = Target {
                def,
                namespace: namespace.map(str::to_string),
                name: meta_str(&obj, "name").map(str::to_string),
                sub: None,
            };
            let current = get(api, &t).await?;
            obj["metadata"]["resourceVersion"] = current.obj["metadata"]["resourceVersion"].clone();
            update(api, &t, obj, &Params::new(), Mode::Main)
                .await
                .map(|(o, _)| o)
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_to_targets() {
        let t = parse_target("/api/v1/namespaces/default/pods/web/status").unwrap();
        assert_eq!(
            (
                t.def.plural,
                t.namespace.as_deref(),
                t.name(),
                t.sub.as_deref()
            ),
            ("pods", Some("default"), "web", Some("status"))
        );
        let t = parse_target("/api/v1/namespaces/kube-system").unwrap();
        assert_eq!((t.def.plural, t.name()), ("namespaces", "kube-system"));
        let t = parse_target("/api/v1/namespaces/x/finalize").unwrap();
        assert_eq!(
            (t.def.plural, t.name(), t.sub.as_deref()),
            ("namespaces", "x", Some("finalize"))
        );
        let t = parse_target("/apis/apps/v1/deployments").unwrap();
        assert_eq!(
            (t.def.plural, t.namespace.as_deref()),
            ("deployments", None)
        );
        assert_eq!(parse_target("/api/v1/pods/x").unwrap_err().code, 404);
        assert_eq!(
            parse_target("/apis/apps/v9/deployments").unwrap_err().code,
            404
        );
        assert_eq!(parse_target("/api/v1/widgets").unwrap_err().code, 404);
    }

    #[test]
    fn unknown_fields_are_found_with_paths() {
        let input = json!({"spec": {"replicas": 1, "bogus": true, "template": {"spec": {"containers": [{"name": "a", "imagex": "y"}]}}}});
        let typed =
            json!({"spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "a"}]}}}});
        let mut out = Vec::new();
        unknown_fields(&input, &typed, "", &mut out);
        assert_eq!(
            out,
            vec!["spec.bogus", "spec.template.spec.containers[0].imagex"]
        );
    }
}
