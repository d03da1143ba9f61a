#!/usr/bin/env python3
"""Writes crates/krate-apiserver/src/rbac/bootstrap-policy.jsonl: upstream's default RBAC
policy (the roles and bindings kube-apiserver creates at start), one object per line.

The facts come from upstream's own dump of its bootstrap policy (the testdata of
plugin/pkg/auth/authorizer/rbac/bootstrappolicy in the k8s.io/kubernetes module, for the
version krate reports). Fetch the module first:

    go mod download k8s.io/kubernetes@v1.37.2   # or let scripts/conformance fetch it
    tools/gen-bootstrap-policy.py [MODULE_DIR]

The label `kubernetes.io/bootstrapping: rbac-defaults` and the annotation
`rbac.authorization.kubernetes.io/autoupdate: "true"` that every object carries are left
out; the loader adds them back.
"""
import glob
import json
import os
import sys

import yaml

FILES = [
    "cluster-roles.yaml",
    "cluster-role-bindings.yaml",
    "controller-roles.yaml",
    "controller-role-bindings.yaml",
    "namespace-roles.yaml",
    "namespace-role-bindings.yaml",
]


def module_dir():
    if len(sys.argv) > 1:
        return sys.argv[1]
    gopath = os.environ.get("GOPATH", os.path.expanduser("~/go"))
    found = sorted(glob.glob(os.path.join(gopath, "pkg/mod/k8s.io/kubernetes@v1.37.*")))
    if not found:
        sys.exit("no k8s.io/kubernetes module in the Go module cache: go mod download k8s.io/kubernetes@v1.37.2")
    return found[-1]


def main():
    root = os.path.join(module_dir(), "plugin/pkg/auth/authorizer/rbac/bootstrappolicy/testdata")
    out = []
    for name in FILES:
        with open(os.path.join(root, name)) as f:
            doc = yaml.safe_load(f)
        for item in doc["items"]:
            meta = item["metadata"]
            labels = meta.get("labels", {})
            labels.pop("kubernetes.io/bootstrapping", None)
            if not labels:
                meta.pop("labels", None)
            annotations = meta.get("annotations", {})
            annotations.pop("rbac.authorization.kubernetes.io/autoupdate", None)
            if not annotations:
                meta.pop("annotations", None)
            out.append(json.dumps(item, separators=(",", ":"), sort_keys=True))
    here = os.path.dirname(os.path.abspath(__file__))
    target = os.path.join(here, "..", "crates/krate-apiserver/src/rbac/bootstrap-policy.jsonl")
    with open(target, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"{len(out)} objects written to {os.path.normpath(target)}")


if __name__ == "__main__":
    main()
