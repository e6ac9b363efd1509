"""Demo images pushed to a real registry read back byte for byte; the real oras CLI reads them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from signgate.errors import UsageError
from signgate.registry.client import RegistryClient
from signgate.registry.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    LAYER_FILE_NAME,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    build_image,
    build_index,
    layer_tar,
    push_image,
    push_index,
)
from signgate.registry.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from tests.integration.registry_servers import RunningRegistry
from tests.integration.tools import tool_path

pytestmark = pytest.mark.integration

CONTENT = b"hello from signgate\n"
PLATFORMS = [("linux", "amd64"), ("linux", "arm64"), ("linux", "arm/v7")]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_in_layer(layer: bytes) -> tuple[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        (member,) = tar.getmembers()
        extracted = tar.extractfile(member)
        assert extracted is not None
        return member.name, extracted.read()


@pytest.fixture(scope="session")
def oras_binary() -> Path:
    return tool_path("oras")


@pytest.fixture
async def client(registry: RunningRegistry) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(registry.options()) as registry_client:
        yield registry_client


# --- pure: what gets built -------------------------------------------------------------------


def test_image_bytes_depend_on_content_and_platform_only() -> None:
    first = build_image(CONTENT, ("linux", "amd64"))
    assert build_image(CONTENT, ("linux", "amd64")) == first
    assert build_image(CONTENT, ("linux", "arm64")).digest != first.digest
    assert build_image(b"other", ("linux", "amd64")).layer != first.layer
    # gzip header bytes 4..8 are the mtime: zero means no timestamp
    assert first.layer[4:8] == b"\0\0\0\0"


def test_layer_holds_one_file_with_the_content() -> None:
    assert file_in_layer(build_image(CONTENT).layer) == (LAYER_FILE_NAME, CONTENT)


@pytest.mark.parametrize(
    ("media_type", "config_media_type", "layer_media_type"),
    [
        (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP),
        (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP),
    ],
)
def test_manifest_describes_config_and_layer(
    media_type: str, config_media_type: str, layer_media_type: str
) -> None:
    image = build_image(CONTENT, ("linux", "arm/v7"), media_type)
    manifest = json.loads(image.manifest)
    assert manifest == {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": config_media_type,
            "digest": sha256_digest(image.config),
            "size": len(image.config),
        },
        "layers": [
            {
                "mediaType": layer_media_type,
                "digest": sha256_digest(image.layer),
                "size": len(image.layer),
            }
        ],
    }
    assert json.loads(image.config) == {
        "architecture": "arm",
        "variant": "v7",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer_tar(CONTENT))]},
    }


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: build_image(CONTENT, media_type=OCI_INDEX), "cannot build an image manifest"),
        (lambda: build_image(CONTENT, ("linux", "")), "needs an OS and an architecture"),
        (lambda: build_index([], OCI_MANIFEST), "cannot build an index"),
        (
            lambda: build_index([build_image(CONTENT)], DOCKER_MANIFEST_LIST),
            "cannot hold application/vnd.oci.image.manifest.v1+json",
        ),
    ],
)
def test_refuses_what_it_cannot_build(call: Any, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        call()


# --- against a real registry -----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
async def test_pushed_image_reads_back(
    registry: RunningRegistry, client: RegistryClient, media_type: str
) -> None:
    repo = registry.repository("images-test/image")
    digest = await push_image(
        client, repo, "v1", content=CONTENT, platform=("linux", "arm64"), media_type=media_type
    )

    expected = build_image(CONTENT, ("linux", "arm64"), media_type)
    assert digest == expected.digest
    fetched = await client.get_manifest(repo, "v1")
    assert (fetched.raw, fetched.digest, fetched.media_type) == (
        expected.manifest,
        digest,
        media_type,
    )
    assert await client.head_manifest(repo, "v1") == digest

    (layer_descriptor,) = fetched.json()["layers"]
    layer = await client.get_blob(repo, layer_descriptor["digest"])
    assert file_in_layer(layer) == (LAYER_FILE_NAME, CONTENT)
    config = json.loads(await client.get_blob(repo, fetched.json()["config"]["digest"]))
    assert (config["os"], config["architecture"]) == ("linux", "arm64")
    assert config["rootfs"]["diff_ids"] == [sha256_digest(gzip.decompress(layer))]


@pytest.mark.anyio
async def test_image_pushed_without_tag_is_reachable_by_digest(
    registry: RunningRegistry, client: RegistryClient
) -> None:
    repo = registry.repository("images-test/untagged")
    digest = await push_image(client, repo, None, content=b"no tag")

    assert (await client.get_manifest(repo, digest)).raw == build_image(b"no tag").manifest
    assert await client.head_manifest(repo, "latest") is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("media_type", "child_media_type"),
    [(OCI_INDEX, OCI_MANIFEST), (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)],
)
async def test_pushed_index_lists_one_image_per_platform(
    registry: RunningRegistry, client: RegistryClient, media_type: str, child_media_type: str
) -> None:
    repo = registry.repository("images-test/multi")
    index_digest, child_digests = await push_index(
        client, repo, "multi", content=CONTENT, platforms=PLATFORMS, media_type=media_type
    )

    index = await client.get_manifest(repo, "multi")
    assert (index.digest, index.media_type) == (index_digest, media_type)
    manifests = index.json()["manifests"]
    assert [m["digest"] for m in manifests] == child_digests
    assert len(set(child_digests)) == len(PLATFORMS)
    assert [m["mediaType"] for m in manifests] == [child_media_type] * len(PLATFORMS)
    assert [m["platform"] for m in manifests] == [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64"},
        {"os": "linux", "architecture": "arm", "variant": "v7"},
    ]
    for descriptor in manifests:
        child = await client.get_manifest(repo, descriptor["digest"])
        assert (child.media_type, len(child.raw)) == (child_media_type, descriptor["size"])
        config_digest = child.json()["config"]["digest"]
        config = json.loads(await client.get_blob(repo, config_digest))
        assert config["architecture"] == descriptor["platform"]["architecture"]


@pytest.mark.anyio
async def test_oras_reads_the_pushed_index_and_image(
    registry: RunningRegistry, client: RegistryClient, oras_binary: Path
) -> None:
    repo = registry.repository("images-test/oras")
    index_digest, (amd64_digest, *_) = await push_index(
        client, repo, "v2", content=CONTENT, platforms=PLATFORMS
    )

    index_raw = subprocess.run(
        [oras_binary, "manifest", "fetch", "--plain-http", f"{repo}:v2"],
        capture_output=True,
        check=True,
    ).stdout
    assert sha256_digest(index_raw) == index_digest

    image_raw = subprocess.run(
        [
            oras_binary,
            "manifest",
            "fetch",
            "--plain-http",
            "--platform",
            "linux/amd64",
            f"{repo}:v2",
        ],
        capture_output=True,
        check=True,
    ).stdout
    assert sha256_digest(image_raw) == amd64_digest
