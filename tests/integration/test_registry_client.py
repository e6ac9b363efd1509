"""The registry client against real docker-registry processes (distribution 2.8).

Where a registry cannot be made to misbehave on demand (tampering, 429), a transport wrapping
the real one alters what the real registry said.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from signgate.errors import (
    DigestMismatch,
    NotFound,
    RateLimited,
    RegistryError,
    TLSFailure,
    Unauthorized,
    Unreachable,
    UsageError,
)
from signgate.reference import Repository
from signgate.registry.client import Manifest, RegistryClient, RegistryOptions
from signgate.registry.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from tests.integration.conftest import TEST_PASSWORD, TEST_USERNAME
from tests.integration.registry_servers import RunningRegistry, free_port
from tests.integration.token_server import TokenServer

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

CONFIG_MEDIA_TYPES = {
    OCI_MANIFEST: "application/vnd.oci.image.config.v1+json",
    DOCKER_MANIFEST: "application/vnd.docker.container.image.v1+json",
}
LAYER_MEDIA_TYPES = {
    OCI_MANIFEST: "application/vnd.oci.image.layer.v1.tar",
    DOCKER_MANIFEST: "application/vnd.docker.image.rootfs.diff.tar.gzip",
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


def image_manifest(config: bytes, layers: list[bytes], media_type: str = OCI_MANIFEST) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPES[media_type],
            "digest": sha256(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": LAYER_MEDIA_TYPES[media_type],
                "digest": sha256(layer),
                "size": len(layer),
            }
            for layer in layers
        ],
    }
    return json.dumps(document, indent=1).encode()


async def push_image(
    client: RegistryClient,
    repo: Repository,
    tag: str,
    media_type: str = OCI_MANIFEST,
    content: bytes = b"layer",
) -> tuple[str, bytes]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
    await client.push_blob(repo, config)
    await client.push_blob(repo, content)
    manifest = image_manifest(config, [content], media_type)
    return await client.put_manifest(repo, tag, manifest, media_type), manifest


class Middleware(httpx.AsyncBaseTransport):
    """The real network, with ``handle`` free to look at, answer or alter each exchange."""

    def __init__(
        self,
        handle: Callable[
            [httpx.Request, Callable[[httpx.Request], Awaitable[httpx.Response]]],
            Awaitable[httpx.Response],
        ],
    ) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.handle = handle
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.handle(request, self.inner.handle_async_request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def replace_body(response: httpx.Response, body: bytes) -> httpx.Response:
    await response.aread()
    await response.aclose()
    headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-length", "content-encoding", "transfer-encoding")
    ]
    return httpx.Response(response.status_code, headers=headers, content=body)


def recording() -> Middleware:
    async def passthrough(
        request: httpx.Request, send: Callable[[httpx.Request], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        return await send(request)

    return Middleware(passthrough)


# --- blobs, manifests, indexes --------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 7])
async def test_blob_upload_reads_back(registry: RunningRegistry, chunk_size: int | None) -> None:
    repo = registry.repository(unique("blobs"))
    data = b"0123456789abcdefghijklmnopqrstuvwxyz" * 3
    transport = recording()
    async with RegistryClient(registry.options(transport=transport)) as client:
        digest = await client.push_blob(repo, data, chunk_size=chunk_size)
        assert digest == sha256(data)
        assert await client.blob_exists(repo, digest)
        assert await client.get_blob(repo, digest) == data
        # Present already: no second upload.
        uploads_before = sum(r.method == "POST" for r in transport.requests)
        assert await client.push_blob(repo, data, chunk_size=chunk_size) == digest
        assert sum(r.method == "POST" for r in transport.requests) == uploads_before

    patches = [r for r in transport.requests if r.method == "PATCH"]
    if chunk_size is None:
        assert patches == []
    else:
        assert [r.headers["content-range"] for r in patches] == [
            f"{start}-{min(start + chunk_size, len(data)) - 1}"
            for start in range(0, len(data), chunk_size)
        ]
    (final,) = [r for r in transport.requests if r.method == "PUT"]
    assert final.url.params["digest"] == digest
    assert final.url.params.get("_state"), "the upload state the registry handed out is kept"


async def test_blob_larger_than_the_bound_is_refused(registry: RunningRegistry) -> None:
    repo = registry.repository(unique("big"))
    async with RegistryClient(registry.options()) as client:
        digest = await client.push_blob(repo, b"x" * 100)
        with pytest.raises(RegistryError, match=r"blob is larger than 99 bytes"):
            await client.get_blob(repo, digest, max_bytes=99)
        assert await client.get_blob(repo, digest, max_bytes=100) == b"x" * 100


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
async def test_manifest_by_tag_and_by_digest(registry: RunningRegistry, media_type: str) -> None:
    repo = registry.repository(unique("app"))
    async with RegistryClient(registry.options()) as client:
        digest, raw = await push_image(client, repo, "v1", media_type)
        assert digest == sha256(raw)

        by_tag = await client.get_manifest(repo, "v1")
        by_digest = await client.get_manifest(repo, digest)
        assert by_tag == by_digest == Manifest(media_type, digest, raw)
        assert await client.head_manifest(repo, "v1") == digest
        assert await client.head_manifest(repo, digest) == digest
        assert await client.head_manifest(repo, "absent") is None


@pytest.mark.parametrize(
    ("index_type", "child_type"),
    [(OCI_INDEX, OCI_MANIFEST), (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)],
)
async def test_index_round_trip(
    registry: RunningRegistry, index_type: str, child_type: str
) -> None:
    repo = registry.repository(unique("multi"))
    async with RegistryClient(registry.options()) as client:
        children = []
        for arch in ("amd64", "arm64"):
            digest, raw = await push_image(client, repo, arch, child_type, content=arch.encode())
            children.append(
                {
                    "mediaType": child_type,
                    "digest": digest,
                    "size": len(raw),
                    "platform": {"architecture": arch, "os": "linux"},
                }
            )
        index = json.dumps(
            {"schemaVersion": 2, "mediaType": index_type, "manifests": children}
        ).encode()
        digest = await client.put_manifest(repo, "multi", index, index_type)

        fetched = await client.get_manifest(repo, "multi")
        assert fetched == Manifest(index_type, digest, index)
        assert [m["digest"] for m in fetched.json()["manifests"]] == [c["digest"] for c in children]


async def test_mount_across_repositories(registry: RunningRegistry) -> None:
    source = registry.repository(unique("source"))
    target = registry.repository(unique("target"))
    data = b"shared layer"
    transport = recording()
    async with RegistryClient(registry.options(transport=transport)) as client:
        digest = await client.push_blob(source, data)
        transport.requests.clear()
        assert await client.push_blob(target, data, mount_from=source) == digest
        assert await client.get_blob(target, digest) == data

    posts = [r for r in transport.requests if r.method == "POST"]
    assert [(p.url.params["mount"], p.url.params["from"]) for p in posts] == [(digest, source.path)]
    assert not [r for r in transport.requests if r.method in ("PATCH", "PUT")], "mounted"


async def test_mount_from_a_repository_without_the_blob_falls_back_to_upload(
    registry: RunningRegistry,
) -> None:
    source = registry.repository(unique("empty-source"))
    target = registry.repository(unique("target"))
    data = b"not in the source"
    async with RegistryClient(registry.options()) as client:
        digest = await client.push_blob(target, data, mount_from=source)
        assert await client.get_blob(target, digest) == data


# --- listings ---------------------------------------------------------------------------------


async def test_list_tags_with_page_size(registry: RunningRegistry) -> None:
    repo = registry.repository(unique("tags"))
    tags = ["a", "b", "c", "d", "e"]
    async with RegistryClient(registry.options()) as client:
        for tag in tags:
            await push_image(client, repo, tag)
        # distribution 2.8 ignores n for tags and sends them all at once: the result is
        # the same either way. Link pagination of tags is covered with a transport below.
        assert sorted(await client.list_tags(repo, page_size=2)) == tags
        assert sorted(await client.list_tags(repo)) == tags
        absent = registry.repository(unique("never-pushed"))
        with pytest.raises(NotFound) as raised:
            await client.list_tags(absent)
        assert raised.value.diagnostics() == f"{absent}: repository name not known to registry"


async def test_catalog_follows_link_pagination(registry: RunningRegistry) -> None:
    prefix = unique("catalog")
    repos = [registry.repository(f"{prefix}/r{i}") for i in range(5)]
    transport = recording()
    async with RegistryClient(registry.options(transport=transport)) as client:
        for repo in repos:
            await push_image(client, repo, "v1")
        transport.requests.clear()
        listed = await client.catalog(registry.host, page_size=2)

    assert [r.path for r in repos] == [p for p in listed if p.startswith(prefix)]
    pages = [r for r in transport.requests if r.url.path == "/v2/_catalog"]
    assert len(pages) == -(-len(listed) // 2)
    assert all(p.url.params["n"] == "2" for p in pages)
    assert all(p.url.params.get("last") for p in pages[1:])


async def test_tag_pages_are_followed(registry: RunningRegistry) -> None:
    """A registry that paginates tags (distribution 3 does): Link headers are followed."""
    repo = registry.repository(unique("paged-tags"))

    async def paginate(
        request: httpx.Request, send: Callable[[httpx.Request], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        if not request.url.path.endswith("/tags/list"):
            return await send(request)
        last = request.url.params.get("last")
        pages = {None: (["a", "b"], "b"), "b": (["c", "d"], "d"), "d": (["e"], None)}
        tags, next_last = pages[last]
        headers = {}
        if next_last:
            headers["Link"] = f'</v2/{repo.path}/tags/list?last={next_last}&n=2>; rel="next"'
        return httpx.Response(200, headers=headers, json={"name": repo.path, "tags": tags})

    async with RegistryClient(registry.options(transport=Middleware(paginate))) as client:
        assert await client.list_tags(repo, page_size=2) == ["a", "b", "c", "d", "e"]


# --- delete --------------------------------------------------------------------------------


async def test_delete_by_digest_then_not_found(registry: RunningRegistry) -> None:
    repo = registry.repository(unique("delete"))
    async with RegistryClient(registry.options()) as client:
        digest, _ = await push_image(client, repo, "v1")
        with pytest.raises(UsageError, match="not a sha256 or sha512 digest"):
            await client.delete_manifest(repo, "v1")

        await client.delete_manifest(repo, digest)

        assert await client.head_manifest(repo, digest) is None
        assert await client.head_manifest(repo, "v1") is None
        with pytest.raises(NotFound) as raised:
            await client.get_manifest(repo, digest)
        assert raised.value.diagnostics() == f"{repo}@{digest}: manifest unknown"
        with pytest.raises(NotFound) as raised:
            await client.get_manifest(repo, "v1")
        assert raised.value.diagnostics() == f"{repo}:v1: manifest unknown"
        with pytest.raises(NotFound):
            await client.delete_manifest(repo, digest)


# --- TLS -----------------------------------------------------------------------------------


async def test_tls_registry_with_its_ca(tls_registry: RunningRegistry) -> None:
    repo = tls_registry.repository(unique("tls"))
    assert tls_registry.ca_file is not None
    assert tls_registry.url.startswith("https://")
    async with RegistryClient(tls_registry.options()) as client:
        digest, _ = await push_image(client, repo, "v1")
        assert (await client.get_manifest(repo, "v1")).digest == digest


async def test_tls_registry_without_its_ca_is_refused(tls_registry: RunningRegistry) -> None:
    repo = tls_registry.repository(unique("tls"))
    async with RegistryClient(tls_registry.options(ca_bundle=None)) as client:
        with pytest.raises(TLSFailure) as raised:
            await client.get_manifest(repo, "v1")
    message = raised.value.diagnostics()
    assert message.startswith(f"TLS certificate of registry {tls_registry.host} could not be")
    assert message.endswith("pass --allow-insecure-registry only if you trust the network")
    assert "\n" not in str(raised.value)


async def test_tls_registry_named_insecure_is_reached_without_verification(
    tls_registry: RunningRegistry,
) -> None:
    repo = tls_registry.repository(unique("tls-insecure"))
    options = tls_registry.options(ca_bundle=None, insecure_registries=[tls_registry.host])
    async with RegistryClient(options) as client:
        digest, _ = await push_image(client, repo, "v1")
        assert await client.head_manifest(repo, "v1") == digest


async def test_plain_http_registry_not_on_loopback_needs_naming_insecure(
    registry: RunningRegistry,
) -> None:
    """The same plain-HTTP registry reached by a non-loopback name: HTTPS only, refused."""
    port = registry.host.rsplit(":", 1)[1]

    async def resolve(
        request: httpx.Request, send: Callable[[httpx.Request], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        url = request.url.copy_with(host="127.0.0.1")
        return await send(httpx.Request(request.method, url, headers=request.headers))

    host = f"registry.test:{port}"
    repo = Repository(host, unique("remote"))
    async with RegistryClient(RegistryOptions(transport=Middleware(resolve))) as client:
        with pytest.raises(TLSFailure, match=re.escape(f"TLS handshake with registry {host}")):
            await client.get_manifest(repo, "v1")
    options = RegistryOptions(transport=Middleware(resolve), insecure_registries=[host])
    async with RegistryClient(options) as client:
        with pytest.raises(NotFound):
            await client.get_manifest(repo, "v1")


# --- auth ---------------------------------------------------------------------------------


async def test_basic_auth_with_the_right_credentials(basic_auth_registry: RunningRegistry) -> None:
    repo = basic_auth_registry.repository(unique("basic"))
    async with RegistryClient(basic_auth_registry.options()) as client:
        digest, _ = await push_image(client, repo, "v1")
        assert (await client.get_manifest(repo, "v1")).digest == digest
        assert repo.path in await client.catalog(basic_auth_registry.host)


async def test_basic_auth_with_wrong_credentials(basic_auth_registry: RunningRegistry) -> None:
    repo = basic_auth_registry.repository(unique("basic"))
    options = basic_auth_registry.options(password="wrong password")
    async with RegistryClient(options) as client:
        with pytest.raises(Unauthorized) as raised:
            await client.get_manifest(repo, "v1")
    message = raised.value.diagnostics()
    assert message.startswith(f"{repo}:v1: unauthorized: authentication required")
    assert "refused the credentials" in message
    assert "wrong password" not in message


async def test_basic_auth_without_credentials(
    basic_auth_registry: RunningRegistry, tmp_path: Path
) -> None:
    repo = basic_auth_registry.repository(unique("basic"))
    options = basic_auth_registry.options(username=None, password=None, docker_config_dir=tmp_path)
    async with RegistryClient(options) as client:
        with pytest.raises(Unauthorized, match="no credentials for this registry"):
            await client.get_manifest(repo, "v1")


async def test_token_auth_with_credentials(
    token_registry: RunningRegistry, token_server: TokenServer
) -> None:
    repo = token_registry.repository(unique("token"))
    async with RegistryClient(token_registry.options()) as client:
        asked_before = len(token_server.requests)
        digest, _ = await push_image(client, repo, "v1")
        for _ in range(3):
            assert (await client.get_manifest(repo, "v1")).digest == digest
        await client.delete_manifest(repo, digest)
        assert await client.head_manifest(repo, digest) is None
    asked = token_server.requests[asked_before:]
    assert all(r.username == TEST_USERNAME and r.granted for r in asked)
    # One token per distinct scope set; reused while it lasts.
    assert [r.scopes for r in asked] == [
        (f"repository:{repo.path}:pull",),
        (f"repository:{repo.path}:pull,push",),
        (f"repository:{repo.path}:delete",),
    ]


async def test_token_auth_from_docker_config(
    token_registry: RunningRegistry, token_server: TokenServer, tmp_path: Path
) -> None:
    auth = base64.b64encode(f"{TEST_USERNAME}:{TEST_PASSWORD}".encode()).decode()
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {token_registry.host: {"auth": auth}}})
    )
    repo = token_registry.repository(unique("docker-config"))
    options = token_registry.options(username=None, password=None, docker_config_dir=tmp_path)
    async with RegistryClient(options) as client:
        digest, _ = await push_image(client, repo, "v1")
        assert await client.head_manifest(repo, "v1") == digest


async def test_token_auth_with_an_identity_token_from_docker_config(
    token_registry: RunningRegistry, token_server: TokenServer, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {token_registry.host: {"identitytoken": "signgate-identity-token"}}})
    )
    repo = token_registry.repository(unique("identity-token"))
    options = token_registry.options(username=None, password=None, docker_config_dir=tmp_path)
    async with RegistryClient(options) as client:
        asked_before = len(token_server.requests)
        digest, _ = await push_image(client, repo, "v1")
        assert await client.head_manifest(repo, "v1") == digest
    methods = {r.method for r in token_server.requests[asked_before:]}
    assert methods == {"POST"}


async def test_token_auth_with_wrong_credentials(token_registry: RunningRegistry) -> None:
    repo = token_registry.repository(unique("token"))
    async with RegistryClient(token_registry.options(password="not the password")) as client:
        with pytest.raises(Unauthorized) as raised:
            await client.get_manifest(repo, "v1")
    message = raised.value.diagnostics()
    assert message == (
        f"registry {token_registry.host}: the auth server refused the credentials "
        "(unauthorized: invalid username or password)"
    )


async def test_token_auth_without_credentials(
    token_registry: RunningRegistry, tmp_path: Path
) -> None:
    repo = token_registry.repository(unique("token"))
    options = token_registry.options(username=None, password=None, docker_config_dir=tmp_path)
    async with RegistryClient(options) as client:
        with pytest.raises(Unauthorized) as raised:
            await client.get_manifest(repo, "v1")
    message = raised.value.diagnostics()
    assert message.startswith(f"{repo}:v1: unauthorized: authentication required")
    assert "no credentials for this registry" in message


# --- failures ------------------------------------------------------------------------------


async def test_unreachable_registry() -> None:
    host = f"127.0.0.1:{free_port()}"
    async with RegistryClient(RegistryOptions()) as client:
        with pytest.raises(Unreachable) as raised:
            await client.get_manifest(Repository(host, "demo"), "v1")
    assert raised.value.diagnostics() == f"cannot connect to registry {host}: connection refused"


def tamper_manifests(
    alter: Callable[[bytes], bytes], *, keep_digest_header: bool = True
) -> Middleware:
    async def handle(
        request: httpx.Request, send: Callable[[httpx.Request], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        response = await send(request)
        if request.method != "GET" or "/manifests/" not in request.url.path:
            return response
        await response.aread()
        altered = await replace_body(response, alter(response.content))
        if not keep_digest_header:
            del altered.headers["docker-content-digest"]
        return altered

    return Middleware(handle)


def add_space(body: bytes) -> bytes:
    return body + b" "


async def test_tampered_manifest_by_digest(registry: RunningRegistry) -> None:
    repo = registry.repository(unique("tamper"))
    async with RegistryClient(registry.options()) as client:
        digest, _ = await push_image(client, repo, "v1")
    async with RegistryClient(registry.options(transport=tamper_manifests(add_space))) as client:
        with pytest.raises(DigestMismatch, match=re.escape(f"{repo}@{digest}: the registry")):
            await client.get_manifest(repo, digest)


async def test_tampered_manifest_by_tag_disagrees_with_the_digest_header(
    registry: RunningRegistry,
) -> None:
    repo = registry.repository(unique("tamper"))
    async with RegistryClient(registry.options()) as client:
        digest, raw = await push_image(client, repo, "v1")
    async with RegistryClient(registry.options(transport=tamper_manifests(add_space))) as client:
        with pytest.raises(DigestMismatch, match=re.escape(f"says the digest is {digest}")):
            await client.get_manifest(repo, "v1")
    # Without the header nothing contradicts the bytes: their own digest is the answer,
    # never the one the registry claimed.
    transport = tamper_manifests(add_space, keep_digest_header=False)
    async with RegistryClient(registry.options(transport=transport)) as client:
        fetched = await client.get_manifest(repo, "v1")
    assert fetched.digest == sha256(raw + b" ") != digest


async def test_tampered_blob(registry: RunningRegistry) -> None:
    repo = registry.repository(unique("tamper-blob"))
    async with RegistryClient(registry.options()) as client:
        digest = await client.push_blob(repo, b"genuine")

    async def handle(
        request: httpx.Request, send: Callable[[httpx.Request], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        response = await send(request)
        if request.method == "GET" and "/blobs/" in request.url.path:
            return await replace_body(response, b"forged!")
        return response

    async with RegistryClient(registry.options(transport=Middleware(handle))) as client:
        with pytest.raises(DigestMismatch, match="served a blob whose digest is"):
            await client.get_blob(repo, digest)


async def test_oversized_manifest_is_refused(registry: RunningRegistry) -> None:
    repo = registry.repository(unique("big-manifest"))
    async with RegistryClient(registry.options()) as client:
        _, raw = await push_image(client, repo, "v1")
    async with RegistryClient(registry.options(max_manifest_bytes=len(raw) - 1)) as client:
        with pytest.raises(RegistryError, match=f"manifest is larger than {len(raw) - 1} bytes"):
            await client.get_manifest(repo, "v1")


def flaky(status: int, times: int, headers: dict[str, str] | None = None) -> Middleware:
    """Answer the first ``times`` manifest requests with ``status`` instead of the registry."""
    served = 0

    async def handle(
        request: httpx.Request, send: Callable[[httpx.Request], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        nonlocal served
        if "/manifests/" in request.url.path and served < times:
            served += 1
            return httpx.Response(status, headers=headers)
        return await send(request)

    return Middleware(handle)


async def test_rate_limited_request_is_retried_after_retry_after(
    registry: RunningRegistry,
) -> None:
    repo = registry.repository(unique("rate"))
    async with RegistryClient(registry.options()) as client:
        digest, _ = await push_image(client, repo, "v1")
    transport = flaky(429, 1, {"Retry-After": "0"})
    async with RegistryClient(registry.options(transport=transport)) as client:
        assert (await client.get_manifest(repo, "v1")).digest == digest
    assert sum("/manifests/" in r.url.path for r in transport.requests) == 2


async def test_rate_limiting_that_does_not_end_gives_up(registry: RunningRegistry) -> None:
    repo = registry.repository(unique("rate"))
    transport = flaky(429, 100, {"Retry-After": "0"})
    async with RegistryClient(registry.options(transport=transport, max_retries=3)) as client:
        with pytest.raises(RateLimited, match=re.escape(f"{repo}:v1: rate limited")):
            await client.get_manifest(repo, "v1")
    assert sum("/manifests/" in r.url.path for r in transport.requests) == 4


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
async def test_unavailable_registry_is_retried_for_reads_only(
    registry: RunningRegistry, status: int
) -> None:
    repo = registry.repository(unique("unavailable"))
    async with RegistryClient(registry.options()) as client:
        digest, raw = await push_image(client, repo, "v1")
    transport = flaky(status, 2)
    async with RegistryClient(
        registry.options(transport=transport, retry_backoff_seconds=0)
    ) as client:
        assert (await client.get_manifest(repo, digest)).raw == raw
    assert sum("/manifests/" in r.url.path for r in transport.requests) == 3

    async def refuse_uploads(
        request: httpx.Request, send: Callable[[httpx.Request], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(503)
        return await send(request)

    transport = Middleware(refuse_uploads)
    async with RegistryClient(
        registry.options(transport=transport, retry_backoff_seconds=0)
    ) as client:
        with pytest.raises(RegistryError, match=r": HTTP 503$"):
            await client.push_blob(repo, b"new blob")
    assert sum(r.method == "POST" for r in transport.requests) == 1


async def test_connection_reset_is_retried(registry: RunningRegistry) -> None:
    repo = registry.repository(unique("reset"))
    async with RegistryClient(registry.options()) as client:
        digest, _ = await push_image(client, repo, "v1")
    resets = 0

    async def reset_once(
        request: httpx.Request, send: Callable[[httpx.Request], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        nonlocal resets
        if "/manifests/" in request.url.path and resets == 0:
            resets += 1
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return await send(request)

    options = registry.options(transport=Middleware(reset_once), retry_backoff_seconds=0)
    async with RegistryClient(options) as client:
        assert await client.head_manifest(repo, "v1") == digest
    assert resets == 1
