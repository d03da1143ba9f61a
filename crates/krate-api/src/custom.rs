//! CustomResourceDefinitions: validating a CRD, and turning an established one into
//! served kinds that go through the same generic path as built-in kinds.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::{json, Value};

use crate::convert::{Conversion, Renames};
use crate::error::FieldError;
use crate::kinds::{KindInfo, ScaleInfo, SelectableField, StorageResource, ALL_VERBS};
use crate::object::{get, get_str};
use crate::schema::{Additional, Node};
use crate::strategy::{Errors, Strategy};
use crate::validation::NameRule;

/// The finalizer that keeps a CRD until its objects are gone.
pub const CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

/// One `additionalPrinterColumns` entry.
#[derive(Clone, Debug)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// What a custom kind carries beyond the generic `KindInfo`.
#[derive(Clone, Debug, Default)]
pub struct CustomKind {
    pub printer_columns: Vec<PrinterColumn>,
    /// The schema declares defaults: objects are defaulted when read too, so a default
    /// added later shows on objects stored before it (upstream defaults from storage).
    pub defaults_on_read: bool,
}

/// Custom kinds live as long as the process; their names and conversions are interned
/// so rebuilding the kinds table does not leak.
static INTERNED: LazyLock<Mutex<HashMap<String, &'static str>>> = LazyLock::new(Default::default);
static CONVERSIONS: LazyLock<Mutex<HashMap<(String, String), &'static Renames>>> = LazyLock::new(Default::default);
static PATHS: LazyLock<Mutex<HashMap<String, &'static [&'static str]>>> = LazyLock::new(Default::default);
static FIELDS: LazyLock<Mutex<HashMap<Vec<String>, &'static [SelectableField]>>> = LazyLock::new(Default::default);

/// A version's `selectableFields` (`.spec.color` is selected as `spec.color`), interned.
fn selectable_fields(version: &Value) -> &'static [SelectableField] {
    let paths: Vec<String> = version
        .get("selectableFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|f| f["jsonPath"].as_str().map(str::to_string))
        .collect();
    if paths.is_empty() {
        return &[];
    }
    let mut map = FIELDS.lock().expect("fields lock");
    if let Some(fields) = map.get(&paths) {
        return fields;
    }
    let fields: Vec<SelectableField> = paths
        .iter()
        .map(|p| SelectableField {
            label: intern(p.trim_start_matches('.')),
            path: intern_path(p),
            absent: "",
            fallback: None,
        })
        .collect();
    let leaked: &'static [SelectableField] = Box::leak(fields.into_boxed_slice());
    map.insert(paths, leaked);
    leaked
}

fn intern(s: &str) -> &'static str {
    let mut map = INTERNED.lock().expect("intern lock");
    if let Some(v) = map.get(s) {
        return v;
    }
    let leaked: &'static str = Box::leak(s.to_string().into_boxed_str());
    map.insert(s.to_string(), leaked);
    leaked
}

/// `.spec.replicas` as a static path.
fn intern_path(json_path: &str) -> &'static [&'static str] {
    let mut map = PATHS.lock().expect("paths lock");
    if let Some(v) = map.get(json_path) {
        return v;
    }
    let parts: Vec<&'static str> =
        json_path.trim_start_matches('.').split('.').filter(|p| !p.is_empty()).map(intern).collect();
    let leaked: &'static [&'static str] = Box::leak(parts.into_boxed_slice());
    map.insert(json_path.to_string(), leaked);
    leaked
}

/// Rewrites apiVersion between a served version and the storage version (conversion
/// strategy None).
fn version_conversion(served: &str, storage: &str) -> &'static dyn Conversion {
    let mut map = CONVERSIONS.lock().expect("conversions lock");
    let key = (served.to_string(), storage.to_string());
    if let Some(c) = map.get(&key) {
        return *c;
    }
    let c: &'static Renames = Box::leak(Box::new(Renames::api_version_only(intern(served), intern(storage))));
    map.insert(key, c);
    c
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// The kinds a CRD serves (one per served version).
pub fn kinds_of(crd: &Value) -> Vec<KindInfo> {
    let spec = crd.get("spec").cloned().unwrap_or_default();
    let group = get_str(&spec, &["group"]).unwrap_or_default().to_string();
    let names = spec.get("names").cloned().unwrap_or_default();
    let plural = get_str(&names, &["plural"]).unwrap_or_default().to_string();
    let kind = get_str(&names, &["kind"]).unwrap_or_default().to_string();
    let versions = spec.get("versions").and_then(Value::as_array).cloned().unwrap_or_default();
    let storage_version =
        versions.iter().find(|v| v["storage"] == true).and_then(|v| v["name"].as_str()).unwrap_or_default().to_string();
    let storage_api_version = format!("{group}/{storage_version}");
    let mut out = Vec::new();
    for v in versions.iter().filter(|v| v["served"] == true) {
        let version = v["name"].as_str().unwrap_or_default().to_string();
        let schema_json = v
            .pointer("/schema/openAPIV3Schema")
            .cloned()
            .unwrap_or(json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
        let Ok(schema) = serde_json::from_value::<Node>(schema_json.clone()) else { continue };
        let defaults_on_read = crate::schema::has_defaults(&schema);
        let api_version = format!("{group}/{version}");
        let scale = v.pointer("/subresources/scale").map(|s| ScaleInfo {
            spec_replicas: intern_path(s["specReplicasPath"].as_str().unwrap_or(".spec.replicas")),
            status_replicas: intern_path(s["statusReplicasPath"].as_str().unwrap_or(".status.replicas")),
            selector: intern_path(s["labelSelectorPath"].as_str().unwrap_or("")),
        });
        let printer_columns = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .map(|c| PrinterColumn {
                        name: c["name"].as_str().unwrap_or_default().to_string(),
                        type_: c["type"].as_str().unwrap_or("string").to_string(),
                        format: c["format"].as_str().unwrap_or_default().to_string(),
                        description: c["description"].as_str().unwrap_or_default().to_string(),
                        priority: c["priority"].as_i64().unwrap_or(0),
                        json_path: c["jsonPath"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let status = v.pointer("/subresources/status").is_some();
        out.push(KindInfo {
            group: group.clone(),
            version: version.clone(),
            kind: kind.clone(),
            plural: plural.clone(),
            singular: get_str(&names, &["singular"])
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .unwrap_or_else(|| kind.to_lowercase()),
            namespaced: get_str(&spec, &["scope"]) == Some("Namespaced"),
            short_names: strings(names.get("shortNames")),
            categories: strings(names.get("categories")),
            verbs: ALL_VERBS.iter().map(|v| v.to_string()).collect(),
            status,
            status_metadata: &[],
            scale,
            subresources: &[],
            generation: true,
            name_rule: NameRule::Subdomain,
            storage: StorageResource { group: intern(&group), resource: intern(&plural) },
            // Every version converts, the storage version too: objects written before
            // the storage version changed keep their old apiVersion until rewritten.
            conversion: Some(version_conversion(&api_version, &storage_api_version)),
            typed: None,
            schema: Some(Arc::new(schema)),
            schema_json: Some(Arc::new(schema_json)),
            strategy: &CustomResourceStrategy,
            field_selectors: selectable_fields(v),
            custom: Some(CustomKind { printer_columns, defaults_on_read }),
            printer: &crate::printers::DEFAULT,
            returns_deleted_object: false,
            handler: None,
        });
    }
    out
}

/// Custom resources: metadata must be ObjectMeta; the rest is defaulted, pruned and
/// validated against the CRD's schema.
pub fn check_object(kind: &KindInfo, schema: &Node, mut body: Value) -> crate::ApiResult<(Value, Vec<String>)> {
    if let Some(meta) = body.get("metadata") {
        if let Err(e) =
            serde_json::from_value::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(meta.clone())
        {
            return Err(crate::ApiError::bad_request(format!(
                "{} in version {:?} cannot be handled as a {}: metadata: {e}",
                kind.kind, kind.version, kind.kind
            )));
        }
    }
    let checked = crate::schema::check(schema, &mut body);
    if !checked.errors.is_empty() {
        return Err(crate::ApiError::invalid(&kind.group, &kind.kind, crate::object::name(&body), &checked.errors));
    }
    Ok((body, checked.unknown))
}

/// Custom resources: the schema does the validating, generically.
pub struct CustomResourceStrategy;
impl Strategy for CustomResourceStrategy {}

/// apiextensions.k8s.io/v1 CustomResourceDefinition.
pub struct CrdStrategy;

impl Strategy for CrdStrategy {
    fn default(&self, obj: &mut Value) {
        crate::object::default(obj, &["spec", "conversion", "strategy"], json!("None"));
        if let Some(names) = obj.pointer_mut("/spec/names") {
            if names.get("singular").and_then(Value::as_str).is_none_or(str::is_empty) {
                let singular = names.get("kind").and_then(Value::as_str).unwrap_or_default().to_lowercase();
                names["singular"] = json!(singular);
            }
            if names.get("listKind").and_then(Value::as_str).is_none_or(str::is_empty) {
                let list = format!("{}List", names.get("kind").and_then(Value::as_str).unwrap_or_default());
                names["listKind"] = json!(list);
            }
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        let finalizers =
            crate::object::object_at(obj, &["metadata"]).map(|m| m.entry("finalizers").or_insert(json!([])));
        if let Some(Value::Array(list)) = finalizers {
            if !list.iter().any(|f| f == CLEANUP_FINALIZER) {
                list.push(json!(CLEANUP_FINALIZER));
            }
        }
    }

    fn initial_status(&self, obj: &Value) -> Option<Value> {
        let storage = obj
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .and_then(|vs| vs.iter().find(|v| v["storage"] == true))
            .map(|v| v["name"].clone());
        Some(
            json!({"conditions": [], "acceptedNames": {"plural": "", "kind": ""}, "storedVersions": storage.into_iter().collect::<Vec<_>>()}),
        )
    }

    fn validate(&self, obj: &Value, errs: &mut Errors) {
        validate_crd(obj, errs);
    }

    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        validate_crd(new, errs);
        crate::strategy::immutable(new, old, &["spec", "scope"], "spec.scope", errs);
        crate::strategy::immutable(new, old, &["spec", "group"], "spec.group", errs);
    }
}

fn validate_crd(obj: &Value, errs: &mut Errors) {
    let group = get_str(obj, &["spec", "group"]).unwrap_or_default();
    let plural = get_str(obj, &["spec", "names", "plural"]).unwrap_or_default();
    let name = get_str(obj, &["metadata", "name"]).unwrap_or_default();
    if group.is_empty() {
        errs.push(FieldError::required("spec.group", ""));
    } else if !group.contains('.') {
        errs.push(FieldError::invalid("spec.group", &json!(group), "should be a domain with at least one dot"));
    }
    if plural.is_empty() {
        errs.push(FieldError::required("spec.names.plural", ""));
    } else if !crate::validation::is_dns1123_label(plural).is_empty() {
        errs.push(FieldError::invalid(
            "spec.names.plural",
            &json!(plural),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'",
        ));
    }
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        errs.push(FieldError::invalid("metadata.name", &json!(name), "must be spec.names.plural+\".\"+spec.group"));
    }
    if get_str(obj, &["spec", "names", "kind"]).is_none_or(str::is_empty) {
        errs.push(FieldError::required("spec.names.kind", ""));
    }
    match get_str(obj, &["spec", "scope"]) {
        Some("Namespaced" | "Cluster") => {}
        Some(other) => errs.push(FieldError::not_supported("spec.scope", &json!(other), &["Cluster", "Namespaced"])),
        None => errs.push(FieldError::required("spec.scope", "")),
    }
    let versions = get(obj, &["spec", "versions"]).and_then(Value::as_array).cloned().unwrap_or_default();
    if versions.is_empty() {
        errs.push(FieldError::required("spec.versions", "must have exactly one version marked as storage version"));
    } else if versions.iter().filter(|v| v["storage"] == true).count() != 1 {
        errs.push(FieldError::invalid(
            "spec.versions",
            &json!(versions.iter().map(|v| v["name"].clone()).collect::<Vec<_>>()),
            "must have exactly one version marked as storage version",
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        let base = format!("spec.versions[{i}]");
        if v["name"].as_str().is_none_or(str::is_empty) {
            errs.push(FieldError::required(format!("{base}.name"), ""));
        }
        let Some(schema) = v.pointer("/schema/openAPIV3Schema") else {
            errs.push(FieldError::required(format!("{base}.schema.openAPIV3Schema"), "schemas are required"));
            continue;
        };
        let path = format!("{base}.schema.openAPIV3Schema");
        match serde_json::from_value::<Node>(schema.clone()) {
            Err(e) => {
                errs.push(FieldError::invalid(path, &json!("<schema>"), &format!("the schema could not be read: {e}")))
            }
            Ok(node) => {
                if node.type_.as_deref() != Some("object") {
                    errs.push(FieldError::invalid(
                        format!("{path}.type"),
                        &json!(node.type_.clone().unwrap_or_default()),
                        "must be object at the root",
                    ));
                }
                check_structural(&node, &path, errs);
            }
        }
        for (j, c) in v.get("additionalPrinterColumns").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let cpath = format!("{base}.additionalPrinterColumns[{j}]");
            if c["jsonPath"].as_str().is_none_or(|p| !p.starts_with('.')) {
                errs.push(FieldError::invalid(
                    format!("{cpath}.jsonPath"),
                    &c["jsonPath"],
                    "must be a simple json path starting with .",
                ));
            }
            let allowed = ["integer", "number", "string", "boolean", "date"];
            if !allowed.contains(&c["type"].as_str().unwrap_or_default()) {
                errs.push(FieldError::not_supported(format!("{cpath}.type"), &c["type"], &allowed));
            }
        }
    }
}

const TYPES: &[&str] = &["array", "boolean", "integer", "number", "object", "string"];

/// Upstream's structural-schema rules that matter for serving: every specified field
/// has a known type (unless int-or-string or preserve-unknown-fields), arrays have items.
fn check_structural(node: &Node, path: &str, errs: &mut Errors) {
    match node.type_.as_deref() {
        Some(t) if !TYPES.contains(&t) => {
            errs.push(FieldError::not_supported(format!("{path}.type"), &json!(t), TYPES))
        }
        None if !node.int_or_string && !node.preserve_unknown_fields => {
            errs.push(FieldError::required(format!("{path}.type"), "must not be empty for specified object fields"));
        }
        _ => {}
    }
    if node.type_.as_deref() == Some("array") && node.items.is_none() {
        errs.push(FieldError::required(format!("{path}.items"), "must be specified"));
    }
    crate::schema::rules::check_declared(node, path, errs);
    if let Some(p) = &node.pattern {
        if regex::Regex::new(p).is_err() {
            errs.push(FieldError::invalid(format!("{path}.pattern"), &json!(p), "must be a valid regular expression"));
        }
    }
    for (name, prop) in &node.properties {
        check_structural(prop, &format!("{path}.properties[{name}]"), errs);
    }
    if let Some(items) = &node.items {
        check_structural(items, &format!("{path}.items"), errs);
    }
    if let Some(Additional::Schema(s)) = &node.additional_properties {
        check_structural(s, &format!("{path}.additionalProperties"), errs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd() -> Value {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                     "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object", "properties": {"size": {"type": "integer"}}}}}}},
                    {"name": "v1beta1", "served": true, "storage": false,
                     "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}})
    }

    #[test]
    fn a_crd_serves_one_kind_per_version() {
        let kinds = kinds_of(&crd());
        assert_eq!(kinds.len(), 2);
        assert_eq!(kinds[0].api_version(), "example.com/v1");
        assert!(kinds[0].status);
        assert_eq!(kinds[1].storage, kinds[0].storage);
        let stored = kinds[1].conversion.unwrap().store(json!({"apiVersion": "example.com/v1beta1"})).unwrap();
        assert_eq!(stored["apiVersion"], "example.com/v1", "v1beta1 is stored as v1");
        // The storage version converts too: an object stored as v1beta1 before the
        // storage version moved to v1 is served as v1.
        let v1 = kinds[0].conversion.unwrap();
        assert_eq!(v1.serve(json!({"apiVersion": "example.com/v1beta1"})).unwrap()["apiVersion"], "example.com/v1");
        assert!(v1.serves_as_stored("example.com/v1") && !v1.serves_as_stored("example.com/v1beta1"));
    }

    #[test]
    fn invalid_crds_are_rejected_with_field_paths() {
        let mut errs = vec![];
        validate_crd(&crd(), &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        let mut bad = crd();
        bad["metadata"]["name"] = json!("wrong");
        bad["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["size"]["type"] =
            json!("integr");
        bad["spec"]["versions"][1]["storage"] = json!(true);
        let mut errs = vec![];
        validate_crd(&bad, &mut errs);
        let lines: Vec<String> = errs.iter().map(FieldError::to_line).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[size].type: Unsupported value: \"integr\"")), "{lines:?}");
    }
}
