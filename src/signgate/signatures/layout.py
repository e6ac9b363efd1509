"""The classic cosign signature image: one layer per signature at tag ``sha256-HEX.sig`` (pure).

Layout as written by cosign 2.x (go-containerregistry's empty image plus appended static
layers): https://github.com/sigstore/cosign/blob/main/pkg/oci/static/
The storage format sits behind this module so that cosign 3's bundle format can slot in beside it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from signgate.digests import compute_digest
from signgate.registry.mediatypes import OCI_MANIFEST

SIMPLE_SIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
OCI_CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
CERTIFICATE_ANNOTATION = "dev.sigstore.cosign/certificate"
CHAIN_ANNOTATION = "dev.sigstore.cosign/chain"
BUNDLE_ANNOTATION = "dev.sigstore.cosign/bundle"


@dataclass(frozen=True)
class SignatureLayer:
    """One layer of a signature image: its descriptor as stored (payload fetched separately)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def signature_b64(self) -> str | None:
        return self.annotations.get(SIGNATURE_ANNOTATION)

    def signature(self) -> bytes | None:
        """The decoded signature, or None when absent or not base64."""
        text = self.signature_b64
        if text is None:
            return None
        try:
            # Go's base64 decoder skips CR and LF, and some signers wrap long signatures.
            return base64.b64decode(text.replace("\r", "").replace("\n", ""), validate=True)
        except (binascii.Error, ValueError):
            return None

    def descriptor(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "mediaType": self.media_type,
            "size": self.size,
            "digest": self.digest,
        }
        if self.annotations:
            value["annotations"] = dict(self.annotations)
        return value

    @classmethod
    def for_signature(
        cls, payload: bytes, signature: bytes, extra: Mapping[str, str] | None = None
    ) -> SignatureLayer:
        annotations = {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()}
        annotations.update(extra or {})
        return cls(SIMPLE_SIGNING_MEDIA_TYPE, compute_digest(payload), len(payload), annotations)


def config_blob(layers: Sequence[SignatureLayer]) -> bytes:
    """The config blob cosign writes for these layers, exact bytes."""
    history = ",".join('{"created":"0001-01-01T00:00:00Z"}' for _ in layers)
    diff_ids = ",".join(json.dumps(layer.digest) for layer in layers)
    return (
        '{"architecture":"","created":"0001-01-01T00:00:00Z","history":[' + history + "],"
        '"os":"","rootfs":{"type":"layers","diff_ids":[' + diff_ids + ']},"config":{}}'
    ).encode()


def manifest_bytes(layers: Sequence[SignatureLayer], config: bytes) -> bytes:
    """The OCI manifest of a signature image with ``layers`` and ``config``."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG_MEDIA_TYPE,
            "size": len(config),
            "digest": compute_digest(config),
        },
        "layers": [layer.descriptor() for layer in layers],
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def parse_layers(manifest: Mapping[str, Any]) -> list[SignatureLayer]:
    """The layers of a stored signature manifest, whatever their media type."""
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        return []
    parsed = []
    for entry in layers:
        if not isinstance(entry, dict):
            continue
        digest, size = entry.get("digest"), entry.get("size")
        if not isinstance(digest, str) or not isinstance(size, int):
            continue
        annotations = entry.get("annotations") or {}
        if not isinstance(annotations, dict):
            annotations = {}
        parsed.append(
            SignatureLayer(
                media_type=str(entry.get("mediaType", "")),
                digest=digest,
                size=size,
                annotations={str(k): str(v) for k, v in annotations.items()},
            )
        )
    return parsed
