"""Content digests (``algorithm:hex``), as the OCI image spec defines them (pure)."""

from __future__ import annotations

import hashlib
import re

# The algorithms go-digest registers, with the length of their lowercase hex encoding; a digest
# with another algorithm is well formed but unusable (distribution refuses it the same way).
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
_DIGEST_RE = re.compile(r"(sha256|sha384|sha512):([a-f0-9]+)")


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of ``data``."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def parse_digest(text: str) -> tuple[str, str] | None:
    """(algorithm, hex) when ``text`` is a digest we can check, else None."""
    match = _DIGEST_RE.fullmatch(text)
    if match is None or len(match.group(2)) != DIGEST_HEX_LENGTHS[match.group(1)]:
        return None
    return match.group(1), match.group(2)
