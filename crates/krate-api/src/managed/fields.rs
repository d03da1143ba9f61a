//! Field sets (structured-merge-diff's `FieldsV1`) and the schema-aware walks over
//! objects that produce, compare and merge them.
//!
//! A path element is `f:<field>` (struct field or map key), `k:<json of key fields>`
//! (an element of a list-map), `v:<json value>` (an element of a set) or `i:<index>`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::schema::{ListType, Node};

pub type Path = Vec<String>;

/// A set of field paths. A node is a member when the path ending at it is in the set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<String, FieldSet>,
}

impl FieldSet {
    /// Parses `FieldsV1`: `{}` is a member leaf, `".": {}` marks a member with children.
    pub fn from_fields_v1(v: &Value) -> FieldSet {
        let mut set = FieldSet::default();
        let Value::Object(map) = v else { return set };
        for (key, child) in map {
            if key == "." {
                set.member = true;
                continue;
            }
            let mut c = FieldSet::from_fields_v1(child);
            if child.as_object().is_some_and(Map::is_empty) {
                c.member = true;
            }
            set.children.insert(key.clone(), c);
        }
        set
    }

    pub fn to_fields_v1(&self) -> Value {
        let mut map = Map::new();
        if self.member && !self.children.is_empty() {
            map.insert(".".into(), Value::Object(Map::new()));
        }
        for (key, child) in &self.children {
            map.insert(key.clone(), child.to_fields_v1());
        }
        Value::Object(map)
    }

    pub fn is_empty(&self) -> bool {
        !self.member && self.children.values().all(FieldSet::is_empty)
    }

    pub fn insert(&mut self, path: &[String]) {
        match path.split_first() {
            None => self.member = true,
            Some((first, rest)) => self.children.entry(first.clone()).or_default().insert(rest),
        }
    }

    pub fn contains(&self, path: &[String]) -> bool {
        match path.split_first() {
            None => self.member,
            Some((first, rest)) => self.children.get(first).is_some_and(|c| c.contains(rest)),
        }
    }

    /// True if the set has any member at or below `path`.
    pub fn owns_under(&self, path: &[String]) -> bool {
        match path.split_first() {
            None => !self.is_empty(),
            Some((first, rest)) => self.children.get(first).is_some_and(|c| c.owns_under(rest)),
        }
    }

    /// Every member path, parents before children.
    pub fn members(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Path, out: &mut Vec<Path>) {
        if self.member {
            out.push(prefix.clone());
        }
        for (key, child) in &self.children {
            prefix.push(key.clone());
            child.collect(prefix, out);
            prefix.pop();
        }
    }

    pub fn remove(&mut self, path: &[String]) {
        match path.split_first() {
            None => self.member = false,
            Some((first, rest)) => {
                if let Some(c) = self.children.get_mut(first) {
                    c.remove(rest);
                    if c.is_empty() {
                        self.children.remove(first);
                    }
                }
            }
        }
    }

    pub fn union(&mut self, other: &FieldSet) {
        self.member |= other.member;
        for (key, child) in &other.children {
            self.children.entry(key.clone()).or_default().union(child);
        }
    }

    /// Members of `self` not in `other`.
    pub fn difference(&self, other: &FieldSet) -> FieldSet {
        let mut out = self.clone();
        for path in other.members() {
            out.remove(&path);
        }
        out
    }

    /// Keeps only the members `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&[String]) -> bool) {
        for path in self.members() {
            if !keep(&path) {
                self.remove(&path);
            }
        }
    }
}

fn field_key(name: &str) -> String {
    format!("f:{name}")
}

/// The key fields of a list-map element, with upstream's default for `protocol`.
fn element_key(keys: &[String], item: &Value, element: Option<&Node>) -> Option<Value> {
    let mut key = Map::new();
    for k in keys {
        let value = match item.get(k) {
            Some(v) if !v.is_null() => v.clone(),
            _ => match element
                .and_then(|e| e.field(k))
                .and_then(|f| f.default.clone().or_else(|| f.resolve().default.clone()))
            {
                Some(d) => d,
                None if k == "protocol" => Value::String("TCP".into()),
                None => continue,
            },
        };
        key.insert(k.clone(), value);
    }
    (!key.is_empty()).then_some(Value::Object(key))
}

fn item_path_element(list: Option<&Node>, index: usize, item: &Value) -> String {
    match list.map(Node::list_type) {
        Some(ListType::Map(keys)) => match element_key(keys, item, list.and_then(Node::element)) {
            Some(k) => format!("k:{k}"),
            None => format!("i:{index}"),
        },
        Some(ListType::Set) => format!("v:{item}"),
        _ => format!("i:{index}"),
    }
}

fn is_struct_like(schema: Option<&Node>, v: &Value) -> bool {
    v.is_object() && !schema.is_some_and(Node::is_atomic_map)
}

/// The fields `value` sets: its leaves, and list-map/set elements.
pub fn of_object(schema: Option<&Node>, value: &Value) -> FieldSet {
    let mut out = FieldSet::default();
    walk_leaves(schema, value, &mut Vec::new(), &mut out);
    out
}

fn walk_leaves(schema: Option<&Node>, value: &Value, path: &mut Path, out: &mut FieldSet) {
    match value {
        Value::Object(map) if is_struct_like(schema, value) && !map.is_empty() => {
            for (k, v) in map {
                path.push(field_key(k));
                walk_leaves(schema.and_then(|s| s.field(k)), v, path, out);
                path.pop();
            }
        }
        Value::Array(items) if schema.is_some_and(|s| s.list_type() != ListType::Atomic) && !items.is_empty() => {
            let element = schema.and_then(Node::element);
            for (i, item) in items.iter().enumerate() {
                path.push(item_path_element(schema, i, item));
                out.insert(path);
                if matches!(schema.map(Node::list_type), Some(ListType::Map(_))) {
                    walk_leaves(element, item, path, out);
                }
                path.pop();
            }
        }
        _ => out.insert(path),
    }
}

/// Granular lists whose Go fields have no `omitempty` (`PodSpec.containers`,
/// `CSINodeSpec.drivers`): an empty object of their kind already has them (as null).
const LISTS_WRITTEN_WHEN_EMPTY: &[&str] = &["f:containers", "f:drivers"];

/// The fields an update changed: present in `new` and absent or different in `old`.
pub fn changed(schema: Option<&Node>, old: Option<&Value>, new: &Value) -> FieldSet {
    let mut out = FieldSet::default();
    walk_changed(schema, old, new, &mut Vec::new(), &mut out);
    out
}

fn walk_changed(schema: Option<&Node>, old: Option<&Value>, new: &Value, path: &mut Path, out: &mut FieldSet) {
    if old == Some(new) {
        return;
    }
    match new {
        Value::Object(map) if is_struct_like(schema, new) && !map.is_empty() => {
            let old_map = old.and_then(Value::as_object);
            if old_map.is_none() && schema.is_some_and(Node::is_map) && !path.is_empty() {
                out.insert(path);
            }
            for (k, v) in map {
                path.push(field_key(k));
                walk_changed(schema.and_then(|s| s.field(k)), old_map.and_then(|m| m.get(k)), v, path, out);
                path.pop();
            }
        }
        Value::Array(items) if schema.is_some_and(|s| s.list_type() != ListType::Atomic) => {
            let element = schema.and_then(Node::element);
            let old_items = old.and_then(Value::as_array);
            // A list the old object lacked is itself a member (upstream's `".": {}`).
            // Upstream compares with an empty typed object, which has the lists Go
            // writes even when empty (no `omitempty`) as null: those are not new.
            let always_written = path.last().is_some_and(|f| LISTS_WRITTEN_WHEN_EMPTY.contains(&f.as_str()));
            if old.is_none() && !items.is_empty() && !always_written && !path.is_empty() {
                out.insert(path);
            }
            for (i, item) in items.iter().enumerate() {
                let key = item_path_element(schema, i, item);
                let before = old_items
                    .and_then(|o| o.iter().enumerate().find(|(j, x)| item_path_element(schema, *j, x) == key))
                    .map(|(_, x)| x);
                path.push(key);
                if before.is_none() {
                    out.insert(path);
                }
                if matches!(schema.map(Node::list_type), Some(ListType::Map(_))) {
                    walk_changed(element, before, item, path, out);
                }
                path.pop();
            }
        }
        _ => out.insert(path),
    }
}

/// The value at `path`, if the object has it.
pub fn lookup<'a>(schema: Option<&Node>, value: &'a Value, path: &[String]) -> Option<&'a Value> {
    let Some((first, rest)) = path.split_first() else { return Some(value) };
    if let Some(name) = first.strip_prefix("f:") {
        return lookup(schema.and_then(|s| s.field(name)), value.get(name)?, rest);
    }
    let items = value.as_array()?;
    let (_, item) = items.iter().enumerate().find(|(i, item)| item_path_element(schema, *i, item) == *first)?;
    lookup(schema.and_then(Node::element), item, rest)
}

/// Removes the field or element at `path`. Returns whether something was removed.
pub fn remove_at(schema: Option<&Node>, value: &mut Value, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else { return false };
    if let Some(name) = first.strip_prefix("f:") {
        let child_schema = schema.and_then(|s| s.field(name));
        let Some(map) = value.as_object_mut() else { return false };
        if rest.is_empty() {
            return map.remove(name).is_some();
        }
        return map.get_mut(name).is_some_and(|child| remove_at(child_schema, child, rest));
    }
    let element = schema.and_then(Node::element);
    let Some(items) = value.as_array_mut() else { return false };
    let Some(pos) = items.iter().enumerate().position(|(i, item)| item_path_element(schema, i, item) == *first) else {
        return false;
    };
    if rest.is_empty() {
        items.remove(pos);
        return true;
    }
    remove_at(element, &mut items[pos], rest)
}

/// Merges an applied configuration into the live object: structs and maps field by
/// field, list-maps by key, sets by value; anything else is replaced.
pub fn merge(schema: Option<&Node>, live: &mut Value, config: &Value) {
    match config {
        Value::Object(c) if is_struct_like(schema, config) && live.is_object() => {
            let l = live.as_object_mut().expect("checked above");
            for (k, v) in c {
                if v.is_null() {
                    l.remove(k);
                    continue;
                }
                let slot = l.entry(k.clone()).or_insert(Value::Null);
                merge(schema.and_then(|s| s.field(k)), slot, v);
            }
        }
        Value::Array(items) if live.is_array() && schema.is_some_and(|s| s.list_type() != ListType::Atomic) => {
            let element = schema.and_then(Node::element);
            let is_map = matches!(schema.map(Node::list_type), Some(ListType::Map(_)));
            let l = live.as_array_mut().expect("checked above");
            for (i, item) in items.iter().enumerate() {
                let key = item_path_element(schema, i, item);
                let existing = (0..l.len()).find(|j| item_path_element(schema, *j, &l[*j]) == key);
                match existing {
                    Some(j) if is_map => merge(element, &mut l[j], item),
                    Some(_) => {}
                    None => l.push(item.clone()),
                }
            }
        }
        other => *live = other.clone(),
    }
}

/// Upstream's rendering of a path in conflict messages:
/// `.spec.template.spec.containers[name="nginx"].image`.
pub fn render(path: &[String]) -> String {
    let mut out = String::new();
    for element in path {
        if let Some(name) = element.strip_prefix("f:") {
            out.push('.');
            out.push_str(name);
        } else if let Some(key) = element.strip_prefix("k:") {
            let parts: Vec<String> = serde_json::from_str::<Map<String, Value>>(key)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = element.strip_prefix("v:") {
            out.push_str(&format!("[={v}]"));
        } else if let Some(i) = element.strip_prefix("i:") {
            out.push_str(&format!("[{i}]"));
        }
    }
    out
}
