"""``azurekms://`` against a double of Azure Key Vault, reached through azure-core's transport.

No Azure here: :class:`KeyVaultDouble` is an azure-core ``HttpTransport`` that answers the Key
Vault keys REST API in memory, and the real ``KeyClient`` and ``CryptographyClient`` (their
pipelines, Key Vault's challenge authentication, retries, paging and JSON models) run on top
of it. The double signs with real P-256 keys and answers raw r||s, as Key Vault does: what
signgate makes of it verifies, or fails to, for real.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest
import requests
import urllib3
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline.transport import HttpTransport
from azure.core.pipeline.transport._requests_basic import RequestsTransport
from azure.core.rest import HttpRequest, HttpResponse
from azure.core.rest._requests_basic import RestRequestsTransportResponse
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from requests.adapters import HTTPAdapter

from signgate.errors import KMSError
from signgate.keys.kms import azure
from signgate.keys.kms.azure import (
    AzureKeyName,
    AzureKeyVault,
    authority_host,
    der_from_jws,
    parse_azure_key_name,
)
from signgate.keys.model import PublicKey
from signgate.keys.password import PasswordSource
from signgate.keys.refs import KeyBackend, KeyCreator, KeyDisabler, KeyVersioner, VersionedKeys
from signgate.reference import ImageReference
from signgate.registry import RegistryClient
from signgate.registry.images import push_image
from signgate.signatures.formats import SignatureFormat
from signgate.signatures.sign import sign_image
from signgate.signatures.verify import ImageVerification, verify_image
from tests.integration.registry_servers import RunningRegistry, running_registry
from tests.integration.tools import run, tool_env, tool_path

# cosign 2 reads only the classic signature image.
CLASSIC = SignatureFormat.CLASSIC
PAYLOAD = b'{"critical":{"type":"cosign container image signature"},"optional":null}'
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.double-token-secret.signature"
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def never_asked() -> bytes:
    raise AssertionError("a KMS backend asked for a password")


NO_PASSWORD: PasswordSource = never_asked


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def from_b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- the doubles ----------------------------------------------------------------------------


class TokenCredentialDouble:
    """Stands in for azure-identity's ``DefaultAzureCredential``: hands out one bearer token,
    or fails as azure-identity does when no credential is configured."""

    def __init__(self, token: str = TOKEN, failure: Exception | None = None) -> None:
        self.token = token
        self.failure = failure
        self.asked: list[tuple[tuple[str, ...], str | None]] = []

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        self.asked.append((scopes, tenant_id))
        if self.failure is not None:
            raise self.failure
        return AccessToken(self.token, int(time.time()) + 3600)


@dataclass
class KeyVersionDouble:
    version: str
    kty: str
    private_key: SigningKey | None  # None: a symmetric (oct-HSM) key
    created: int
    enabled: bool = True
    key_ops: list[str] = field(default_factory=lambda: ["sign", "verify"])
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    body: Any


class KeyVaultDouble(HttpTransport[HttpRequest, HttpResponse]):
    """Stands in for the Azure Key Vault keys REST API (https://learn.microsoft.com/rest/api/
    keyvault/keys/) of one vault, as an azure-core transport.

    Shaped after the documented requests and responses: a request without a token gets 401 and
    Key Vault's ``WWW-Authenticate: Bearer authorization=..., resource=...`` challenge; a key
    bundle is ``{"key": JWK, "attributes": {...}, "tags": {...}}`` with base64url JWK members;
    ``versions`` pages with ``nextLink``; ``sign`` takes ``{"alg", "value"}`` and returns the
    JWS signature (raw r||s for ES256) as ``{"kid", "value"}``; ``PATCH /keys/NAME/VERSION``
    (update key) takes ``{"attributes": {"enabled": ...}}`` and returns the bundle; a create on
    an existing name adds a version; errors are ``{"error": {"code", "message"}}`` with Key
    Vault's codes. ``faults`` makes an operation
    fail with a status; ``short_signatures`` trims the signatures it returns.
    """

    def __init__(self, vault_host: str) -> None:
        self.vault_host = vault_host
        self.keys: dict[str, list[KeyVersionDouble]] = {}
        self.requests: list[RecordedRequest] = []
        self.faults: dict[str, tuple[int, str, str]] = {}
        self.short_signatures = False
        self.pauses: list[float] = []
        self._created = itertools.count(1_700_000_000, 60)
        self._adapter = HTTPAdapter()

    # -- setting up keys

    def add_version(
        self,
        name: str,
        kty: str = "EC",
        private_key: SigningKey | None = None,
        **attributes: Any,
    ) -> KeyVersionDouble:
        if private_key is None and kty in ("EC", "EC-HSM"):
            private_key = ec.generate_private_key(ec.SECP256R1())
        version = KeyVersionDouble(
            uuid.uuid4().hex, kty, private_key, next(self._created), **attributes
        )
        self.keys.setdefault(name, []).append(version)
        return version

    def public_key(self, version: KeyVersionDouble) -> PublicKey:
        assert version.private_key is not None
        return PublicKey(version.private_key.public_key())

    def calls(self, operation: str) -> list[RecordedRequest]:
        """The authenticated requests for ``operation`` (not Key Vault's challenge round)."""
        return [
            r
            for r in self.requests
            if r.authorization is not None and _operation(r.method, r.path)[0] == operation
        ]

    # -- azure-core's transport interface

    def __enter__(self) -> KeyVaultDouble:
        return self

    def __exit__(self, *args: object) -> None:
        pass  # each client closes its transport on exit; the double outlives them

    def open(self) -> None:
        pass

    def close(self) -> None:
        self._adapter.close()

    def sleep(self, duration: float) -> None:
        # The pauses the SDK's retry policy asks for are recorded, not waited.
        self.pauses.append(duration)

    def send(self, request: HttpRequest, **kwargs: Any) -> HttpResponse:
        url = urlsplit(request.url)
        assert url.scheme == "https"
        assert url.netloc == self.vault_host
        body = json.loads(request.content) if request.content else None
        recorded = RecordedRequest(
            request.method, url.path, parse_qs(url.query),
            request.headers.get("Authorization"), body,
        )
        self.requests.append(recorded)
        status, payload, headers = self._answer(recorded)
        return self._response(request, status, payload, headers)

    # -- the service

    def _answer(self, request: RecordedRequest) -> tuple[int, Any, dict[str, str]]:
        challenge = {
            "WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/'
            f'{TENANT}", resource="https://vault.azure.net"'
        }
        if request.authorization is None:
            return 401, _error("Unauthorized", "AKV10000: Request is missing a Bearer or PoP "
                               "token."), challenge
        if request.authorization != f"Bearer {TOKEN}":
            return 401, _error("Unauthorized", "AKV10032: Invalid issuer. Expected one of "
                               "https://sts.windows.net/..."), challenge
        if "api-version" not in request.query:
            return 400, _error("BadParameter", "The api-version query parameter is missing."), {}
        operation, groups = _operation(request.method, request.path)
        if operation in self.faults:
            status, code, message = self.faults[operation]
            return status, _error(code, message), {}
        if operation == "create_key":
            return self._create(groups[0], request.body)
        versions = self.keys.get(groups[0]) if groups else None
        if not versions:
            return 404, _error(
                "KeyNotFound",
                f"A key with (name/id) {groups[0] if groups else '?'} was not found in this key "
                "vault. If you recently deleted this key you may be able to recover it using "
                "the correct recovery command.",
            ), {}
        if operation == "get_key_versions":
            return 200, self._versions_page(groups[0], versions, request.query), {}
        version = versions[-1] if not groups[1] else _find(versions, groups[1])
        if version is None:
            return 404, _error(
                "KeyNotFound", f"A key with (name/id) {groups[0]}/{groups[1]} was not found"
            ), {}
        if operation == "get_key":
            return 200, self._bundle(groups[0], version), {}
        if operation == "sign":
            return self._sign(groups[0], version, request.body)
        if operation == "update_key":
            attributes = request.body.get("attributes") or {}
            if "enabled" in attributes:
                version.enabled = bool(attributes["enabled"])
            return 200, self._bundle(groups[0], version), {}
        return 400, _error("BadParameter", "not an operation the double knows"), {}

    def _create(self, name: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        if body.get("kty") not in ("EC", "EC-HSM") or body.get("crv") != "P-256":
            return 400, _error("BadParameter", "The double makes EC P-256 keys only."), {}
        version = self.add_version(
            name, body["kty"], key_ops=body.get("key_ops", []), tags=body.get("tags", {})
        )
        return 200, self._bundle(name, version), {}

    def _sign(
        self, name: str, version: KeyVersionDouble, body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        if not version.enabled:
            return 403, _error("Forbidden", "Operation sign is not allowed on a disabled key."), {}
        if not isinstance(version.private_key, ec.EllipticCurvePrivateKey):
            return 400, _error("BadParameter", "Key and signing algorithm are incompatible."), {}
        digest = from_b64url(body["value"])
        if body["alg"] != "ES256" or len(digest) != 32:
            return 400, _error("BadParameter", "Invalid digest length for ES256."), {}
        der = version.private_key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        r, s = decode_dss_signature(der)
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if self.short_signatures:
            raw = raw[:-1]
        return 200, {"kid": self._kid(name, version), "value": b64url(raw)}, {}

    def _versions_page(
        self, name: str, versions: list[KeyVersionDouble], query: dict[str, list[str]]
    ) -> Any:
        # Two to a page, so that the SDK's pager has to follow nextLink.
        start = int(query.get("$skiptoken", ["0"])[0])
        page = versions[start : start + 2]
        more = start + 2 < len(versions)
        next_link = (
            f"https://{self.vault_host}/keys/{name}/versions?api-version="
            f"{query['api-version'][0]}&$skiptoken={start + 2}"
            if more
            else None
        )
        return {
            "value": [
                {"kid": self._kid(name, v), "attributes": _attributes(v), "tags": v.tags}
                for v in page
            ],
            "nextLink": next_link,
        }

    def _bundle(self, name: str, version: KeyVersionDouble) -> Any:
        jwk: dict[str, Any] = {
            "kid": self._kid(name, version), "kty": version.kty, "key_ops": version.key_ops,
        }
        key = version.private_key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            numbers = key.public_key().public_numbers()
            size = (key.curve.key_size + 7) // 8
            jwk.update(
                crv={256: "P-256", 384: "P-384"}[key.curve.key_size],
                x=b64url(numbers.x.to_bytes(size, "big")),
                y=b64url(numbers.y.to_bytes(size, "big")),
            )
        elif isinstance(key, rsa.RSAPrivateKey):
            numbers_rsa = key.public_key().public_numbers()
            jwk.update(
                n=b64url(numbers_rsa.n.to_bytes(key.key_size // 8, "big")),
                e=b64url(numbers_rsa.e.to_bytes(3, "big")),
            )
        return {"key": jwk, "attributes": _attributes(version), "tags": version.tags}

    def _kid(self, name: str, version: KeyVersionDouble) -> str:
        return f"https://{self.vault_host}/keys/{name}/{version.version}"

    def _response(
        self, request: HttpRequest, status: int, payload: Any, headers: dict[str, str]
    ) -> HttpResponse:
        data = json.dumps(payload).encode()
        raw = urllib3.HTTPResponse(
            body=io.BytesIO(data),
            headers={
                **headers,
                "Content-Type": "application/json; charset=utf-8",
                "Content-Length": str(len(data)),
                "x-ms-keyvault-service-version": "1.9.1.0",
            },
            status=status,
            preload_content=False,
        )
        prepared = requests.Request(request.method, request.url).prepare()
        return RestRequestsTransportResponse(  # type: ignore[no-untyped-call]
            request=request, internal_response=self._adapter.build_response(prepared, raw)
        )


_ROUTES = [
    ("GET", re.compile(r"/keys/([^/]+)/versions"), "get_key_versions"),
    ("GET", re.compile(r"/keys/([^/]+)/([^/]*)"), "get_key"),
    ("POST", re.compile(r"/keys/([^/]+)/create"), "create_key"),
    ("POST", re.compile(r"/keys/([^/]+)/([^/]+)/sign"), "sign"),
    ("PATCH", re.compile(r"/keys/([^/]+)/([^/]*)"), "update_key"),
]


def _operation(method: str, path: str) -> tuple[str, tuple[str, ...]]:
    for route_method, pattern, operation in _ROUTES:
        match = pattern.fullmatch(path)
        if method == route_method and match:
            return operation, match.groups()
    return "unknown", ()


def _find(versions: list[KeyVersionDouble], version: str) -> KeyVersionDouble | None:
    return next((v for v in versions if v.version == version), None)


def _attributes(version: KeyVersionDouble) -> dict[str, Any]:
    return {
        "enabled": version.enabled,
        "created": version.created,
        "updated": version.created,
        "recoveryLevel": "Recoverable+Purgeable",
        "recoverableDays": 90,
        "exportable": False,
    }


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class RequestsTransportWithoutPauses(RequestsTransport):
    """The SDK's real HTTP transport; only the pauses between its retries are skipped, so that
    a test of an unreachable vault does not wait out the back-off."""

    def sleep(self, duration: float) -> None:
        pass


# --- fixtures -------------------------------------------------------------------------------

# Key Vault's challenge is cached per vault host for the whole process: a host per test keeps
# the tests independent of their order.
_vaults = itertools.count(1)


@dataclass
class Vault:
    double: KeyVaultDouble
    credential: TokenCredentialDouble
    backend: AzureKeyVault

    def ref(self, key: str = "signer", version: str | None = None) -> str:
        return f"{self.double.vault_host}/{key}" + (f"/{version}" if version else "")


@pytest.fixture
def vault() -> Iterator[Vault]:
    double = KeyVaultDouble(f"signgate-{next(_vaults)}-{os.getpid()}.vault.azure.net")
    credential = TokenCredentialDouble()
    try:
        yield Vault(double, credential, AzureKeyVault(credential, double))
    finally:
        double.close()


# --- the reference grammar ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("myvault.vault.azure.net/mykey", AzureKeyName("myvault.vault.azure.net", "mykey")),
        (
            "myvault.vault.azure.net/mykey/78deebed173b48e48f55abf87ed4cf71",
            AzureKeyName("myvault.vault.azure.net", "mykey", "78deebed173b48e48f55abf87ed4cf71"),
        ),
        # cosign takes a trailing slash: no version.
        ("myvault.vault.azure.net/mykey/", AzureKeyName("myvault.vault.azure.net", "mykey")),
        ("hsm.managedhsm.azure.net/Key-1", AzureKeyName("hsm.managedhsm.azure.net", "Key-1")),
        ("myvault.vault.azure.cn/k", AzureKeyName("myvault.vault.azure.cn", "k")),
        ("127.0.0.1:8443/k", AzureKeyName("127.0.0.1:8443", "k")),
    ],
)
def test_valid_references(location: str, expected: AzureKeyName) -> None:
    assert parse_azure_key_name(location) == expected


@pytest.mark.parametrize(
    "location",
    [
        "",
        "myvault.vault.azure.net",
        "myvault.vault.azure.net/",
        "/mykey",
        "myvault.vault.azure.net//v1",
        "myvault.vault.azure.net/mykey/v1/extra",
        "myvault.vault.azure.net/mykey/VERSION",  # versions are lowercase, as in cosign
        "myvault.vault.azure.net/my_key",  # Key Vault names: letters, digits, dashes
        "myvault.vault.azure.net/my key",
        "myvault.vault.azure.net/mykey?version=1",
        "https://myvault.vault.azure.net/mykey",
        "user@myvault.vault.azure.net/mykey",
        "-vault.azure.net/mykey",
        "myvault.vault.azure.net:port/mykey",
        "myvault.vault.azure.net/" + "k" * 128,
    ],
)
def test_invalid_references_are_refused_naming_them(location: str) -> None:
    with pytest.raises(KMSError) as caught:
        parse_azure_key_name(location)
    assert caught.value.diagnostics() == " ".join(
        f"azurekms://{location}: not an Azure Key Vault key reference; expected "
        "azurekms://VAULT-HOST/KEY[/VERSION], as in azurekms://myvault.vault.azure.net/mykey"
        .split()
    )


def test_reference_vault_url_and_text() -> None:
    name = parse_azure_key_name("myvault.vault.azure.net/mykey/abc")
    assert name.vault_url == "https://myvault.vault.azure.net/"
    assert str(name) == "azurekms://myvault.vault.azure.net/mykey/abc"


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        (None, None),
        ("", None),
        ("AZUREPUBLICCLOUD", None),
        ("AzureCloud", None),
        ("AZUREUSGOVERNMENT", "login.microsoftonline.us"),
        ("AZUREUSGOVERNMENTCLOUD", "login.microsoftonline.us"),
        ("AZURECHINACLOUD", "login.chinacloudapi.cn"),
    ],
)
def test_azure_environment_picks_the_sign_in_authority(
    environment: str | None, expected: str | None
) -> None:
    environ = {} if environment is None else {"AZURE_ENVIRONMENT": environment}
    assert authority_host(environ) == expected


def test_an_unknown_azure_environment_is_refused() -> None:
    with pytest.raises(KMSError, match="AZURE_ENVIRONMENT='AZUREGERMANCLOUD' is not one of"):
        authority_host({"AZURE_ENVIRONMENT": "AzureGermanCloud"})


@pytest.mark.parametrize(
    ("r", "s"),
    [(1, 2), (2**255 + 7, 2**256 - 1), (0x30 << 248, 5), (2**200, 2**100)],
)
def test_jws_signatures_become_der(r: int, s: int) -> None:
    name = parse_azure_key_name("v.vault.azure.net/k")
    der = der_from_jws(name, r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    assert decode_dss_signature(der) == (r, s)


@pytest.mark.parametrize("size", [0, 63, 65, 72])
def test_a_signature_of_another_size_is_refused(size: int) -> None:
    name = parse_azure_key_name("v.vault.azure.net/k")
    with pytest.raises(KMSError) as caught:
        der_from_jws(name, b"\x01" * size)
    assert caught.value.diagnostics() == (
        f"azurekms://v.vault.azure.net/k: Azure Key Vault returned a {size}-byte ES256 "
        "signature, not 64"
    )


def test_the_module_backend_is_every_kind_of_backend() -> None:
    backend = azure.backend("azurekms")
    assert isinstance(backend, KeyBackend)
    assert isinstance(backend, KeyCreator)
    assert isinstance(backend, VersionedKeys)
    assert isinstance(backend, KeyDisabler)
    assert isinstance(backend, KeyVersioner)


# --- signing --------------------------------------------------------------------------------


def test_signing_sends_the_digest_and_stores_der(vault: Vault) -> None:
    vault.double.add_version("signer")
    current = vault.double.add_version("signer")
    signer = vault.backend.signer(vault.ref(), NO_PASSWORD)

    signature = signer.sign(PAYLOAD)

    (request,) = vault.double.calls("sign")
    # The version read with the public key, though the reference names none.
    assert request.path == f"/keys/signer/{current.version}/sign"
    assert request.body == {"alg": "ES256", "value": b64url(hashlib.sha256(PAYLOAD).digest())}
    assert request.authorization == f"Bearer {TOKEN}"
    assert signature[0] == 0x30
    decode_dss_signature(signature)
    assert signer.public_key() == vault.double.public_key(current)
    assert vault.double.public_key(current).verify(signature, PAYLOAD)


def test_the_client_follows_key_vaults_challenge(vault: Vault) -> None:
    vault.double.add_version("signer")
    vault.backend.public_key(vault.ref(), NO_PASSWORD)
    first, second = vault.double.requests
    assert first.authorization is None  # the challenge request
    assert second.authorization == f"Bearer {TOKEN}"
    assert vault.credential.asked == [(("https://vault.azure.net/.default",), TENANT)]


def test_a_pinned_version_signs_with_that_version(vault: Vault) -> None:
    old = vault.double.add_version("signer")
    vault.double.add_version("signer")
    signer = vault.backend.signer(vault.ref(version=old.version), NO_PASSWORD)
    signature = signer.sign(PAYLOAD)
    assert [r.path for r in vault.double.calls("get_key")] == [f"/keys/signer/{old.version}"]
    assert [r.path for r in vault.double.calls("sign")] == [f"/keys/signer/{old.version}/sign"]
    assert vault.double.public_key(old).verify(signature, PAYLOAD)


def test_the_public_key_is_the_current_versions(vault: Vault) -> None:
    old = vault.double.add_version("signer")
    current = vault.double.add_version("signer")
    assert vault.backend.public_key(vault.ref(), NO_PASSWORD) == vault.double.public_key(current)
    assert vault.backend.public_key(vault.ref(version=old.version), NO_PASSWORD) == (
        vault.double.public_key(old)
    )


def test_verifiers_trust_every_enabled_version_newest_first(vault: Vault) -> None:
    first = vault.double.add_version("signer")
    vault.double.add_version("signer", enabled=False)
    third = vault.double.add_version("signer")
    fourth = vault.double.add_version("signer", kty="EC-HSM")

    keys = vault.backend.public_keys(vault.ref(), NO_PASSWORD)

    assert keys == [vault.double.public_key(v) for v in (fourth, third, first)]
    listings = vault.double.calls("get_key_versions")
    assert len(listings) == 2  # four versions, two to a page
    pinned = vault.backend.public_keys(vault.ref(version=first.version), NO_PASSWORD)
    assert pinned == [vault.double.public_key(first)]


def test_without_list_permission_a_verifier_trusts_the_current_version(vault: Vault) -> None:
    vault.double.add_version("signer")
    current = vault.double.add_version("signer")
    vault.double.faults["get_key_versions"] = (
        403, "Forbidden", "The user does not have keys list permission on key vault 'signgate'."
    )
    assert vault.backend.public_keys(vault.ref(), NO_PASSWORD) == [
        vault.double.public_key(current)
    ]


def test_a_signature_from_a_rotated_key_still_verifies(vault: Vault) -> None:
    vault.double.add_version("signer")
    old_signature = vault.backend.signer(vault.ref(), NO_PASSWORD).sign(PAYLOAD)
    vault.double.add_version("signer")
    new_signature = vault.backend.signer(vault.ref(), NO_PASSWORD).sign(PAYLOAD)
    trusted = vault.backend.public_keys(vault.ref(), NO_PASSWORD)
    for signature in (old_signature, new_signature):
        assert any(key.verify(signature, PAYLOAD) for key in trusted)


def test_a_short_signature_is_refused(vault: Vault) -> None:
    vault.double.add_version("signer")
    vault.double.short_signatures = True
    signer = vault.backend.signer(vault.ref(), NO_PASSWORD)
    with pytest.raises(KMSError, match="returned a 63-byte ES256 signature, not 64"):
        signer.sign(PAYLOAD)


# --- wrong keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kty", "private_key", "described"),
    [
        ("RSA", rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA"),
        ("oct-HSM", None, "oct-HSM"),
        ("EC", ec.generate_private_key(ec.SECP384R1()), "EC P-384"),
    ],
)
def test_a_key_of_another_type_is_refused_naming_it(
    vault: Vault, kty: str, private_key: SigningKey | None, described: str
) -> None:
    vault.double.add_version("signer", kty, private_key)
    for use in (vault.backend.signer, vault.backend.public_key, vault.backend.public_keys):
        with pytest.raises(KMSError) as caught:
            use(vault.ref(), NO_PASSWORD)
        assert caught.value.diagnostics() == (
            f"azurekms://{vault.ref()}: the key is {described}; signgate needs an EC P-256 key"
        )
    assert vault.double.calls("sign") == []


def test_a_key_that_may_not_sign_is_refused(vault: Vault) -> None:
    vault.double.add_version("signer", key_ops=["verify"])
    with pytest.raises(KMSError) as caught:
        vault.backend.signer(vault.ref(), NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"azurekms://{vault.ref()}: the key does not allow sign (key_ops: verify)"
    )
    # Verifying needs no sign permission on the key.
    assert vault.backend.public_key(vault.ref(), NO_PASSWORD)


def test_a_disabled_current_version_is_refused(vault: Vault) -> None:
    version = vault.double.add_version("signer", enabled=False)
    with pytest.raises(KMSError) as caught:
        vault.backend.signer(vault.ref(), NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"azurekms://{vault.ref()}: version {version.version} is disabled"
    )


def test_a_key_without_enabled_versions_is_refused(vault: Vault) -> None:
    vault.double.add_version("signer", enabled=False)
    with pytest.raises(KMSError) as caught:
        vault.backend.public_keys(vault.ref(), NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"azurekms://{vault.ref()}: the key has no enabled version in Azure Key Vault"
    )


# --- errors from the service ----------------------------------------------------------------


def test_a_missing_key_names_the_key_and_the_vault(vault: Vault) -> None:
    for use in (vault.backend.signer, vault.backend.public_key, vault.backend.public_keys):
        with pytest.raises(KMSError) as caught:
            use(vault.ref(), NO_PASSWORD)
        assert caught.value.diagnostics() == (
            f"azurekms://{vault.ref()}: no such key in Azure Key Vault {vault.double.vault_host}"
        )


def test_permission_denied_names_the_action(vault: Vault) -> None:
    vault.double.add_version("signer")
    signer = vault.backend.signer(vault.ref(), NO_PASSWORD)
    vault.double.faults["sign"] = (
        403,
        "Forbidden",
        "The user, group or application 'appid=...;oid=...' does not have keys sign permission "
        "on key vault 'signgate;location=westeurope'.",
    )
    with pytest.raises(KMSError) as caught:
        signer.sign(PAYLOAD)
    assert caught.value.diagnostics() == (
        f"azurekms://{vault.ref()}: permission denied to sign (HTTP 403 Forbidden): the "
        "identity needs the key permission or a Key Vault Crypto role"
    )


def test_a_token_key_vault_refuses_is_not_repeated(vault: Vault) -> None:
    vault.double.add_version("signer")
    other = "eyJ0eXAiOiJKV1QifQ.someone-elses-secret-token.sig"
    backend = AzureKeyVault(TokenCredentialDouble(token=other), vault.double)
    with pytest.raises(KMSError) as caught:
        backend.public_key(vault.ref(), NO_PASSWORD)
    message = str(caught.value)
    assert message == (
        f"azurekms://{vault.ref()}: no Azure credentials that Key Vault accepts "
        "(DefaultAzureCredential: AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, workload "
        "or managed identity, az login)"
    )
    assert "secret" not in message


def test_no_credential_is_reported_without_azure_identitys_text(vault: Vault) -> None:
    failure = ClientAuthenticationError(
        "DefaultAzureCredential failed to retrieve a token from the included credentials.\n"
        "Attempted credentials:\n\tEnvironmentCredential: client_secret=hunter2 rejected"
    )
    backend = AzureKeyVault(TokenCredentialDouble(failure=failure), vault.double)
    with pytest.raises(KMSError) as caught:
        backend.signer(vault.ref(), NO_PASSWORD)
    assert "no Azure credentials that Key Vault accepts" in caught.value.diagnostics()
    assert "hunter2" not in str(caught.value)


def test_other_refusals_carry_the_status_and_code(vault: Vault) -> None:
    vault.double.faults["get_key"] = (429, "Throttled", "Request was not processed because "
                                      "too many requests were received.")
    with pytest.raises(KMSError) as caught:
        vault.backend.public_key(vault.ref(), NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"azurekms://{vault.ref()}: Azure Key Vault refused to read the key (HTTP 429 Throttled)"
    )
    # The SDK's retries ran (and paused) before the refusal was final.
    assert len(vault.double.calls("get_key")) > 1
    assert vault.double.pauses


def test_an_unreachable_vault() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{probe.getsockname()[1]}"
    # Nothing listens there now: the real transport's connection is refused, retries and all.
    backend = AzureKeyVault(TokenCredentialDouble(), RequestsTransportWithoutPauses())
    with pytest.raises(KMSError) as caught:
        backend.public_key(f"{host}/signer", NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"azurekms://{host}/signer: cannot reach Azure Key Vault at https://{host}/"
    )


# --- creating keys --------------------------------------------------------------------------


@pytest.mark.parametrize(("hardware", "kty"), [(False, "EC"), (True, "EC-HSM")])
def test_create_key_makes_a_p256_signing_key(vault: Vault, hardware: bool, kty: str) -> None:
    backend = AzureKeyVault(vault.credential, vault.double, hardware_protected=hardware)

    public_key = backend.create_key(vault.ref(), NO_PASSWORD)

    (request,) = vault.double.calls("create_key")
    assert request.path == "/keys/signer/create"
    assert request.body["kty"] == kty
    assert request.body["crv"] == "P-256"
    assert request.body["key_ops"] == ["sign", "verify"]
    assert request.body["tags"] == {"use": "sigstore"}
    (created,) = vault.double.keys["signer"]
    assert public_key == vault.double.public_key(created)
    signature = backend.signer(vault.ref(), NO_PASSWORD).sign(PAYLOAD)
    assert public_key.verify(signature, PAYLOAD)


def test_create_key_refuses_an_existing_key(vault: Vault) -> None:
    vault.double.add_version("signer")
    with pytest.raises(KMSError) as caught:
        vault.backend.create_key(vault.ref(), NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"azurekms://{vault.ref()}: the key exists already in Azure Key Vault"
    )
    # Creating it again would have made a new version: a silent rotation.
    assert vault.double.calls("create_key") == []
    assert len(vault.double.keys["signer"]) == 1


def test_create_key_refuses_a_version(vault: Vault) -> None:
    with pytest.raises(KMSError, match="Key Vault names a new key's version; drop /abc"):
        vault.backend.create_key(vault.ref(version="abc"), NO_PASSWORD)
    assert vault.double.requests == []


def test_create_key_permission_denied(vault: Vault) -> None:
    vault.double.faults["create_key"] = (403, "Forbidden", "Caller is not authorized.")
    with pytest.raises(KMSError, match=r"permission denied to create the key \(HTTP 403"):
        vault.backend.create_key(vault.ref(), NO_PASSWORD)


# --- retiring versions and adding new ones -------------------------------------------------


def test_disabling_a_version_stops_its_signing_and_the_trust_in_it(vault: Vault) -> None:
    old = vault.double.add_version("signer")
    current = vault.double.add_version("signer")
    old_ref = vault.ref(version=old.version)
    old_signature = vault.backend.signer(old_ref, NO_PASSWORD).sign(PAYLOAD)

    assert vault.backend.disable_key(old_ref) == (
        f"azurekms://{old_ref}: disabled in Azure Key Vault"
    )
    assert old.enabled is False
    (update,) = vault.double.calls("update_key")
    assert update.path == f"/keys/signer/{old.version}"
    assert update.body["attributes"] == {"enabled": False}
    trusted = vault.backend.public_keys(vault.ref(), NO_PASSWORD)
    assert trusted == [vault.double.public_key(current)]
    assert not any(key.verify(old_signature, PAYLOAD) for key in trusted)
    for use in (vault.backend.signer, vault.backend.public_keys):
        with pytest.raises(KMSError) as caught:
            use(old_ref, NO_PASSWORD)
        assert caught.value.diagnostics() == (
            f"azurekms://{old_ref}: version {old.version} is disabled"
        )

    assert vault.backend.disable_key(old_ref) == (
        f"azurekms://{old_ref}: disabled already in Azure Key Vault"
    )
    assert len(vault.double.calls("update_key")) == 1


def test_without_a_version_the_only_enabled_version_is_disabled(vault: Vault) -> None:
    vault.double.add_version("signer", enabled=False)
    current = vault.double.add_version("signer")
    assert vault.backend.disable_key(vault.ref()) == (
        f"azurekms://{vault.ref(version=current.version)}: disabled in Azure Key Vault"
    )
    assert current.enabled is False
    with pytest.raises(KMSError, match=f"version {current.version} is disabled"):
        vault.backend.signer(vault.ref(), NO_PASSWORD)
    assert vault.backend.disable_key(vault.ref()) == (
        f"azurekms://{vault.ref()}: no enabled version left in Azure Key Vault"
    )


def test_without_a_version_a_key_with_several_enabled_versions_is_refused(vault: Vault) -> None:
    first = vault.double.add_version("signer")
    second = vault.double.add_version("signer")
    vault.double.add_version("signer", enabled=False)
    with pytest.raises(KMSError) as caught:
        vault.backend.disable_key(vault.ref())
    assert caught.value.diagnostics() == (
        f"azurekms://{vault.ref()}: the key has 2 enabled versions ({second.version}, "
        f"{first.version}); name the one to disable, as in "
        f"azurekms://{vault.ref(version=first.version)}"
    )
    assert vault.double.calls("update_key") == []


def test_disabling_without_permission_names_the_action(vault: Vault) -> None:
    version = vault.double.add_version("signer")
    vault.double.faults["update_key"] = (403, "Forbidden", "Caller is not authorized.")
    with pytest.raises(KMSError) as caught:
        vault.backend.disable_key(vault.ref(version=version.version))
    assert caught.value.diagnostics() == (
        f"azurekms://{vault.ref(version=version.version)}: permission denied to disable the "
        "key version (HTTP 403 Forbidden): the identity needs the key permission or a Key "
        "Vault Crypto role"
    )


def test_a_new_version_signs_and_both_are_trusted_until_the_old_is_disabled(
    vault: Vault,
) -> None:
    old = vault.double.add_version(
        "signer", kty="EC-HSM", key_ops=["sign", "verify"], tags={"use": "sigstore"}
    )

    new_key = vault.backend.add_key_version(vault.ref())

    (create,) = vault.double.calls("create_key")
    assert create.path == "/keys/signer/create"
    assert (create.body["kty"], create.body["crv"]) == ("EC-HSM", "P-256")
    assert create.body["key_ops"] == ["sign", "verify"]
    assert create.body["tags"] == {"use": "sigstore"}
    _, new = vault.double.keys["signer"]
    assert new_key == vault.double.public_key(new)
    signer = vault.backend.signer(vault.ref(), NO_PASSWORD)
    assert signer.public_key() == new_key
    assert new_key.verify(signer.sign(PAYLOAD), PAYLOAD)
    assert vault.double.calls("sign")[-1].path == f"/keys/signer/{new.version}/sign"
    assert vault.backend.public_keys(vault.ref(), NO_PASSWORD) == [
        new_key, vault.double.public_key(old)
    ]

    vault.backend.disable_key(vault.ref(version=old.version))
    assert vault.backend.public_keys(vault.ref(), NO_PASSWORD) == [new_key]


def test_no_new_version_of_a_missing_key_or_one_of_another_type(vault: Vault) -> None:
    with pytest.raises(KMSError) as missing:
        vault.backend.add_key_version(vault.ref())
    assert missing.value.diagnostics() == (
        f"azurekms://{vault.ref()}: no such key in Azure Key Vault {vault.double.vault_host}"
    )
    vault.double.add_version(
        "signer", kty="RSA", private_key=rsa.generate_private_key(public_exponent=65537,
                                                                  key_size=2048)
    )
    with pytest.raises(KMSError) as other_type:
        vault.backend.add_key_version(vault.ref())
    assert other_type.value.diagnostics() == (
        f"azurekms://{vault.ref()}: the key is RSA; signgate needs an EC P-256 key"
    )
    assert vault.double.calls("create_key") == []


# --- an image, end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


def cosign2() -> Path:
    return tool_path("cosign2")


@pytest.mark.integration
def test_an_image_signed_through_key_vault_verifies_in_signgate_and_cosign(
    vault: Vault, registry: RunningRegistry, tmp_path: Path
) -> None:
    vault.double.add_version("signer")
    current = vault.double.add_version("signer")
    image = f"{registry.host}/azurekms/app:v1"

    async def sign_and_verify() -> ImageVerification:
        async with RegistryClient(registry.options()) as client:
            await push_image(client, registry.repository("azurekms/app"), "v1", content=b"az")
            reference = ImageReference.parse(image)
            await sign_image(
                client,
                vault.backend.signer(vault.ref(), NO_PASSWORD),
                reference,
                signature_format=CLASSIC,
            )
            return await verify_image(
                client, reference, vault.backend.public_keys(vault.ref(), NO_PASSWORD)
            )

    verdict = anyio.run(sign_and_verify)

    assert verdict.ok, verdict.reason()
    assert [r.path for r in vault.double.calls("sign")] == [f"/keys/signer/{current.version}/sign"]
    public_key = tmp_path / "cosign.pub"
    public_key.write_bytes(vault.backend.public_key(vault.ref(), NO_PASSWORD).pem())
    run(
        [
            str(cosign2()), "verify", "--key", str(public_key), "--insecure-ignore-tlog",
            "--allow-insecure-registry", image,
        ],
        tool_env(tmp_path),
    )
