"""Verifying an image's signatures (classic `.sig` images and cosign 3 bundles) against public keys
and required annotations."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from signgate.digests import compute_digest
from signgate.errors import Error, VerificationError
from signgate.keys.model import PublicKey
from signgate.reference import ImageReference, Repository
from signgate.registry import IMAGE_CONCURRENCY, RegistryClient
from signgate.signatures.formats import (
    BUNDLE_MEDIA_TYPE,
    SIGNATURE_FORMATS,
    SignatureFormat,
    describe_formats,
)
from signgate.signatures.layout import SIMPLE_SIGNING_MEDIA_TYPE, SignatureLayer
from signgate.signatures.payload import SimpleSigningPayload, build_payload, parse_payload
from signgate.signatures.store import fetch_payload, read_signature_image, signature_repository

if TYPE_CHECKING:
    from signgate.signatures.referrers import BundleArtifact


@dataclass(frozen=True)
class SignatureCheck:
    """The outcome for one signature layer: the key that verified it, or why it failed."""

    layer: SignatureLayer
    key: PublicKey | None = None
    payload: SimpleSigningPayload | None = None
    payload_bytes: bytes = b""
    reason: str | None = None

    @property
    def verified(self) -> bool:
        return self.reason is None and self.key is not None


# Failure reasons, most telling first: when every signature fails, the person sees the reason of
# the signature that came closest to verifying.
_REASON_RANK = ("annotation", "digest claim", "payload", "does not verify", "not a signature")


def check_signature(
    layer: SignatureLayer,
    payload_bytes: bytes,
    keys: Sequence[PublicKey],
    digest: str,
    required_annotations: Mapping[str, str],
) -> SignatureCheck:
    """Check one signature over its stored payload bytes (pure)."""
    if layer.media_type != SIMPLE_SIGNING_MEDIA_TYPE:
        return SignatureCheck(layer, reason=f"layer {layer.digest} is not a signature")
    signature = layer.signature()
    if signature is None:
        return SignatureCheck(layer, reason=f"layer {layer.digest} is not a signature")
    key = next((k for k in keys if k.verify(signature, payload_bytes)), None)
    if key is None:
        return SignatureCheck(layer, reason="signature does not verify with the given keys")
    try:
        payload = parse_payload(payload_bytes)
    except VerificationError as e:
        return SignatureCheck(layer, key=key, reason=f"payload invalid: {e.diagnostics()}")
    if payload.manifest_digest != digest:
        return SignatureCheck(
            layer,
            key=key,
            payload=payload,
            reason=f"digest claim mismatch: signature is for {payload.manifest_digest}",
        )
    for name, wanted in required_annotations.items():
        found = payload.annotations.get(name)
        if found is None or str(found) != wanted:
            return SignatureCheck(
                layer,
                key=key,
                payload=payload,
                reason=f"annotation mismatch: {name}={wanted!s} required, found {found!r}",
            )
    return SignatureCheck(layer, key=key, payload=payload, payload_bytes=payload_bytes)


def _rank(reason: str) -> int:
    return next((i for i, word in enumerate(_REASON_RANK) if word in reason), len(_REASON_RANK))


@dataclass(frozen=True)
class ImageVerification:
    """The verdict for one image: the signatures that verified, or why none did."""

    reference: ImageReference
    digest: str | None
    checks: tuple[SignatureCheck, ...] = ()
    error: str | None = None
    signature_location: str | None = None
    # Set when no accepted signature verified but one in a format not accepted does: says so.
    format_refusal: str | None = None
    verified: tuple[SignatureCheck, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "verified", tuple(c for c in self.checks if c.verified))

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.verified)

    def reason(self) -> str:
        """One line saying why the image failed (empty when it verified)."""
        if self.ok:
            return ""
        if self.format_refusal:
            return self.format_refusal
        if self.error:
            return self.error
        if not self.checks:
            return f"no signatures found in {self.signature_location}"
        return min((c.reason or "" for c in self.checks), key=_rank)


def predictable_payloads(
    repository: Repository, digest: str, required_annotations: Mapping[str, str]
) -> dict[str, bytes]:
    """The payloads cosign and signgate write for ``repository@digest`` with no annotations or
    with exactly the required ones, by their digest.

    A signature layer whose descriptor names one of these digests holds exactly those bytes
    (SHA-256 binds them), so verification need not fetch its blob: one request fewer per
    image, and the blob is the slowest of the three to serve.
    """
    candidates = [build_payload(str(repository), digest)]
    if required_annotations:
        candidates.append(build_payload(str(repository), digest, required_annotations))
    return {compute_digest(payload): payload for payload in candidates}


async def resolve_digest(client: RegistryClient, reference: ImageReference) -> str:
    """The digest ``reference`` names; a tag is resolved by fetching and hashing the manifest."""
    if reference.digest:
        return reference.digest
    manifest = await client.get_manifest(reference.repository, reference.identifier)
    return manifest.digest


async def verify_image(
    client: RegistryClient,
    reference: ImageReference,
    keys: Sequence[PublicKey],
    required_annotations: Mapping[str, str] | None = None,
    signature_repo: Repository | None = None,
    formats: Collection[str] = SIGNATURE_FORMATS,
) -> ImageVerification:
    """Verify one image's signatures in the given ``formats`` (classic ``.sig`` images and
    cosign 3 bundles by default); registry failures become the verdict's error, never an
    exception.

    When no signature in ``formats`` verifies, the other format is looked at too, so that the
    reason can say the image is signed, but only in a format not accepted.
    """
    try:
        # Fetched by digest too, as cosign does (go-containerregistry checks the digest of what
        # it fetched): a registry serving other bytes under the digest fails verification.
        manifest = await client.get_manifest(reference.repository, reference.identifier)
        digest = manifest.digest
    except Error as e:
        return ImageVerification(reference, None, error=e.diagnostics())
    repository = signature_repo or signature_repository(reference.repository)
    required = required_annotations or {}
    result = await _verify_digest(client, reference, digest, repository, keys, required, formats)
    others = [f for f in SIGNATURE_FORMATS if f not in formats]
    if result.ok or not others:
        return result
    elsewhere = await _verify_digest(client, reference, digest, repository, keys, required, others)
    if not elsewhere.ok:
        return result
    refusal = (
        f"the signature exists only in the {describe_formats(others)} format; "
        f"the {describe_formats(formats)} format is required"
    )
    return replace(result, format_refusal=refusal)


async def _verify_digest(
    client: RegistryClient,
    reference: ImageReference,
    digest: str,
    repository: Repository,
    keys: Sequence[PublicKey],
    required: Mapping[str, str],
    formats: Collection[str],
) -> ImageVerification:
    checks: list[SignatureCheck] = []
    image = None
    if SignatureFormat.CLASSIC in formats:
        try:
            image = await read_signature_image(client, repository, digest)
            if image is not None:
                known = predictable_payloads(reference.repository, digest, required)
                checks.extend(
                    await asyncio.gather(
                        *(_check_layer(client, repository, layer, keys, digest, required, known)
                          for layer in image.layers)
                    )
                )
        except Error as e:
            return ImageVerification(reference, digest, error=e.diagnostics())
    location = image.location if image is not None else None
    verified_keys = {c.key.key_id for c in checks if c.verified and c.key is not None}
    # Bundles can only add keys not yet verified: skip the look-up (two requests on a registry
    # without the referrers API) when every key already verified a classic signature.
    if SignatureFormat.BUNDLE in formats and not {k.key_id for k in keys} <= verified_keys:
        try:
            # Imported here: a run that meets only classic signatures never loads them.
            from signgate.signatures.referrers import read_bundles

            bundles = await read_bundles(client, repository, digest)
        except Error as e:
            if not checks:
                return ImageVerification(reference, digest, error=e.diagnostics())
            checks.append(
                SignatureCheck(_BUNDLE_PLACEHOLDER, reason=f"bundles unreadable: {e.diagnostics()}")
            )
        else:
            checks.extend(bundle_signature_check(a, keys, digest, required, str(reference))
                          for a in bundles.artifacts)
            if bundles.artifacts and location is None:
                location = bundles.location
    if not checks:
        return ImageVerification(
            reference, digest, error=f"no signatures found for {reference.repository}@{digest}"
        )
    return ImageVerification(reference, digest, tuple(checks), signature_location=location)


_BUNDLE_PLACEHOLDER = SignatureLayer(BUNDLE_MEDIA_TYPE, "", 0)


def bundle_signature_check(
    artifact: BundleArtifact,
    keys: Sequence[PublicKey],
    digest: str,
    required_annotations: Mapping[str, str],
    docker_reference: str = "",
) -> SignatureCheck:
    """A bundle's verdict in the shape of a classic one, so both count towards a threshold.

    Its payload document is what cosign 3 prints for a bundle: a simple-signing claim made of
    the reference verified, the digest, the predicate type and the statement's annotations,
    so that what reads `verify`'s output need not know the signature's format.
    """
    layer = SignatureLayer(BUNDLE_MEDIA_TYPE, artifact.bundle_digest or artifact.manifest_digest,
                           len(artifact.bundle))
    if artifact.problem is not None:
        return SignatureCheck(layer, reason=artifact.problem)
    from signgate.signatures.bundle import check_bundle

    result = check_bundle(layer.digest, artifact.bundle, keys, digest, required_annotations)
    payload = None
    if result.statement is not None:
        statement = result.statement
        payload = SimpleSigningPayload(
            docker_reference=docker_reference,
            manifest_digest=digest,
            annotations=statement.annotations,
            document={
                "critical": {
                    "identity": {"docker-reference": docker_reference},
                    "image": {"docker-manifest-digest": digest},
                    "type": statement.predicate_type,
                },
                "optional": dict(statement.annotations),
            },
        )
    return SignatureCheck(layer, key=result.key, payload=payload,
                          payload_bytes=result.statement_bytes, reason=result.reason)


async def _check_layer(
    client: RegistryClient,
    repository: Repository,
    layer: SignatureLayer,
    keys: Sequence[PublicKey],
    digest: str,
    required_annotations: Mapping[str, str],
    known_payloads: Mapping[str, bytes],
) -> SignatureCheck:
    if layer.media_type != SIMPLE_SIGNING_MEDIA_TYPE:
        return SignatureCheck(layer, reason=f"layer {layer.digest} is not a signature")
    payload = known_payloads.get(layer.digest)
    if payload is None:
        payload = await fetch_payload(client, repository, layer)
    return check_signature(layer, payload, keys, digest, required_annotations)


async def verify_images(
    client: RegistryClient,
    references: Sequence[ImageReference],
    keys: Sequence[PublicKey],
    required_annotations: Mapping[str, str] | None = None,
    concurrency: int = IMAGE_CONCURRENCY,
    formats: Collection[str] = SIGNATURE_FORMATS,
) -> list[ImageVerification]:
    """Verify many images concurrently over the client's one connection pool."""
    limit = asyncio.Semaphore(concurrency)

    async def one(reference: ImageReference) -> ImageVerification:
        async with limit:
            return await verify_image(
                client, reference, keys, required_annotations, formats=formats
            )

    return list(await asyncio.gather(*(one(r) for r in references)))
