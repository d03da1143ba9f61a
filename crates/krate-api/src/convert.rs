//! Conversions between a served version and the version its objects are stored in.

use serde_json::{json, Value};

/// Converts objects of one served version to and from their stored form. Built-in
/// conversions cannot fail; a CRD's conversion webhook can (the error is upstream's
/// `conversion webhook for ... failed: ...`).
pub trait Conversion: Sync + Send {
    fn store(&self, obj: Value) -> Result<Value, String>;
    fn serve(&self, obj: Value) -> Result<Value, String>;
    /// Whether an object stored with `api_version` is served exactly as stored (so its
    /// stored bytes can be sent without decoding).
    fn serves_as_stored(&self, _api_version: &str) -> bool {
        false
    }
}

/// Renames top-level fields and rewrites apiVersion.
pub struct Renames {
    served_api_version: &'static str,
    storage_api_version: &'static str,
    /// (served name, stored name)
    fields: &'static [(&'static str, &'static str)],
}

fn rename(obj: Value, api_version: &str, pairs: impl Iterator<Item = (&'static str, &'static str)>) -> Value {
    let Value::Object(mut map) = obj else { return obj };
    for (from, to) in pairs {
        if let Some(v) = map.remove(from) {
            map.insert(to.to_string(), v);
        }
    }
    map.insert("apiVersion".to_string(), json!(api_version));
    Value::Object(map)
}

impl Renames {
    /// Versions that differ only in name (custom resources, conversion strategy None).
    pub fn api_version_only(served: &'static str, storage: &'static str) -> Self {
        Renames { served_api_version: served, storage_api_version: storage, fields: &[] }
    }
}

impl Conversion for Renames {
    fn store(&self, obj: Value) -> Result<Value, String> {
        Ok(rename(obj, self.storage_api_version, self.fields.iter().copied()))
    }
    fn serve(&self, obj: Value) -> Result<Value, String> {
        Ok(rename(obj, self.served_api_version, self.fields.iter().map(|(a, b)| (*b, *a))))
    }
    fn serves_as_stored(&self, api_version: &str) -> bool {
        self.fields.is_empty() && api_version == self.served_api_version
    }
}

/// events.k8s.io/v1 Event <-> core/v1 Event.
pub static EVENTS_V1: &dyn Conversion = &Renames {
    served_api_version: "events.k8s.io/v1",
    storage_api_version: "v1",
    fields: &[
        ("regarding", "involvedObject"),
        ("note", "message"),
        ("deprecatedSource", "source"),
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedCount", "count"),
        ("reportingController", "reportingComponent"),
    ],
};

/// autoscaling/v1 HorizontalPodAutoscaler <-> autoscaling/v2 (stored).
pub struct HpaV1;
pub static HPA_V1: HpaV1 = HpaV1;

fn cpu_metric(key: &str, inner: Value) -> Value {
    json!({"type": "Resource", "resource": {"name": "cpu", key: inner}})
}

fn find_cpu_utilization(metrics: Option<&Value>, key: &str) -> Option<Value> {
    metrics?.as_array()?.iter().find_map(|m| {
        let r = m.get("resource")?;
        (m.get("type")?.as_str()? == "Resource" && r.get("name")?.as_str()? == "cpu")
            .then(|| r.get(key)?.get("averageUtilization").cloned())?
    })
}

impl Conversion for HpaV1 {
    fn store(&self, obj: Value) -> Result<Value, String> {
        Ok(Self::to_v2(obj))
    }
    fn serve(&self, obj: Value) -> Result<Value, String> {
        Ok(Self::to_v1(obj))
    }
}

impl HpaV1 {
    fn to_v2(mut obj: Value) -> Value {
        obj["apiVersion"] = json!("autoscaling/v2");
        if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            if let Some(pct) = spec.remove("targetCPUUtilizationPercentage") {
                spec.insert(
                    "metrics".into(),
                    json!([cpu_metric("target", json!({"type": "Utilization", "averageUtilization": pct}))]),
                );
            }
        }
        if let Some(status) = obj.get_mut("status").and_then(Value::as_object_mut) {
            if let Some(pct) = status.remove("currentCPUUtilizationPercentage") {
                status.insert(
                    "currentMetrics".into(),
                    json!([cpu_metric("current", json!({"averageUtilization": pct}))]),
                );
            }
        }
        obj
    }

    fn to_v1(mut obj: Value) -> Value {
        obj["apiVersion"] = json!("autoscaling/v1");
        if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            let target = find_cpu_utilization(spec.get("metrics"), "target");
            spec.remove("metrics");
            spec.remove("behavior");
            if let Some(pct) = target {
                spec.insert("targetCPUUtilizationPercentage".into(), pct);
            }
        }
        if let Some(status) = obj.get_mut("status").and_then(Value::as_object_mut) {
            let current = find_cpu_utilization(status.get("currentMetrics"), "current");
            status.remove("currentMetrics");
            status.remove("conditions");
            if let Some(pct) = current {
                status.insert("currentCPUUtilizationPercentage".into(), pct);
            }
        }
        obj
    }
}

/// A conversion that only rewrites apiVersion (CRD versions with `None` strategy).
pub fn set_api_version(obj: &mut Value, api_version: &str) {
    if let Some(map) = obj.as_object_mut() {
        map.insert("apiVersion".to_string(), Value::String(api_version.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_v1_round_trips_through_core() {
        let v1 = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "regarding": {"name": "p"}, "note": "hi", "reason": "R"});
        let core = EVENTS_V1.store(v1.clone()).unwrap();
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "p");
        assert_eq!(core["message"], "hi");
        assert_eq!(EVENTS_V1.serve(core).unwrap(), v1);
    }

    #[test]
    fn hpa_v1_cpu_target_maps_to_v2_metrics() {
        let v1 = json!({"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
            "spec": {"maxReplicas": 5, "targetCPUUtilizationPercentage": 70}});
        let v2 = HPA_V1.store(v1.clone()).unwrap();
        assert_eq!(v2["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"], 70);
        assert_eq!(HPA_V1.serve(v2).unwrap(), v1);
    }
}
