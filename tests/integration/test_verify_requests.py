"""How many requests verification makes: the payload blob is fetched only when it must be."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signgate.keys import PrivateKeySigner
from signgate.reference import ImageReference
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image
from signgate.signatures.formats import SignatureFormat
from signgate.signatures.sign import sign_image
from signgate.signatures.verify import verify_image
from tests.integration.registry_servers import RunningRegistry

pytestmark = pytest.mark.integration


class CountingTransport(httpx.AsyncBaseTransport):
    """The real transport, counting requests by kind (manifests, blobs)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.kinds: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.split("/")
        kind = next((p for p in ("manifests", "blobs") if p in parts), "other")
        self.kinds[f"{request.method} {kind}"] += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize(
    ("signed_with", "required", "blob_gets"),
    [
        ({}, {}, 0),  # the payload signgate and cosign write: predicted, not fetched
        ({"env": "prod"}, {"env": "prod"}, 0),  # exactly the required annotations: predicted
        ({"env": "prod", "team": "a"}, {"env": "prod"}, 1),  # more than required: fetched
    ],
)
def test_payload_blob_is_fetched_only_when_it_cannot_be_predicted(
    registry: RunningRegistry,
    tmp_path: Path,
    signed_with: dict[str, str],
    required: dict[str, str],
    blob_gets: int,
) -> None:
    signer = PrivateKeySigner(ec.generate_private_key(ec.SECP256R1()))
    reference = ImageReference.parse(f"{registry.host}/requests/{tmp_path.name.lower()}:v1")

    async def run() -> None:
        async with RegistryClient(RegistryOptions()) as client:
            await push_image(client, reference.repository, reference.tag, content=b"x")
            await sign_image(
                client, signer, reference, signed_with, signature_format=SignatureFormat.CLASSIC
            )
        transport = CountingTransport()
        async with RegistryClient(RegistryOptions(transport=transport)) as client:
            result = await verify_image(client, reference, [signer.public_key()], required)
        assert result.ok, result.reason()
        assert result.verified[0].payload is not None
        assert dict(result.verified[0].payload.annotations) == signed_with
        assert transport.kinds["GET blobs"] == blob_gets
        assert transport.kinds["GET manifests"] == 2  # the image, then its signature image

    anyio.run(run)
