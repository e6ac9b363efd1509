"""WWW-Authenticate parsing, token scopes and caching, and the auth flow against fake
registries on an ``httpx.MockTransport`` (no network)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from signgate.errors import Denied, RateLimited, RegistryError, Unauthorized
from signgate.reference import Repository
from signgate.registry.auth import (
    AuthCache,
    Challenge,
    RegistryAuth,
    addresses_registry,
    merge_scopes,
    parse_token_response,
    parse_www_authenticate,
    token_request,
)
from signgate.registry.client import RegistryClient, RegistryOptions
from signgate.registry.credentials import Credentials
from signgate.registry.errors import error_for_response, retry_after_seconds

REALM = "https://auth.example/token"
REGISTRY = "registry.example"
PASSWORD = "s3cret-password"
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
REPO = Repository(REGISTRY, "team/app")


# --- WWW-Authenticate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/nginx:pull"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/nginx:pull",
                    },
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        ('basic REALM="x"', [Challenge("basic", {"realm": "x"})]),
        (
            'Basic realm="a", Bearer realm="https://t/token",service="s"',
            [
                Challenge("basic", {"realm": "a"}),
                Challenge("bearer", {"realm": "https://t/token", "service": "s"}),
            ],
        ),
        (
            'Bearer realm="https://t/token",error="insufficient_scope",'
            'scope="repository:a:pull repository:b:pull,push"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://t/token",
                        "error": "insufficient_scope",
                        "scope": "repository:a:pull repository:b:pull,push",
                    },
                )
            ],
        ),
        (r'Bearer realm="say \"hi\""', [Challenge("bearer", {"realm": 'say "hi"'})]),
        ('Bearer realm = "x" , service = y', [Challenge("bearer", {"realm": "x", "service": "y"})]),
        (
            'Negotiate abc123==, Basic realm="x"',
            [Challenge("negotiate", {}), Challenge("basic", {"realm": "x"})],
        ),
        ("Bearer", [Challenge("bearer", {})]),
        ("", []),
        ('Bearer realm="unterminated', [Challenge("bearer", {})]),
    ],
)
def test_parse_www_authenticate(header: str, expected: list[Challenge]) -> None:
    assert parse_www_authenticate(header) == expected


def test_parse_www_authenticate_reads_every_header_value() -> None:
    assert parse_www_authenticate(['Basic realm="a"', 'Bearer realm="b"']) == [
        Challenge("basic", {"realm": "a"}),
        Challenge("bearer", {"realm": "b"}),
    ]


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ([["repository:a:pull"], ["repository:a:push"]], ("repository:a:pull,push",)),
        (
            [["repository:b:pull", "repository:a:pull,push"], ["repository:a:delete"]],
            ("repository:a:delete,pull,push", "repository:b:pull"),
        ),
        ([["registry:catalog:*"]], ("registry:catalog:*",)),
        ([["repository:ns/app:pull"], []], ("repository:ns/app:pull",)),
        ([["nonsense", ""]], ()),
    ],
)
def test_merge_scopes(groups: list[list[str]], expected: tuple[str, ...]) -> None:
    assert merge_scopes(*groups) == expected


@pytest.mark.parametrize(
    ("url", "registry", "expected"),
    [
        ("https://registry.example/v2/", "registry.example", True),
        ("https://registry.example:443/v2/", "registry.example", True),
        ("https://registry.example/v2/", "registry.example:443", True),
        ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000", True),
        ("http://127.0.0.1:5001/v2/", "127.0.0.1:5000", False),
        ("https://storage.example/blob", "registry.example", False),
        ("https://REGISTRY.example/v2/", "registry.example", True),
        ("http://[::1]:5000/v2/", "[::1]:5000", True),
    ],
)
def test_addresses_registry(url: str, registry: str, expected: bool) -> None:
    assert addresses_registry(httpx.URL(url), registry) is expected


# --- tokens --------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cached_token_expires_before_the_server_deadline() -> None:
    clock = FakeClock()
    cache = AuthCache(clock)
    scopes = ("repository:a:pull",)
    cache.store_token(REGISTRY, scopes, "t1", 300)
    assert cache.token(REGISTRY, scopes) == "t1"
    assert cache.token(REGISTRY, ("repository:a:pull,push",)) is None
    assert cache.token("other.example", scopes) is None
    clock.now += 289
    assert cache.token(REGISTRY, scopes) == "t1"
    clock.now += 1
    assert cache.token(REGISTRY, scopes) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"token": "abc", "expires_in": 300}, ("abc", 300.0)),
        ({"access_token": "xyz"}, ("xyz", 60.0)),
        ({"token": "abc", "access_token": "xyz", "expires_in": 0}, ("abc", 60.0)),
        ({"token": "abc", "expires_in": "soon"}, ("abc", 60.0)),
    ],
)
def test_parse_token_response(body: dict[str, object], expected: tuple[str, float]) -> None:
    raw = json.dumps(body).encode()
    assert parse_token_response(200, raw, REGISTRY, sent_credentials=True) == expected


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (
            401,
            b'{"errors":[{"code":"UNAUTHORIZED","message":"bad password"}]}',
            Unauthorized,
            "registry registry.example: the auth server refused the credentials "
            "(unauthorized: bad password)",
        ),
        (
            403,
            b"",
            Unauthorized,
            "registry registry.example: the auth server refused anonymous access (HTTP 403)",
        ),
        (500, b"oops", RegistryError, "the auth server failed to issue a token (HTTP 500)"),
        (200, b"not json", RegistryError, "the auth server replied with invalid JSON"),
        (200, b'{"expires_in": 60}', RegistryError, "the auth server replied without a token"),
        (200, b"[]", RegistryError, "the auth server replied without a token"),
    ],
)
def test_parse_token_response_failures(
    status: int, body: bytes, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as raised:
        parse_token_response(status, body, REGISTRY, sent_credentials=status == 401)
    assert message in str(raised.value)


def test_token_request_with_password() -> None:
    challenge = Challenge("bearer", {"realm": REALM + "?tenant=x", "service": REGISTRY})
    request = token_request(
        challenge, ("repository:a:pull", "repository:b:pull,push"), Credentials("alice", PASSWORD)
    )
    assert request.method == "GET"
    assert request.url.params.multi_items() == [
        ("tenant", "x"),
        ("service", REGISTRY),
        ("scope", "repository:a:pull"),
        ("scope", "repository:b:pull,push"),
    ]
    expected = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected}"


def test_token_request_anonymous() -> None:
    request = token_request(Challenge("bearer", {"realm": REALM}), ("repository:a:pull",), None)
    assert "authorization" not in request.headers
    assert request.url.params.multi_items() == [("scope", "repository:a:pull")]


def test_token_request_with_identity_token_is_an_oauth2_refresh_grant() -> None:
    challenge = Challenge("bearer", {"realm": REALM, "service": REGISTRY})
    credentials = Credentials("<token>", "", identity_token="refresh-me")
    request = token_request(challenge, ("repository:a:pull", "repository:b:push"), credentials)
    assert request.method == "POST"
    assert "authorization" not in request.headers
    form = dict(httpx.QueryParams(request.read().decode()).multi_items())
    assert form == {
        "grant_type": "refresh_token",
        "refresh_token": "refresh-me",
        "client_id": "signgate",
        "scope": "repository:a:pull repository:b:push",
        "service": REGISTRY,
    }


# --- the flow against fake registries ---------------------------------------------------


@dataclass
class FakeRegistry:
    """``registry.example`` that wants Bearer tokens from ``auth.example`` (or Basic)."""

    scheme: str = "bearer"
    users: dict[str, str] = field(default_factory=lambda: {"alice": PASSWORD})
    identity_tokens: dict[str, str] = field(default_factory=dict)
    token_lifetime: int = 300
    issued: list[str] = field(default_factory=list)
    log: list[httpx.Request] = field(default_factory=list)
    # (host, Authorization) as sent: the auth flow re-sends the same Request object.
    authorizations: list[tuple[str, str | None]] = field(default_factory=list)

    def _user(self, request: httpx.Request) -> str | None:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return None
        name, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return name if self.users.get(name) == password else ""

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.log.append(request)
        self.authorizations.append((request.url.host, request.headers.get("authorization")))
        if request.url.host == "auth.example":
            return self._token(request)
        authorization = request.headers.get("authorization", "")
        if self.scheme == "basic":
            allowed = bool(self._user(request))
            challenge = 'Basic realm="fake"'
        else:
            allowed = bool(self.issued) and authorization == f"Bearer {self.issued[-1]}"
            scope = f"repository:{REPO.path}:pull"
            challenge = f'Bearer realm="{REALM}",service="{REGISTRY}",scope="{scope}"'
        if not allowed:
            body = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
            return httpx.Response(401, headers={"WWW-Authenticate": challenge}, json=body)
        headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        return httpx.Response(200, headers=headers, content=MANIFEST)

    def _token(self, request: httpx.Request) -> httpx.Response:
        user: str | None
        if request.method == "POST":
            form = dict(httpx.QueryParams(request.read().decode()).multi_items())
            user = self.identity_tokens.get(form.get("refresh_token", ""), "")
        else:
            user = self._user(request)
        if user == "":
            error = {"code": "UNAUTHORIZED", "message": "invalid username or password"}
            return httpx.Response(401, json={"errors": [error]})
        if user is None:
            return httpx.Response(200, json={"token": "anonymous-nothing-granted"})
        self.issued.append(f"token-{len(self.issued) + 1}")
        key = "access_token" if request.method == "POST" else "token"
        return httpx.Response(200, json={key: self.issued[-1], "expires_in": self.token_lifetime})

    def requests_to(self, host: str) -> list[httpx.Request]:
        return [r for r in self.log if r.url.host == host]


def client_for(fake: FakeRegistry, **overrides: Any) -> RegistryClient:
    options = RegistryOptions(
        transport=httpx.MockTransport(fake.handle), username="alice", password=PASSWORD
    )
    return RegistryClient(replace(options, **overrides))


@pytest.mark.anyio
async def test_bearer_token_is_fetched_once_and_reused() -> None:
    fake = FakeRegistry()
    async with client_for(fake) as client:
        for _ in range(3):
            manifest = await client.get_manifest(REPO, MANIFEST_DIGEST)
            assert manifest.raw == MANIFEST

    (token_ask,) = fake.requests_to("auth.example")
    assert token_ask.url.params.multi_items() == [
        ("service", REGISTRY),
        ("scope", f"repository:{REPO.path}:pull"),
    ]
    assert [sent for host, sent in fake.authorizations if host == REGISTRY] == [
        None,
        "Bearer token-1",
        "Bearer token-1",
        "Bearer token-1",
    ]


@pytest.mark.anyio
async def test_expired_token_is_fetched_again() -> None:
    fake = FakeRegistry()
    clock = FakeClock()
    cache = AuthCache(clock)
    credentials = Credentials("alice", PASSWORD)
    url = f"https://{REGISTRY}/v2/{REPO.path}/manifests/v1"
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake.handle)) as http:
        for _ in range(2):
            auth = RegistryAuth(REGISTRY, [f"repository:{REPO.path}:pull"], credentials, cache)
            assert (await http.get(url, auth=auth)).status_code == 200
        assert fake.issued == ["token-1"]
        clock.now += fake.token_lifetime
        auth = RegistryAuth(REGISTRY, [f"repository:{REPO.path}:pull"], credentials, cache)
        assert (await http.get(url, auth=auth)).status_code == 200
    assert fake.issued == ["token-1", "token-2"]


@pytest.mark.anyio
async def test_identity_token_is_exchanged_with_a_refresh_grant() -> None:
    fake = FakeRegistry(identity_tokens={"refresh-me": "alice"})
    credentials = Credentials("<token>", "", identity_token="refresh-me")
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake.handle)) as http:
        auth = RegistryAuth(REGISTRY, [f"repository:{REPO.path}:pull"], credentials, AuthCache())
        response = await http.get(f"https://{REGISTRY}/v2/{REPO.path}/manifests/v1", auth=auth)
    assert response.status_code == 200
    assert [r.method for r in fake.requests_to("auth.example")] == ["POST"]


@pytest.mark.anyio
async def test_basic_challenge_is_answered_and_remembered() -> None:
    fake = FakeRegistry(scheme="basic")
    async with client_for(fake) as client:
        for _ in range(3):
            await client.get_manifest(REPO, MANIFEST_DIGEST)
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert fake.authorizations == [(REGISTRY, None), *[(REGISTRY, basic)] * 3]
    assert fake.requests_to("auth.example") == []


@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["bearer", "basic"])
async def test_without_credentials_the_error_says_so(scheme: str, tmp_path: Path) -> None:
    fake = FakeRegistry(scheme=scheme)
    async with client_for(fake, username=None, password=None, docker_config_dir=tmp_path) as client:
        with pytest.raises(Unauthorized) as raised:
            await client.get_manifest(REPO, "v1")
    assert raised.value.diagnostics() == (
        f"{REPO}:v1: unauthorized: authentication required; no credentials for this registry "
        "(docker login, or --registry-username/--registry-password)"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["bearer", "basic"])
async def test_wrong_password_never_shows_in_the_error(scheme: str) -> None:
    fake = FakeRegistry(scheme=scheme)
    async with client_for(fake, password="hunter2-wrong") as client:
        with pytest.raises(Unauthorized) as raised:
            await client.get_manifest(REPO, "v1")
    message = raised.value.diagnostics()
    assert "refused the credentials" in message
    assert "hunter2" not in message
    assert base64.b64encode(b"alice:hunter2-wrong").decode() not in message


@pytest.mark.anyio
async def test_token_is_not_sent_to_another_host() -> None:
    fake = FakeRegistry()
    cache = AuthCache()
    scopes = [f"repository:{REPO.path}:pull"]
    cache.store_token(REGISTRY, merge_scopes(scopes), "secret-token", 300)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        auth = RegistryAuth(REGISTRY, scopes, Credentials("alice", PASSWORD), cache)
        await http.get("https://storage.example/upload", auth=auth)
        await http.get(f"https://{REGISTRY}/v2/", auth=auth)
    assert [r.headers.get("authorization") for r in seen] == [None, "Bearer secret-token"]
    assert fake.log == []


def test_registry_auth_refuses_a_sync_client() -> None:
    auth = RegistryAuth(REGISTRY, [], None, AuthCache())
    with (
        httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as http,
        pytest.raises(RuntimeError, match=r"only with httpx\.AsyncClient"),
    ):
        http.get(f"https://{REGISTRY}/v2/", auth=auth)


# --- what the client reports ------------------------------------------------------------


def answering(response: Callable[[httpx.Request], httpx.Response]) -> RegistryClient:
    return RegistryClient(RegistryOptions(transport=httpx.MockTransport(response)))


@pytest.mark.anyio
async def test_denied() -> None:
    body = {"errors": [{"code": "DENIED", "message": "requested access to the resource is denied"}]}
    async with answering(lambda r: httpx.Response(403, json=body)) as client:
        with pytest.raises(Denied) as raised:
            await client.get_manifest(REPO, "v1")
    assert raised.value.diagnostics() == (
        f"{REPO}:v1: denied: requested access to the resource is denied"
    )


@pytest.mark.anyio
async def test_retry_after_is_bounded_by_the_longest_wait() -> None:
    attempts: list[httpx.Request] = []

    def limited(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        return httpx.Response(429, headers={"Retry-After": "3600"})

    options = RegistryOptions(
        transport=httpx.MockTransport(limited), max_retries=2, max_retry_wait_seconds=0
    )
    async with RegistryClient(options) as client:
        with pytest.raises(RateLimited) as raised:
            await client.get_manifest(REPO, "v1")
    assert len(attempts) == 3
    assert raised.value.diagnostics() == (
        f"{REPO}:v1: rate limited by the registry, gave up retrying (Retry-After: 3600)"
    )


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            404,
            b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":"v1"}]}',
            "r/app:v1: manifest unknown",
        ),
        (404, b"", "r/app:v1: not found"),
        (
            500,
            b'{"errors":[{"code":"UNKNOWN","message":"storage\\nfailed\\tbadly"}]}',
            "r/app:v1: HTTP 500: unknown: storage failed badly",
        ),
        (502, b"<html>bad gateway</html>", "r/app:v1: HTTP 502"),
        (
            405,
            b'{"errors":[{"code":"UNSUPPORTED","message":"The operation is unsupported."}]}',
            "r/app:v1: HTTP 405: unsupported: The operation is unsupported.",
        ),
        (
            400,
            b'{"errors":[{"code":"NAME_INVALID","message":"name invalid"}]}',
            "r/app:v1: HTTP 400: name invalid",
        ),
    ],
)
def test_error_sentences(status: int, body: bytes, expected: str) -> None:
    error = error_for_response(status, body, "r/app:v1")
    assert str(error) == expected
    assert "\n" not in str(error)


def test_retry_after_values() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC), usegmt=True)
    assert retry_after_seconds({"retry-after": "0"}) == 0
    assert retry_after_seconds({"retry-after": " 7 "}) == 7
    assert retry_after_seconds({"retry-after": later}, now=now.timestamp()) == 30
    assert retry_after_seconds({"retry-after": later}, now=now.timestamp() + 60) == 0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
