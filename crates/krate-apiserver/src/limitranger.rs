//! LimitRanger admission, as upstream's: the LimitRanges of a namespace give new pods'
//! containers the default requests and limits they lack (noted in the
//! `kubernetes.io/limit-ranger` annotation), then refuse pods and persistent volume
//! claims outside their min, max and max limit/request ratio, with upstream's messages.
//! A LimitRange's `Container` item is read with upstream's defaulting: a missing default
//! limit is the max, a missing default request the default limit, else the min.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;
use krate_api::object;
use krate_api::quantity;
use krate_api::ApiResult;
use serde_json::{json, Map, Value};

use crate::admission::{forbidden, Attributes, Operation, Plugin};
use crate::registry::Storage;

type Resources = BTreeMap<String, String>;

fn resources(v: &Value) -> Resources {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
        .collect()
}

/// One item of a LimitRange, with upstream's defaults applied.
struct Item {
    kind: String,
    min: Resources,
    max: Resources,
    default: Resources,
    default_request: Resources,
    ratio: Resources,
}

fn items(range: &Value) -> Vec<Item> {
    range["spec"]["limits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            let mut item = Item {
                kind: l["type"].as_str().unwrap_or_default().to_string(),
                min: resources(&l["min"]),
                max: resources(&l["max"]),
                default: resources(&l["default"]),
                default_request: resources(&l["defaultRequest"]),
                ratio: resources(&l["maxLimitRequestRatio"]),
            };
            if item.kind == "Container" {
                for (k, v) in &item.max {
                    item.default.entry(k.clone()).or_insert_with(|| v.clone());
                }
                for (k, v) in item.default.iter().chain(&item.min) {
                    item.default_request.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            item
        })
        .collect()
}

fn value(q: &str) -> f64 {
    quantity::parse(q).unwrap_or(0.0)
}

fn min_constraint(kind: &str, name: &str, enforced: &str, requests: &Resources, limits: &Resources) -> Option<String> {
    let Some(req) = requests.get(name) else {
        return Some(format!("minimum {name} usage per {kind} is {enforced}.  No request is specified"));
    };
    if value(req) < value(enforced) {
        return Some(format!("minimum {name} usage per {kind} is {enforced}, but request is {req}"));
    }
    match limits.get(name) {
        Some(lim) if value(lim) < value(enforced) => {
            Some(format!("minimum {name} usage per {kind} is {enforced}, but limit is {lim}"))
        }
        _ => None,
    }
}

fn max_constraint(kind: &str, name: &str, enforced: &str, requests: &Resources, limits: &Resources) -> Option<String> {
    let Some(lim) = limits.get(name) else {
        return Some(format!("maximum {name} usage per {kind} is {enforced}.  No limit is specified"));
    };
    if value(lim) > value(enforced) {
        return Some(format!("maximum {name} usage per {kind} is {enforced}, but limit is {lim}"));
    }
    match requests.get(name) {
        Some(req) if value(req) > value(enforced) => {
            Some(format!("maximum {name} usage per {kind} is {enforced}, but request is {req}"))
        }
        _ => None,
    }
}

fn max_request_constraint(kind: &str, name: &str, enforced: &str, requests: &Resources) -> Option<String> {
    match requests.get(name) {
        None => Some(format!("maximum {name} usage per {kind} is {enforced}.  No request is specified")),
        Some(req) if value(req) > value(enforced) => {
            Some(format!("maximum {name} usage per {kind} is {enforced}, but request is {req}"))
        }
        _ => None,
    }
}

fn ratio_constraint(
    kind: &str,
    name: &str,
    enforced: &str,
    requests: &Resources,
    limits: &Resources,
) -> Option<String> {
    let req = requests.get(name).map(|r| value(r)).filter(|r| *r != 0.0);
    let lim = limits.get(name).map(|l| value(l)).filter(|l| *l != 0.0);
    let Some(req) = req else {
        return Some(format!(
            "{name} max limit to request ratio per {kind} is {enforced}, but no request is specified or request is 0"
        ));
    };
    let Some(lim) = lim else {
        return Some(format!(
            "{name} max limit to request ratio per {kind} is {enforced}, but no limit is specified or limit is 0"
        ));
    };
    let observed = lim / req;
    (observed > value(enforced) + 1e-9).then(|| {
        format!("{name} max limit to request ratio per {kind} is {enforced}, but provided ratio is {observed:.6}")
    })
}

/// The min, max and ratio rules of `item` against one set of requests and limits.
fn check(item: &Item, requests: &Resources, limits: &Resources, errors: &mut Vec<String>) {
    let kind = item.kind.as_str();
    errors.extend(item.min.iter().filter_map(|(k, v)| min_constraint(kind, k, v, requests, limits)));
    errors.extend(item.max.iter().filter_map(|(k, v)| max_constraint(kind, k, v, requests, limits)));
    errors.extend(item.ratio.iter().filter_map(|(k, v)| ratio_constraint(kind, k, v, requests, limits)));
}

fn container_resources(c: &Value) -> (Resources, Resources) {
    (resources(&c["resources"]["requests"]), resources(&c["resources"]["limits"]))
}

/// A pod's requests or limits: the sum over its containers, at least each init
/// container's.
fn pod_total(spec: &Value, field: &str) -> Resources {
    let mut sum: BTreeMap<String, f64> = BTreeMap::new();
    for c in spec["containers"].as_array().into_iter().flatten() {
        for (k, v) in resources(&c["resources"][field]) {
            *sum.entry(k).or_default() += value(&v);
        }
    }
    for c in spec["initContainers"].as_array().into_iter().flatten() {
        for (k, v) in resources(&c["resources"][field]) {
            let entry = sum.entry(k).or_default();
            *entry = entry.max(value(&v));
        }
    }
    sum.into_iter().map(|(k, v)| (k, quantity::format(v))).collect()
}

pub struct LimitRanger;

impl LimitRanger {
    async fn ranges(storage: &Storage, namespace: &str) -> Vec<Value> {
        storage.cached_objects(&storage.builtin::<core::LimitRange>(Some(namespace.to_string())), false).await
    }

    /// Which writes upstream's plugin looks at: pod creates and PVC creates and updates.
    fn applies(attrs: &Attributes<'_>) -> bool {
        let sub = attrs.request.map(|r| r.subresource.as_str()).unwrap_or_default();
        sub.is_empty()
            && ((attrs.kind.is::<core::Pod>() && attrs.operation == Operation::Create)
                || (attrs.kind.is::<core::PersistentVolumeClaim>() && attrs.operation != Operation::Delete))
    }
}

#[async_trait::async_trait]
impl Plugin for LimitRanger {
    fn name(&self) -> &'static str {
        "LimitRanger"
    }

    async fn admit(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &mut Value) -> ApiResult<()> {
        if !Self::applies(attrs) || !attrs.kind.is::<core::Pod>() {
            return Ok(());
        }
        let ranges = Self::ranges(storage, object::namespace(obj).unwrap_or_default()).await;
        let (mut requests, mut limits) = (Resources::new(), Resources::new());
        for item in ranges.iter().flat_map(items).filter(|i| i.kind == "Container") {
            requests.extend(item.default_request.clone());
            limits.extend(item.default.clone());
        }
        if requests.is_empty() && limits.is_empty() {
            return Ok(());
        }
        let mut notes = Vec::new();
        for (field, prefix) in [("containers", "container"), ("initContainers", "init container")] {
            for c in obj["spec"][field].as_array_mut().into_iter().flatten() {
                let name = c["name"].as_str().unwrap_or_default().to_string();
                let resources =
                    c.as_object_mut().expect("a container is an object").entry("resources").or_insert(json!({}));
                for (which, defaults) in [("requests", &requests), ("limits", &limits)] {
                    let set = resources.as_object_mut().and_then(|r| {
                        let list = r.entry(which).or_insert(Value::Object(Map::new())).as_object_mut()?;
                        let added: Vec<String> = defaults.keys().filter(|k| !list.contains_key(*k)).cloned().collect();
                        for k in &added {
                            list.insert(k.clone(), json!(defaults[k]));
                        }
                        Some(added)
                    });
                    if let Some(set) = set.filter(|s| !s.is_empty()) {
                        let kind = if which == "requests" { "request" } else { "limit" };
                        notes.push(format!("{} {kind} for {prefix} {name}", set.join(", ")));
                    }
                }
            }
        }
        if !notes.is_empty() {
            let text = format!("LimitRanger plugin set: {}", notes.join("; "));
            object::set(obj, &["metadata", "annotations", "kubernetes.io/limit-ranger"], json!(text));
        }
        Ok(())
    }

    async fn validate(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
        if !Self::applies(attrs) {
            return Ok(());
        }
        let ranges = Self::ranges(storage, object::namespace(obj).unwrap_or_default()).await;
        let mut errors = Vec::new();
        for item in ranges.iter().flat_map(items) {
            if attrs.kind.is::<core::PersistentVolumeClaim>() {
                if item.kind == "PersistentVolumeClaim" {
                    let requests = resources(&obj["spec"]["resources"]["requests"]);
                    let kind = item.kind.as_str();
                    errors.extend(
                        item.min.iter().filter_map(|(k, v)| min_constraint(kind, k, v, &requests, &Resources::new())),
                    );
                    errors.extend(item.max.iter().filter_map(|(k, v)| max_request_constraint(kind, k, v, &requests)));
                }
                continue;
            }
            match item.kind.as_str() {
                "Container" => {
                    for field in ["containers", "initContainers"] {
                        for c in obj["spec"][field].as_array().into_iter().flatten() {
                            let (requests, limits) = container_resources(c);
                            check(&item, &requests, &limits, &mut errors);
                        }
                    }
                }
                "Pod" => {
                    check(&item, &pod_total(&obj["spec"], "requests"), &pod_total(&obj["spec"], "limits"), &mut errors)
                }
                _ => {}
            }
        }
        match errors.as_slice() {
            [] => Ok(()),
            [one] => Err(forbidden(attrs.kind, obj, one)),
            many => Err(forbidden(attrs.kind, obj, format!("[{}]", many.join(", ")))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_take_upstreams_defaults() {
        let range =
            json!({"spec": {"limits": [{"type": "Container", "max": {"cpu": "2"}, "min": {"memory": "10Mi"}}]}});
        let item = &items(&range)[0];
        assert_eq!(item.default.get("cpu").map(String::as_str), Some("2"));
        assert_eq!(item.default_request.get("cpu").map(String::as_str), Some("2"));
        assert_eq!(item.default_request.get("memory").map(String::as_str), Some("10Mi"));
    }

    #[test]
    fn constraints_say_what_is_wrong() {
        let r =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Resources>();
        assert_eq!(
            max_constraint("Container", "cpu", "1", &r(&[]), &r(&[("cpu", "2")])).unwrap(),
            "maximum cpu usage per Container is 1, but limit is 2"
        );
        assert_eq!(
            min_constraint("Container", "memory", "10Mi", &r(&[]), &r(&[])).unwrap(),
            "minimum memory usage per Container is 10Mi.  No request is specified"
        );
        assert_eq!(
            ratio_constraint("Container", "cpu", "2", &r(&[("cpu", "100m")]), &r(&[("cpu", "500m")])).unwrap(),
            "cpu max limit to request ratio per Container is 2, but provided ratio is 5.000000"
        );
        assert_eq!(ratio_constraint("Container", "cpu", "5", &r(&[("cpu", "100m")]), &r(&[("cpu", "500m")])), None);
        assert_eq!(min_constraint("Container", "cpu", "100m", &r(&[("cpu", "0.1")]), &r(&[])), None);
    }
}
