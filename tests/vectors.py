"""Where the cosign test vectors live (../shared/vectors beside the project)."""

from __future__ import annotations

import os
from pathlib import Path

VECTORS = Path(
    os.environ.get("SIGNGATE_VECTORS", Path(__file__).resolve().parents[2] / "shared" / "vectors")
)


def vector(*parts: str) -> Path:
    path = VECTORS.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"test vector {path} is missing (set SIGNGATE_VECTORS)")
    return path
