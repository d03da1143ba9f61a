//! The generic REST storage path: one implementation of create, get, list, update,
//! patch and delete for every kind, with per-kind behaviour taken from the kinds table
//! (`KindInfo`) and its strategy.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use krate_api::error::success_status;
use krate_api::managed::{self, Manager};
use krate_api::object::{self, get, get_str};
use krate_api::patch::{apply_json_patch, apply_merge_patch, PatchType};
use krate_api::schema::{self, Node};
use krate_api::selectors::{FieldSelector, LabelSelector};
use krate_api::validation::{self, validate_annotations, validate_labels};
use krate_api::{ApiError, ApiResult, FieldError, KindInfo, Registry};
use krate_store::{ListRequest, Revision, Store, StoreError};
use serde_json::{json, Value};

use crate::admission::{Attributes, Operation};
use crate::cache::{CachedObject, WatchCache};
use crate::request::RequestAttributes;
use crate::rest::HookTable;

/// How unknown fields in a request body are treated (`fieldValidation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_validation: FieldValidation,
    /// `fieldManager`, or the client's user-agent prefix as upstream defaults it.
    pub field_manager: String,
    /// `force` (server-side apply takes conflicting fields over).
    pub force: bool,
    /// Who asks and for what (None: the server's own writes).
    pub request: Option<Arc<RequestAttributes>>,
}

pub(crate) fn manager<'a>(
    kind: &KindInfo,
    opts: &'a WriteOptions,
    api_version: &'a str,
    sub: Subresource,
) -> Manager<'a> {
    Manager {
        name: &opts.field_manager,
        api_version,
        subresource: match sub {
            Subresource::Status => Some("status"),
            Subresource::Scale => Some("scale"),
            Subresource::Approval => Some("approval"),
            Subresource::EphemeralContainers => Some("ephemeralcontainers"),
            Subresource::Resize => Some("resize"),
            _ => None,
        },
        ignore_status: kind.status,
    }
}

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subresource {
    Main,
    Status,
    Scale,
    /// `namespaces/finalize`: writes only `spec.finalizers`.
    Finalize,
    /// `certificatesigningrequests/approval`: writes only `status.conditions` (and the
    /// metadata a status write may change).
    Approval,
    /// `pods/ephemeralcontainers`: writes only `spec.ephemeralContainers`.
    EphemeralContainers,
    /// `pods/resize`: writes only the containers' `resources` and `resizePolicy`.
    Resize,
}

impl Subresource {
    /// The generic-path subresource a request addressed, from its attributes.
    fn of_request(opts: &WriteOptions) -> Self {
        match opts.request.as_deref().map(|r| r.subresource.as_str()) {
            Some("ephemeralcontainers") => Subresource::EphemeralContainers,
            Some("resize") => Subresource::Resize,
            _ => Subresource::Main,
        }
    }
}

/// The resource a request addresses.
#[derive(Clone)]
pub struct Scope {
    pub kind: Arc<KindInfo>,
    pub namespace: Option<String>,
}

/// A successful write: HTTP code, served-form body and warnings for the `Warning` header.
pub struct Written {
    pub code: u16,
    pub body: Value,
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    pub propagation_policy: Option<String>,
    pub orphan_dependents: Option<bool>,
    pub precondition_uid: Option<String>,
    pub precondition_resource_version: Option<String>,
    pub dry_run: bool,
    /// Who asks and for what (None: the server's own deletions).
    pub request: Option<Arc<RequestAttributes>>,
}

impl DeleteOptions {
    fn write_options(&self) -> WriteOptions {
        WriteOptions { dry_run: self.dry_run, request: self.request.clone(), ..Default::default() }
    }
}

/// List parameters shared by list and watch.
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

pub struct ListResult {
    pub items: Vec<Arc<CachedObject>>,
    pub revision: Revision,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// The generic storage for all kinds.
pub struct Storage {
    pub store: Arc<dyn Store>,
    pub cache: Arc<WatchCache>,
    /// Admission plugins every write passes through.
    pub admission: crate::admission::Chain,
    /// Stateful per-kind hooks (allocators).
    pub hooks: HookTable,
    /// The served kinds; replaced whole when custom resources come or go.
    kinds: RwLock<Arc<Registry>>,
}

const CONFLICT_RETRIES: usize = 16;
static SCALE_SCHEMA: std::sync::LazyLock<Option<schema::KindSchema>> =
    std::sync::LazyLock::new(|| schema::builtin_kind("autoscaling", "v1", "Scale"));
const GENERATE_NAME_RETRIES: usize = 8;

pub fn storage_prefix(kind: &KindInfo) -> String {
    storage_prefix_of(kind.storage)
}

/// Where objects of a stored resource live: `/registry/{group|core}/{resource}/`.
pub fn storage_prefix_of(storage: krate_api::StorageResource) -> String {
    let group = if storage.group.is_empty() { "core" } else { storage.group };
    format!("{}{}/{}/", crate::cache::REGISTRY_PREFIX, group, storage.resource)
}

pub fn key_for(kind: &KindInfo, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) if kind.namespaced => format!("{}{ns}/{name}", storage_prefix(kind)),
        _ => format!("{}{name}", storage_prefix(kind)),
    }
}

/// The served form of a stored object (an error when a CRD's conversion webhook fails);
/// a custom kind's schema defaults are applied, as upstream defaults what it reads.
pub fn to_served(kind: &KindInfo, stored: Value) -> ApiResult<Value> {
    let mut served = match kind.conversion {
        Some(c) => c.serve(stored).map_err(ApiError::internal)?,
        None => stored,
    };
    if let (Some(custom), Some(schema)) = (&kind.custom, &kind.schema) {
        if custom.defaults_on_read {
            krate_api::schema::apply_defaults(schema, &mut served);
        }
    }
    Ok(served)
}

/// Whether serving this stored object changes it (a conversion, defaults on read).
fn serving_changes(kind: &KindInfo, obj: &CachedObject) -> bool {
    if kind.custom.as_ref().is_some_and(|c| c.defaults_on_read) {
        return true;
    }
    match kind.conversion {
        None => false,
        Some(c) => !stored_api_version(&obj.json).is_some_and(|v| c.serves_as_stored(v)),
    }
}

/// The apiVersion of stored JSON that opens with it (custom resources, whose keys are
/// written sorted), without decoding the rest.
fn stored_api_version(json: &[u8]) -> Option<&str> {
    let rest = json.strip_prefix(b"{\"apiVersion\":\"")?;
    let end = rest.iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}

pub(crate) fn to_storage(kind: &KindInfo, served: Value) -> ApiResult<Value> {
    match kind.conversion {
        Some(c) => c.store(served).map_err(ApiError::internal),
        None => Ok(served),
    }
}

/// The served JSON of a cached object, without re-encoding when no conversion applies.
/// Whether `obj` matches `fields` as `kind` serves it. The watch cache keeps the field
/// values of the stored form; a custom resource served in another version is matched
/// on its converted form (a version's selectable fields may exist only there, as
/// upstream selects after conversion). An object that cannot be converted matches
/// nothing.
pub fn fields_match(kind: &KindInfo, obj: &CachedObject, fields: &FieldSelector) -> bool {
    if fields.is_empty() {
        return true;
    }
    if kind.custom.is_some() && serving_changes(kind, obj) {
        return match to_served(kind, obj.parse()) {
            Ok(served) => fields.matches(|f| kind.field_value(&served, f)),
            Err(_) => false,
        };
    }
    fields.matches(|f| obj.field(f).map(str::to_string))
}

pub fn served_json(kind: &KindInfo, obj: &CachedObject) -> ApiResult<Bytes> {
    match serving_changes(kind, obj) {
        true => Ok(Bytes::from(krate_api::protobuf::to_go_json(&to_served(kind, obj.parse())?))),
        false => Ok(obj.json.clone()),
    }
}

/// The served protobuf message of a cached object (no envelope); `None` for kinds
/// without a protobuf form (custom kinds, the only ones whose conversion can fail).
pub fn served_proto(kind: &KindInfo, obj: &CachedObject) -> Option<Bytes> {
    let message = kind.protobuf_message()?;
    Some(match kind.conversion {
        Some(c) => Bytes::from(krate_api::protobuf::message(message, &c.serve(obj.parse()).ok()?)),
        None => obj.proto(message).clone(),
    })
}

fn store_error(kind: &KindInfo, name: &str, err: StoreError) -> ApiError {
    match err {
        StoreError::AlreadyExists(_) => ApiError::already_exists(&kind.group, &kind.plural, name),
        StoreError::NotFound(_) => ApiError::not_found(&kind.group, &kind.plural, name),
        StoreError::Conflict { .. } => ApiError::modified(&kind.group, &kind.plural, name),
        StoreError::Compacted { requested, compacted } => {
            ApiError::gone(format!("too old resource version: {requested} ({compacted})"))
        }
        StoreError::FutureRevision { requested, current } => {
            let mut e = ApiError::timeout(format!("Too large resource version: {requested}, current: {current}"));
            e.retry_after_seconds = Some(1);
            e
        }
        StoreError::Backend(msg) => ApiError::internal(msg),
    }
}

fn parse_revision(rv: &str) -> ApiResult<Revision> {
    rv.parse::<Revision>()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}: expected an integer")))
}

/// Upstream's check of a decoded body: apiVersion and kind must match the endpoint
/// (missing ones are defaulted from it), then the object must decode as the typed kind.
/// Returns the canonical object and the paths of unknown fields.
pub fn decode_body(kind: &KindInfo, mut body: Value) -> ApiResult<(Value, Vec<String>)> {
    let Some(map) = body.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {}: the body must be a JSON object",
            kind.kind, kind.version, kind.kind
        )));
    };
    let api_version = kind.api_version();
    match map.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            map.insert("apiVersion".into(), json!(api_version));
        }
        Some(v) if v != api_version => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )))
        }
        _ => {}
    }
    match map.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            map.insert("kind".into(), json!(kind.kind));
        }
        Some(k) if k != kind.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                kind.kind
            )))
        }
        _ => {}
    }
    if let (Some(schema), None) = (&kind.schema, kind.typed) {
        return krate_api::custom::check_object(kind, schema, body);
    }
    let Some(typed) = kind.typed else { return Ok((body, vec![])) };
    let refused = |e: &dyn std::fmt::Display| {
        ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {}: {e}",
            kind.kind, kind.version, kind.kind
        ))
    };
    let canonical = match typed(&body) {
        Ok(canonical) => canonical,
        // Go clients send a zero metav1.Condition's lastTransitionTime as null, which
        // upstream decodes (to the zero time); the typed form requires a time: now.
        Err(e) => {
            let mut timed = body.clone();
            if !time_null_conditions(&mut timed, &krate_api::object::now_rfc3339()) {
                return Err(refused(&e));
            }
            typed(&timed).map_err(|e| refused(&e))?
        }
    };
    let mut unknown = Vec::new();
    unknown_fields(&body, &canonical, "", &mut unknown);
    Ok((canonical, unknown))
}

/// Sets the null or missing `lastTransitionTime` of every condition in `value` to `now`
/// (a zero time comes as null in JSON, and not at all in protobuf); whether there was
/// one.
fn time_null_conditions(value: &mut Value, now: &str) -> bool {
    let mut changed = false;
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(conditions)) = map.get_mut("conditions") {
                for condition in conditions.iter_mut().filter_map(Value::as_object_mut) {
                    let untimed = condition.get("lastTransitionTime").is_none_or(Value::is_null);
                    if untimed && condition.contains_key("type") && condition.contains_key("status") {
                        condition.insert("lastTransitionTime".into(), json!(now));
                        changed = true;
                    }
                }
            }
            for v in map.values_mut() {
                changed |= time_null_conditions(v, now);
            }
        }
        Value::Array(items) => {
            for v in items.iter_mut() {
                changed |= time_null_conditions(v, now);
            }
        }
        _ => {}
    }
    changed
}

/// Paths present in `input` but dropped by the typed round trip.
fn unknown_fields(input: &Value, canonical: &Value, path: &str, out: &mut Vec<String>) {
    match (input, canonical) {
        (Value::Object(i), Value::Object(c)) => {
            for (k, v) in i {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match c.get(k) {
                    Some(cv) => unknown_fields(v, cv, &p, out),
                    None if !v.is_null() => out.push(p),
                    None => {}
                }
            }
        }
        (Value::Array(i), Value::Array(c)) => {
            for (n, (iv, cv)) in i.iter().zip(c).enumerate() {
                unknown_fields(iv, cv, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// Applies the field validation directive to unknown fields.
/// Applies the field validation directive to unknown and duplicate fields: an error
/// (Strict), warnings (Warn) or nothing (Ignore).
pub fn check_fields(
    kind: &KindInfo,
    unknown: &[String],
    duplicate: &[String],
    mode: FieldValidation,
) -> ApiResult<Vec<String>> {
    let problems: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .chain(duplicate.iter().map(|f| format!("duplicate field \"{f}\"")))
        .collect();
    match mode {
        _ if problems.is_empty() => Ok(vec![]),
        FieldValidation::Ignore => Ok(vec![]),
        FieldValidation::Warn => Ok(problems),
        FieldValidation::Strict => Err(ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {}: strict decoding error: {}",
            kind.kind,
            kind.version,
            kind.kind,
            problems.join(", ")
        ))),
    }
}

/// `check_fields` for server-side apply: a strict apply with unknown fields fails as
/// upstream's field manager fails to build the typed patch (structured-merge-diff's
/// "field not declared in schema", one per field).
fn check_applied_fields(
    kind: &KindInfo,
    scope: &Scope,
    name: &str,
    unknown: &[String],
    mode: FieldValidation,
) -> ApiResult<Vec<String>> {
    if mode != FieldValidation::Strict || unknown.is_empty() {
        return check_fields(kind, unknown, &[], mode);
    }
    let errors: Vec<String> = unknown.iter().map(|f| format!(".{f}: field not declared in schema")).collect();
    let errors = match errors.as_slice() {
        [one] => one.clone(),
        many => std::iter::once("errors:".to_string())
            .chain(many.iter().map(|e| format!("  {e}")))
            .collect::<Vec<_>>()
            .join("\n"),
    };
    // Go's NamespacedName and GroupVersionKind strings: `ns/name; group/version, Kind=K`.
    Err(ApiError::bad_request(format!(
        "failed to create typed patch object ({}/{name}; {}/{}, Kind={}): {errors}",
        scope.namespace.as_deref().unwrap_or_default(),
        kind.group,
        kind.version,
        kind.kind
    )))
}

fn validate_metadata(kind: &KindInfo, obj: &Value, errs: &mut Vec<FieldError>) {
    let name = object::name(obj);
    if name.is_empty() {
        errs.push(FieldError::required("metadata.name", "name or generateName is required"));
    } else {
        for msg in validation::validate_name(kind.name_rule, name) {
            errs.push(FieldError::invalid("metadata.name", &json!(name), &msg));
        }
    }
    validate_labels(get(obj, &["metadata", "labels"]), "metadata.labels", errs);
    validate_annotations(get(obj, &["metadata", "annotations"]), "metadata.annotations", errs);
    for (i, f) in object::finalizers(obj).iter().enumerate() {
        for msg in validation::is_qualified_name(f) {
            errs.push(FieldError::invalid(format!("metadata.finalizers[{i}]"), &json!(f), &msg));
        }
    }
    if let Some(refs) = get(obj, &["metadata", "ownerReferences"]).and_then(Value::as_array) {
        for (i, r) in refs.iter().enumerate() {
            for field in ["apiVersion", "kind", "name", "uid"] {
                if get_str(r, &[field]).is_none_or(str::is_empty) {
                    errs.push(FieldError::required(format!("metadata.ownerReferences[{i}].{field}"), ""));
                }
            }
        }
    }
}

fn validate(kind: &KindInfo, obj: &Value, old: Option<&Value>, sub: Subresource) -> ApiResult<()> {
    let mut errs = Vec::new();
    validate_metadata(kind, obj, &mut errs);
    match old {
        None => kind.strategy.validate(obj, &mut errs),
        Some(old) => {
            match sub {
                Subresource::EphemeralContainers => {
                    kind.strategy.validate_subresource_update("ephemeralcontainers", obj, old, &mut errs)
                }
                Subresource::Resize => kind.strategy.validate_subresource_update("resize", obj, old, &mut errs),
                _ => kind.strategy.validate_update(obj, old, &mut errs),
            }
            if get(old, &["metadata", "deletionTimestamp"]).is_some() {
                let old_f = object::finalizers(old);
                if object::finalizers(obj).iter().any(|f| !old_f.contains(f)) {
                    errs.push(FieldError::forbidden(
                        "metadata.finalizers",
                        "no new finalizers can be added if the object is being deleted",
                    ));
                }
            }
        }
    }
    // A custom kind's CEL validation rules, on the object as its version's schema sees it.
    if let (Some(_), Some(schema)) = (&kind.custom, &kind.schema) {
        let served = to_served(kind, obj.clone())?;
        let old = old.map(|o| to_served(kind, o.clone())).transpose()?;
        errs.extend(krate_api::schema::rules::validate(schema, &served, old.as_ref()));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&kind.group, &kind.kind, object::name(obj), &errs))
    }
}

/// `len` random characters of upstream's generateName suffix alphabet (no vowels, no
/// confusable characters).
pub(crate) fn random_suffix(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

fn generate_name(prefix: &str) -> String {
    let prefix = if prefix.len() > 58 { &prefix[..58] } else { prefix };
    format!("{prefix}{}", random_suffix(5))
}

fn encode(obj: &Value) -> ApiResult<Bytes> {
    let mut stored = obj.clone();
    if let Some(meta) = stored.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    serde_json::to_vec(&stored).map(Bytes::from).map_err(|e| ApiError::internal(e.to_string()))
}

fn decode_stored(bytes: &[u8], revision: Revision) -> ApiResult<Value> {
    let mut v: Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::internal(format!("stored object is corrupt: {e}")))?;
    object::set(&mut v, &["metadata", "resourceVersion"], json!(revision.to_string()));
    Ok(v)
}

fn with_revision(mut obj: Value, revision: Revision) -> Value {
    object::set(&mut obj, &["metadata", "resourceVersion"], json!(revision.to_string()));
    obj
}

/// How a read-modify-write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Done {
    Stored,
    Removed,
    Unchanged,
}

/// What a mutation closure decided for the current object.
pub(crate) enum Mutation {
    Write(Value),
    /// The object is finished (deletion with no finalizers left): remove it.
    Remove,
}

impl Storage {
    pub fn new(
        store: Arc<dyn Store>,
        cache: Arc<WatchCache>,
        kinds: Arc<Registry>,
        admission: crate::admission::Chain,
        hooks: HookTable,
    ) -> Self {
        Self { store, cache, admission, hooks, kinds: RwLock::new(kinds) }
    }

    /// The served kinds.
    pub fn kinds(&self) -> Arc<Registry> {
        self.kinds.read().expect("kinds lock").clone()
    }

    /// Replaces the served kinds (custom resources came or went).
    pub fn set_kinds(&self, kinds: Registry) {
        *self.kinds.write().expect("kinds lock") = Arc::new(kinds);
    }

    /// The scope of a built-in kind (always served), by its k8s-openapi type.
    pub fn builtin<T: k8s_openapi::Resource>(&self, namespace: Option<String>) -> Scope {
        let kind = self.kinds().of::<T>().unwrap_or_else(|| panic!("{} is a built-in kind", T::KIND)).clone();
        Scope { kind, namespace }
    }

    /// Creates an object from a decoded (served-form) body.
    pub async fn create(&self, scope: &Scope, body: Value, opts: &WriteOptions) -> ApiResult<Written> {
        let kind = &scope.kind;
        let mut obj = to_storage(kind, body)?;
        let meta = object::object_at(&mut obj, &["metadata"])
            .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
        if kind.namespaced {
            let url_ns = scope.namespace.clone().unwrap_or_default();
            match meta.get("namespace").and_then(Value::as_str) {
                Some(ns) if !ns.is_empty() && ns != url_ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ))
                }
                _ => {
                    meta.insert("namespace".into(), json!(url_ns));
                }
            }
        } else {
            meta.remove("namespace");
        }
        for field in ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"] {
            meta.remove(field);
        }
        meta.insert("uid".into(), json!(uuid_v4()));
        meta.insert("creationTimestamp".into(), json!(object::now_rfc3339()));
        if kind.generation {
            meta.insert("generation".into(), json!(1));
        } else {
            meta.remove("generation");
        }
        let generate = meta
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
            .then(|| meta.get("generateName").and_then(Value::as_str).map(str::to_string))
            .flatten()
            .filter(|g| !g.is_empty());

        kind.strategy.default(&mut obj);
        // Upstream's create handler tracks managed fields on the decoded, defaulted
        // object, before admission and the strategy's PrepareForCreate: what those add
        // (a namespace's finalizer, a pod's service account, a job's selector) has no
        // manager. A kind's status is a reset field, owned by no one on create.
        let status = if kind.status { object::remove(&mut obj, &["status"]) } else { None };
        managed::track_update(
            kind.schema.as_deref(),
            None,
            &mut obj,
            &manager(kind, opts, &kind.api_version(), Subresource::Main),
        );
        if let Some(status) = status {
            object::set(&mut obj, &["status"], status);
        }
        kind.strategy.prepare_for_create(&mut obj);
        let admission = Attributes {
            kind,
            operation: Operation::Create,
            old: None,
            request: opts.request.as_deref(),
            dry_run: opts.dry_run,
        };
        self.admission.admit(self, &admission, &mut obj).await?;
        if kind.status {
            match kind.strategy.initial_status(&obj) {
                Some(status) => object::set(&mut obj, &["status"], status),
                // Custom resources start without one (upstream deletes it); built-in
                // kinds with an empty one, as Go encodes a struct field: a JSON patch
                // may add to `/status/...` at once.
                None if kind.custom.is_some() => {
                    object::remove(&mut obj, &["status"]);
                }
                None => object::set(&mut obj, &["status"], json!({})),
            }
        }
        for attempt in 0..GENERATE_NAME_RETRIES {
            if let Some(prefix) = &generate {
                object::set(&mut obj, &["metadata", "name"], json!(generate_name(prefix)));
            }
            validate(kind, &obj, None, Subresource::Main)?;
            if attempt == 0 {
                self.admission.validate(self, &admission, &obj).await?;
            }
            let name = object::name(&obj).to_string();
            let hooks = self.hooks.get(&kind.storage);
            if let Some(hooks) = hooks {
                hooks.begin_create(self, &mut obj, opts).await?;
            }
            let stored = match opts.dry_run {
                true => Ok(obj.clone()),
                false => match encode(&obj) {
                    Ok(bytes) => self
                        .store
                        .create(&key_for(kind, scope.namespace.as_deref(), &name), bytes)
                        .await
                        .map(|kv| with_revision(obj.clone(), kv.mod_revision)),
                    Err(e) => Err(StoreError::Backend(e.message)),
                },
            };
            if let Some(hooks) = hooks {
                hooks.finish_create(self, &obj, stored.is_ok(), opts).await;
            }
            match stored {
                Ok(obj) => return Ok(Written { code: 201, body: to_served(kind, obj)?, warnings: vec![] }),
                Err(StoreError::AlreadyExists(_)) if generate.is_some() && attempt + 1 < GENERATE_NAME_RETRIES => {
                    continue
                }
                Err(err) => return Err(store_error(kind, &name, err)),
            }
        }
        unreachable!("the create loop always returns")
    }

    /// A consistent read of one object from the cache: when the cache cannot be shown
    /// current (the store is unreachable, or has no quorum), an error rather than what
    /// the cache happens to hold, which another server may already have changed.
    pub async fn get(&self, scope: &Scope, name: &str) -> ApiResult<Arc<CachedObject>> {
        if !self.cache.sync().await {
            return Err(ApiError::timeout("Timeout: the watch cache did not catch up with storage"));
        }
        self.cached(scope, name)
    }

    /// One object as the cache holds it now (after a `cache.sync()`, consistent).
    pub fn cached(&self, scope: &Scope, name: &str) -> ApiResult<Arc<CachedObject>> {
        let key = key_for(&scope.kind, scope.namespace.as_deref(), name);
        let rc = self.cache.resource(&storage_prefix(&scope.kind));
        let found = rc.state.read().expect("cache lock").objects.get(&key).cloned();
        found.ok_or_else(|| ApiError::not_found(&scope.kind.group, &scope.kind.plural, name))
    }

    /// Reads an object straight from the store (for read-modify-write).
    async fn read_current(&self, scope: &Scope, name: &str) -> ApiResult<(Value, Revision)> {
        let key = key_for(&scope.kind, scope.namespace.as_deref(), name);
        match self.store.get(&key).await.map_err(|e| store_error(&scope.kind, name, e))? {
            Some(kv) => Ok((decode_stored(&kv.value, kv.mod_revision)?, kv.mod_revision)),
            None => Err(ApiError::not_found(&scope.kind.group, &scope.kind.plural, name)),
        }
    }

    /// The cached object and its revision, if the cache has it (possibly stale).
    fn cached_current(&self, scope: &Scope, name: &str) -> Option<(Value, Revision)> {
        let key = key_for(&scope.kind, scope.namespace.as_deref(), name);
        let rc = self.cache.resource(&storage_prefix(&scope.kind));
        let found = rc.state.read().expect("cache lock").objects.get(&key).cloned()?;
        Some((found.parse(), found.revision))
    }

    /// Read-modify-write with optimistic concurrency, retried on conflicts unless the
    /// mutation pinned a resourceVersion. `mutate` gets the current stored object and
    /// builds (and validates) what replaces it; admission for `operation` and the kind's
    /// hooks then run on the change before it is written.
    ///
    /// The first attempt starts from the watch cache, as upstream's GuaranteedUpdate does:
    /// the compare-and-swap on the revision catches a stale copy, and anything decided on
    /// the cached copy other than a successful write (an error, "unchanged", a pinned
    /// conflict, a dry run) is decided again on a fresh read from the store.
    pub(crate) async fn guaranteed_update(
        &self,
        scope: &Scope,
        name: &str,
        operation: Operation,
        opts: &WriteOptions,
        mut mutate: impl FnMut(&Value) -> ApiResult<(Mutation, bool)>,
    ) -> ApiResult<(Value, Done)> {
        let kind = &scope.kind;
        let key = key_for(kind, scope.namespace.as_deref(), name);
        for attempt in 0..CONFLICT_RETRIES {
            let cached = if attempt == 0 && !opts.dry_run { self.cached_current(scope, name) } else { None };
            let from_cache = cached.is_some();
            let (current, revision) = match cached {
                Some(c) => c,
                None => self.read_current(scope, name).await?,
            };
            let admitted = match mutate(&current) {
                Ok((mutation, pinned)) => {
                    self.admit_change(kind, operation, opts, &current, mutation).await.map(|m| (m, pinned))
                }
                Err(e) => Err(e),
            };
            let (mutation, pinned) = match admitted {
                Ok(m) => m,
                Err(_) if from_cache => continue,
                Err(e) => return Err(e),
            };
            let result = match mutation {
                Mutation::Write(new) if new == current && from_cache => continue,
                Mutation::Write(new) if new == current => return Ok((new, Done::Unchanged)),
                Mutation::Remove if opts.dry_run => return Ok((current, Done::Removed)),
                Mutation::Write(new) => self.write_change(kind, &key, &current, revision, new, opts).await?,
                Mutation::Remove => {
                    let removed = self.store.delete(&key, Some(revision)).await;
                    if let (Ok(_), Some(hooks)) = (&removed, self.hooks.get(&kind.storage)) {
                        hooks.after_delete(self, &current).await;
                    }
                    removed.map(|(rev, _)| (with_revision(current, rev), Done::Removed))
                }
            };
            match result {
                Ok(done) => return Ok(done),
                Err(StoreError::Conflict { .. }) if !pinned || from_cache => continue,
                Err(err) => return Err(store_error(kind, name, err)),
            }
        }
        Err(ApiError::modified(&kind.group, &kind.plural, name))
    }

    /// Admission of a changed object: for an update, the mutating phase (the object is
    /// validated again if a plugin changed it) and the validating phase; for a delete,
    /// the validating phase on the object being deleted. An update that finishes a
    /// deletion (the last finalizer removed) is not asked about.
    async fn admit_change(
        &self,
        kind: &KindInfo,
        operation: Operation,
        opts: &WriteOptions,
        current: &Value,
        mutation: Mutation,
    ) -> ApiResult<Mutation> {
        let attrs =
            Attributes { kind, operation, old: Some(current), request: opts.request.as_deref(), dry_run: opts.dry_run };
        match (operation, mutation) {
            (Operation::Delete, mutation) => {
                self.admission.validate(self, &attrs, current).await?;
                Ok(mutation)
            }
            (_, Mutation::Write(mut new)) if new != *current => {
                let built = new.clone();
                self.admission.admit(self, &attrs, &mut new).await?;
                if new != built {
                    validate(kind, &new, Some(current), Subresource::of_request(opts))?;
                }
                self.admission.validate(self, &attrs, &new).await?;
                Ok(Mutation::Write(new))
            }
            (_, mutation) => Ok(mutation),
        }
    }

    /// Writes `new` over `current` (at `revision`), between the kind's update hooks.
    /// Inner error: the store's (a conflict is retried by the caller); outer: a hook's.
    async fn write_change(
        &self,
        kind: &KindInfo,
        key: &str,
        current: &Value,
        revision: Revision,
        mut new: Value,
        opts: &WriteOptions,
    ) -> ApiResult<Result<(Value, Done), StoreError>> {
        let hooks = self.hooks.get(&kind.storage);
        if let Some(hooks) = hooks {
            hooks.begin_update(self, current, &mut new, opts).await?;
        }
        let written = match opts.dry_run {
            true => Ok((new.clone(), Done::Stored)),
            false => match encode(&new) {
                Ok(bytes) => self
                    .store
                    .update(key, bytes, revision)
                    .await
                    .map(|kv| (with_revision(new.clone(), kv.mod_revision), Done::Stored)),
                Err(e) => Err(StoreError::Backend(e.message)),
            },
        };
        if let Some(hooks) = hooks {
            hooks.finish_update(self, current, &new, written.is_ok(), opts).await;
        }
        Ok(written)
    }

    /// Builds the object an update of `sub` produces from `current` and the new served
    /// body, applying generic rules and the strategy; validates it.
    fn prepare_update(
        scope: &Scope,
        sub: Subresource,
        current: &Value,
        body: Value,
        opts: &WriteOptions,
    ) -> ApiResult<Mutation> {
        let kind = &scope.kind;
        let mut new = match sub {
            Subresource::Main | Subresource::Finalize => {
                let mut new = to_storage(kind, body)?;
                // System-owned metadata always comes from the stored object.
                for field in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                    "namespace",
                    "name",
                ] {
                    match get(current, &["metadata", field]) {
                        Some(v) => object::set(&mut new, &["metadata", field], v.clone()),
                        None => {
                            object::remove(&mut new, &["metadata", field]);
                        }
                    }
                }
                if get(&new, &["metadata", "managedFields"]).is_none_or(Value::is_null) {
                    match get(current, &["metadata", "managedFields"]) {
                        Some(m) => object::set(&mut new, &["metadata", "managedFields"], m.clone()),
                        None => {
                            object::remove(&mut new, &["metadata", "managedFields"]);
                        }
                    }
                }
                if kind.status && sub == Subresource::Main {
                    match current.get("status") {
                        Some(s) => object::set(&mut new, &["status"], s.clone()),
                        None => {
                            object::remove(&mut new, &["status"]);
                        }
                    }
                }
                if sub == Subresource::Finalize {
                    // namespaces/finalize changes only spec.finalizers.
                    let finalizers = get(&new, &["spec", "finalizers"]).cloned().unwrap_or(json!([]));
                    let mut updated = current.clone();
                    object::set(&mut updated, &["spec", "finalizers"], finalizers);
                    new = updated;
                } else {
                    kind.strategy.default(&mut new);
                    kind.strategy.prepare_for_update(&mut new, current);
                }
                new
            }
            Subresource::Status | Subresource::Approval | Subresource::EphemeralContainers => {
                let served = to_storage(kind, body)?;
                let mut new = current.clone();
                let (path, value): (&[&str], _) = match sub {
                    Subresource::Approval => (&["status", "conditions"], get(&served, &["status", "conditions"])),
                    Subresource::EphemeralContainers => {
                        (&["spec", "ephemeralContainers"], get(&served, &["spec", "ephemeralContainers"]))
                    }
                    _ => (&["status"], served.get("status")),
                };
                match value {
                    Some(v) => object::set(&mut new, path, v.clone()),
                    None => {
                        object::remove(&mut new, path);
                    }
                }
                if sub == Subresource::EphemeralContainers {
                    // The added containers get the defaults every container gets; the
                    // metadata stays the stored one (upstream's ResetObjectMetaForStatus).
                    kind.strategy.default(&mut new);
                } else {
                    kind.strategy.default_status(&mut new);
                    // The metadata the kind lets a status write change comes with it.
                    for field in kind.status_metadata {
                        match get(&served, &["metadata", field]) {
                            Some(v) => object::set(&mut new, &["metadata", field], v.clone()),
                            None => {
                                object::remove(&mut new, &["metadata", field]);
                            }
                        }
                    }
                }
                new
            }
            Subresource::Resize => {
                // Upstream's dropNonResizeUpdates: each container of the stored pod takes
                // the resources and resize policy the body gives the container of its name.
                let served = to_storage(kind, body)?;
                let mut new = current.clone();
                krate_api::strategy::take_resize(&mut new, &served);
                kind.strategy.default(&mut new);
                new
            }
            Subresource::Scale => unreachable!("scale has its own path"),
        };
        object::set(
            &mut new,
            &["metadata", "resourceVersion"],
            get(current, &["metadata", "resourceVersion"]).cloned().unwrap_or(Value::Null),
        );
        // A pod's ephemeral containers and resources are its spec too (upstream bumps its
        // generation).
        let spec_write = matches!(sub, Subresource::Main | Subresource::EphemeralContainers | Subresource::Resize);
        if kind.generation && spec_write && spec_changed(&new, current) {
            let generation = get(current, &["metadata", "generation"]).and_then(Value::as_i64).unwrap_or(0);
            object::set(&mut new, &["metadata", "generation"], json!(generation + 1));
        }
        if sub != Subresource::Finalize {
            let api_version = kind.api_version();
            managed::track_update(
                kind.schema.as_deref(),
                Some(current),
                &mut new,
                &manager(kind, opts, &api_version, sub),
            );
        }
        validate(kind, &new, Some(current), sub)?;
        let deleting = get(&new, &["metadata", "deletionTimestamp"]).is_some();
        if deleting
            && object::finalizers(&new).is_empty()
            && !awaits_graceful_termination(&new)
            && !kind.strategy.deletion_blocked(&new)
        {
            return Ok(Mutation::Remove);
        }
        Ok(Mutation::Write(new))
    }

    /// PUT of the main resource or a subresource.
    pub async fn update(
        &self,
        scope: &Scope,
        name: &str,
        sub: Subresource,
        body: Value,
        opts: &WriteOptions,
    ) -> ApiResult<Written> {
        let kind = scope.kind.clone();
        let body_name = get_str(&body, &["metadata", "name"]).unwrap_or_default().to_string();
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if sub == Subresource::Scale {
            return self.update_scale(scope, name, ScaleChange::Replace(body), opts).await;
        }
        let precondition = object::resource_version(&body).map(parse_revision).transpose()?;
        let (obj, _) = self
            .guaranteed_update(scope, name, Operation::Update, opts, |current| {
                if let Some(rv) = precondition {
                    if get_str(current, &["metadata", "resourceVersion"]) != Some(rv.to_string().as_str()) {
                        return Err(ApiError::modified(&kind.group, &kind.plural, name));
                    }
                }
                let mut body = body.clone();
                object::set(&mut body, &["metadata", "name"], json!(name));
                Ok((Self::prepare_update(scope, sub, current, body, opts)?, precondition.is_some()))
            })
            .await?;
        Ok(Written { code: 200, body: to_served(&kind, obj)?, warnings: vec![] })
    }

    /// PATCH of the main resource or a subresource.
    pub async fn patch(
        &self,
        scope: &Scope,
        name: &str,
        sub: Subresource,
        patch_type: PatchType,
        patch: Value,
        opts: &WriteOptions,
    ) -> ApiResult<Written> {
        let kind = scope.kind.clone();
        if sub == Subresource::Scale {
            return self.update_scale(scope, name, ScaleChange::Patch(patch_type, patch), opts).await;
        }
        if patch_type == PatchType::Apply {
            return self.apply(scope, name, sub, patch, opts).await;
        }
        let mut warnings = Vec::new();
        let (obj, _) = self
            .guaranteed_update(scope, name, Operation::Update, opts, |current| {
                let served = to_served(&kind, current.clone())?;
                let mut patched = served.clone();
                apply_patch(
                    &mut patched,
                    patch_type,
                    &patch,
                    kind.schema.as_deref().filter(|_| kind.custom.is_none()),
                )?;
                let (canonical, unknown) = decode_body(&kind, patched.clone())?;
                warnings = check_fields(&kind, &unknown, &[], opts.field_validation)?;
                // A resourceVersion in the patch is a precondition.
                let pinned = match (object::resource_version(&patched), object::resource_version(&served)) {
                    (Some(p), Some(c)) if p != c => return Err(ApiError::modified(&kind.group, &kind.plural, name)),
                    (Some(_), _) => patch_sets_resource_version(&patch),
                    _ => false,
                };
                if object::name(&patched) != name {
                    return Err(ApiError::bad_request(format!(
                        "metadata.name: Invalid value: {:?}: field is immutable",
                        object::name(&patched)
                    )));
                }
                Ok((Self::prepare_update(scope, sub, current, canonical, opts)?, pinned))
            })
            .await?;
        Ok(Written { code: 200, body: to_served(&kind, obj)?, warnings })
    }

    /// Server-side apply: creates the object if needed, else merges the configuration
    /// into it under field management.
    async fn apply(
        &self,
        scope: &Scope,
        name: &str,
        sub: Subresource,
        config: Value,
        opts: &WriteOptions,
    ) -> ApiResult<Written> {
        let kind = scope.kind.clone();
        if opts.field_manager.is_empty() {
            return Err(ApiError::invalid(
                "meta.k8s.io",
                "PatchOptions",
                "",
                &[FieldError::required("fieldManager", "is required for apply patch")],
            ));
        }
        if !config.is_object() {
            return Err(ApiError::bad_request("the apply configuration must be an object"));
        }
        let (api_version, kind_name) =
            (get_str(&config, &["apiVersion"]).unwrap_or_default(), get_str(&config, &["kind"]).unwrap_or_default());
        if api_version != kind.api_version() || kind_name != kind.kind {
            return Err(ApiError::bad_request(format!(
                "the apply configuration is for {api_version:?}, kind {kind_name:?}; this endpoint serves {:?}, kind {:?}",
                kind.api_version(), kind.kind
            )));
        }
        match get_str(&config, &["metadata", "name"]) {
            Some(n) if n == name => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    other.unwrap_or_default()
                )))
            }
        }
        let schema = kind.schema.clone();
        let served_version = kind.api_version();
        let who = manager(&kind, opts, &served_version, sub);
        let exists = self.cached_current(scope, name).is_some()
            || match self.read_current(scope, name).await {
                Ok(_) => true,
                Err(e) if e.code == 404 && sub == Subresource::Main => false,
                Err(e) => return Err(e),
            };
        if !exists {
            let obj = managed::apply(schema.as_deref(), None, &config, &who, opts.force)?;
            let (canonical, unknown) = decode_body(&kind, obj)?;
            let warnings = check_applied_fields(&kind, scope, name, &unknown, opts.field_validation)?;
            return match self.create(scope, canonical, opts).await {
                Ok(mut written) => {
                    written.warnings.extend(warnings);
                    Ok(written)
                }
                // Lost a race with another creator: apply onto what they made.
                Err(e) if e.code == 409 => Box::pin(self.apply(scope, name, sub, config, opts)).await,
                Err(e) => Err(e),
            };
        }
        let mut warnings = Vec::new();
        let (obj, _) = self
            .guaranteed_update(scope, name, Operation::Update, opts, |current| {
                let served = to_served(&kind, current.clone())?;
                let merged = managed::apply(schema.as_deref(), Some(&served), &config, &who, opts.force)?;
                let (canonical, unknown) = decode_body(&kind, merged)?;
                warnings = check_applied_fields(&kind, scope, name, &unknown, opts.field_validation)?;
                Ok((Self::prepare_update(scope, sub, current, canonical, opts)?, false))
            })
            .await?;
        Ok(Written { code: 200, body: to_served(&kind, obj)?, warnings })
    }

    async fn update_scale(
        &self,
        scope: &Scope,
        name: &str,
        change: ScaleChange,
        opts: &WriteOptions,
    ) -> ApiResult<Written> {
        let kind = scope.kind.clone();
        let Some(info) = kind.scale else {
            return Err(ApiError::not_found(&kind.group, &format!("{}/scale", kind.plural), name));
        };
        let (obj, _) = self
            .guaranteed_update(scope, name, Operation::Update, opts, |current| {
                let api_version = kind.api_version();
                let scale = scale_of(&kind, current);
                let new_scale = match &change {
                    ScaleChange::Replace(body) => body.clone(),
                    ScaleChange::Patch(t, p) => {
                        let mut s = scale.clone();
                        apply_patch(&mut s, *t, p, SCALE_SCHEMA.as_deref())?;
                        s
                    }
                };
                let pinned = match object::resource_version(&new_scale) {
                    Some(rv) if Some(rv) != object::resource_version(current) => {
                        return Err(ApiError::modified(&kind.group, &kind.plural, name))
                    }
                    Some(_) => matches!(change, ScaleChange::Replace(_)),
                    None => false,
                };
                let replicas = get(&new_scale, &["spec", "replicas"]).and_then(Value::as_i64).unwrap_or(0);
                if replicas < 0 {
                    return Err(ApiError::invalid(
                        "autoscaling",
                        "Scale",
                        name,
                        &[FieldError::invalid("spec.replicas", &json!(replicas), "must be greater than or equal to 0")],
                    ));
                }
                let mut new = current.clone();
                object::set(&mut new, info.spec_replicas, json!(replicas));
                managed::track_update(
                    kind.schema.as_deref(),
                    Some(current),
                    &mut new,
                    &manager(&kind, opts, &api_version, Subresource::Scale),
                );
                if kind.generation && new != *current {
                    let generation = get(current, &["metadata", "generation"]).and_then(Value::as_i64).unwrap_or(0);
                    object::set(&mut new, &["metadata", "generation"], json!(generation + 1));
                }
                Ok((Mutation::Write(new), pinned))
            })
            .await?;
        Ok(Written { code: 200, body: scale_of(&kind, &obj), warnings: vec![] })
    }

    /// DELETE: immediate, or pending (graceful pods, finalizers, namespaces).
    pub async fn delete(&self, scope: &Scope, name: &str, opts: &DeleteOptions) -> ApiResult<Written> {
        let kind = scope.kind.clone();
        let (obj, done) = self
            .guaranteed_update(scope, name, Operation::Delete, &opts.write_options(), |current| {
                if let Some(uid) = &opts.precondition_uid {
                    if object::uid(current) != uid {
                        return Err(ApiError::conflict(&kind.group, &kind.plural, name, &format!(
                            "Precondition failed: UID in precondition: {uid}, UID in object meta: {}", object::uid(current))));
                    }
                }
                if let Some(rv) = &opts.precondition_resource_version {
                    let actual = object::resource_version(current).unwrap_or_default();
                    if actual != rv {
                        return Err(ApiError::conflict(&kind.group, &kind.plural, name, &format!(
                            "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {actual}")));
                    }
                }
                let pinned = opts.precondition_resource_version.is_some();
                Ok((plan_delete(&kind, current, opts), pinned))
            })
            .await?;
        let served = to_served(&kind, obj)?;
        if done == Done::Removed {
            // Some kinds answer with the deleted object, the others with a Status.
            let body = if kind.returns_deleted_object {
                served
            } else {
                success_status(&kind.group, &kind.plural, name, object::uid(&served))
            };
            return Ok(Written { code: 200, body, warnings: vec![] });
        }
        let code = if opts.orphan_dependents == Some(false) { 202 } else { 200 };
        Ok(Written { code, body: served, warnings: vec![] })
    }

    /// Lists from the cache (or, for pages of an older snapshot, from the store).
    pub async fn list(&self, scope: &Scope, opts: &ListOptions) -> ApiResult<ListResult> {
        let kind = &scope.kind;
        let prefix = match scope.namespace.as_deref().filter(|_| kind.namespaced) {
            Some(ns) => format!("{}{ns}/", storage_prefix(kind)),
            None => storage_prefix(kind),
        };
        let token = opts.continue_token.as_deref().map(ContinueToken::decode).transpose()?;
        let exact = opts.resource_version_match.as_deref() == Some("Exact");
        let requested = opts.resource_version.as_deref().filter(|rv| !rv.is_empty()).map(parse_revision).transpose()?;
        match requested {
            _ if token.is_some() => {}
            None => {
                if !self.cache.sync().await {
                    return Err(ApiError::timeout("Timeout: the watch cache did not catch up with storage"));
                }
            }
            Some(0) => {}
            Some(rv) => {
                if !self.cache.wait_for(rv, Duration::from_secs(3)).await {
                    let mut e = ApiError::timeout(format!(
                        "Timeout: Too large resource version: {rv}, current: {}",
                        self.cache.revision()
                    ));
                    e.retry_after_seconds = Some(1);
                    return Err(e);
                }
            }
        }
        if let Some(t) = token.as_ref().filter(|t| t.rv > 0) {
            // As etcd would: a snapshot older than the compacted history is gone, even
            // where the cache could still serve it. The error offers an inconsistent
            // token (rv -1) that goes on from the same key at the newest revision.
            let compacted = self.store.compacted_revision().await.map_err(|e| store_error(kind, "", e))?;
            if t.rv < compacted {
                let mut gone = ApiError::gone(EXPIRED_CONTINUE);
                gone.continue_token = Some(ContinueToken { rv: -1, start: t.start.clone() }.encode());
                return Err(gone);
            }
        }
        let snapshot_rev = token.as_ref().map(|t| t.rv).filter(|rv| *rv > 0).or(requested.filter(|_| exact));
        let start = token.as_ref().map(|t| format!("{prefix}{}", t.start));
        if let Some(page) = self.list_from_cache(kind, &prefix, snapshot_rev, start.clone(), opts) {
            return Ok(page);
        }
        let revision = snapshot_rev.expect("only snapshots read the store");
        self.list_from_store(kind, &prefix, revision, start, opts, exact && token.is_none()).await
    }

    /// A page from the cache, or None when the requested snapshot is older than what the
    /// cache holds (the cache has only the newest state; an older snapshot is servable
    /// from it only if nothing in this resource changed since).
    fn list_from_cache(
        &self,
        kind: &KindInfo,
        prefix: &str,
        snapshot_rev: Option<Revision>,
        start: Option<String>,
        opts: &ListOptions,
    ) -> Option<ListResult> {
        let rc = self.cache.resource(&storage_prefix(kind));
        let state = rc.state.read().expect("cache lock");
        if snapshot_rev.is_some_and(|rev| state.last_change > rev) {
            return None;
        }
        let revision = snapshot_rev.unwrap_or_else(|| self.cache.revision().max(state.last_change));
        let lower = start.unwrap_or_else(|| prefix.to_string());
        let upper = krate_store::prefix_end(prefix);
        let matches = |o: &CachedObject| opts.labels.matches(&o.labels) && fields_match(kind, o, &opts.fields);
        let mut items = Vec::new();
        let mut iter = state.objects.range(lower..upper).map(|(_, o)| o).filter(|o| matches(o));
        for obj in iter.by_ref() {
            items.push(obj.clone());
            if opts.limit.is_some_and(|l| items.len() >= l) {
                break;
            }
        }
        let remaining = iter.count();
        let continue_token = (remaining > 0).then(|| {
            let last = items.last().expect("a page before the remainder");
            ContinueToken { rv: revision, start: format!("{}\u{0}", &last.key[prefix.len()..]) }.encode()
        });
        Some(ListResult { items, revision, continue_token, remaining: (remaining > 0).then_some(remaining) })
    }

    async fn list_from_store(
        &self,
        kind: &KindInfo,
        prefix: &str,
        revision: Revision,
        start: Option<String>,
        opts: &ListOptions,
        exact: bool,
    ) -> ApiResult<ListResult> {
        let mut items = Vec::new();
        let mut cursor = start;
        let paths = kind.field_selectors;
        loop {
            let page = self
                .store
                .list(ListRequest {
                    prefix: prefix.to_string(),
                    start_key: cursor.clone(),
                    limit: Some(500),
                    revision: Some(revision),
                })
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { .. } if !exact => {
                        let mut gone = ApiError::gone(EXPIRED_CONTINUE);
                        gone.continue_token = cursor
                            .as_deref()
                            .map(|k| ContinueToken { rv: -1, start: k[prefix.len()..].to_string() }.encode());
                        gone
                    }
                    other => store_error(kind, "", other),
                })?;
            for kv in &page.items {
                let Some(obj) = CachedObject::from_kv(kv, kv.mod_revision, paths) else { continue };
                if opts.labels.matches(&obj.labels) && fields_match(kind, &obj, &opts.fields) {
                    items.push(Arc::new(obj));
                }
            }
            if let Some(last) = page.items.last() {
                cursor = Some(format!("{}\u{0}", last.key));
            }
            let enough = opts.limit.is_some_and(|l| items.len() > l);
            if !page.more || enough {
                break;
            }
        }
        let more = opts.limit.is_some_and(|l| items.len() > l);
        if let Some(limit) = opts.limit {
            items.truncate(limit);
        }
        let continue_token = more.then(|| {
            let last = items.last().expect("a page before the remainder");
            ContinueToken { rv: revision, start: format!("{}\u{0}", &last.key[prefix.len()..]) }.encode()
        });
        Ok(ListResult { items, revision, continue_token, remaining: None })
    }

    /// DELETE on a collection: every matching object, each with the same options.
    pub async fn delete_collection(
        &self,
        scope: &Scope,
        list: &ListOptions,
        opts: &DeleteOptions,
    ) -> ApiResult<Vec<Value>> {
        let listed = self.list(scope, &ListOptions { limit: None, continue_token: None, ..list.clone() }).await?;
        let mut deleted = Vec::new();
        for obj in listed.items {
            let item_scope = Scope { kind: scope.kind.clone(), namespace: obj.namespace.clone() };
            match self.delete(&item_scope, &obj.name, opts).await {
                Ok(_) => deleted.push(to_served(&scope.kind, obj.parse())?),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Creates `scope`'s object unless it exists (bootstrap of built-in objects).
    pub async fn ensure(&self, scope: &Scope, obj: Value) -> ApiResult<()> {
        // Looked up first: a create of what exists could fail for another reason first
        // (the `kubernetes` Service's address is taken, by itself).
        if self.get(scope, object::name(&obj)).await.is_ok() {
            return Ok(());
        }
        match self.create(scope, obj, &WriteOptions::default()).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

enum ScaleChange {
    Replace(Value),
    Patch(PatchType, Value),
}

const CUSTOM_PATCH_TYPES: &[&str] =
    &["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"];
const BUILTIN_PATCH_TYPES: &[&str] = &[
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
];

/// The patch media types a kind accepts.
pub fn patch_types(kind: &KindInfo) -> &'static [&'static str] {
    if kind.custom.is_some() {
        CUSTOM_PATCH_TYPES
    } else {
        BUILTIN_PATCH_TYPES
    }
}

/// Applies a non-apply patch; strategic merge needs the built-in schema (custom
/// resources do not support it, as upstream).
fn apply_patch(target: &mut Value, patch_type: PatchType, patch: &Value, schema: Option<&Node>) -> ApiResult<()> {
    match patch_type {
        PatchType::Json => apply_json_patch(target, patch),
        PatchType::Merge => apply_merge_patch(target, patch),
        PatchType::StrategicMerge => match schema {
            Some(schema) => krate_api::patch::apply_strategic_merge_patch(target, patch, schema),
            None => Err(ApiError::unsupported_among("application/strategic-merge-patch+json", CUSTOM_PATCH_TYPES)),
        },
        // Objects are applied through Storage::apply; a configuration applied to the
        // scale subresource simply sets what it names.
        PatchType::Apply => apply_merge_patch(target, patch),
    }
}

fn patch_sets_resource_version(patch: &Value) -> bool {
    match patch {
        Value::Object(_) => patch.pointer("/metadata/resourceVersion").is_some_and(|v| !v.is_null()),
        Value::Array(ops) => ops.iter().any(|op| get_str(op, &["path"]) == Some("/metadata/resourceVersion")),
        _ => false,
    }
}

/// True when everything outside metadata and status differs.
fn spec_changed(new: &Value, old: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
        }
        v
    };
    strip(new) != strip(old)
}

/// A pod whose deletion grace period is still running stays until its node agent
/// finishes it (deletionGracePeriodSeconds reaches 0).
fn awaits_graceful_termination(obj: &Value) -> bool {
    get(obj, &["metadata", "deletionGracePeriodSeconds"]).and_then(Value::as_i64).is_some_and(|g| g > 0)
}

/// Decides what a DELETE does to `current`.
fn plan_delete(kind: &KindInfo, current: &Value, opts: &DeleteOptions) -> Mutation {
    let mut obj = current.clone();
    let mut finalizers = object::finalizers(&obj);
    let propagation = opts.propagation_policy.as_deref().or(match opts.orphan_dependents {
        Some(true) => Some("Orphan"),
        Some(false) => Some("Background"),
        None => None,
    });
    match propagation {
        Some("Foreground") if !finalizers.iter().any(|f| f == "foregroundDeletion") => {
            finalizers.push("foregroundDeletion".into())
        }
        Some("Orphan") if !finalizers.iter().any(|f| f == "orphan") => finalizers.push("orphan".into()),
        _ => {}
    }
    let blocked = kind.strategy.deletion_blocked(&obj);
    if blocked || !finalizers.is_empty() {
        kind.strategy.prepare_for_delete(&mut obj);
    }
    let already_deleting = get(&obj, &["metadata", "deletionTimestamp"]).is_some();
    // Being marked for deletion changes how controllers treat an object: its
    // generation moves on (upstream's BeforeDelete and markAsDeleting), where it has one.
    let bump_generation = |obj: &mut Value| {
        if let Some(generation) = get(obj, &["metadata", "generation"]).and_then(Value::as_i64).filter(|g| *g > 0) {
            object::set(obj, &["metadata", "generation"], json!(generation + 1));
        }
    };
    let grace = kind.strategy.graceful_delete_seconds(&obj, opts.grace_period_seconds);
    if let Some(grace) = grace {
        // A shorter grace period may replace a longer one, never the reverse.
        let current_grace = get(&obj, &["metadata", "deletionGracePeriodSeconds"]).and_then(Value::as_i64);
        if current_grace.is_none_or(|g| grace < g) {
            object::set(&mut obj, &["metadata", "deletionGracePeriodSeconds"], json!(grace));
            object::set(&mut obj, &["metadata", "deletionTimestamp"], json!(object::rfc3339_in(grace)));
        }
        if !already_deleting {
            bump_generation(&mut obj);
        }
        if !finalizers.is_empty() {
            object::set(&mut obj, &["metadata", "finalizers"], json!(finalizers));
        }
        return Mutation::Write(obj);
    }
    if opts.grace_period_seconds == Some(0) && already_deleting {
        // Ends a running grace period now (kinds deleted without one already have 0).
        object::set(&mut obj, &["metadata", "deletionGracePeriodSeconds"], json!(0));
    }
    if finalizers.is_empty() && !blocked && !awaits_graceful_termination(&obj) {
        return Mutation::Remove;
    }
    if !already_deleting {
        object::set(&mut obj, &["metadata", "deletionTimestamp"], json!(object::now_rfc3339()));
        // Upstream's markAsDeleting sets a zero grace period; a namespace's own
        // deletion (blocked on its spec.finalizers) sets only the timestamp.
        if !blocked {
            object::set(&mut obj, &["metadata", "deletionGracePeriodSeconds"], json!(0));
        }
        bump_generation(&mut obj);
    }
    if !finalizers.is_empty() {
        object::set(&mut obj, &["metadata", "finalizers"], json!(finalizers));
    }
    Mutation::Write(obj)
}

/// The autoscaling/v1 Scale view of an object.
pub fn scale_of(kind: &KindInfo, obj: &Value) -> Value {
    let info = kind.scale.unwrap_or(krate_api::kinds::STANDARD_SCALE);
    let selector = get(obj, info.selector)
        .and_then(|s| LabelSelector::from_json(s).ok())
        .map(|s| s.to_query())
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": object::name(obj),
            "namespace": object::namespace(obj),
            "uid": object::uid(obj),
            "resourceVersion": object::resource_version(obj),
            "creationTimestamp": get(obj, &["metadata", "creationTimestamp"]),
        },
        "spec": {"replicas": get(obj, info.spec_replicas).and_then(Value::as_i64).unwrap_or(0)},
        "status": {"replicas": get(obj, info.status_replicas).and_then(Value::as_i64).unwrap_or(0), "selector": selector},
    })
}

pub(crate) fn uuid_v4() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

/// Upstream's message for a continue token whose snapshot was compacted away.
const EXPIRED_CONTINUE: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

/// Upstream's continue token: base64 of `{"v":"meta.k8s.io/v1","rv":N,"start":"key\0"}`.
pub(crate) struct ContinueToken {
    rv: Revision,
    start: String,
}

impl ContinueToken {
    fn encode(&self) -> String {
        use base64::Engine;
        let raw = json!({"v": "meta.k8s.io/v1", "rv": self.rv, "start": self.start});
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.to_string())
    }

    pub(crate) fn decode(token: &str) -> ApiResult<Self> {
        use base64::Engine;
        let invalid = || ApiError::bad_request("continue key is not valid: the continue token is malformed");
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim_end_matches('='))
            .or_else(|_| base64::engine::general_purpose::STANDARD.decode(token))
            .map_err(|_| invalid())?;
        let v: Value = serde_json::from_slice(&raw).map_err(|_| invalid())?;
        if v.get("v").and_then(Value::as_str) != Some("meta.k8s.io/v1") {
            return Err(invalid());
        }
        let rv = v.get("rv").and_then(Value::as_i64).ok_or_else(invalid)?;
        let start = v.get("start").and_then(Value::as_str).ok_or_else(invalid)?.to_string();
        if start.contains('/') && !start.ends_with('\u{0}') {
            return Err(invalid());
        }
        Ok(Self { rv, start })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_reported_with_paths() {
        let input = json!({"spec": {"replicas": 1, "bogus": 2, "template": {"spec": {"containers": [{"name": "a", "x": 1}]}}}, "nul": null});
        let canonical = json!({"spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "a"}]}}}});
        let mut out = Vec::new();
        unknown_fields(&input, &canonical, "", &mut out);
        assert_eq!(out, ["spec.bogus", "spec.template.spec.containers[0].x"]);
    }

    #[test]
    fn continue_tokens_round_trip() {
        let t = ContinueToken { rv: 42, start: "web-1\u{0}".into() }.encode();
        let back = ContinueToken::decode(&t).unwrap();
        assert_eq!((back.rv, back.start.as_str()), (42, "web-1\u{0}"));
        assert_eq!(ContinueToken::decode("garbage!").err().unwrap().code, 400);
    }

    #[test]
    fn uuids_are_version_4() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
