"""A model registry on a local directory: immutable semantic versions and deployment stages.

Layout under the root (``file:///abs/path`` or a plain path)::

    <root>/<name>/<version>/weights.pt      torch state dict (loaded with weights_only=True)
    <root>/<name>/<version>/config.json     how to rebuild the model (encoder, network, paths, threshold)
    <root>/<name>/<version>/metrics.json    training/validation figures
    <root>/<name>/<version>/reference.json  reference feature distributions for drift (optional)
    <root>/<name>/<version>/meta.json       name, version, created_at
    <root>/<name>/stages.json               {"production", "canary", "canary_weight", "shadow"}
    <root>/<name>/history.jsonl             one line per stage change (time, actor, stage, from, to)
    <root>/<name>/flags.jsonl               versions flagged (e.g. for retraining) and why

A version is written to a temporary directory and renamed into place, so a
reader never sees half a version; versions are immutable. Stage changes take
an exclusive ``fcntl`` lock on ``<root>/<name>/.lock`` and replace
``stages.json`` atomically (temporary file, fsync, ``os.replace``).

Promotion goes shadow → canary (traffic weight in (0, 1], default 0.1) →
production; skipping a stage (a rollback, a first deployment) needs
``force=True``. A version promoted to canary leaves shadow, one promoted to
production leaves canary and shadow.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:  # torch only to register weights: the API image reads stages without it
    import torch

STAGES: Final = ("shadow", "canary", "production")
SUPPORTED_SCHEMES: Final = ("file",)
DEFAULT_CANARY_WEIGHT: Final = 0.1
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")


class VersionExistsError(ValueError):
    """A version is immutable: registering it again is an error."""


class PromotionError(ValueError):
    """A promotion that skips a stage without ``force=True``."""


def parse_version(version: str) -> tuple[int, int, int]:
    """``"1.2.0"`` → ``(1, 2, 0)``; anything but MAJOR.MINOR.PATCH raises ``ValueError``."""
    match = _SEMVER.match(version) if isinstance(version, str) else None
    if match is None:
        raise ValueError(f"invalid semantic version {version!r}: expected MAJOR.MINOR.PATCH, e.g. 1.0.0")
    return int(match[1]), int(match[2]), int(match[3])


def root_from_uri(uri: str | Path) -> Path:
    """The registry's root directory from ``file:///abs/path`` or a plain path."""
    if isinstance(uri, Path):
        return uri
    parsed = urlparse(uri)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] in (":\\", ":/")):
        return Path(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URIs must name a local path (file:///abs/path), got {uri!r}")
        return Path(unquote(parsed.path))
    raise ValueError(
        f"unsupported registry URI scheme {parsed.scheme!r} in {uri!r}: supported are "
        f"{', '.join(s + '://' for s in SUPPORTED_SCHEMES)} (file:///abs/path) and plain directory paths"
    )


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    created_at: str

    @property
    def weights_path(self) -> Path:
        return self.path / "weights.pt"

    def reference(self) -> dict[str, Any] | None:
        """The reference feature distributions stored with this version, if any."""
        file = self.path / "reference.json"
        if not file.exists():
            return None
        data: dict[str, Any] = json.loads(file.read_text())
        return data


@dataclass(frozen=True)
class Stages:
    production: str | None = None
    canary: str | None = None
    canary_weight: float = 0.0
    shadow: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "production": self.production,
            "canary": self.canary,
            "canary_weight": self.canary_weight,
            "shadow": self.shadow,
        }

    def stage_of(self, version: str) -> str | None:
        for stage in ("production", "canary", "shadow"):
            if getattr(self, stage) == version:
                return stage
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _json_bytes(value: Any, what: str) -> bytes:
    try:
        return (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from exc


class Registry:
    """A local-directory model registry (see the module docstring)."""

    def __init__(self, uri: str | Path) -> None:
        self.root = root_from_uri(uri)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ---- paths and locking
    def _model_dir(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"invalid model name {name!r}: lower-case letters, digits, '_', '-' and '.'")
        return self.root / name

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[Path]:
        directory = self._model_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield directory
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # ---- versions
    def names(self) -> list[str]:
        """The models with at least one registered version."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name) and self.versions(p.name)
        )

    def register(
        self,
        name: str,
        *,
        weights: Mapping[str, torch.Tensor] | bytes,
        config: dict[str, Any],
        metrics: dict[str, Any],
        reference: dict[str, Any] | None = None,
        version: str | None = None,
    ) -> ModelVersion:
        """Store a new immutable version; ``version=None`` takes the next minor after the highest (first: 1.0.0)."""
        if version is not None:
            parse_version(version)
        files = {
            "config.json": _json_bytes(config, "config"),
            "metrics.json": _json_bytes(metrics, "metrics"),
        }
        if reference is not None:
            files["reference.json"] = _json_bytes(reference, "reference")
        if isinstance(weights, bytes | bytearray):
            blob = bytes(weights)
        else:
            import torch

            buffer = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in weights.items()}, buffer)
            blob = buffer.getvalue()
        with self._lock(name) as directory:
            existing = [v.version for v in self.versions(name)]
            if version is None:
                if existing:
                    major, minor, _ = parse_version(existing[-1])
                    version = f"{major}.{minor + 1}.0"
                else:
                    version = "1.0.0"
            target = directory / version
            if version in existing or target.exists():
                raise VersionExistsError(f"{name} {version} is already registered; versions are immutable")
            tmp = directory / f".tmp-{version}-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                created_at = _now()
                _fsync_write(tmp / "weights.pt", blob)
                for filename, data in files.items():
                    _fsync_write(tmp / filename, data)
                meta = {"name": name, "version": version, "created_at": created_at}
                _fsync_write(tmp / "meta.json", _json_bytes(meta, "meta"))
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return self.get(name, version)

    def versions(self, name: str) -> list[ModelVersion]:
        """Every registered version of ``name``, sorted by semantic version (empty when none)."""
        directory = self._model_dir(name)
        if not directory.is_dir():
            return []
        found = [p.name for p in directory.iterdir() if _SEMVER.match(p.name) and (p / "meta.json").exists()]
        return [self._read(name, v) for v in sorted(found, key=parse_version)]

    def get(self, name: str, version: str) -> ModelVersion:
        parse_version(version)
        path = self._model_dir(name) / version
        if not (path / "meta.json").exists():
            known = ", ".join(v.version for v in self.versions(name)) or "none"
            raise KeyError(f"model {name!r} has no version {version!r} in registry {self.root} (registered: {known})")
        return self._read(name, version)

    def latest(self, name: str) -> ModelVersion | None:
        found = self.versions(name)
        return found[-1] if found else None

    def _read(self, name: str, version: str) -> ModelVersion:
        path = self._model_dir(name) / version
        meta = json.loads((path / "meta.json").read_text())
        return ModelVersion(
            name=name,
            version=version,
            path=path,
            config=json.loads((path / "config.json").read_text()),
            metrics=json.loads((path / "metrics.json").read_text()),
            created_at=str(meta["created_at"]),
        )

    # ---- stages
    def stages(self, name: str) -> Stages:
        file = self._model_dir(name) / "stages.json"
        if not file.exists():
            return Stages()
        data = json.loads(file.read_text())
        return Stages(
            production=data.get("production"),
            canary=data.get("canary"),
            canary_weight=float(data.get("canary_weight") or 0.0),
            shadow=data.get("shadow"),
        )

    def resolve(self, name: str, stage: str) -> ModelVersion | None:
        """The version serving ``stage`` ("production", "canary" or "shadow"), or ``None``."""
        _check_stage(stage)
        version: str | None = getattr(self.stages(name), stage)
        return None if version is None else self.get(name, version)

    def promote(
        self,
        name: str,
        version: str,
        stage: str,
        *,
        weight: float | None = None,
        actor: str = "cli",
        force: bool = False,
    ) -> Stages:
        """Move ``version`` into ``stage``; shadow → canary → production unless ``force`` (rollbacks)."""
        _check_stage(stage)
        self.get(name, version)  # must exist
        if stage != "canary" and weight is not None:
            raise ValueError("weight applies to the canary stage only")
        if stage == "canary":
            weight = DEFAULT_CANARY_WEIGHT if weight is None else float(weight)
            if not 0.0 < weight <= 1.0:
                raise ValueError(f"canary weight must be within (0, 1], got {weight}")
        with self._lock(name) as directory:
            current = self.stages(name)
            was = current.stage_of(version)
            if not force:
                if stage == "canary" and version not in (current.shadow, current.canary):
                    raise PromotionError(
                        f"{name} {version} is not in shadow (shadow: {current.shadow}); "
                        "promote it to shadow first or pass force=True"
                    )
                if stage == "production" and version not in (current.canary, current.production):
                    raise PromotionError(
                        f"{name} {version} is not in canary (canary: {current.canary}); "
                        "promote it to canary first or pass force=True (rollback)"
                    )
            values = current.to_json()
            previous = values[stage]
            if stage == "shadow":
                values["shadow"] = version
            elif stage == "canary":
                values["canary"], values["canary_weight"] = version, weight
                if values["shadow"] == version:
                    values["shadow"] = None
            else:
                values["production"] = version
                if values["canary"] == version:
                    values["canary"], values["canary_weight"] = None, 0.0
                if values["shadow"] == version:
                    values["shadow"] = None
            updated = Stages(**values)
            self._write_stages(directory, updated)
            self._append(
                directory / "history.jsonl",
                {
                    "time": _now(),
                    "actor": actor,
                    "action": "promote",
                    "stage": stage,
                    "from": previous,
                    "to": version,
                    "version_was": was,
                    "weight": weight,
                    "forced": bool(force),
                },
            )
            return updated

    def clear(self, name: str, stage: str, *, actor: str = "cli") -> Stages:
        """Empty ``stage`` (abort a canary or a shadow; clearing production leaves the platform on its rules)."""
        _check_stage(stage)
        with self._lock(name) as directory:
            values = self.stages(name).to_json()
            previous = values[stage]
            values[stage] = None
            if stage == "canary":
                values["canary_weight"] = 0.0
            updated = Stages(**values)
            self._write_stages(directory, updated)
            self._append(
                directory / "history.jsonl",
                {"time": _now(), "actor": actor, "action": "clear", "stage": stage, "from": previous, "to": None},
            )
            return updated

    def history(self, name: str) -> list[dict[str, Any]]:
        return _read_jsonl(self._model_dir(name) / "history.jsonl")

    # ---- flags
    def flag(self, name: str, version: str, reason: str) -> None:
        """Record that ``version`` needs attention (e.g. drift: retrain), with the reason."""
        self.get(name, version)
        with self._lock(name) as directory:
            self._append(directory / "flags.jsonl", {"time": _now(), "version": version, "reason": reason})

    def flags(self, name: str) -> list[dict[str, Any]]:
        return _read_jsonl(self._model_dir(name) / "flags.jsonl")

    # ---- helpers
    @staticmethod
    def _write_stages(directory: Path, stages: Stages) -> None:
        tmp = directory / f".stages-{uuid.uuid4().hex}.tmp"
        try:
            _fsync_write(tmp, _json_bytes(stages.to_json(), "stages"))
            os.replace(tmp, directory / "stages.json")
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _append(file: Path, record: Mapping[str, Any]) -> None:
        with open(file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")


def _read_jsonl(file: Path) -> list[dict[str, Any]]:
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
