//! Label selectors (equality- and set-based) and field selectors, parsed from the query
//! string syntax and from `LabelSelector` objects; whether a toleration tolerates a
//! taint; and which host ports two pods cannot both hold on one node.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Taint, Toleration};
use serde_json::Value;

/// A host port a pod's container asks of its node (upstream's NodePorts): the protocol,
/// the node address it binds (None: all of them, as an empty or unspecified `hostIP`)
/// and the port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub protocol: String,
    pub ip: Option<IpAddr>,
    pub port: i32,
}

impl HostPort {
    /// Whether pods asking for these two could not both run on one node: the same
    /// protocol and port, on the same address or either on all of them.
    pub fn conflicts(&self, other: &HostPort) -> bool {
        self.protocol == other.protocol
            && self.port == other.port
            && (self.ip.is_none() || other.ip.is_none() || self.ip == other.ip)
    }
}

/// The host ports a pod's containers ask for (upstream counts the pod's containers, not
/// its init containers).
pub fn host_ports(pod: &Pod) -> Vec<HostPort> {
    let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
    containers
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.is_some_and(|h| h > 0))
        .map(|p| HostPort {
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            ip: p.host_ip.as_deref().and_then(|ip| ip.parse().ok()).filter(|ip: &IpAddr| !ip.is_unspecified()),
            port: p.host_port.unwrap_or_default(),
        })
        .collect()
}

/// Upstream's `ToleratesTaint`: the key matches (an empty key with `Exists` matches every
/// key), the value matches unless the operator is `Exists`, and the effect matches (an
/// empty effect matches every effect).
pub fn toleration_matches(t: &Toleration, taint: &Taint) -> bool {
    let key_ok = match t.key.as_deref() {
        None | Some("") => t.operator.as_deref() == Some("Exists"),
        Some(k) => k == taint.key,
    };
    let value_ok = match t.operator.as_deref() {
        Some("Exists") => true,
        _ => t.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default(),
    };
    let effect_ok = t.effect.as_deref().is_none_or(|e| e.is_empty() || e == taint.effect);
    key_ok && value_ok && effect_ok
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Equals,
    NotEquals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    GreaterThan,
    LessThan,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: Vec<String>,
}

impl Requirement {
    fn matches(&self, labels: &dyn Fn(&str) -> Option<String>) -> bool {
        let value = labels(&self.key);
        match self.op {
            Op::Equals | Op::In => value.is_some_and(|v| self.values.contains(&v)),
            Op::NotEquals | Op::NotIn => value.is_none_or(|v| !self.values.contains(&v)),
            Op::Exists => value.is_some(),
            Op::DoesNotExist => value.is_none(),
            Op::GreaterThan | Op::LessThan => {
                let (Some(v), Some(bound)) = (value, self.values.first()) else { return false };
                match (v.parse::<i64>(), bound.parse::<i64>()) {
                    (Ok(v), Ok(bound)) if self.op == Op::GreaterThan => v > bound,
                    (Ok(v), Ok(bound)) => v < bound,
                    _ => false,
                }
            }
        }
    }

    fn render(&self) -> String {
        let k = &self.key;
        match self.op {
            Op::Equals => format!("{k}={}", self.values[0]),
            Op::NotEquals => format!("{k}!={}", self.values[0]),
            Op::In => format!("{k} in ({})", self.values.join(",")),
            Op::NotIn => format!("{k} notin ({})", self.values.join(",")),
            Op::Exists => k.clone(),
            Op::DoesNotExist => format!("!{k}"),
            Op::GreaterThan => format!("{k}>{}", self.values[0]),
            Op::LessThan => format!("{k}<{}", self.values[0]),
        }
    }
}

/// A conjunction of label requirements; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let get = |k: &str| labels.get(k).cloned();
        self.requirements.iter().all(|r| r.matches(&get))
    }

    pub fn matches_json(&self, labels: Option<&Value>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str).map(str::to_string);
        self.requirements.iter().all(|r| r.matches(&get))
    }

    /// Parses the query-string syntax: `app=web,tier in (a,b),!canary`.
    pub fn parse(input: &str) -> Result<Self, String> {
        let mut lexer = Lexer { chars: input.chars().collect(), pos: 0 };
        let mut requirements = Vec::new();
        loop {
            lexer.skip_ws();
            if lexer.at_end() {
                break;
            }
            requirements.push(lexer.requirement().map_err(|e| format!("unable to parse requirement: {e}"))?);
            lexer.skip_ws();
            match lexer.next() {
                None => break,
                Some(',') => continue,
                Some(c) => return Err(format!("found '{c}', expected: ',' or 'end of string'")),
            }
        }
        for r in &requirements {
            let errs = crate::validation::is_qualified_name(&r.key);
            if let Some(e) = errs.first() {
                return Err(format!("unable to parse requirement: invalid label key \"{}\": {e}", r.key));
            }
        }
        Ok(Self { requirements })
    }

    /// Builds a selector from a `metav1.LabelSelector` (`matchLabels`/`matchExpressions`)
    /// or, for ReplicationControllers, a plain label map.
    pub fn from_json(selector: &Value) -> Result<Self, String> {
        let mut requirements = Vec::new();
        let Value::Object(map) = selector else { return Ok(Self::default()) };
        let is_label_selector = map.contains_key("matchLabels") || map.contains_key("matchExpressions");
        let match_labels = if is_label_selector { map.get("matchLabels") } else { Some(selector) };
        if let Some(Value::Object(labels)) = match_labels {
            for (k, v) in labels {
                let v = v.as_str().ok_or_else(|| format!("label {k} must be a string"))?;
                requirements.push(Requirement { key: k.clone(), op: Op::Equals, values: vec![v.to_string()] });
            }
        }
        if let Some(Value::Array(exprs)) = map.get("matchExpressions").filter(|_| is_label_selector) {
            for e in exprs {
                let key = e.get("key").and_then(Value::as_str).unwrap_or_default().to_string();
                let values: Vec<String> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|vs| vs.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                let op = match e.get("operator").and_then(Value::as_str).unwrap_or_default() {
                    "In" => Op::In,
                    "NotIn" => Op::NotIn,
                    "Exists" => Op::Exists,
                    "DoesNotExist" => Op::DoesNotExist,
                    other => return Err(format!("{other:?} is not a valid label selector operator")),
                };
                requirements.push(Requirement { key, op, values });
            }
        }
        // Upstream renders requirements sorted by key.
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Self { requirements })
    }

    pub fn to_query(&self) -> String {
        self.requirements.iter().map(Requirement::render).collect::<Vec<_>>().join(",")
    }
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
}

impl Lexer {
    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        self.pos += 1;
        c
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }
    fn is_ident_char(c: char) -> bool {
        !c.is_whitespace() && !matches!(c, ',' | '=' | '!' | '(' | ')' | '<' | '>')
    }
    fn ident(&mut self) -> Result<String, String> {
        self.skip_ws();
        let start = self.pos;
        while self.peek().is_some_and(Self::is_ident_char) {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(match self.peek() {
                Some(c) => format!("found '{c}', expected: identifier"),
                None => "found '', expected: identifier".to_string(),
            });
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }
    /// A value may be empty (`a=`).
    fn value(&mut self) -> String {
        self.skip_ws();
        let start = self.pos;
        while self.peek().is_some_and(Self::is_ident_char) {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }
    fn requirement(&mut self) -> Result<Requirement, String> {
        self.skip_ws();
        if self.peek() == Some('!') {
            self.pos += 1;
            let key = self.ident()?;
            return Ok(Requirement { key, op: Op::DoesNotExist, values: vec![] });
        }
        let key = self.ident()?;
        self.skip_ws();
        let rest: String = self.chars[self.pos..].iter().take(6).collect();
        let op = if rest.starts_with("==") {
            self.pos += 2;
            Op::Equals
        } else if rest.starts_with("!=") {
            self.pos += 2;
            Op::NotEquals
        } else if rest.starts_with('=') {
            self.pos += 1;
            Op::Equals
        } else if rest.starts_with('>') {
            self.pos += 1;
            Op::GreaterThan
        } else if rest.starts_with('<') {
            self.pos += 1;
            Op::LessThan
        } else if rest.starts_with("notin") && rest[5..].starts_with(|c: char| c.is_whitespace() || c == '(') {
            self.pos += 5;
            Op::NotIn
        } else if rest.starts_with("in") && rest[2..].starts_with(|c: char| c.is_whitespace() || c == '(') {
            self.pos += 2;
            Op::In
        } else if rest.is_empty() || rest.starts_with(',') {
            return Ok(Requirement { key, op: Op::Exists, values: vec![] });
        } else {
            return Err(format!("found '{}', expected: in, notin, =, ==, !=, gt, lt", rest));
        };
        let values = match op {
            Op::In | Op::NotIn => {
                self.skip_ws();
                if self.next() != Some('(') {
                    return Err("found '', expected: '('".to_string());
                }
                let mut values = Vec::new();
                loop {
                    values.push(self.value());
                    self.skip_ws();
                    match self.next() {
                        Some(',') => continue,
                        Some(')') => break,
                        _ => return Err("found '', expected: ',' or ')'".to_string()),
                    }
                }
                values
            }
            Op::GreaterThan | Op::LessThan => {
                let v = self.value();
                if v.parse::<i64>().is_err() {
                    return Err(format!("for 'gt', 'lt' operators, the value must be an integer, got {v:?}"));
                }
                vec![v]
            }
            _ => vec![self.value()],
        };
        Ok(Requirement { key, op, values })
    }
}

/// One `field=value` or `field!=value` term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldRequirement {
    pub field: String,
    pub value: String,
    pub negated: bool,
}

/// A conjunction of field requirements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    pub requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    pub fn parse(input: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_unescaped(input, ',') {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let (field, value, negated) = if let Some((f, v)) = split_op(term, "!=") {
                (f, v, true)
            } else if let Some((f, v)) = split_op(term, "==") {
                (f, v, false)
            } else if let Some((f, v)) = split_op(term, "=") {
                (f, v, false)
            } else {
                return Err(format!("invalid selector: '{input}'; can't understand '{term}'"));
            };
            requirements.push(FieldRequirement { field: field.trim().to_string(), value: unescape(&value), negated });
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// `value_of(field)` gives the object's value for a supported field.
    pub fn matches(&self, value_of: impl Fn(&str) -> Option<String>) -> bool {
        self.requirements.iter().all(|r| {
            let v = value_of(&r.field).unwrap_or_default();
            (v == r.value) != r.negated
        })
    }

    /// The value an `=` term pins `field` to, for index-style shortcuts (e.g. metadata.name).
    pub fn exact_value(&self, field: &str) -> Option<&str> {
        self.requirements.iter().find(|r| r.field == field && !r.negated).map(|r| r.value.as_str())
    }
}

fn split_unescaped(input: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in input.chars() {
        if escaped {
            parts.last_mut().expect("non-empty").push('\\');
            parts.last_mut().expect("non-empty").push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(String::new());
        } else {
            parts.last_mut().expect("non-empty").push(c);
        }
    }
    parts
}

fn split_op(term: &str, op: &str) -> Option<(String, String)> {
    // The operator is the first unescaped occurrence.
    let bytes = term.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        // Compared as bytes: `i` may be inside a multi-byte character (never where an
        // operator, which is ASCII, starts, so the slices below stay on boundaries).
        if bytes[i..].starts_with(op.as_bytes()) {
            if op == "=" && i > 0 && bytes[i - 1] == b'!' {
                return None;
            }
            return Some((term[..i].to_string(), term[i + op.len()..].to_string()));
        }
        i += 1;
    }
    None
}

fn unescape(value: &str) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_ascii_values_and_escapes_parse() {
        let selector = FieldSelector::parse("metadata.name=éx").unwrap();
        assert_eq!(selector.exact_value("metadata.name"), Some("éx"));
        assert!(FieldSelector::parse("metadata.name=\\é=x").is_ok());
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn equality_and_set_based_label_selectors() {
        let s = LabelSelector::parse("app=web, tier in (front,back),!canary,env!=prod").unwrap();
        assert_eq!(s.requirements.len(), 4);
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "db")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "front"), ("canary", "")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "front"), ("env", "prod")])));
        let s = LabelSelector::parse("app, version notin (v1), n>3").unwrap();
        assert!(s.matches(&labels(&[("app", ""), ("n", "4")])));
        assert!(!s.matches(&labels(&[("app", ""), ("n", "3")])));
        assert!(!s.matches(&labels(&[("app", ""), ("n", "4"), ("version", "v1")])));
        assert!(LabelSelector::parse("").unwrap().matches(&labels(&[])));
        assert!(LabelSelector::parse("a==b").unwrap().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn malformed_label_selectors_are_rejected() {
        for bad in ["app in web", "=x", "a=b,,", "a in (x", "!", "a>b"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn label_selector_objects_render_like_upstream() {
        let s = LabelSelector::from_json(&serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]
        }))
        .unwrap();
        assert_eq!(s.to_query(), "app=web,tier in (a,b)");
        let rc = LabelSelector::from_json(&serde_json::json!({"app": "web"})).unwrap();
        assert_eq!(rc.to_query(), "app=web");
    }

    #[test]
    fn field_selectors() {
        let s = FieldSelector::parse("metadata.name=a,status.phase!=Running").unwrap();
        let fields = |f: &str| match f {
            "metadata.name" => Some("a".to_string()),
            "status.phase" => Some("Pending".to_string()),
            _ => None,
        };
        assert!(s.matches(fields));
        assert_eq!(s.exact_value("metadata.name"), Some("a"));
        assert!(FieldSelector::parse("nonsense").is_err());
        let escaped = FieldSelector::parse(r"metadata.name=a\,b").unwrap();
        assert_eq!(escaped.requirements[0].value, "a,b");
    }
}
