//! Bounded fuzzing of the parsers that read what clients send, run with the unit tests:
//! label and field selectors, quantities, names and label values, duplicate-field
//! detection, Kubernetes protobuf bodies and the three kinds of patch. Each input must
//! get an answer (a value or an error), never a panic. The inputs are generated from a
//! fixed seed, so a failure repeats; each target runs a few thousand cases (well under
//! a second in all). The committed corpus (`fuzz-corpus/`: inputs that broke a parser
//! once, and typical ones) is run too, each entry with a few hundred byte-level
//! mutations of it; an input that breaks something belongs there.

use serde_json::{json, Value};

use crate::fuzzing::{corpus, with_mutations, Rng};
use crate::{patch, protobuf, quantity, selectors, validation};

/// The shapes of input these parsers read.
trait Shapes {
    fn json(&mut self, depth: usize) -> Value;
    fn proto(&mut self, depth: usize) -> Vec<u8>;
}

impl Shapes for Rng {
    /// A JSON value at most `depth` deep, with keys a patch or an object may use.
    fn json(&mut self, depth: usize) -> Value {
        const KEYS: &[&str] = &[
            "metadata",
            "spec",
            "name",
            "containers",
            "image",
            "env",
            "value",
            "ports",
            "containerPort",
            "$patch",
            "$retainKeys",
            "$deleteFromPrimitiveList/finalizers",
            "$setElementOrder/containers",
            "finalizers",
            "labels",
            "op",
            "path",
            "from",
            "",
        ];
        let leaf = |rng: &mut Rng| match rng.below(6) {
            0 => Value::Null,
            1 => json!(rng.below(3) == 0),
            2 => json!(rng.next_u64() as i64),
            3 => json!(f64::from(rng.below(1000) as u32) / 7.0),
            4 => json!(["replace", "delete", "merge", "add", "remove", "/spec/containers/0", "/-"][rng.below(7)]),
            _ => json!(rng.text(&["a", "é", "/", "~1", "~0", "-", "0"], 4)),
        };
        if depth == 0 {
            return leaf(self);
        }
        match self.below(4) {
            0 => leaf(self),
            1 => Value::Array((0..self.below(4)).map(|_| self.json(depth - 1)).collect()),
            _ => {
                let mut map = serde_json::Map::new();
                for _ in 0..self.below(5) {
                    map.insert(KEYS[self.below(KEYS.len())].to_string(), self.json(depth - 1));
                }
                Value::Object(map)
            }
        }
    }

    /// Protobuf-shaped bytes: fields of every wire type, nested messages, truncations.
    fn proto(&mut self, depth: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..self.below(6) {
            let tag = self.below(20) as u64 + 1;
            match self.below(if depth == 0 { 3 } else { 4 }) {
                0 => {
                    varint(tag << 3, &mut out);
                    varint(self.next_u64() >> self.below(64), &mut out);
                }
                1 => {
                    varint((tag << 3) | 2, &mut out);
                    let bytes = self.text(&["a", "v1", "Pod", "\u{0}", "é"], 5).into_bytes();
                    varint(bytes.len() as u64, &mut out);
                    out.extend(bytes);
                }
                2 => out.push(self.next_u64() as u8), // garbage, or a wire type the decoder must refuse
                _ => {
                    varint((tag << 3) | 2, &mut out);
                    let inner = self.proto(depth - 1);
                    // Sometimes a length that lies.
                    let len = if self.below(8) == 0 {
                        inner.len() as u64 + self.below(1 << 20) as u64
                    } else {
                        inner.len() as u64
                    };
                    varint(len, &mut out);
                    out.extend(inner);
                }
            }
        }
        out
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn rng() -> Rng {
    Rng::default()
}

#[test]
fn selectors_with_any_characters_parse_or_fail() {
    let pieces = [
        "é",
        "\\",
        "=",
        "==",
        "!=",
        "!",
        ",",
        "in",
        "notin",
        "(",
        ")",
        "a",
        " ",
        "日本",
        "\u{1F600}",
        "metadata.name",
        ".",
        "-",
    ];
    let mut rng = rng();
    for _ in 0..20_000 {
        let text = rng.text(&pieces, 7);
        let _ = selectors::FieldSelector::parse(&text);
        let _ = selectors::LabelSelector::parse(&text);
    }
}

#[test]
fn quantities_names_and_label_values_parse_or_fail() {
    let pieces = ["1", "0", ".", "e", "E", "-", "+", "Ki", "Mi", "m", "n", "u", "k", "9999999999", "é", "a", " ", "_"];
    let mut rng = rng();
    for _ in 0..20_000 {
        let text = rng.text(&pieces, 8);
        let _ = quantity::parse(&text);
        let _ = validation::is_dns1123_subdomain(&text);
        let _ = validation::is_dns1035_label(&text);
        let _ = validation::is_qualified_name(&text);
        let _ = validation::is_label_value(&text);
    }
}

#[test]
fn duplicate_fields_are_found_in_any_bytes() {
    let mut rng = rng();
    for _ in 0..5_000 {
        let mut body = serde_json::to_vec(&rng.json(4)).unwrap();
        // Cut it, or flip a byte, now and then.
        match rng.below(4) {
            0 => body.truncate(rng.below(body.len() + 1)),
            1 if !body.is_empty() => {
                let at = rng.below(body.len());
                body[at] = rng.next_u64() as u8;
            }
            _ => {}
        }
        let _ = validation::duplicate_json_fields(&body);
    }
}

#[test]
fn protobuf_bodies_decode_or_fail() {
    let mut rng = rng();
    for _ in 0..5_000 {
        let mut type_meta = Vec::new();
        for (tag, text) in
            [(1u64, ["v1", "apps/v1", ""][rng.below(3)]), (2, ["Pod", "Deployment", "ConfigMap", "Nope"][rng.below(4)])]
        {
            varint((tag << 3) | 2, &mut type_meta);
            varint(text.len() as u64, &mut type_meta);
            type_meta.extend_from_slice(text.as_bytes());
        }
        let raw = rng.proto(4);
        let mut body = b"k8s\0".to_vec();
        for (tag, field) in [(1u64, &type_meta), (2, &raw)] {
            varint((tag << 3) | 2, &mut body);
            varint(field.len() as u64, &mut body);
            body.extend_from_slice(field);
        }
        if rng.below(4) == 0 {
            body.truncate(rng.below(body.len() + 1));
        }
        let _ = protobuf::decode(&body);
    }
}

#[test]
fn patches_apply_or_fail() {
    let schema = crate::schema::builtin_kind("", "v1", "Pod").unwrap();
    let mut rng = rng();
    for _ in 0..5_000 {
        let (original, patch_value) = (rng.json(4), rng.json(4));
        let mut target = original.clone();
        let _ = patch::apply_merge_patch(&mut target, &patch_value);
        let mut target = original.clone();
        let _ = patch::apply_strategic_merge_patch(&mut target, &patch_value, &schema);
        let mut target = original;
        let op = ["add", "remove", "replace", "move", "copy", "test"][rng.below(6)];
        let path = rng.text(&["/", "spec", "containers", "0", "-", "~1", "~"], 5);
        let from = rng.text(&["/", "metadata", "0"], 3);
        let operations = json!([{"op": op, "path": path, "from": from, "value": rng.json(2)}]);
        let _ = patch::apply_json_patch(&mut target, &operations);
    }
}

/// Every entry of corpus file `file` and `per_entry` mutations of each.
fn corpus_inputs(file: &str, per_entry: usize) -> Vec<Vec<u8>> {
    let text = match file {
        "selectors.txt" => include_str!("../fuzz-corpus/selectors.txt"),
        "quantities.txt" => include_str!("../fuzz-corpus/quantities.txt"),
        "json.txt" => include_str!("../fuzz-corpus/json.txt"),
        "protobuf.hex" => include_str!("../fuzz-corpus/protobuf.hex"),
        other => panic!("no corpus {other}"),
    };
    with_mutations(&corpus(text, file.ends_with(".hex")), per_entry)
}

#[test]
fn the_corpus_of_selectors_and_quantities_parses_or_fails() {
    for input in corpus_inputs("selectors.txt", 300) {
        let text = String::from_utf8_lossy(&input);
        let _ = selectors::FieldSelector::parse(&text);
        let _ = selectors::LabelSelector::parse(&text);
    }
    for input in corpus_inputs("quantities.txt", 300) {
        let text = String::from_utf8_lossy(&input);
        let _ = quantity::parse(&text);
        let _ = validation::is_label_value(&text);
    }
}

#[test]
fn the_corpus_of_bodies_and_patches_applies_or_fails() {
    let schema = crate::schema::builtin_kind("", "v1", "Pod").unwrap();
    let pod = json!({"metadata": {"name": "a", "labels": {"a": "b"}},
                     "spec": {"containers": [{"name": "a", "image": "i", "ports": [{"containerPort": 80}]}, {"name": "b"}]}});
    for input in corpus_inputs("json.txt", 300) {
        let _ = validation::duplicate_json_fields(&input);
        let Ok(patch_value) = serde_json::from_slice::<Value>(&input) else { continue };
        let _ = patch::apply_merge_patch(&mut pod.clone(), &patch_value);
        let _ = patch::apply_strategic_merge_patch(&mut pod.clone(), &patch_value, &schema);
        let _ = patch::apply_json_patch(&mut pod.clone(), &patch_value);
    }
}

#[test]
fn the_corpus_of_protobuf_bodies_decodes_or_fails_and_reencodes_to_the_same() {
    let mut round_trips = 0;
    for input in corpus_inputs("protobuf.hex", 500) {
        let Ok(decoded) = protobuf::decode(&input) else { continue };
        // What decodes encodes again to what decodes the same.
        if let Some(encoded) = protobuf::encode(&decoded) {
            assert_eq!(protobuf::decode(&encoded).as_ref(), Ok(&decoded), "{input:02x?}");
            round_trips += 1;
        }
    }
    assert!(round_trips > 100, "only {round_trips} mutated bodies decoded");
}
