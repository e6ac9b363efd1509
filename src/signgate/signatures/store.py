"""Reading and writing classic signature images in a registry (thin I/O over layout.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from signgate.errors import InvalidReference, NotFound, VerificationError
from signgate.reference import Repository, signature_tag
from signgate.registry import Manifest, RegistryClient
from signgate.registry.mediatypes import OCI_MANIFEST
from signgate.signatures.layout import (
    SignatureLayer,
    config_blob,
    manifest_bytes,
    parse_layers,
)

MAX_PAYLOAD_BYTES = 1 << 20  # payloads are a few hundred bytes; refuse anything huge


def signature_repository(image: Repository, override: str | None = None) -> Repository:
    """Where ``image``'s signatures live: beside it, or in ``COSIGN_REPOSITORY`` when set."""
    text = override if override is not None else os.environ.get("COSIGN_REPOSITORY")
    if not text:
        return image
    try:
        return Repository.parse(text)
    except InvalidReference as e:
        raise InvalidReference(f"COSIGN_REPOSITORY: {e.diagnostics()}") from e


@dataclass(frozen=True)
class SignatureImage:
    """A stored ``sha256-HEX.sig`` image: where it is, its manifest, and its layers."""

    repository: Repository
    tag: str
    manifest: Manifest
    layers: tuple[SignatureLayer, ...]

    @property
    def location(self) -> str:
        return f"{self.repository}:{self.tag}"


async def read_signature_image(
    client: RegistryClient, repository: Repository, digest: str
) -> SignatureImage | None:
    """The signature image for ``digest``, or None when the image has no signatures."""
    tag = signature_tag(digest)
    try:
        manifest = await client.get_manifest(repository, tag)
    except NotFound:
        return None
    try:
        document = manifest.json()
    except ValueError as e:
        raise VerificationError(f"{repository}:{tag} is not a valid manifest") from e
    return SignatureImage(repository, tag, manifest, tuple(parse_layers(document)))


async def fetch_payload(
    client: RegistryClient, repository: Repository, layer: SignatureLayer
) -> bytes:
    """The payload blob of ``layer``, checked against its digest by the client."""
    if layer.size > MAX_PAYLOAD_BYTES:
        raise VerificationError(f"signature layer {layer.digest} is too large ({layer.size} bytes)")
    return await client.get_blob(repository, layer.digest, max_bytes=MAX_PAYLOAD_BYTES)


async def write_signature_image(
    client: RegistryClient,
    repository: Repository,
    digest: str,
    layers: Sequence[SignatureLayer],
    new_payloads: Mapping[str, bytes],
) -> str:
    """Push the blobs in ``new_payloads`` and a manifest holding ``layers``; its digest."""
    for payload in new_payloads.values():
        await client.push_blob(repository, payload)
    config = config_blob(layers)
    await client.push_blob(repository, config)
    raw = manifest_bytes(layers, config)
    return await client.put_manifest(repository, signature_tag(digest), raw, OCI_MANIFEST)

