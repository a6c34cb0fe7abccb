"""Secret files generated for the embedded defaults (``make run``): never at import, never in production."""

from __future__ import annotations

import secrets
from pathlib import Path


def secret_file(data_dir: Path, name: str) -> Path:
    """``<data_dir>/secrets/<name>``, created with 32 random bytes (hex) and mode 0600 if absent."""
    folder = data_dir / "secrets"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / name
    if not path.exists():
        path.write_text(secrets.token_hex(32), encoding="utf-8")
        path.chmod(0o600)
    return path


__all__ = ["secret_file"]
