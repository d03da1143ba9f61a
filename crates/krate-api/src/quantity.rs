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

/// The resources every node and pod speaks of, kept in fixed slots: the scheduler
/// compares them on every node it considers, where name lookups would dominate.
const WELL_KNOWN: [&str; 4] = ["cpu", "ephemeral-storage", "memory", "pods"];

fn well_known(resource: &str) -> Option<usize> {
    WELL_KNOWN.iter().position(|k| *k == resource)
}

/// Amounts per resource name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    well_known: [Option<f64>; 4],
    extended: BTreeMap<String, f64>,
}

impl Resources {
    pub fn get(&self, resource: &str) -> Option<f64> {
        match well_known(resource) {
            Some(i) => self.well_known[i],
            None => self.extended.get(resource).copied(),
        }
    }

    pub fn cpu(&self) -> Option<f64> {
        self.well_known[0]
    }

    pub fn memory(&self) -> Option<f64> {
        self.well_known[2]
    }

    pub fn pods(&self) -> Option<f64> {
        self.well_known[3]
    }

    fn slot(&mut self, resource: &str) -> &mut f64 {
        match well_known(resource) {
            Some(i) => self.well_known[i].get_or_insert(0.0),
            None => self.extended.entry(resource.to_string()).or_default(),
        }
    }

    pub fn set(&mut self, resource: &str, amount: f64) {
        *self.slot(resource) = amount;
    }

    pub fn add_one(&mut self, resource: &str, amount: f64) {
        *self.slot(resource) += amount;
    }

    pub fn add(&mut self, other: &Resources) {
        for (k, v) in other.iter() {
            self.add_one(k, v);
        }
    }

    pub fn subtract(&mut self, other: &Resources) {
        for (k, v) in other.iter() {
            self.add_one(k, -v);
        }
    }

    /// Per resource, the larger of the two (init containers run one at a time).
    pub fn max_with(&mut self, other: &Resources) {
        for (k, v) in other.iter() {
            let slot = self.slot(k);
            *slot = slot.max(v);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        let known = WELL_KNOWN.iter().zip(&self.well_known).filter_map(|(k, v)| Some((*k, (*v)?)));
        known.chain(self.extended.iter().map(|(k, v)| (k.as_str(), *v)))
    }

    /// The first resource (other than the pod count) of which these requests want more
    /// than `allocatable` has left after `used`.
    pub fn first_shortfall(&self, allocatable: &Resources, used: &Resources) -> Option<&str> {
        // The first three slots: cpu, ephemeral-storage, memory (not pods).
        for (i, name) in WELL_KNOWN.iter().enumerate().take(3) {
            if let Some(amount) = self.well_known[i].filter(|a| *a > 0.0) {
                if amount > allocatable.well_known[i].unwrap_or(0.0) - used.well_known[i].unwrap_or(0.0) + 1e-9 {
                    return Some(name);
                }
            }
        }
        self.extended
            .iter()
            .find(|(name, amount)| {
                **amount > 0.0 && **amount > allocatable.get(name).unwrap_or(0.0) - used.get(name).unwrap_or(0.0) + 1e-9
            })
            .map(|(name, _)| name.as_str())
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
        for (name, q) in
            c.pointer(&format!("/resources/{which}")).and_then(serde_json::Value::as_object).into_iter().flatten()
        {
            if let Some(v) = q.as_str().and_then(parse).or_else(|| q.as_f64()) {
                r.add_one(name, v);
            }
        }
        r
    };
    let list = |key: &str| {
        pod.pointer(&format!("/spec/{key}")).and_then(serde_json::Value::as_array).cloned().unwrap_or_default()
    };
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
    fn well_known_and_extended_resources_sum_and_compare() {
        let mut requests = super::Resources::default();
        requests.set("cpu", 1.0);
        requests.add_one("example.com/gpu", 2.0);
        let mut allocatable = requests.clone();
        allocatable.set("cpu", 4.0);
        let mut used = super::Resources::default();
        assert_eq!(requests.first_shortfall(&allocatable, &used), None);
        used.add_one("example.com/gpu", 1.0);
        assert_eq!(requests.first_shortfall(&allocatable, &used), Some("example.com/gpu"));
        used.add_one("cpu", 3.5);
        assert_eq!(requests.first_shortfall(&allocatable, &used), Some("cpu"));
        assert_eq!(requests.iter().collect::<Vec<_>>(), vec![("cpu", 1.0), ("example.com/gpu", 2.0)]);
        assert_eq!((requests.cpu(), requests.memory(), requests.get("memory")), (Some(1.0), None, None));
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
