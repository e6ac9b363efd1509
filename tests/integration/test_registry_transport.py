"""The registry client's own HTTP transport against the real docker-registry.

Edge cases of the transport are in tests/unit/test_transport.py; here: many images at once over
one pool, a plain-HTTP registry named insecure, and what `signgate verify` imports.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from signgate.reference import ImageReference, Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image
from tests.integration.registry_servers import RunningRegistry
from tests.integration.tools import SIGNGATE, run, signgate, tool_env

pytestmark = pytest.mark.integration

HEAVY_MODULES = {"httpcore", "anyio", "h11"}


@pytest.mark.anyio
async def test_many_images_at_once_over_one_pool(registry: RunningRegistry) -> None:
    repository = registry.repository("transport/many")
    async with RegistryClient(RegistryOptions()) as client:
        pushed = await asyncio.gather(
            *(push_image(client, repository, f"v{i}", content=b"%d" % i) for i in range(40))
        )
    async with RegistryClient(RegistryOptions(max_retries=0)) as client:
        for _ in range(2):  # the second round on kept-alive connections
            heads = asyncio.gather(*(client.head_manifest(repository, f"v{i}") for i in range(40)))
            gets = asyncio.gather(*(client.get_manifest(repository, d) for d in pushed))
            resolved, manifests = await asyncio.gather(heads, gets)
            assert resolved == pushed
            assert [m.digest for m in manifests] == pushed


@pytest.mark.anyio
async def test_plain_http_registry_named_insecure(registry: RunningRegistry) -> None:
    """Tried over TLS without verification first, as docker does; the registry's plain-HTTP
    answer to the TLS handshake sends the client to http://."""
    repository = Repository(registry.host, "transport/insecure")
    options = RegistryOptions(insecure_registries=[registry.host])
    async with RegistryClient(options) as client:
        digest = await push_image(client, repository, "v1", content=b"insecure")
        assert await client.head_manifest(repository, "v1") == digest


def imported_modules(importtime_report: str) -> set[str]:
    """Top-level package names from ``python -X importtime``'s report."""
    names = set()
    for line in importtime_report.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


async def push(reference: ImageReference) -> str:
    async with RegistryClient(RegistryOptions()) as client:
        return await push_image(client, reference.repository, reference.tag, content=b"imports")


def test_verify_imports_no_httpcore_anyio_or_h11(registry: RunningRegistry, tmp_path: Path) -> None:
    """Start-up is most of a one-image verify; these would add about 26 ms of imports."""
    env = tool_env(tmp_path, COSIGN_PASSWORD="imports")
    image = f"{registry.host}/transport/{tmp_path.name.lower()}:v1"
    digest = asyncio.run(push(ImageReference.parse(image)))
    signgate("generate-key-pair", env=env, cwd=tmp_path)
    signgate("sign", "--key", "cosign.key", image, env=env, cwd=tmp_path)

    verify = [str(SIGNGATE), "verify", "--key", "cosign.pub", image]
    verified = run([sys.executable, "-X", "importtime", *verify], env, cwd=tmp_path)

    assert digest.removeprefix("sha256:") in verified.stdout  # either signature format
    modules = imported_modules(verified.stderr)
    assert {"signgate", "httpx", "httptools"} <= modules  # the report lists what was loaded
    assert not modules & HEAVY_MODULES, sorted(modules & HEAVY_MODULES)
