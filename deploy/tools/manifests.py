"""What deploy/tools/check.sh needs from rendered manifests (run with the tools venv's Python, it has PyYAML).

    python manifests.py rules RENDERING OUT
        Writes the spec.groups of every PrometheusRule in RENDERING into one Prometheus rule file OUT
        (the file promtool checks and the rule unit tests load). Fails when there is none, or when two
        groups share a name (Prometheus would refuse the file).
    python manifests.py kube-score-ignores RENDERING
        Fails when an object carries kube-score's `kube-score/ignore` annotation without a non-empty
        `firstmile.io/kube-score-ignore-reason` beside it: no check is switched off without a reason.
    python manifests.py ignore-file FILE
        Reads a kube-score ignore file (`<test id>  <reason>` per line, # comments) and prints the ids
        comma-separated; fails on a line without a reason.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

IGNORE = "kube-score/ignore"
REASON = "firstmile.io/kube-score-ignore-reason"


def documents(path: str) -> list[dict[str, Any]]:
    with open(path) as stream:
        return [doc for doc in yaml.safe_load_all(stream) if isinstance(doc, dict)]


def name_of(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def rules(rendering: str, out: str) -> int:
    groups: list[dict[str, Any]] = []
    sources: dict[str, str] = {}
    for doc in documents(rendering):
        if doc.get("kind") != "PrometheusRule":
            continue
        for group in (doc.get("spec") or {}).get("groups") or []:
            name = group.get("name")
            if name in sources:
                print(f"rule group {name!r} is in both {sources[name]} and {name_of(doc)}", file=sys.stderr)
                return 1
            sources[name] = name_of(doc)
            groups.append(group)
    if not groups:
        print(f"no PrometheusRule with rule groups in {rendering}", file=sys.stderr)
        return 1
    Path(out).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    count = sum(len(group.get("rules") or []) for group in groups)
    print(f"{len(groups)} groups, {count} rules from {len(set(sources.values()))} PrometheusRule objects")
    return 0


def kube_score_ignores(rendering: str) -> int:
    bad = []
    for doc in documents(rendering):
        # kube-score reads the annotation on the object and on a workload's pod template.
        metas = [doc.get("metadata") or {}]
        template = ((doc.get("spec") or {}).get("template") or {}).get("metadata")
        if isinstance(template, dict):
            metas.append(template)
        for meta in metas:
            annotations = meta.get("annotations") or {}
            if annotations.get(IGNORE) and not str(annotations.get(REASON) or "").strip():
                bad.append(f"{name_of(doc)} ignores {annotations[IGNORE]!r} without {REASON}")
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


def ignore_file(path: str) -> int:
    ids = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if raw.lstrip().startswith("#") else raw.strip()
        if not line:
            continue
        test_id, _, reason = line.partition(" ")
        if not reason.strip():
            print(f"{path}:{number}: {test_id!r} has no reason", file=sys.stderr)
            return 1
        ids.append(test_id)
    print(",".join(ids))
    return 0


def main() -> int:
    commands = {"rules": (rules, 2), "kube-score-ignores": (kube_score_ignores, 1), "ignore-file": (ignore_file, 1)}
    if len(sys.argv) < 2 or sys.argv[1] not in commands or len(sys.argv) - 2 != commands[sys.argv[1]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    function, _ = commands[sys.argv[1]]
    return function(*sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
