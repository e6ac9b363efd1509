"""The simple-signing payload, byte for byte as cosign builds it (pure).

https://github.com/sigstore/sigstore/blob/main/pkg/signature/payload/payload.go
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from signgate.errors import VerificationError

COSIGN_SIGNATURE_TYPE = "cosign container image signature"

# Go's encoding/json escapes these for safe embedding in HTML; cosign's bytes carry the escapes,
# and the payload is compared byte for byte by anyone who re-signs or re-verifies it.
_GO_HTML_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
                    "\u2029": "\\u2029"}


def go_json(value: Any) -> bytes:
    """Compact JSON as Go's json.Marshal writes it: sorted map keys, HTML escapes, UTF-8."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    for raw, escaped in _GO_HTML_ESCAPES.items():
        text = text.replace(raw, escaped)
    return text.encode()


def build_payload(
    docker_reference: str, digest: str, annotations: Mapping[str, Any] | None = None
) -> bytes:
    """The exact bytes cosign signs for image ``docker_reference@digest``."""
    # The struct's field order is the wire order; only "optional" is a map (sorted keys).
    critical = (
        '{"identity":{"docker-reference":' + go_json(docker_reference).decode() + "},"
        '"image":{"docker-manifest-digest":' + go_json(digest).decode() + "},"
        '"type":' + go_json(COSIGN_SIGNATURE_TYPE).decode() + "}"
    )
    optional = go_json(dict(annotations)).decode() if annotations else "null"
    return ('{"critical":' + critical + ',"optional":' + optional + "}").encode()


@dataclass(frozen=True)
class SimpleSigningPayload:
    """What a verified payload claims."""

    docker_reference: str
    manifest_digest: str
    annotations: Mapping[str, Any]
    document: Mapping[str, Any]


def parse_payload(data: bytes) -> SimpleSigningPayload:
    """Parse stored payload bytes (never re-serialise them to verify)."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise VerificationError("signature payload is not JSON") from e
    if not isinstance(document, dict):
        raise VerificationError("signature payload is not a JSON object")
    critical = document.get("critical")
    if not isinstance(critical, dict):
        raise VerificationError("signature payload has no 'critical' section")
    if critical.get("type") != COSIGN_SIGNATURE_TYPE:
        raise VerificationError(f"signature payload has unknown type {critical.get('type')!r}")
    image = critical.get("image")
    digest = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    if not isinstance(digest, str):
        raise VerificationError("signature payload names no image digest")
    identity = critical.get("identity")
    reference = identity.get("docker-reference") if isinstance(identity, dict) else None
    optional = document.get("optional")
    if optional is not None and not isinstance(optional, dict):
        raise VerificationError("signature payload's 'optional' section is not an object")
    return SimpleSigningPayload(
        docker_reference=reference if isinstance(reference, str) else "",
        manifest_digest=digest,
        annotations=optional or {},
        document=document,
    )
