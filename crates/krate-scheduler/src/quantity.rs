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

#[cfg(test)]
mod tests {
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
