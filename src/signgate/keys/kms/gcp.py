"""``gcpkms://projects/P/locations/L/keyRings/R/cryptoKeys/K[/cryptoKeyVersions/V]``: ECDSA
P-256 keys in Google Cloud KMS, through the official ``google-cloud-kms`` SDK (``signgate[gcp]``).

Credentials are Google's Application Default Credentials, as cosign's: the file named by
``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``, or the metadata
server of the machine or workload.

Key versions: ``.../cryptoKeyVersions/V`` (or cosign's shorter ``.../versions/V``) names version
V. Without it, signing uses the newest ENABLED version: asymmetric keys have no primary version
in Cloud KMS, and cosign picks the latest enabled one too
(https://github.com/sigstore/sigstore/blob/main/pkg/signature/kms/gcp/client.go). A verifier
trusts every ENABLED version, so a key rotated inside Cloud KMS keeps the signatures already
pushed valid until their version is disabled.

Retiring and adding versions: disabling ``.../cryptoKeyVersions/V`` sets that version's state
to DISABLED (never DESTROYED: it can be enabled again). A reference without a version stands for
every ENABLED version, so disabling it disables the key's only ENABLED version and refuses a key
with several (which one was meant is not for signgate to guess: name it). A new version of a key
(CreateCryptoKeyVersion) follows the key's version template; it signs for the unversioned
reference as soon as it is generated, being the newest.

Only ``EC_SIGN_P256_SHA256`` versions are used. Signing sends the SHA-256 digest with its CRC32C
and checks the CRC32Cs of the reply, as Google's data integrity guidelines ask
(https://cloud.google.com/kms/docs/data-integrity-guidelines).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from signgate.errors import KMSError, UnsupportedKey
from signgate.keys.kms import DigestSigner, require_extra
from signgate.keys.model import PublicKey, Signer
from signgate.keys.password import PasswordSource

SCHEME: Final = "gcpkms"

require_extra("google.cloud.kms_v1", "gcp", SCHEME)

import google.auth.exceptions as google_auth_exceptions  # noqa: E402
from google.api_core import exceptions as google_exceptions  # noqa: E402
from google.api_core import retry as google_retry  # noqa: E402
from google.cloud import kms_v1  # noqa: E402

_Algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
_State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState

ALGORITHM: Final = _Algorithm.EC_SIGN_P256_SHA256
# States in which a version no longer signs; disabling leaves them as they are.
_OUT_OF_USE_STATES: Final = frozenset(
    {_State.DISABLED, _State.DESTROYED, _State.DESTROY_SCHEDULED}
)
_PROTECTION_LEVELS: Final = {
    "SOFTWARE": kms_v1.ProtectionLevel.SOFTWARE,
    "HSM": kms_v1.ProtectionLevel.HSM,
}
# The SDK's own limit for one call, retries included.
DEFAULT_DEADLINE_SECONDS: Final = 60.0
# A new key's first version is PENDING_GENERATION for a moment (longer on an HSM).
GENERATION_TIMEOUT_SECONDS: Final = 120.0

# cosign's reference regex, which also takes "versions" for "cryptoKeyVersions"; a version is a
# number from 1 (the only version ids Cloud KMS hands out).
_REFERENCE = re.compile(
    r"projects/([^/]+)/locations/([^/]+)/keyRings/([^/]+)/cryptoKeys/([^/]+)"
    r"(?:/(?:cryptoKeyVersions|versions)/([1-9][0-9]*))?"
)
_WHITESPACE = re.compile(r"\s")


@dataclass(frozen=True)
class GcpKeyName:
    """A parsed ``gcpkms://`` reference: a CryptoKey and maybe one of its versions."""

    project: str
    location: str
    key_ring: str
    key: str
    version: int | None = None

    @property
    def location_path(self) -> str:
        return f"projects/{self.project}/locations/{self.location}"

    @property
    def key_ring_path(self) -> str:
        return f"{self.location_path}/keyRings/{self.key_ring}"

    @property
    def key_path(self) -> str:
        return f"{self.key_ring_path}/cryptoKeys/{self.key}"

    def version_path(self, version: int) -> str:
        return f"{self.key_path}/cryptoKeyVersions/{version}"

    def __str__(self) -> str:
        path = self.key_path if self.version is None else self.version_path(self.version)
        return f"{SCHEME}://{path}"


def parse_gcp_key_name(location: str) -> GcpKeyName:
    """The key named by ``location`` (the reference without ``gcpkms://``)."""
    match = _REFERENCE.fullmatch(location)
    if match is None or _WHITESPACE.search(location):
        raise KMSError(
            f"{SCHEME}://{location}: not a Cloud KMS key reference; expected "
            f"{SCHEME}://projects/P/locations/L/keyRings/R/cryptoKeys/K[/cryptoKeyVersions/V]"
        )
    project, where, key_ring, key, version = match.groups()
    return GcpKeyName(project, where, key_ring, key, int(version) if version else None)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum Cloud KMS puts on requests and replies."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def version_number(version_path: str) -> int:
    """V of ``.../cryptoKeyVersions/V``."""
    return int(version_path.rpartition("/")[2])


_T = TypeVar("_T")


class GcpKms:
    """The ``gcpkms://`` backend.

    ``client`` is the SDK's client (by default one made on first use, with Application Default
    Credentials). ``protection_level`` is where ``create_key`` puts new keys: ``SOFTWARE`` (as
    cosign, which leaves Cloud KMS's default) or ``HSM``. ``deadline`` bounds each call,
    retries of UNAVAILABLE and DEADLINE_EXCEEDED included.
    """

    def __init__(
        self,
        client: kms_v1.KeyManagementServiceClient | None = None,
        *,
        protection_level: str = "SOFTWARE",
        deadline: float = DEFAULT_DEADLINE_SECONDS,
    ) -> None:
        if protection_level not in _PROTECTION_LEVELS:
            raise KMSError(
                f"{SCHEME}://: protection level {protection_level!r}; use SOFTWARE or HSM"
            )
        self._protection_level = _PROTECTION_LEVELS[protection_level]
        self._client = client
        self._deadline = deadline

    def signer(self, location: str, password: PasswordSource) -> Signer:
        name = parse_gcp_key_name(location)
        version = self._signing_version(name)
        public_key = self._public_key(name, version)
        return DigestSigner(
            public_key,
            lambda digest: self._sign_digest(name, version, digest),
            f"{SCHEME}://{name.version_path(version)}",
        )

    def public_key(self, location: str, password: PasswordSource) -> PublicKey:
        name = parse_gcp_key_name(location)
        return self._public_key(name, self._signing_version(name))

    def public_keys(self, location: str, password: PasswordSource) -> list[PublicKey]:
        name = parse_gcp_key_name(location)
        if name.version is not None:
            return [self._public_key(name, self._signing_version(name))]
        return [self._public_key(name, version) for version in self._enabled_versions(name)]

    def create_key(self, location: str, password: PasswordSource) -> PublicKey:
        name = parse_gcp_key_name(location)
        if name.version is not None:
            raise KMSError(
                f"{name}: a new key starts at version 1; name the key without /cryptoKeyVersions"
            )
        self._ensure_key_ring(name)
        template = kms_v1.CryptoKeyVersionTemplate(
            algorithm=ALGORITHM, protection_level=self._protection_level
        )
        request = kms_v1.CreateCryptoKeyRequest(
            parent=name.key_ring_path,
            crypto_key_id=name.key,
            crypto_key=kms_v1.CryptoKey(
                purpose=kms_v1.CryptoKey.CryptoKeyPurpose.ASYMMETRIC_SIGN,
                version_template=template,
            ),
        )
        try:
            self._call(name, "create the key", self._kms(name).create_crypto_key, request, False)
        except KMSError as e:
            if isinstance(e.__cause__, google_exceptions.AlreadyExists):
                raise KMSError(f"{name}: the key exists already in Cloud KMS") from e.__cause__
            raise
        # Cloud KMS numbers a key's versions from 1, and makes the first with the key.
        self._wait_until_generated(name, 1)
        return self._public_key(name, 1)

    def disable_key(self, location: str) -> str:
        """Set the named version's state to DISABLED; without a version, the key's only
        ENABLED version (a key with several is refused)."""
        name = parse_gcp_key_name(location)
        version = name.version
        if version is None:
            enabled = sorted(
                (version_number(v.name) for v in self._list_enabled(name)), reverse=True
            )
            if not enabled:
                return f"{name}: no ENABLED version left in Cloud KMS"
            if len(enabled) > 1:
                raise KMSError(
                    f"{name}: the key has {len(enabled)} ENABLED versions "
                    f"({', '.join(map(str, enabled))}); name the one to disable, as in "
                    f"{SCHEME}://{name.version_path(enabled[-1])}"
                )
            version = enabled[0]
        path = name.version_path(version)
        current = self._call(
            name,
            "read the key version",
            self._kms(name).get_crypto_key_version,
            kms_v1.GetCryptoKeyVersionRequest(name=path),
        )
        if current.state in _OUT_OF_USE_STATES:
            return f"{SCHEME}://{path}: {_State(current.state).name} already in Cloud KMS"
        request = kms_v1.UpdateCryptoKeyVersionRequest(
            crypto_key_version=kms_v1.CryptoKeyVersion(name=path, state=_State.DISABLED),
            update_mask={"paths": ["state"]},
        )
        self._call(
            name, "disable the key version", self._kms(name).update_crypto_key_version, request
        )
        return f"{SCHEME}://{path}: DISABLED in Cloud KMS"

    def add_key_version(self, location: str) -> PublicKey:
        """A new version of the key (after its version template), once generated."""
        name = parse_gcp_key_name(location)
        request = kms_v1.CreateCryptoKeyVersionRequest(
            parent=name.key_path, crypto_key_version=kms_v1.CryptoKeyVersion()
        )
        created = self._call(
            name,
            "create a key version",
            self._kms(name).create_crypto_key_version,
            request,
            False,
        )
        version = version_number(created.name)
        self._wait_until_generated(name, version)
        return self._public_key(name, version)

    def _kms(self, name: GcpKeyName) -> kms_v1.KeyManagementServiceClient:
        if self._client is None:
            try:
                self._client = kms_v1.KeyManagementServiceClient()
            except google_auth_exceptions.GoogleAuthError as e:
                raise KMSError(f"{name}: {_NO_CREDENTIALS}") from e
        return self._client

    def _signing_version(self, name: GcpKeyName) -> int:
        if name.version is None:
            return max(self._enabled_versions(name))
        version = self._call(
            name,
            "read the key version",
            self._kms(name).get_crypto_key_version,
            kms_v1.GetCryptoKeyVersionRequest(name=name.version_path(name.version)),
        )
        _check_usable(name, version)
        return name.version

    def _enabled_versions(self, name: GcpKeyName) -> list[int]:
        """Every ENABLED version of the key, newest first; each checked to be P-256."""
        enabled = self._list_enabled(name)
        if not enabled:
            raise KMSError(f"{name}: the key has no ENABLED version in Cloud KMS")
        for version in enabled:
            _check_usable(name, version)
        # Highest number first: the newest. cosign asks the API for "name desc", which orders
        # version 9 after 10 as text; the number is what "newest" means.
        return sorted((version_number(v.name) for v in enabled), reverse=True)

    def _list_enabled(self, name: GcpKeyName) -> list[kms_v1.CryptoKeyVersion]:
        def list_versions() -> list[kms_v1.CryptoKeyVersion]:
            request = kms_v1.ListCryptoKeyVersionsRequest(
                parent=name.key_path, filter="state=ENABLED"
            )
            pages = self._kms(name).list_crypto_key_versions(
                request=request, retry=self._retry(), timeout=self._deadline
            )
            return list(pages)

        versions = self._call(name, "list the key versions", list_versions)
        return [v for v in versions if v.state == _State.ENABLED]

    def _public_key(self, name: GcpKeyName, version: int) -> PublicKey:
        path = name.version_path(version)
        reply = self._call(
            name,
            "read the public key",
            self._kms(name).get_public_key,
            kms_v1.GetPublicKeyRequest(name=path),
        )
        if reply.algorithm != ALGORITHM:
            raise KMSError(_wrong_algorithm(name, version, reply.algorithm))
        if reply.pem_crc32c is not None and crc32c(reply.pem.encode()) != reply.pem_crc32c:
            raise KMSError(f"{name}: the public key was corrupted in transit (CRC32C); try again")
        try:
            key = PublicKey.from_pem(reply.pem.encode())
        except UnsupportedKey as e:
            raise KMSError(f"{name}: Cloud KMS returned an unusable public key: {e}") from e
        if not isinstance(key.key, ec.EllipticCurvePublicKey) or key.key.curve.name != "secp256r1":
            raise KMSError(f"{name}: the public key of version {version} is not EC P-256")
        return key

    def _sign_digest(self, name: GcpKeyName, version: int, digest: bytes) -> bytes:
        path = name.version_path(version)
        request = kms_v1.AsymmetricSignRequest(
            name=path, digest=kms_v1.Digest(sha256=digest), digest_crc32c=crc32c(digest)
        )
        reply = self._call(name, "sign", self._kms(name).asymmetric_sign, request)
        if not reply.verified_digest_crc32c:
            raise KMSError(f"{name}: Cloud KMS did not receive the digest intact (CRC32C)")
        if reply.name != path:
            raise KMSError(f"{name}: Cloud KMS signed with {reply.name or 'another key'}")
        if reply.signature_crc32c is None or crc32c(reply.signature) != reply.signature_crc32c:
            raise KMSError(f"{name}: the signature was corrupted in transit (CRC32C); try again")
        return bytes(reply.signature)

    def _ensure_key_ring(self, name: GcpKeyName) -> None:
        # As cosign: the key ring is made when missing (key rings cannot be deleted, so a
        # typo in its name leaves one behind; the user named it, though).
        try:
            self._call(
                name,
                "read the key ring",
                self._kms(name).get_key_ring,
                kms_v1.GetKeyRingRequest(name=name.key_ring_path),
            )
            return
        except KMSError as e:
            if not isinstance(e.__cause__, google_exceptions.NotFound):
                raise
        request = kms_v1.CreateKeyRingRequest(
            parent=name.location_path, key_ring_id=name.key_ring, key_ring=kms_v1.KeyRing()
        )
        try:
            self._call(name, "create the key ring", self._kms(name).create_key_ring, request, False)
        except KMSError as e:
            # Made by someone else in the meantime: as good as ours.
            if not isinstance(e.__cause__, google_exceptions.AlreadyExists):
                raise

    def _wait_until_generated(self, name: GcpKeyName, version: int) -> None:
        request = kms_v1.GetCryptoKeyVersionRequest(name=name.version_path(version))
        give_up = time.monotonic() + GENERATION_TIMEOUT_SECONDS
        pause = 0.05
        while True:
            reply = self._call(
                name, "read the new key version", self._kms(name).get_crypto_key_version, request
            )
            if reply.state != _State.PENDING_GENERATION:
                _check_usable(name, reply)
                return
            if time.monotonic() > give_up:
                raise KMSError(
                    f"{name}: version {version} still PENDING_GENERATION after "
                    f"{GENERATION_TIMEOUT_SECONDS:.0f}s; try public-key later"
                )
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    def _retry(self) -> google_retry.Retry:
        return google_retry.Retry(
            predicate=google_retry.if_exception_type(
                google_exceptions.ServiceUnavailable, google_exceptions.DeadlineExceeded
            ),
            initial=0.1,
            maximum=10.0,
            multiplier=1.3,
            timeout=self._deadline,
        )

    def _call(
        self,
        name: GcpKeyName,
        action: str,
        method: Callable[..., _T],
        request: Any = None,
        idempotent: bool = True,
    ) -> _T:
        """``method(request)``, bounded by the deadline; SDK failures as one-line KMSErrors.

        ``idempotent=False`` (creating things) is not retried: a retry of a create that went
        through would report that the thing exists.
        """
        with _gcp_errors(name, action):
            if request is None:
                return method()
            retry = self._retry() if idempotent else None
            return method(request=request, retry=retry, timeout=self._deadline)


_NO_CREDENTIALS: Final = (
    "no usable Google credentials (Application Default Credentials: "
    "GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, or the metadata "
    "server)"
)


@contextmanager
def _gcp_errors(name: GcpKeyName, action: str) -> Iterator[None]:
    # Cloud KMS's own messages name the resource or the missing IAM permission and never
    # carry credentials, so they are kept; the auth library's are not (file paths, token
    # endpoints).
    try:
        yield
    except google_exceptions.NotFound as e:
        raise KMSError(f"{name}: not found in Cloud KMS ({_one_line(e.message)})") from e
    except google_exceptions.PermissionDenied as e:
        raise KMSError(
            f"{name}: permission denied to {action} ({_one_line(e.message)})"
        ) from e
    except google_exceptions.Unauthenticated as e:
        raise KMSError(f"{name}: Cloud KMS refused the credentials: {_NO_CREDENTIALS}") from e
    except google_auth_exceptions.GoogleAuthError as e:
        raise KMSError(f"{name}: {_NO_CREDENTIALS}") from e
    except (google_exceptions.ServiceUnavailable, google_exceptions.DeadlineExceeded) as e:
        raise KMSError(f"{name}: cannot reach Cloud KMS to {action} ({_code(e)})") from e
    except google_exceptions.RetryError as e:
        cause = f"; last error {_code(e.cause)}" if e.cause is not None else ""
        raise KMSError(f"{name}: cannot reach Cloud KMS to {action}: gave up{cause}") from e
    except google_exceptions.GoogleAPICallError as e:
        raise KMSError(
            f"{name}: Cloud KMS refused to {action}: {_code(e)} {_one_line(e.message)}"
        ) from e


def _check_usable(name: GcpKeyName, version: kms_v1.CryptoKeyVersion) -> None:
    number = version_number(version.name) if version.name else name.version or 0
    if version.algorithm != ALGORITHM:
        raise KMSError(_wrong_algorithm(name, number, version.algorithm))
    if version.state != _State.ENABLED:
        raise KMSError(
            f"{name}: version {number} is {_State(version.state).name}; signgate uses ENABLED "
            "versions"
        )


def _wrong_algorithm(name: GcpKeyName, version: int, algorithm: int) -> str:
    try:
        label = _Algorithm(algorithm).name
    except ValueError:
        label = f"algorithm {algorithm}"
    return (
        f"{name}: version {version} is {label}; signgate needs an ASYMMETRIC_SIGN key with "
        "EC_SIGN_P256_SHA256"
    )


def _code(error: BaseException) -> str:
    if isinstance(error, google_exceptions.GoogleAPICallError):
        grpc_code = error.grpc_status_code
        return grpc_code.name if grpc_code is not None else f"HTTP {error.code}"
    return type(error).__name__


def _one_line(text: str | None, limit: int = 240) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def backend(scheme: str) -> GcpKms:
    return GcpKms()
