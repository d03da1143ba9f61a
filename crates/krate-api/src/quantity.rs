//! Resource quantities (`100m`, `1.5`, `128Mi`, `1G`, `1e3`) as plain numbers in base
//! units (cores, bytes, counts), and per-resource sums.

use std::collections::BTreeMap;

/// Parses a Kubernetes quantity into base units.
pub fn parse(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+')).unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let value: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "u" => 1e-6,
        "n" => 1e-9,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(value * factor)
}

/// Amounts per resource name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources(BTreeMap<String, f64>);

impl Resources {
    pub fn get(&self, resource: &str) -> Option<f64> {
        self.0.get(resource).copied()
    }

    pub fn set(&mut self, resource: &str, amount: f64) {
        self.0.insert(resource.to_string(), amount);
    }

    pub fn add_one(&mut self, resource: &str, amount: f64) {
        *self.0.entry(resource.to_string()).or_default() += amount;
    }

    pub fn add(&mut self, other: &Resources) {
        for (k, v) in &other.0 {
            self.add_one(k, *v);
        }
    }

    pub fn subtract(&mut self, other: &Resources) {
        for (k, v) in &other.0 {
            self.add_one(k, -*v);
        }
    }

    /// Per resource, the larger of the two (init containers run one at a time).
    pub fn max_with(&mut self, other: &Resources) {
        for (k, v) in &other.0 {
            let slot = self.0.entry(k.clone()).or_default();
            *slot = slot.max(*v);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// A quantity in canonical form: whole numbers plain (with `Ki`/`Mi`/`Gi` when exact),
/// fractions in milli-units.
pub fn format(value: f64) -> String {
    let rounded = value.round();
    if (value - rounded).abs() < 1e-9 {
        let n = rounded as i64;
        for (suffix, unit) in [("Gi", 1i64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if n != 0 && n % unit == 0 {
                return format!("{}{suffix}", n / unit);
            }
        }
        return n.to_string();
    }
    format!("{}m", (value * 1000.0).round() as i64)
}

/// A pod's effective `requests` or `limits` (`which`) from its JSON: per resource, the
/// larger of the containers' sum and any one init container, plus the pod overhead.
pub fn pod_amounts(pod: &serde_json::Value, which: &str) -> Resources {
    let of = |c: &serde_json::Value| {
        let mut r = Resources::default();
        for (name, q) in c.pointer(&format!("/resources/{which}")).and_then(serde_json::Value::as_object).into_iter().flatten() {
            if let Some(v) = q.as_str().and_then(parse).or_else(|| q.as_f64()) {
                r.add_one(name, v);
            }
        }
        r
    };
    let list = |key: &str| pod.pointer(&format!("/spec/{key}")).and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
    let mut total = Resources::default();
    for c in list("containers") {
        total.add(&of(&c));
    }
    for c in list("initContainers") {
        total.max_with(&of(&c));
    }
    if let Some(overhead) = pod.pointer("/spec/overhead") {
        total.add(&of(&serde_json::json!({"resources": {which: overhead}})));
    }
    total
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_canonically() {
        assert_eq!(super::format(0.5), "500m");
        assert_eq!(super::format(2.0), "2");
        assert_eq!(super::format(128.0 * 1024.0 * 1024.0), "128Mi");
        assert_eq!(super::format(1e9), "1000000000");
    }

    #[test]
    fn pod_amounts_take_init_containers_and_overhead() {
        let pod = serde_json::json!({"spec": {
            "containers": [{"resources": {"requests": {"cpu": "100m"}}}, {"resources": {"requests": {"cpu": "200m", "memory": "1Gi"}}}],
            "initContainers": [{"resources": {"requests": {"cpu": "1"}}}],
            "overhead": {"memory": "1Mi"},
        }});
        let r = super::pod_amounts(&pod, "requests");
        assert_eq!(r.get("cpu"), Some(1.0));
        assert_eq!(r.get("memory"), Some((1024.0 + 1.0) * 1024.0 * 1024.0));
    }

    #[test]
    fn quantities() {
        assert_eq!(super::parse("100m"), Some(0.1));
        assert_eq!(super::parse("2"), Some(2.0));
        assert_eq!(super::parse("128Mi"), Some(128.0 * 1024.0 * 1024.0));
        assert_eq!(super::parse("1G"), Some(1e9));
        assert_eq!(super::parse("1e3"), Some(1000.0));
        assert_eq!(super::parse("bogus"), None);
    }
}
