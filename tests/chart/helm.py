#!/usr/bin/env python3
"""Renders and lints the Tollgate chart with the real Helm SDK (helm-python-sdk bundles
Helm's Go code as a shared library; no helm binary), for the Rust tests and to generate
manifests/.

  helm.py render [--values-json JSON] [--name N] [--namespace NS] [--kube-version V]
                 [--api-version A ...]     -> JSON {"lint": {...}, "docs": [...]} on stdout
                                              ("crds": the chart's crds/ directory, which
                                              Helm never upgrades, so it stays empty; the
                                              CRDs are templates and come in "docs")
  helm.py manifests DIR                    -> writes DIR/00-namespace.yaml, 01-crds.yaml,
                                              02-tollgate.yaml (the default render)
"""

import argparse
import json
import os
import sys

import helm_python as helm
from helm_python import _native  # helm_render's kube_version/api_versions (C API, pinned 0.2.2)
import yaml

class Loader(yaml.SafeLoader):
    """Like Kubernetes: timestamps stay strings."""


Loader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_all(text):
    return [d for d in yaml.load_all(text, Loader=Loader) if d]


CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "charts", "tollgate")
KUBE_VERSION = "v1.33.0"


def lint(values, kube_version=KUBE_VERSION, namespace="tollgate"):
    report = helm.lint(CHART, values, strict=True, kube_version=kube_version, namespace=namespace)
    return {
        "ok": report["total_charts_linted"] > 0 and not report["errors"],
        "errors": report["errors"],
        "messages": [m for m in report["messages"] if m["severity"] >= 2],
    }


def template(values, name="tollgate", namespace="tollgate", kube_version=KUBE_VERSION,
             api_versions=(), include_crds=True):
    """`helm template NAME CHART -n NS --kube-version V --api-versions A... --include-crds`,
    as (the documents of crds/, the rendered documents, NOTES.txt)."""
    opts = {"name": name, "namespace": namespace, "kube_version": kube_version}
    if api_versions:
        opts["api_versions"] = list(api_versions)
    with helm.Chart.load(CHART) as chart:
        rendered = json.loads(_native.call_string(
            "helm_render", chart._raw(), None if values is None else json.dumps(values),
            json.dumps(opts)))
        crds = chart.crds if include_crds else []
    crd_docs = []
    for c in sorted(crds, key=lambda c: c["filename"]):
        crd_docs.extend(load_all(c["data"]))
    docs = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(load_all(rendered[path]))
    notes = next((t for p, t in rendered.items() if p.endswith("NOTES.txt")), "")
    return crd_docs, docs, notes


# Kinds kubernetes-validate has no schema for: our CRDs' and the Prometheus Operator's.
# Anything else without a schema (e.g. a removed API version) is an error.
NO_SCHEMA_GROUPS = ("tollgate.dev/", "monitoring.coreos.com/")


def validate(docs, kube_version):
    """Every object against the Kubernetes OpenAPI schemas (strict: no unknown fields)."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError
    version = kube_version.lstrip("v").rsplit(".", 1)[0]
    problems = []
    for d in docs:
        where = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except SchemaNotFoundError as e:
            if not d.get("apiVersion", "").startswith(NO_SCHEMA_GROUPS):
                problems.append(f"{where}: no schema for {d.get('apiVersion')} ({e})")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{where}: {path}: {e.message}")
    return problems


def render(args):
    values = json.loads(args.values_json) if args.values_json else None
    out = {"lint": lint(values, args.kube_version, args.namespace)}
    try:
        crds, docs, notes = template(values, args.name, args.namespace, args.kube_version,
                                     args.api_version)
        out.update(crds=crds, docs=docs, notes=notes,
                   validation=validate(crds + docs, args.kube_version))
    except helm.HelmError as e:
        out["error"] = str(e)
    json.dump(out, sys.stdout)


def dump(docs):
    return "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in docs)


# The plain manifests name the bundled Redis password Secret instead of generating one
# (a password committed to the repository would be everyone's): docs/install.md creates
# it before `kubectl apply`.
MANIFEST_VALUES = {"redis": {"bundled": {"auth": {"existingSecret": "tollgate-redis-auth"}}}}


def is_crd(doc):
    return doc.get("kind") == "CustomResourceDefinition"


def manifests(args):
    crds_dir, rendered, _ = template(MANIFEST_VALUES)
    # The CRDs are templates (so that `helm upgrade` upgrades them); the plain manifests
    # still keep them in a file of their own, applied before the objects that need them.
    docs = crds_dir + rendered
    crds = [d for d in docs if is_crd(d)]
    docs = [d for d in docs if not is_crd(d)]
    os.makedirs(args.dir, exist_ok=True)
    header = ("# Generated from charts/tollgate with its default values (release tollgate in\n"
              "# namespace tollgate) by tests/chart/helm.py; do not edit. A test fails when\n"
              "# these files drift from the chart. One difference: the bundled Redis password\n"
              "# comes from the Secret tollgate-redis-auth, which you create first\n"
              "# (docs/install.md).\n")
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tollgate"}}
    files = {
        "00-namespace.yaml": [namespace],
        "01-crds.yaml": crds,
        "02-tollgate.yaml": docs,
    }
    for name, content in files.items():
        with open(os.path.join(args.dir, name), "w") as f:
            f.write(header + dump(content))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render")
    r.add_argument("--values-json")
    r.add_argument("--name", default="tollgate")
    r.add_argument("--namespace", default="tollgate")
    r.add_argument("--kube-version", default=KUBE_VERSION)
    r.add_argument("--api-version", action="append", default=[])
    r.set_defaults(func=render)
    m = sub.add_parser("manifests")
    m.add_argument("dir")
    m.set_defaults(func=manifests)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
