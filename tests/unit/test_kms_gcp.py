"""``gcpkms://`` against a double of Cloud KMS, reached through the SDK's own gRPC transport.

No Google Cloud here: :class:`CloudKmsDouble` serves the KeyManagementService methods signgate
calls on a loopback gRPC server, and the real ``KeyManagementServiceClient`` talks to it over
the real gRPC transport (``KeyManagementServiceGrpcTransport(channel=...)``), so requests and
replies cross the wire as the SDK's own protobuf messages. The double signs with real P-256
keys: what it returns verifies, or fails to, for real.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import anyio
import grpc  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)

from signgate.errors import KMSError
from signgate.keys.kms import gcp
from signgate.keys.kms.gcp import GcpKeyName, GcpKms, crc32c, parse_gcp_key_name
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

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
Purpose = kms_v1.CryptoKey.CryptoKeyPurpose

RING = "projects/signgate-test/locations/europe-west1/keyRings/release"
KEY = f"{RING}/cryptoKeys/signer"
# cosign 2 reads only the classic signature image.
CLASSIC = SignatureFormat.CLASSIC
PAYLOAD = b'{"critical":{"type":"cosign container image signature"},"optional":null}'


def never_asked() -> bytes:
    raise AssertionError("a KMS backend asked for a password")


NO_PASSWORD: PasswordSource = never_asked


# --- the double -----------------------------------------------------------------------------


@dataclass
class VersionDouble:
    algorithm: int
    state: int
    private_key: SigningKey | None  # None: a symmetric key, no public half
    protection_level: int = kms_v1.ProtectionLevel.SOFTWARE
    pending_reads: int = 0  # GetCryptoKeyVersion answers PENDING_GENERATION this many times


@dataclass
class KeyDouble:
    purpose: int
    versions: dict[int, VersionDouble] = field(default_factory=dict)


class CloudKmsDouble:
    """Stands in for Google Cloud KMS's ``google.cloud.kms.v1.KeyManagementService`` (gRPC).

    Its replies were shaped after the API reference (https://cloud.google.com/kms/docs/reference/
    rpc/google.cloud.kms.v1) and the data integrity guide: GetPublicKey fills ``pem``,
    ``pem_crc32c``, ``algorithm``, ``name`` and ``protection_level``; AsymmetricSign fills
    ``signature`` (ASN.1 DER for EC keys), ``signature_crc32c``, ``verified_digest_crc32c``,
    ``name`` and ``protection_level``; errors carry the status codes and message forms the
    service uses. CreateCryptoKeyVersion makes the next version after the key's newest (its
    algorithm standing in for the key's version template); UpdateCryptoKeyVersion changes only
    ``state``, between ENABLED and DISABLED. ``faults`` makes a method fail with a given status;
    ``corruptions`` damages one integrity field of a reply. Every request is kept in
    ``requests``.
    """

    SERVICE = "google.cloud.kms.v1.KeyManagementService"

    def __init__(self) -> None:
        self.key_rings: set[str] = set()
        self.keys: dict[str, KeyDouble] = {}
        self.requests: list[tuple[str, Any]] = []
        self.faults: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.corruptions: set[str] = set()
        self.new_version_pending_reads = 1
        self.new_version_final_state: int = State.ENABLED
        self._server: grpc.Server | None = None

    # -- setting up keys

    def add_key(
        self,
        path: str,
        versions: dict[int, tuple[int, int]],
        purpose: int = Purpose.ASYMMETRIC_SIGN,
    ) -> None:
        """A key at ``path`` with ``{version: (algorithm, state)}``, each with a fresh key."""
        self.key_rings.add(path.rpartition("/cryptoKeys/")[0])
        key = KeyDouble(purpose)
        for number, (algorithm, state) in versions.items():
            key.versions[number] = VersionDouble(algorithm, state, _private_key_for(algorithm))
        self.keys[path] = key

    def public_key(self, version_path: str) -> PublicKey:
        key_path, _, number = version_path.rpartition("/cryptoKeyVersions/")
        private_key = self.keys[key_path].versions[int(number)].private_key
        assert isinstance(private_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
        return PublicKey(private_key.public_key())

    def calls(self, method: str) -> list[Any]:
        return [request for name, request in self.requests if name == method]

    # -- serving

    def start(self) -> str:
        handlers: dict[str, tuple[Callable[[Any, Any], Any], Any, Any]] = {
            "GetKeyRing": (self.get_key_ring, kms_v1.GetKeyRingRequest, kms_v1.KeyRing),
            "CreateKeyRing": (self.create_key_ring, kms_v1.CreateKeyRingRequest, kms_v1.KeyRing),
            "CreateCryptoKey": (
                self.create_crypto_key, kms_v1.CreateCryptoKeyRequest, kms_v1.CryptoKey,
            ),
            "CreateCryptoKeyVersion": (
                self.create_crypto_key_version,
                kms_v1.CreateCryptoKeyVersionRequest,
                kms_v1.CryptoKeyVersion,
            ),
            "UpdateCryptoKeyVersion": (
                self.update_crypto_key_version,
                kms_v1.UpdateCryptoKeyVersionRequest,
                kms_v1.CryptoKeyVersion,
            ),
            "GetCryptoKeyVersion": (
                self.get_crypto_key_version,
                kms_v1.GetCryptoKeyVersionRequest,
                kms_v1.CryptoKeyVersion,
            ),
            "ListCryptoKeyVersions": (
                self.list_crypto_key_versions,
                kms_v1.ListCryptoKeyVersionsRequest,
                kms_v1.ListCryptoKeyVersionsResponse,
            ),
            "GetPublicKey": (self.get_public_key, kms_v1.GetPublicKeyRequest, kms_v1.PublicKey),
            "AsymmetricSign": (
                self.asymmetric_sign, kms_v1.AsymmetricSignRequest, kms_v1.AsymmetricSignResponse,
            ),
        }
        method_handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._recorded(name, handler),
                request_deserializer=request_type.deserialize,
                response_serializer=response_type.serialize,
            )
            for name, (handler, request_type, response_type) in handlers.items()
        }
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(self.SERVICE, method_handlers),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(None).wait()

    def _recorded(
        self, name: str, handler: Callable[[Any, grpc.ServicerContext], Any]
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            self.requests.append((name, request))
            if name in self.faults:
                code, message = self.faults[name]
                abort(context, code, message)
            return handler(request, context)

        return handle

    # -- the service's methods

    def get_key_ring(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.name not in self.key_rings:
            abort(context, grpc.StatusCode.NOT_FOUND, f"KeyRing {request.name} not found.")
        return kms_v1.KeyRing(name=request.name)

    def create_key_ring(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = f"{request.parent}/keyRings/{request.key_ring_id}"
        if name in self.key_rings:
            abort(context, grpc.StatusCode.ALREADY_EXISTS, f"KeyRing {name} already exists.")
        self.key_rings.add(name)
        return kms_v1.KeyRing(name=name)

    def create_crypto_key(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = f"{request.parent}/cryptoKeys/{request.crypto_key_id}"
        if request.parent not in self.key_rings:
            abort(context, grpc.StatusCode.NOT_FOUND, f"KeyRing {request.parent} not found.")
        if name in self.keys:
            abort(context, grpc.StatusCode.ALREADY_EXISTS, f"CryptoKey {name} already exists.")
        template = request.crypto_key.version_template
        version = VersionDouble(
            template.algorithm,
            State.PENDING_GENERATION,
            _private_key_for(template.algorithm),
            template.protection_level,
            pending_reads=self.new_version_pending_reads,
        )
        self.keys[name] = KeyDouble(request.crypto_key.purpose, {1: version})
        return kms_v1.CryptoKey(
            name=name, purpose=request.crypto_key.purpose, version_template=template
        )

    def create_crypto_key_version(self, request: Any, context: grpc.ServicerContext) -> Any:
        key = self.keys.get(request.parent)
        if key is None:
            abort(context, grpc.StatusCode.NOT_FOUND, f"CryptoKey {request.parent} not found.")
        assert key is not None
        newest = key.versions[max(key.versions)]
        number = max(key.versions) + 1
        key.versions[number] = VersionDouble(
            newest.algorithm,
            State.PENDING_GENERATION,
            _private_key_for(newest.algorithm),
            newest.protection_level,
            pending_reads=self.new_version_pending_reads,
        )
        path = f"{request.parent}/cryptoKeyVersions/{number}"
        return self._version_message(path, key.versions[number])

    def update_crypto_key_version(self, request: Any, context: grpc.ServicerContext) -> Any:
        path = request.crypto_key_version.name
        version = self._version(path, context)
        if list(request.update_mask.paths) != ["state"]:
            abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "unsupported update_mask in the double"
            )
        settable = (State.ENABLED, State.DISABLED)
        if request.crypto_key_version.state not in settable:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "The request cannot be fulfilled. crypto_key_version.state must be ENABLED or "
                "DISABLED.",
            )
        if version.state not in settable:
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"The request cannot be fulfilled. Resource {path} has value "
                f"{State(version.state).name} in field crypto_key_version.state.",
            )
        version.state = request.crypto_key_version.state
        return self._version_message(path, version)

    def get_crypto_key_version(self, request: Any, context: grpc.ServicerContext) -> Any:
        version = self._version(request.name, context)
        if version.state == State.PENDING_GENERATION:
            if version.pending_reads > 0:
                version.pending_reads -= 1
            else:
                version.state = self.new_version_final_state
        return self._version_message(request.name, version)

    def list_crypto_key_versions(self, request: Any, context: grpc.ServicerContext) -> Any:
        key = self.keys.get(request.parent)
        if key is None:
            abort(context, grpc.StatusCode.NOT_FOUND, f"CryptoKey {request.parent} not found.")
        if request.filter not in ("", "state=ENABLED"):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "unsupported filter in the double")
        listed = [
            self._version_message(f"{request.parent}/cryptoKeyVersions/{number}", version)
            for number, version in sorted(key.versions.items())
            if not request.filter or version.state == State.ENABLED
        ]
        # Two to a page, so that the SDK's pager has to follow next_page_token.
        start = int(request.page_token or 0)
        page = listed[start : start + 2]
        more = start + 2 < len(listed)
        return kms_v1.ListCryptoKeyVersionsResponse(
            crypto_key_versions=page,
            next_page_token=str(start + 2) if more else "",
            total_size=len(listed),
        )

    def get_public_key(self, request: Any, context: grpc.ServicerContext) -> Any:
        version = self._version(request.name, context)
        if version.private_key is None:
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"CryptoKeyVersion {request.name} has algorithm GOOGLE_SYMMETRIC_ENCRYPTION; "
                "GetPublicKey needs an asymmetric key.",
            )
        if version.state != State.ENABLED:
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"CryptoKeyVersion {request.name} is not enabled.",
            )
        pem = (
            version.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        pem_crc32c = crc32c(pem.encode()) ^ (1 if "pem_crc32c" in self.corruptions else 0)
        return kms_v1.PublicKey(
            pem=pem,
            algorithm=version.algorithm,
            pem_crc32c=pem_crc32c,
            name=request.name,
            protection_level=version.protection_level,
        )

    def asymmetric_sign(self, request: Any, context: grpc.ServicerContext) -> Any:
        version = self._version(request.name, context)
        if version.state != State.ENABLED:
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"CryptoKeyVersion {request.name} is not enabled.",
            )
        private_key = version.private_key
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "not an EC signing key")
        digest = request.digest.sha256
        if request.digest_crc32c is not None and request.digest_crc32c != crc32c(digest):
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "The checksum in field digest_crc32c did not match the data in field digest.",
            )
        signature = private_key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        damaged = self.corruptions
        return kms_v1.AsymmetricSignResponse(
            signature=signature,
            signature_crc32c=crc32c(signature) ^ (1 if "signature_crc32c" in damaged else 0),
            verified_digest_crc32c=(
                request.digest_crc32c is not None and "verified_digest_crc32c" not in damaged
            ),
            name=f"{request.name}-other" if "name" in self.corruptions else request.name,
            protection_level=version.protection_level,
        )

    def _version(self, path: str, context: grpc.ServicerContext) -> VersionDouble:
        key_path, _, number = path.rpartition("/cryptoKeyVersions/")
        key = self.keys.get(key_path)
        version = key.versions.get(int(number)) if key is not None and number.isdigit() else None
        if version is None:
            abort(context, grpc.StatusCode.NOT_FOUND, f"CryptoKeyVersion {path} not found.")
        assert version is not None
        return version

    @staticmethod
    def _version_message(path: str, version: VersionDouble) -> Any:
        return kms_v1.CryptoKeyVersion(
            name=path,
            state=version.state,
            algorithm=version.algorithm,
            protection_level=version.protection_level,
        )


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with a gRPC status, as the service does."""
    context.abort(code, message)
    raise AssertionError("grpc's abort returned")


def _private_key_for(algorithm: int) -> SigningKey | None:
    if algorithm == Algorithm.EC_SIGN_P256_SHA256:
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == Algorithm.EC_SIGN_P384_SHA384:
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == Algorithm.RSA_SIGN_PKCS1_2048_SHA256:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return None


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Kms:
    double: CloudKmsDouble
    client: kms_v1.KeyManagementServiceClient
    backend: GcpKms


def client_on(address: str) -> kms_v1.KeyManagementServiceClient:
    channel = grpc.insecure_channel(address)
    return kms_v1.KeyManagementServiceClient(
        transport=KeyManagementServiceGrpcTransport(channel=channel)
    )


@pytest.fixture
def kms() -> Iterator[Kms]:
    double = CloudKmsDouble()
    address = double.start()
    client = client_on(address)
    try:
        yield Kms(double, client, GcpKms(client, deadline=10.0))
    finally:
        client.transport.close()  # type: ignore[no-untyped-call]
        double.stop()


def p256_key(kms: Kms, versions: dict[int, int], path: str = KEY) -> None:
    kms.double.add_key(path, {n: (Algorithm.EC_SIGN_P256_SHA256, s) for n, s in versions.items()})


# --- the reference grammar ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (
            "projects/p/locations/global/keyRings/r/cryptoKeys/k",
            GcpKeyName("p", "global", "r", "k"),
        ),
        (
            "projects/my-proj/locations/europe-west1/keyRings/ci/cryptoKeys/cosign/"
            "cryptoKeyVersions/3",
            GcpKeyName("my-proj", "europe-west1", "ci", "cosign", 3),
        ),
        # cosign's shorter spelling of the version.
        (
            "projects/p/locations/l/keyRings/r/cryptoKeys/k/versions/12",
            GcpKeyName("p", "l", "r", "k", 12),
        ),
        # Domain-scoped project ids have ':' and '.'.
        (
            "projects/example.com:proj/locations/us/keyRings/r_1/cryptoKeys/k-2",
            GcpKeyName("example.com:proj", "us", "r_1", "k-2"),
        ),
    ],
)
def test_valid_references(location: str, expected: GcpKeyName) -> None:
    assert parse_gcp_key_name(location) == expected


@pytest.mark.parametrize(
    "location",
    [
        "",
        "projects/p",
        "projects/p/locations/l/keyRings/r",
        "projects/p/locations/l/keyRings/r/cryptoKeys/",
        "projects/p/locations/l/keyRings/r/cryptoKeys/k/",
        "projects//locations/l/keyRings/r/cryptoKeys/k",
        "/projects/p/locations/l/keyRings/r/cryptoKeys/k",
        "locations/l/keyRings/r/cryptoKeys/k",
        "projects/p/locations/l/keyrings/r/cryptoKeys/k",
        "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/",
        "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/0",
        "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/latest",
        "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1/extra",
        "projects/p/locations/l/keyRings/r/cryptoKeys/k/keyVersions/1",
        "projects/p q/locations/l/keyRings/r/cryptoKeys/k",
        "projects/p/locations/l/keyRings/r/cryptoKeys/k\n",
    ],
)
def test_invalid_references_are_refused_naming_them(location: str) -> None:
    with pytest.raises(KMSError) as caught:
        parse_gcp_key_name(location)
    message = caught.value.diagnostics()
    assert message.startswith(" ".join(f"gcpkms://{location}: not a Cloud KMS key".split()))
    assert "cryptoKeys/K[/cryptoKeyVersions/V]" in message


def test_reference_prints_as_it_was_given() -> None:
    name = parse_gcp_key_name(f"{KEY}/cryptoKeyVersions/2")
    assert str(name) == f"gcpkms://{KEY}/cryptoKeyVersions/2"
    assert str(parse_gcp_key_name(f"{KEY}/versions/2")) == f"gcpkms://{KEY}/cryptoKeyVersions/2"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"123456789", 0xE3069283),  # the CRC catalogue's check value for CRC-32C
        # RFC 3720, appendix B.4.
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


def test_the_module_backend_is_every_kind_of_backend() -> None:
    backend = gcp.backend("gcpkms")
    assert isinstance(backend, KeyBackend)
    assert isinstance(backend, KeyCreator)
    assert isinstance(backend, VersionedKeys)
    assert isinstance(backend, KeyDisabler)
    assert isinstance(backend, KeyVersioner)


# --- signing --------------------------------------------------------------------------------


def test_signing_sends_the_digest_to_the_newest_enabled_version(kms: Kms) -> None:
    # 10 is newer than 9: versions are numbers, not text.
    p256_key(kms, {1: State.ENABLED, 9: State.ENABLED, 10: State.ENABLED, 11: State.DISABLED})
    signer = kms.backend.signer(KEY, NO_PASSWORD)

    signature = signer.sign(PAYLOAD)

    (request,) = kms.double.calls("AsymmetricSign")
    digest = hashlib.sha256(PAYLOAD).digest()
    assert request.name == f"{KEY}/cryptoKeyVersions/10"
    assert request.digest.sha256 == digest
    assert request.digest_crc32c == crc32c(digest)
    (listing, *more_pages) = kms.double.calls("ListCryptoKeyVersions")
    assert listing.parent == KEY
    assert listing.filter == "state=ENABLED"
    assert len(more_pages) == 1  # three enabled versions, two to a page
    newest = kms.double.public_key(f"{KEY}/cryptoKeyVersions/10")
    assert signer.public_key() == newest
    assert newest.verify(signature, PAYLOAD)
    assert not kms.double.public_key(f"{KEY}/cryptoKeyVersions/9").verify(signature, PAYLOAD)
    assert signature[0] == 0x30  # ASN.1 DER, as Cloud KMS returns and cosign stores


def test_a_pinned_version_signs_with_that_version(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED, 2: State.ENABLED})
    signer = kms.backend.signer(f"{KEY}/cryptoKeyVersions/1", NO_PASSWORD)

    signature = signer.sign(PAYLOAD)

    assert [r.name for r in kms.double.calls("GetCryptoKeyVersion")] == [
        f"{KEY}/cryptoKeyVersions/1"
    ]
    assert [r.name for r in kms.double.calls("AsymmetricSign")] == [f"{KEY}/cryptoKeyVersions/1"]
    assert kms.double.calls("ListCryptoKeyVersions") == []
    assert kms.double.public_key(f"{KEY}/cryptoKeyVersions/1").verify(signature, PAYLOAD)


def test_the_public_key_is_the_signing_versions(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED, 2: State.ENABLED})
    assert kms.backend.public_key(KEY, NO_PASSWORD) == kms.double.public_key(
        f"{KEY}/cryptoKeyVersions/2"
    )
    assert kms.backend.public_key(f"{KEY}/versions/1", NO_PASSWORD) == kms.double.public_key(
        f"{KEY}/cryptoKeyVersions/1"
    )
    (request, _) = kms.double.calls("GetPublicKey")
    assert request.name == f"{KEY}/cryptoKeyVersions/2"


def test_verifiers_trust_every_enabled_version_newest_first(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED, 2: State.DISABLED, 3: State.ENABLED, 4: State.DESTROYED})
    keys = kms.backend.public_keys(KEY, NO_PASSWORD)
    assert keys == [
        kms.double.public_key(f"{KEY}/cryptoKeyVersions/3"),
        kms.double.public_key(f"{KEY}/cryptoKeyVersions/1"),
    ]
    pinned = kms.backend.public_keys(f"{KEY}/cryptoKeyVersions/1", NO_PASSWORD)
    assert pinned == [kms.double.public_key(f"{KEY}/cryptoKeyVersions/1")]


def test_a_signature_from_a_rotated_key_still_verifies(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED})
    old_signature = kms.backend.signer(KEY, NO_PASSWORD).sign(PAYLOAD)
    kms.double.keys[KEY].versions[2] = VersionDouble(
        Algorithm.EC_SIGN_P256_SHA256, State.ENABLED, ec.generate_private_key(ec.SECP256R1())
    )
    new_signer = kms.backend.signer(KEY, NO_PASSWORD)
    new_signature = new_signer.sign(PAYLOAD)
    trusted = kms.backend.public_keys(KEY, NO_PASSWORD)
    assert new_signer.public_key() == kms.double.public_key(f"{KEY}/cryptoKeyVersions/2")
    for signature in (old_signature, new_signature):
        assert any(key.verify(signature, PAYLOAD) for key in trusted)


# --- integrity checks (CRC32C) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        ("signature_crc32c", "the signature was corrupted in transit (CRC32C)"),
        ("verified_digest_crc32c", "Cloud KMS did not receive the digest intact (CRC32C)"),
        ("name", f"Cloud KMS signed with {KEY}/cryptoKeyVersions/1-other"),
    ],
)
def test_a_damaged_sign_reply_is_refused(kms: Kms, corruption: str, message: str) -> None:
    p256_key(kms, {1: State.ENABLED})
    signer = kms.backend.signer(KEY, NO_PASSWORD)
    kms.double.corruptions.add(corruption)
    with pytest.raises(KMSError) as caught:
        signer.sign(PAYLOAD)
    assert caught.value.diagnostics() == f"gcpkms://{KEY}: {message}" + (
        "; try again" if corruption == "signature_crc32c" else ""
    )


def test_a_damaged_public_key_is_refused(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED})
    kms.double.corruptions.add("pem_crc32c")
    with pytest.raises(KMSError, match=r"public key was corrupted in transit \(CRC32C\)"):
        kms.backend.public_key(KEY, NO_PASSWORD)


# --- wrong keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "purpose", "name"),
    [
        (
            Algorithm.RSA_SIGN_PKCS1_2048_SHA256,
            Purpose.ASYMMETRIC_SIGN,
            "RSA_SIGN_PKCS1_2048_SHA256",
        ),
        (Algorithm.EC_SIGN_P384_SHA384, Purpose.ASYMMETRIC_SIGN, "EC_SIGN_P384_SHA384"),
        (
            Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
            Purpose.ENCRYPT_DECRYPT,
            "GOOGLE_SYMMETRIC_ENCRYPTION",
        ),
    ],
)
@pytest.mark.parametrize("pinned", [False, True])
def test_a_key_of_another_algorithm_is_refused_naming_it(
    kms: Kms, algorithm: int, purpose: int, name: str, pinned: bool
) -> None:
    kms.double.add_key(KEY, {1: (algorithm, State.ENABLED)}, purpose)
    location = f"{KEY}/cryptoKeyVersions/1" if pinned else KEY
    for use in (kms.backend.signer, kms.backend.public_key, kms.backend.public_keys):
        with pytest.raises(KMSError) as caught:
            use(location, NO_PASSWORD)
        assert caught.value.diagnostics() == (
            f"gcpkms://{location}: version 1 is {name}; signgate needs an ASYMMETRIC_SIGN key "
            "with EC_SIGN_P256_SHA256"
        )
    assert kms.double.calls("AsymmetricSign") == []


def test_a_disabled_pinned_version_is_refused(kms: Kms) -> None:
    p256_key(kms, {1: State.DISABLED, 2: State.ENABLED})
    with pytest.raises(KMSError) as caught:
        kms.backend.signer(f"{KEY}/cryptoKeyVersions/1", NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"gcpkms://{KEY}/cryptoKeyVersions/1: version 1 is DISABLED; signgate uses ENABLED "
        "versions"
    )


def test_a_key_without_enabled_versions_is_refused(kms: Kms) -> None:
    p256_key(kms, {1: State.DISABLED, 2: State.DESTROY_SCHEDULED})
    for use in (kms.backend.signer, kms.backend.public_keys):
        with pytest.raises(KMSError) as caught:
            use(KEY, NO_PASSWORD)
        assert caught.value.diagnostics() == (
            f"gcpkms://{KEY}: the key has no ENABLED version in Cloud KMS"
        )


# --- errors from the service ----------------------------------------------------------------


def test_a_missing_key_names_the_key(kms: Kms) -> None:
    with pytest.raises(KMSError) as caught:
        kms.backend.signer(KEY, NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"gcpkms://{KEY}: not found in Cloud KMS (CryptoKey {KEY} not found.)"
    )
    with pytest.raises(KMSError) as caught:
        kms.backend.public_key(f"{KEY}/cryptoKeyVersions/7", NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"gcpkms://{KEY}/cryptoKeyVersions/7: not found in Cloud KMS "
        f"(CryptoKeyVersion {KEY}/cryptoKeyVersions/7 not found.)"
    )


def test_permission_denied_names_the_action_and_the_permission(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED})
    signer = kms.backend.signer(KEY, NO_PASSWORD)
    denial = (
        f"Permission 'cloudkms.cryptoKeyVersions.useToSign' denied on resource "
        f"'{KEY}/cryptoKeyVersions/1' (or it may not exist)."
    )
    kms.double.faults["AsymmetricSign"] = (grpc.StatusCode.PERMISSION_DENIED, denial)
    with pytest.raises(KMSError) as caught:
        signer.sign(PAYLOAD)
    assert caught.value.diagnostics() == f"gcpkms://{KEY}: permission denied to sign ({denial})"


def test_refused_credentials_are_reported_without_the_services_text(kms: Kms) -> None:
    kms.double.faults["ListCryptoKeyVersions"] = (
        grpc.StatusCode.UNAUTHENTICATED,
        "Request had invalid authentication credentials. Expected OAuth 2 access token, "
        "login cookie or other valid authentication credential.",
    )
    with pytest.raises(KMSError) as caught:
        kms.backend.public_keys(KEY, NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"gcpkms://{KEY}: Cloud KMS refused the credentials: no usable Google credentials "
        "(Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth "
        "application-default login`, or the metadata server)"
    )


def test_other_refusals_carry_the_status_code(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED})
    kms.double.faults["GetPublicKey"] = (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "Quota exceeded for quota metric 'Read requests'."
    )
    with pytest.raises(KMSError) as caught:
        kms.backend.public_key(KEY, NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"gcpkms://{KEY}: Cloud KMS refused to read the public key: RESOURCE_EXHAUSTED "
        "Quota exceeded for quota metric 'Read requests'."
    )


def test_an_unreachable_kms_is_reported_after_the_deadline() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    # Nothing listens there now.
    client = client_on(address)
    try:
        with pytest.raises(KMSError) as caught:
            GcpKms(client, deadline=0.5).public_key(KEY, NO_PASSWORD)
    finally:
        client.transport.close()  # type: ignore[no-untyped-call]
    assert caught.value.diagnostics().startswith(
        f"gcpkms://{KEY}: cannot reach Cloud KMS to list the key versions"
    )


def test_missing_application_default_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A service account file whose key is broken: the auth library's error quotes the file,
    # signgate's never does.
    secret = (
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n"
    )
    credentials = tmp_path / "service-account.json"
    credentials.write_text(
        '{"type": "service_account", "project_id": "p", "private_key_id": "abc", '
        f'"private_key": {secret!r}, "client_email": "sa@p.iam.gserviceaccount.com", '
        '"token_uri": "https://oauth2.googleapis.com/token"}'.replace("'", '"').replace(
            "\n", "\\n"
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
    with pytest.raises(KMSError) as caught:
        GcpKms().public_key(KEY, NO_PASSWORD)
    message = caught.value.diagnostics()
    assert message == (
        f"gcpkms://{KEY}: no usable Google credentials (Application Default Credentials: "
        "GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, or the "
        "metadata server)"
    )
    assert "c2VjcmV0" not in str(caught.value)


def test_no_credentials_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(KMSError, match="no usable Google credentials"):
        GcpKms().signer(KEY, NO_PASSWORD)


# --- creating keys --------------------------------------------------------------------------


def test_create_key_makes_the_key_ring_and_an_asymmetric_p256_key(kms: Kms) -> None:
    kms.double.new_version_pending_reads = 2

    public_key = kms.backend.create_key(KEY, NO_PASSWORD)

    (ring_request,) = kms.double.calls("CreateKeyRing")
    assert ring_request.parent == "projects/signgate-test/locations/europe-west1"
    assert ring_request.key_ring_id == "release"
    (key_request,) = kms.double.calls("CreateCryptoKey")
    assert key_request.parent == RING
    assert key_request.crypto_key_id == "signer"
    assert key_request.crypto_key.purpose == Purpose.ASYMMETRIC_SIGN
    template = key_request.crypto_key.version_template
    assert template.algorithm == Algorithm.EC_SIGN_P256_SHA256
    assert template.protection_level == kms_v1.ProtectionLevel.SOFTWARE
    # It waited while the first version was PENDING_GENERATION.
    assert len(kms.double.calls("GetCryptoKeyVersion")) == 3
    assert public_key == kms.double.public_key(f"{KEY}/cryptoKeyVersions/1")
    signature = kms.backend.signer(KEY, NO_PASSWORD).sign(PAYLOAD)
    assert public_key.verify(signature, PAYLOAD)


def test_create_key_in_an_existing_ring_on_an_hsm(kms: Kms) -> None:
    kms.double.key_rings.add(RING)
    backend = GcpKms(kms.client, protection_level="HSM")
    backend.create_key(KEY, NO_PASSWORD)
    assert kms.double.calls("CreateKeyRing") == []
    (key_request,) = kms.double.calls("CreateCryptoKey")
    assert key_request.crypto_key.version_template.protection_level == kms_v1.ProtectionLevel.HSM


def test_create_key_refuses_an_existing_key(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED})
    with pytest.raises(KMSError) as caught:
        kms.backend.create_key(KEY, NO_PASSWORD)
    assert caught.value.diagnostics() == f"gcpkms://{KEY}: the key exists already in Cloud KMS"


def test_create_key_refuses_a_version(kms: Kms) -> None:
    with pytest.raises(KMSError, match="a new key starts at version 1"):
        kms.backend.create_key(f"{KEY}/cryptoKeyVersions/1", NO_PASSWORD)
    assert kms.double.requests == []


def test_create_key_reports_a_failed_generation(kms: Kms) -> None:
    kms.double.key_rings.add(RING)
    kms.double.new_version_final_state = State.GENERATION_FAILED
    with pytest.raises(KMSError) as caught:
        kms.backend.create_key(KEY, NO_PASSWORD)
    assert caught.value.diagnostics() == (
        f"gcpkms://{KEY}: version 1 is GENERATION_FAILED; signgate uses ENABLED versions"
    )


def test_an_unknown_protection_level_is_refused() -> None:
    with pytest.raises(KMSError, match="protection level 'EXTERNAL'; use SOFTWARE or HSM"):
        GcpKms(protection_level="EXTERNAL")


# --- retiring versions and adding new ones -------------------------------------------------


def test_disabling_a_version_stops_its_signing_and_the_trust_in_it(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED, 2: State.ENABLED})
    old = f"{KEY}/cryptoKeyVersions/1"
    old_signature = kms.backend.signer(old, NO_PASSWORD).sign(PAYLOAD)

    assert kms.backend.disable_key(old) == f"gcpkms://{old}: DISABLED in Cloud KMS"
    assert kms.double.keys[KEY].versions[1].state == State.DISABLED
    (update,) = kms.double.calls("UpdateCryptoKeyVersion")
    assert update.crypto_key_version.name == old
    assert list(update.update_mask.paths) == ["state"]
    trusted = kms.backend.public_keys(KEY, NO_PASSWORD)
    assert trusted == [kms.double.public_key(f"{KEY}/cryptoKeyVersions/2")]
    assert not any(key.verify(old_signature, PAYLOAD) for key in trusted)
    for use in (kms.backend.signer, kms.backend.public_keys):
        with pytest.raises(KMSError) as caught:
            use(old, NO_PASSWORD)
        assert caught.value.diagnostics() == (
            f"gcpkms://{old}: version 1 is DISABLED; signgate uses ENABLED versions"
        )

    assert kms.backend.disable_key(old) == f"gcpkms://{old}: DISABLED already in Cloud KMS"
    assert len(kms.double.calls("UpdateCryptoKeyVersion")) == 1


def test_without_a_version_the_only_enabled_version_is_disabled(kms: Kms) -> None:
    p256_key(kms, {1: State.DISABLED, 2: State.ENABLED})
    assert kms.backend.disable_key(KEY) == (
        f"gcpkms://{KEY}/cryptoKeyVersions/2: DISABLED in Cloud KMS"
    )
    assert kms.double.keys[KEY].versions[2].state == State.DISABLED
    with pytest.raises(KMSError, match="the key has no ENABLED version"):
        kms.backend.signer(KEY, NO_PASSWORD)
    assert kms.backend.disable_key(KEY) == f"gcpkms://{KEY}: no ENABLED version left in Cloud KMS"


def test_without_a_version_a_key_with_several_enabled_versions_is_refused(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED, 2: State.ENABLED, 3: State.DISABLED})
    with pytest.raises(KMSError) as caught:
        kms.backend.disable_key(KEY)
    assert caught.value.diagnostics() == (
        f"gcpkms://{KEY}: the key has 2 ENABLED versions (2, 1); name the one to disable, as "
        f"in gcpkms://{KEY}/cryptoKeyVersions/1"
    )
    assert kms.double.calls("UpdateCryptoKeyVersion") == []


def test_versions_scheduled_for_destruction_are_left_as_they_are(kms: Kms) -> None:
    p256_key(kms, {1: State.DESTROY_SCHEDULED, 2: State.ENABLED})
    assert kms.backend.disable_key(f"{KEY}/cryptoKeyVersions/1") == (
        f"gcpkms://{KEY}/cryptoKeyVersions/1: DESTROY_SCHEDULED already in Cloud KMS"
    )
    assert kms.double.calls("UpdateCryptoKeyVersion") == []


def test_disabling_without_permission_names_the_action(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED, 2: State.ENABLED})
    denial = (
        "Permission 'cloudkms.cryptoKeyVersions.update' denied on resource "
        f"'{KEY}/cryptoKeyVersions/1' (or it may not exist)."
    )
    kms.double.faults["UpdateCryptoKeyVersion"] = (grpc.StatusCode.PERMISSION_DENIED, denial)
    with pytest.raises(KMSError) as caught:
        kms.backend.disable_key(f"{KEY}/cryptoKeyVersions/1")
    assert caught.value.diagnostics() == (
        f"gcpkms://{KEY}/cryptoKeyVersions/1: permission denied to disable the key version "
        f"({denial})"
    )


def test_a_new_version_signs_and_both_are_trusted_until_the_old_is_disabled(kms: Kms) -> None:
    p256_key(kms, {1: State.ENABLED})
    first = kms.double.public_key(f"{KEY}/cryptoKeyVersions/1")
    kms.double.new_version_pending_reads = 2

    second = kms.backend.add_key_version(KEY)

    (create,) = kms.double.calls("CreateCryptoKeyVersion")
    assert create.parent == KEY
    assert second == kms.double.public_key(f"{KEY}/cryptoKeyVersions/2")
    assert kms.double.keys[KEY].versions[2].state == State.ENABLED
    signer = kms.backend.signer(KEY, NO_PASSWORD)
    assert signer.public_key() == second
    assert second.verify(signer.sign(PAYLOAD), PAYLOAD)
    assert kms.double.calls("AsymmetricSign")[-1].name == f"{KEY}/cryptoKeyVersions/2"
    assert kms.backend.public_keys(KEY, NO_PASSWORD) == [second, first]

    kms.backend.disable_key(f"{KEY}/cryptoKeyVersions/1")
    assert kms.backend.public_keys(KEY, NO_PASSWORD) == [second]
    # A reference pinned to a version names the same key.
    third = kms.backend.add_key_version(f"{KEY}/cryptoKeyVersions/2")
    assert kms.backend.public_key(KEY, NO_PASSWORD) == third


def test_a_new_version_of_a_missing_key_or_one_that_fails_to_generate(kms: Kms) -> None:
    with pytest.raises(KMSError) as caught:
        kms.backend.add_key_version(KEY)
    assert caught.value.diagnostics() == (
        f"gcpkms://{KEY}: not found in Cloud KMS (CryptoKey {KEY} not found.)"
    )
    p256_key(kms, {1: State.ENABLED})
    kms.double.new_version_final_state = State.GENERATION_FAILED
    with pytest.raises(KMSError) as failed:
        kms.backend.add_key_version(KEY)
    assert failed.value.diagnostics() == (
        f"gcpkms://{KEY}: version 2 is GENERATION_FAILED; signgate uses ENABLED versions"
    )


# --- an image, end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


def cosign2() -> Path:
    return tool_path("cosign2")


@pytest.mark.integration
def test_an_image_signed_through_cloud_kms_verifies_in_signgate_and_cosign(
    kms: Kms, registry: RunningRegistry, tmp_path: Path
) -> None:
    p256_key(kms, {1: State.ENABLED, 2: State.ENABLED})
    image = f"{registry.host}/gcpkms/app:v1"

    async def sign_and_verify() -> ImageVerification:
        async with RegistryClient(registry.options()) as client:
            await push_image(client, registry.repository("gcpkms/app"), "v1", content=b"gcp")
            reference = ImageReference.parse(image)
            await sign_image(
                client,
                kms.backend.signer(KEY, NO_PASSWORD),
                reference,
                signature_format=CLASSIC,
            )
            return await verify_image(
                client, reference, kms.backend.public_keys(KEY, NO_PASSWORD)
            )

    verdict = anyio.run(sign_and_verify)

    assert verdict.ok, verdict.reason()
    assert [r.name for r in kms.double.calls("AsymmetricSign")] == [f"{KEY}/cryptoKeyVersions/2"]
    public_key = tmp_path / "cosign.pub"
    public_key.write_bytes(kms.backend.public_key(KEY, NO_PASSWORD).pem())
    run(
        [
            str(cosign2()), "verify", "--key", str(public_key), "--insecure-ignore-tlog",
            "--allow-insecure-registry", image,
        ],
        tool_env(tmp_path),
    )
