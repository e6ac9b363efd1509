"""cosign 3's signature format: a Sigstore bundle (v0.3) holding a DSSE envelope (pure).

The bundle is the single layer of an OCI 1.1 artifact manifest whose ``subject`` is the signed
image. The envelope's payload is an in-toto statement naming the image digest, with cosign's
predicate type ``https://sigstore.dev/cosign/sign/v1`` and the ``-a`` annotations on the subject.
The bundle JSON is read by hand, only the fields a key-signed bundle without a transparency log
carries: the maintained models cost more to import than all of `signgate verify` otherwise
takes (measured here: sigstore-protobuf-specs 0.5.2, on betterproto and grpclib, 167 ms;
sigstore-models 0.0.6, on pydantic, 109 ms), and bundles are what `signgate sign` writes by
default, so every verify of a default signature would pay it.

https://github.com/sigstore/protobuf-specs/blob/main/protos/sigstore_bundle.proto
https://github.com/secure-systems-lab/dsse/blob/master/protocol.md
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from signgate.digests import compute_digest, parse_digest
from signgate.errors import VerificationError
from signgate.keys.model import PublicKey
from signgate.registry.mediatypes import OCI_MANIFEST
from signgate.signatures.formats import BUNDLE_MEDIA_TYPE
from signgate.signatures.payload import go_json

__all__ = ["BUNDLE_MEDIA_TYPE"]  # re-exported: defined beside the formats, without this module
# Older bundle versions a verifier may meet; cosign 3 writes v0.3.
BUNDLE_MEDIA_TYPES = frozenset(
    {
        BUNDLE_MEDIA_TYPE,
        "application/vnd.dev.sigstore.bundle+json;version=0.3",
        "application/vnd.dev.sigstore.bundle+json;version=0.2",
    }
)
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
STATEMENT_TYPES = frozenset({STATEMENT_TYPE, "https://in-toto.io/Statement/v0.1"})
COSIGN_SIGN_PREDICATE_TYPE = "https://sigstore.dev/cosign/sign/v1"
BUNDLE_CONTENT_ANNOTATION = "dev.sigstore.bundle.content"
BUNDLE_PREDICATE_TYPE_ANNOTATION = "dev.sigstore.bundle.predicateType"
CREATED_ANNOTATION = "org.opencontainers.image.created"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: the bytes a DSSE signature covers."""
    encoded_type = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(encoded_type), encoded_type, len(payload), payload)


def key_hint(key: PublicKey) -> str:
    """cosign's hint for a key: standard base64 of the SHA-256 of its PKIX DER."""
    return base64.b64encode(hashlib.sha256(key.der()).digest()).decode()


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise VerificationError(f"bundle: {what} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise VerificationError(f"bundle: {what} is not valid base64") from e


@dataclass(frozen=True)
class DsseEnvelope:
    payload: bytes
    payload_type: str
    signatures: tuple[bytes, ...]

    def signed_bytes(self) -> bytes:
        return pae(self.payload_type, self.payload)


@dataclass(frozen=True)
class SigstoreBundle:
    """What a key-signed bundle carries: the key hint (if any) and its DSSE envelope."""

    media_type: str
    envelope: DsseEnvelope
    key_hint: str | None


def parse_bundle(data: bytes) -> SigstoreBundle:
    """Parse stored bundle bytes; :class:`VerificationError` says what is wrong with them."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise VerificationError("bundle is not JSON") from e
    if not isinstance(document, dict):
        raise VerificationError("bundle is not a JSON object")
    media_type = document.get("mediaType")
    if media_type not in BUNDLE_MEDIA_TYPES:
        raise VerificationError(f"bundle has unknown media type {media_type!r}")
    envelope = document.get("dsseEnvelope")
    if not isinstance(envelope, dict):
        content = "a message signature" if "messageSignature" in document else "no content"
        raise VerificationError(f"bundle content is not a DSSE envelope (it holds {content})")
    payload_type = envelope.get("payloadType")
    if not isinstance(payload_type, str):
        raise VerificationError("bundle: DSSE envelope has no payloadType")
    entries = envelope.get("signatures")
    if not isinstance(entries, list) or not entries:
        raise VerificationError("bundle: DSSE envelope has no signatures")
    signatures = tuple(
        _b64(entry.get("sig") if isinstance(entry, dict) else None, "DSSE signature")
        for entry in entries
    )
    material = document.get("verificationMaterial")
    public_key = material.get("publicKey") if isinstance(material, dict) else None
    hint = public_key.get("hint") if isinstance(public_key, dict) else None
    return SigstoreBundle(
        media_type=media_type,
        envelope=DsseEnvelope(_b64(envelope.get("payload"), "DSSE payload"), payload_type,
                              signatures),
        key_hint=hint if isinstance(hint, str) and hint else None,
    )


@dataclass(frozen=True)
class Statement:
    """An in-toto statement as cosign's ``sign/v1`` predicate uses it."""

    subject_digests: tuple[str, ...]  # "algorithm:hex" of each subject
    annotations: Mapping[str, Any]  # the first subject's annotations (cosign's ``-a``)
    predicate_type: str
    document: Mapping[str, Any]


def parse_statement(payload: bytes) -> Statement:
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise VerificationError("in-toto statement is not JSON") from e
    if not isinstance(document, dict):
        raise VerificationError("in-toto statement is not a JSON object")
    if document.get("_type") not in STATEMENT_TYPES:
        raise VerificationError(f"in-toto statement has unknown _type {document.get('_type')!r}")
    predicate_type = document.get("predicateType")
    if predicate_type != COSIGN_SIGN_PREDICATE_TYPE:
        raise VerificationError(
            f"in-toto statement has predicateType {predicate_type!r}, "
            f"not {COSIGN_SIGN_PREDICATE_TYPE}"
        )
    subjects = document.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise VerificationError("in-toto statement names no subject")
    digests: list[str] = []
    for subject in subjects:
        algorithms = subject.get("digest") if isinstance(subject, dict) else None
        if not isinstance(algorithms, dict):
            raise VerificationError("in-toto statement has a subject without a digest")
        digests.extend(f"{name}:{value}" for name, value in algorithms.items())
    annotations = subjects[0].get("annotations") if isinstance(subjects[0], dict) else None
    if annotations is not None and not isinstance(annotations, dict):
        raise VerificationError("in-toto statement's subject annotations are not an object")
    return Statement(tuple(digests), annotations or {}, predicate_type, document)


@dataclass(frozen=True)
class BundleCheck:
    """The outcome for one bundle: the key that verified it and its statement, or why not."""

    bundle_digest: str
    key: PublicKey | None = None
    statement: Statement | None = None
    statement_bytes: bytes = b""
    reason: str | None = None

    @property
    def verified(self) -> bool:
        return self.reason is None and self.key is not None


def check_bundle(
    bundle_digest: str,
    data: bytes,
    keys: Sequence[PublicKey],
    digest: str,
    required_annotations: Mapping[str, str],
) -> BundleCheck:
    """Check one stored bundle against ``keys`` for image ``digest`` (pure).

    The key hint is only a hint: a bundle whose hint names none of the keys is still tried
    with each, as cosign does, since a hint is not signed.
    """
    try:
        bundle = parse_bundle(data)
    except VerificationError as e:
        return BundleCheck(bundle_digest, reason=f"not a signature: {e.diagnostics()}")
    envelope = bundle.envelope
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE:
        return BundleCheck(
            bundle_digest,
            reason=f"not a signature: DSSE payloadType is {envelope.payload_type!r}",
        )
    signed = envelope.signed_bytes()
    ordered = sorted(keys, key=lambda k: bundle.key_hint != key_hint(k))
    key = next(
        (k for k in ordered for sig in envelope.signatures if k.verify(sig, signed)), None
    )
    if key is None:
        return BundleCheck(
            bundle_digest, reason="bundle signature does not verify with the given keys"
        )
    try:
        statement = parse_statement(envelope.payload)
    except VerificationError as e:
        return BundleCheck(bundle_digest, key=key, reason=f"payload invalid: {e.diagnostics()}")
    if digest not in statement.subject_digests:
        return BundleCheck(
            bundle_digest,
            key=key,
            statement=statement,
            reason="digest claim mismatch: bundle is for "
            + ", ".join(statement.subject_digests),
        )
    for name, wanted in required_annotations.items():
        found = statement.annotations.get(name)
        if found is None or str(found) != wanted:
            return BundleCheck(
                bundle_digest,
                key=key,
                statement=statement,
                reason=f"annotation mismatch: {name}={wanted!s} required, found {found!r}",
            )
    return BundleCheck(bundle_digest, key=key, statement=statement,
                       statement_bytes=envelope.payload)


def build_statement(digest: str, annotations: Mapping[str, str] | None = None) -> bytes:
    """The in-toto statement cosign 3 signs for ``digest``, byte for byte."""
    parsed = parse_digest(digest)
    if parsed is None:
        raise VerificationError(f"not a digest: {digest!r}")
    algorithm, hex_value = parsed
    subject = (
        '{"digest":{' + go_json(algorithm).decode() + ":" + go_json(hex_value).decode() + "},"
        '"annotations":' + go_json(dict(annotations or {})).decode() + "}"
    )
    return (
        '{"_type":' + go_json(STATEMENT_TYPE).decode() + ',"subject":[' + subject + "],"
        '"predicateType":' + go_json(COSIGN_SIGN_PREDICATE_TYPE).decode() + ',"predicate":{}}'
    ).encode()


def build_bundle(statement: bytes, signature: bytes, key: PublicKey) -> bytes:
    """A v0.3 bundle for a key signature without transparency log, as cosign 3 writes it."""
    document = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_hint(key)}},
        "dsseEnvelope": {
            "payload": base64.b64encode(statement).decode(),
            "payloadType": IN_TOTO_PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode()}],
        },
    }
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "mediaType": self.media_type,
            "size": self.size,
            "digest": self.digest,
        }
        if self.artifact_type:
            value["artifactType"] = self.artifact_type
        if self.annotations:
            value["annotations"] = dict(self.annotations)
        return value


def bundle_manifest(bundle: bytes, subject: Descriptor, created: str) -> bytes:
    """The referring manifest cosign 3 pushes for a bundle (``created``: RFC 3339, UTC).

    cosign also puts ``artifactType`` on the config descriptor; kept for byte-level likeness.
    """
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "size": len(EMPTY_CONFIG),
            "digest": compute_digest(EMPTY_CONFIG),
            "artifactType": BUNDLE_MEDIA_TYPE,
        },
        "layers": [
            {"mediaType": BUNDLE_MEDIA_TYPE, "size": len(bundle), "digest": compute_digest(bundle)}
        ],
        "annotations": {
            BUNDLE_CONTENT_ANNOTATION: "dsse-envelope",
            BUNDLE_PREDICATE_TYPE_ANNOTATION: COSIGN_SIGN_PREDICATE_TYPE,
            CREATED_ANNOTATION: created,
        },
        "subject": subject.json(),
        "artifactType": BUNDLE_MEDIA_TYPE,
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def parse_descriptor(value: Any) -> Descriptor | None:
    """A descriptor from JSON, or None when it is malformed."""
    if not isinstance(value, dict):
        return None
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or parse_digest(digest) is None:
        return None
    artifact_type = value.get("artifactType")
    annotations = value.get("annotations")
    return Descriptor(
        media_type=media_type if isinstance(media_type, str) else "",
        digest=digest,
        size=size,
        artifact_type=artifact_type if isinstance(artifact_type, str) else None,
        annotations={str(k): str(v) for k, v in annotations.items()}
        if isinstance(annotations, dict) else {},
    )


def index_with(index: Mapping[str, Any] | None, entry: Descriptor) -> bytes:
    """The fallback index ``index`` with ``entry`` added first (kept once), other entries kept."""
    existing = list(index.get("manifests") or []) if index else []
    kept = [e for e in existing if not (isinstance(e, dict) and e.get("digest") == entry.digest)]
    document = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry.json(), *kept],
    }
    return json.dumps(document, separators=(",", ":")).encode()


def index_without(index: Mapping[str, Any], digests: Collection[str]) -> bytes | None:
    """The fallback index ``index`` without the entries for ``digests``, everything else kept
    as it is; None when no entry is left (the index is then deleted)."""
    existing = list(index.get("manifests") or [])
    kept = [e for e in existing if not (isinstance(e, dict) and e.get("digest") in digests)]
    if not kept:
        return None
    return json.dumps({**index, "manifests": kept}, separators=(",", ":")).encode()
