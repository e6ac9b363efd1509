"""Signing images in either format: the classic signature image appended in the registry, or a
cosign 3 bundle referring to the image."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from signgate.errors import Error, RegistryError
from signgate.keys.model import Signer
from signgate.reference import ImageReference, Repository
from signgate.registry import IMAGE_CONCURRENCY, INDEX_MEDIA_TYPES, RegistryClient
from signgate.signatures.formats import DEFAULT_SIGN_FORMAT, SignatureFormat
from signgate.signatures.layout import SignatureLayer
from signgate.signatures.payload import build_payload
from signgate.signatures.referrers import sign_digest_bundle
from signgate.signatures.store import (
    read_signature_image,
    signature_repository,
    write_signature_image,
)
from signgate.signatures.verify import check_signature

# A concurrent signer can replace the signature image between our read and our write; we read
# back and append again, a bounded number of times.
_WRITE_ATTEMPTS = 5


@dataclass(frozen=True)
class SignedDigest:
    """One digest signed (or found already signed) and where its signature is: the classic
    signature image's tag, or the bundle manifest's ``repository@digest``."""

    reference: ImageReference
    digest: str
    signature_location: str
    already_signed: bool


async def digests_to_sign(
    client: RegistryClient, reference: ImageReference, recursive: bool
) -> list[str]:
    """The image's digest, then, with ``recursive``, every child of a multi-platform index."""
    manifest = await client.get_manifest(reference.repository, reference.identifier)
    digests = [manifest.digest]
    if recursive and manifest.media_type in INDEX_MEDIA_TYPES:
        for child in manifest.json().get("manifests", []):
            if isinstance(child, dict) and isinstance(child.get("digest"), str):
                digests.append(child["digest"])
    return digests


async def sign_digest(
    client: RegistryClient,
    signer: Signer,
    reference: ImageReference,
    digest: str,
    annotations: Mapping[str, str] | None = None,
    signature_repo: Repository | None = None,
) -> SignedDigest:
    """Sign ``reference.repository@digest`` and append the signature to its signature image."""
    repository = signature_repo or signature_repository(reference.repository)
    payload = build_payload(str(reference.repository), digest, annotations)
    public_key = signer.public_key()
    signature = await asyncio.to_thread(signer.sign, payload)
    new_layer = SignatureLayer.for_signature(payload, signature)
    for _ in range(_WRITE_ATTEMPTS):
        image = await read_signature_image(client, repository, digest)
        layers = list(image.layers) if image else []
        for layer in layers:
            # Same digest, same bytes: the stored payload is ours, no need to fetch it.
            if layer.digest != new_layer.digest:
                continue
            if check_signature(layer, payload, [public_key], digest, annotations or {}).verified:
                location = image.location if image else ""
                return SignedDigest(reference, digest, location, already_signed=True)
        await write_signature_image(
            client, repository, digest, [*layers, new_layer], {new_layer.digest: payload}
        )
        written = await read_signature_image(client, repository, digest)
        if written is not None and new_layer in written.layers:
            return SignedDigest(reference, digest, written.location, already_signed=False)
    raise RegistryError(
        f"{repository}: signature for {digest} was overwritten by concurrent writers "
        f"{_WRITE_ATTEMPTS} times; try again"
    )


async def sign_digest_as_bundle(
    client: RegistryClient,
    signer: Signer,
    reference: ImageReference,
    digest: str,
    annotations: Mapping[str, str] | None = None,
) -> SignedDigest:
    """Sign ``reference.repository@digest`` in cosign 3's bundle format."""
    repository = signature_repository(reference.repository)
    bundle = await sign_digest_bundle(
        client, signer, reference.repository, digest, annotations, repository
    )
    location = f"{repository}@{bundle.manifest_digest}"
    return SignedDigest(reference, digest, location, bundle.already_signed)


async def sign_image(
    client: RegistryClient,
    signer: Signer,
    reference: ImageReference,
    annotations: Mapping[str, str] | None = None,
    recursive: bool = False,
    signature_format: SignatureFormat = DEFAULT_SIGN_FORMAT,
) -> list[SignedDigest]:
    """Sign the digest ``reference`` resolves to (and, recursively, an index's children) in
    ``signature_format`` (a cosign 3 bundle by default, as ``signgate sign`` and cosign 3)."""
    digests = await digests_to_sign(client, reference, recursive)
    sign_one = (
        sign_digest_as_bundle if signature_format == SignatureFormat.BUNDLE else sign_digest
    )
    return list(
        await asyncio.gather(
            *(sign_one(client, signer, reference, digest, annotations) for digest in digests)
        )
    )


@dataclass(frozen=True)
class SignOutcome:
    """What signing one image given on the command line did: digests signed, or why not."""

    reference: ImageReference
    signed: tuple[SignedDigest, ...] = ()
    error: str | None = None


async def sign_images(
    client: RegistryClient,
    signer: Signer,
    references: Sequence[ImageReference],
    annotations: Mapping[str, str] | None = None,
    recursive: bool = False,
    concurrency: int = IMAGE_CONCURRENCY,
    signature_format: SignatureFormat = DEFAULT_SIGN_FORMAT,
) -> list[SignOutcome]:
    """Sign many images concurrently over the client's one connection pool, in
    ``signature_format`` (a cosign 3 bundle by default).

    One image's failure does not stop the others: each outcome says what happened to it.
    """
    limit = asyncio.Semaphore(concurrency)

    async def one(reference: ImageReference) -> SignOutcome:
        async with limit:
            try:
                signed = await sign_image(
                    client, signer, reference, annotations, recursive, signature_format
                )
            except Error as e:
                return SignOutcome(reference, error=e.diagnostics())
            return SignOutcome(reference, tuple(signed))

    return list(await asyncio.gather(*(one(r) for r in references)))
