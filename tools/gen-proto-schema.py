#!/usr/bin/env python3
"""Generates crates/krate-api/src/protobuf/schema.txt: the wire schema of Kubernetes'
protobuf messages (field tag -> JSON name and type), which the API server needs to decode
request bodies that client-go sends as `application/vnd.kubernetes.protobuf`.

Tags and types are read from the prost bindings of the `k8s-pb` crate; JSON field names
from the serde code of the `k8s-openapi` crate (prost's snake_case names lose the
original spelling, e.g. podIP). Run from the repository root after `cargo fetch`:

    python3 tools/gen-proto-schema.py
"""
import glob
import os
import re
import sys

REGISTRY = os.path.expanduser("~/.cargo/registry/src")
PB = sorted(glob.glob(f"{REGISTRY}/*/k8s-pb-0.9.*"))[-1] + "/src"
OPENAPI = sorted(glob.glob(f"{REGISTRY}/*/k8s-openapi-0.29.*"))[-1] + "/src/v1_37"
OUT = "crates/krate-api/src/protobuf/schema.txt"


def norm(name):
    return name.replace("r#", "").rstrip("_")


def snake_to_camel(name):
    parts = name.split("_")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def json_names():
    """(module, struct) -> {rust field: json name} from k8s-openapi's deserializers."""
    names = {}
    for path in glob.glob(f"{OPENAPI}/**/*.rs", recursive=True):
        module = os.path.relpath(os.path.dirname(path), OPENAPI).replace("/", ".")
        text = open(path).read()
        m = re.search(r"^pub struct (\w+)", text, re.M)
        if not m:
            continue
        fields = dict((norm(r), j) for j, r in re.findall(r'"([^"]+)" => Field::Key_(\w+)', text))
        names[(module, m.group(1))] = fields
    return names


def resolve(module, rust_type):
    """The fully qualified message a field's Rust type names."""
    t = re.sub(r"\s+", "", rust_type).rstrip(",")
    for wrapper in ("::core::option::Option<", "::prost::alloc::vec::Vec<", "::prost::alloc::boxed::Box<"):
        while t.startswith(wrapper):
            t = t[len(wrapper):-1]
    if t.startswith("::prost::alloc::collections::BTreeMap<"):
        t = t[len("::prost::alloc::collections::BTreeMap<"):-1].split(",", 1)[1]
    t = t.rstrip(",")
    parts = module.split(".")
    segs = t.split("::")
    while segs and segs[0] == "super":
        parts = parts[:-1]
        segs = segs[1:]
    return ".".join(parts + segs)


def json_name(field, known):
    """The JSON name of a prost field: k8s-openapi's, else the camel-cased Rust name
    matched case-insensitively against the struct's JSON names (prost's snake case loses
    acronyms: pod_cid_rs is podCIDRs, non_resource_ur_ls nonResourceURLs)."""
    if field in known:
        return known[field]
    camel = snake_to_camel(field)
    for json in known.values():
        if json.lstrip("$").lower() == camel.lower():  # $ref, $schema
            return json
    return camel


def mark_inline(messages):
    """Marks embedded fields with the JSON name `*`. A Go struct embedded with
    `json:",inline"` (LocalObjectReference in ConfigMapKeySelector, VolumeSource in Volume,
    ProbeHandler in Probe) is a field of its own on the wire, but its fields are the
    parent's in JSON: the parent has no JSON name for it and has every field of the
    embedded message (compared case-insensitively: k8s-openapi has no struct for some
    embedded messages, whose names are then camel-cased guesses, corrected here to the
    parent's spelling). Embedded messages may embed others, so this runs to a fixed point."""

    def flat(name):
        out = []
        for _, json, kind, _ in messages.get(name, []):
            out.extend(flat(kind[2:]) if json == "*" else [json])
        return out

    changed = True
    while changed:
        changed = False
        for entries in messages.values():
            for i, (tag, json, kind, parent) in enumerate(entries):
                if json == "*" or json in parent or not kind.startswith("m:"):
                    continue
                inner = flat(kind[2:])
                spelling = {p.lower(): p for p in parent}
                if inner and all(n.lower() in spelling for n in inner):
                    entries[i] = (tag, "*", kind, parent)
                    for j, e in enumerate(messages[kind[2:]]):
                        if e[1] != "*":
                            messages[kind[2:]][j] = (e[0], spelling[e[1].lower()], e[2], e[3])
                    changed = True


def main():
    names = json_names()
    # prost renames acronyms (JSONSchemaProps is JsonSchemaProps, CSIDriver CsiDriver).
    by_lower = {(module, struct.lower()): fields for (module, struct), fields in names.items()}
    messages = {}  # qualified name -> [(tag, json, kind)]
    for path in sorted(glob.glob(f"{PB}/**/mod.rs", recursive=True)):
        module = os.path.relpath(os.path.dirname(path), PB).replace("/", ".")
        if module == ".":
            continue
        text = open(path).read()
        # An empty message is `pub struct X {}` on one line.
        for sm in re.finditer(r"pub struct (\w+) \{(?:\}|(.*?)\n\})", text, re.S):
            struct, body = sm.group(1), sm.group(2) or ""
            fields = re.findall(r"#\[prost\(([^\]]*)\)\]\s*pub ([\w#]+):\s*(.*?),\n\s*(?=(?:///|#\[|$))", body + "\n", re.S)
            known = names.get((module, struct)) or by_lower.get((module, struct.lower()), {})
            entries = messages.setdefault(f"{module}.{struct}", [])
            for attrs, rust_name, rust_type in fields:
                tag = re.search(r'tag = "(\d+)"', attrs).group(1)
                json = json_name(norm(rust_name), known)
                repeated = " repeated" in " " + attrs.replace(",", " ")
                m = re.match(r'btree_map = "(\w+), (\w+)"', attrs)
                if m:
                    value = m.group(2)
                    if value == "message":
                        value = "m:" + resolve(module, rust_type)
                    kind = f"map:{m.group(1)}:{value}"
                else:
                    base = attrs.split(",")[0].strip()
                    if base.startswith("bytes"):
                        base = "bytes"
                    if base == "message":
                        base = "m:" + resolve(module, rust_type)
                    kind = ("r:" if repeated else "") + base
                entries.append((tag, json, kind, set(known.values())))
    mark_inline(messages)
    lines = []
    for name, entries in messages.items():
        lines.append(f"M {name}")
        lines.extend(f"F {tag} {json} {kind}" for tag, json, kind, _ in entries)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("# Generated by tools/gen-proto-schema.py. Do not edit.\n")
        f.write("\n".join(lines) + "\n")
    print(f"wrote {OUT}: {sum(1 for l in lines if l[0] == 'M')} messages, {sum(1 for l in lines if l[0] == 'F')} fields, "
          f"{sum(1 for l in lines if l.split(' ')[2:3] == ['*'])} of them inline", file=sys.stderr)


main()
