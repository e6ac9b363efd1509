"""``hashivault://KEY`` and ``openbao://KEY``: ECDSA P-256 keys in a Vault or OpenBao Transit
secrets engine, used the way cosign uses them.

Settings come from the environment in cosign's order, the same for both schemes
(https://github.com/sigstore/sigstore/blob/main/pkg/signature/kms/hashivault/client.go):
the address from ``VAULT_ADDR``, else ``BAO_ADDR``; the token from ``VAULT_TOKEN``, else
``BAO_TOKEN``, else ``~/.vault-token`` (the default token helper's file); the mount from
``TRANSIT_SECRET_ENGINE_PATH``, default ``transit``. ``VAULT_NAMESPACE``/``BAO_NAMESPACE`` and
``VAULT_CACERT``/``BAO_CACERT`` are honoured as the Vault client library does.

A sign request is ``POST /v1/<mount>/sign/<key>/sha2-256`` with the base64 SHA-256 digest and
``prehashed: true``; the reply is ``vault:vN:<base64 DER>``.

Key versions: ``hashivault://KEY?version=N`` names version N (signgate's spelling: cosign's
reference grammar has none). Without it, signing uses the latest version and a verifier trusts
every version Transit still verifies with (``min_decryption_version`` to ``latest_version``), so
that ``vault write transit/keys/KEY/rotate`` never breaks the signatures already pushed.

Retiring versions: Transit cannot disable a version on its own. It keeps versions by threshold:
below ``min_decryption_version`` it refuses to sign and to verify with a version (and leaves it
out of the key's description), and below ``min_available_version`` the version is deleted (the
``trim`` endpoint, which signgate never calls). So disabling ``KEY?version=N`` raises
``min_decryption_version`` to N+1, retiring every version up to N, and keeps
``min_encryption_version`` (which must not be below it) in step. The latest version cannot be
retired, nor a key as a whole: a reference without a version is refused.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from signgate.errors import KMSError, UnsupportedKey
from signgate.keys.kms import DigestSigner, require_extra
from signgate.keys.model import PublicKey, Signer
from signgate.keys.password import PasswordSource

DEFAULT_MOUNT = "transit"
KEY_TYPE = "ecdsa-p256"
REQUEST_TIMEOUT_SECONDS = 30

# cosign's referenceRegex, `\w(([\w-.]+)?\w)?`, with Go's ASCII-only \w.
_KEY_NAME = re.compile(r"[0-9A-Za-z_](?:[0-9A-Za-z_.-]*[0-9A-Za-z_])?")
_VERSION_QUERY = re.compile(r"version=([1-9][0-9]{0,9})")
_SIGNATURE_REPLY = re.compile(r"vault:v([1-9][0-9]*):([A-Za-z0-9+/]+={0,2})")
# What may go in an HTTP header; anything else would make the HTTP library echo the token back
# in its error message.
_TOKEN_CHARACTERS = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class TransitKeyRef:
    """A parsed ``hashivault://NAME[?version=N]`` or ``openbao://...`` reference."""

    scheme: str
    name: str
    version: int | None = None

    def __str__(self) -> str:
        suffix = "" if self.version is None else f"?version={self.version}"
        return f"{self.scheme}://{self.name}{suffix}"


def parse_transit_ref(scheme: str, location: str) -> TransitKeyRef:
    """The key named by ``location`` (the reference without ``scheme://``)."""
    name, has_query, query = location.partition("?")
    if not _KEY_NAME.fullmatch(name):
        raise KMSError(
            f"{scheme}://{location}: not a Transit key reference; expected "
            f"{scheme}://KEY[?version=N], KEY of letters, digits, '_', '-' and '.'"
        )
    if not has_query:
        return TransitKeyRef(scheme, name)
    match = _VERSION_QUERY.fullmatch(query)
    if match is None:
        raise KMSError(
            f"{scheme}://{location}: the only query a Transit key reference takes is "
            "version=N, N a key version from 1"
        )
    return TransitKeyRef(scheme, name, int(match.group(1)))


@dataclass(frozen=True)
class TransitSettings:
    """Where the Transit engine is and how to authenticate to it."""

    address: str
    token: str = field(repr=False)
    mount: str = DEFAULT_MOUNT
    namespace: str | None = None
    ca_cert: str | None = None

    @property
    def display_address(self) -> str:
        """The address without any user:password part, for messages."""
        parts = urlsplit(self.address)
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def transit_settings(
    ref: TransitKeyRef, environ: Mapping[str, str], token_file: Path
) -> TransitSettings:
    """The settings cosign would use for ``ref``; ``token_file`` is read only as a last resort."""
    kms = kms_name(ref.scheme)
    address = _first_set(environ, "VAULT_ADDR", "BAO_ADDR")
    if address is None:
        raise KMSError(f"{ref}: set VAULT_ADDR or BAO_ADDR to the address of {kms}")
    token = _first_set(environ, "VAULT_TOKEN", "BAO_TOKEN")
    token_source = "VAULT_TOKEN" if environ.get("VAULT_TOKEN") else "BAO_TOKEN"
    if token is None:
        token = _read_token_file(token_file)
        token_source = str(token_file)
    if token is None:
        raise KMSError(
            f"{ref}: no {kms} token: set VAULT_TOKEN or BAO_TOKEN, or log in so that "
            f"{token_file} holds one"
        )
    if not _TOKEN_CHARACTERS.fullmatch(token):
        raise KMSError(f"{ref}: the token in {token_source} has spaces or control characters")
    mount = (environ.get("TRANSIT_SECRET_ENGINE_PATH") or DEFAULT_MOUNT).strip("/")
    return TransitSettings(
        address=address,
        token=token,
        mount=mount or DEFAULT_MOUNT,
        namespace=_first_set(environ, "VAULT_NAMESPACE", "BAO_NAMESPACE"),
        ca_cert=_first_set(environ, "VAULT_CACERT", "BAO_CACERT"),
    )


def kms_name(scheme: str) -> str:
    return "OpenBao" if scheme == "openbao" else "Vault"


def _first_set(environ: Mapping[str, str], *names: str) -> str | None:
    # As cosign: a variable set to "" counts as unset.
    return next((environ[name] for name in names if environ.get(name)), None)


def _read_token_file(path: Path) -> str | None:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise KMSError(f"cannot read the token file {path}: {type(e).__name__}") from e
    return token or None


@dataclass(frozen=True)
class TransitKey:
    """A Transit key as ``GET /v1/<mount>/keys/<name>`` describes it: the public key of each
    version a verifier may use, oldest first."""

    latest_version: int
    public_keys: dict[int, PublicKey]

    def versions_for(self, ref: TransitKeyRef) -> list[int]:
        """The versions ``ref`` stands for: the one it names, or every trusted version."""
        if ref.version is None:
            return list(self.public_keys)
        if ref.version not in self.public_keys:
            raise KMSError(
                f"{ref}: the Transit key has no usable version {ref.version} "
                f"(it has {_version_range(list(self.public_keys))})"
            )
        return [ref.version]

    def signing_version(self, ref: TransitKeyRef) -> int:
        return self.latest_version if ref.version is None else self.versions_for(ref)[0]


def describe_transit_key(ref: TransitKeyRef, data: Mapping[str, Any]) -> TransitKey:
    """The key in a read-key reply's ``data``; refuses any type but ``ecdsa-p256``."""
    key_type = data.get("type")
    if key_type != KEY_TYPE:
        raise KMSError(
            f"{ref}: the Transit key is of type {key_type}; signgate signs with {KEY_TYPE} "
            "keys, as cosign does (create one with generate-key-pair --kms)"
        )
    try:
        latest = int(data["latest_version"])
        # Transit refuses to verify with versions below min_decryption_version and has
        # deleted those below min_available_version.
        oldest = max(
            1, int(data.get("min_decryption_version") or 1),
            int(data.get("min_available_version") or 1),
        )
        entries: Mapping[str, Any] = data["keys"]
        public_keys = {
            version: PublicKey.from_pem(entries[str(version)]["public_key"].encode("ascii"))
            for version in range(oldest, latest + 1)
            if str(version) in entries
        }
    except UnsupportedKey as e:
        raise KMSError(f"{ref}: the Transit key's public key is unusable: {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise KMSError(f"{ref}: unexpected reply describing the Transit key") from e
    if latest not in public_keys:
        raise KMSError(f"{ref}: the Transit key's reply lacks its latest version {latest}")
    return TransitKey(latest, public_keys)


def retirement_config(ref: TransitKeyRef, data: Mapping[str, Any]) -> dict[str, int] | None:
    """The key configuration that retires ``ref``'s version and every older one, from a
    read-key reply's ``data``; None when Transit refuses that version already."""
    if ref.version is None:
        raise _whole_key_refusal(ref)
    try:
        latest = int(data["latest_version"])
        min_decryption = int(data.get("min_decryption_version") or 1)
        min_encryption = int(data.get("min_encryption_version") or 0)
    except (KeyError, TypeError, ValueError) as e:
        raise KMSError(f"{ref}: unexpected reply describing the Transit key") from e
    if ref.version < min_decryption:
        return None
    if ref.version > latest:
        raise KMSError(f"{ref}: the Transit key has no version {ref.version} (latest {latest})")
    if ref.version == latest:
        raise KMSError(
            f"{ref}: version {latest} is the Transit key's latest, which Transit cannot retire; "
            "add a new version first (rotate the key)"
        )
    config = {"min_decryption_version": ref.version + 1}
    # 0 means "the latest version"; any other value must not be below min_decryption_version.
    if 0 < min_encryption <= ref.version:
        config["min_encryption_version"] = ref.version + 1
    return config


def _whole_key_refusal(ref: TransitKeyRef) -> KMSError:
    return KMSError(
        f"{ref}: Transit cannot disable a whole key, only retire its older versions; name "
        f"the version to retire, as in {ref}?version=N (versions up to N are retired)"
    )


def parse_signature_reply(ref: TransitKeyRef, signature: object) -> tuple[int, bytes]:
    """(key version, DER signature) from Transit's ``vault:vN:<base64>``."""
    match = _SIGNATURE_REPLY.fullmatch(signature) if isinstance(signature, str) else None
    if match is None:
        raise KMSError(f"{ref}: Transit's sign reply is not a vault:vN: signature")
    try:
        der = base64.b64decode(match.group(2), validate=True)
    except binascii.Error as e:
        raise KMSError(f"{ref}: Transit's sign reply is not valid base64") from e
    return int(match.group(1)), der


def _version_range(versions: Sequence[int]) -> str:
    if len(versions) == 1:
        return f"version {versions[0]}"
    return f"versions {versions[0]} to {versions[-1]}"


def _one_line(errors: Sequence[str] | None, limit: int = 200) -> str:
    text = " ".join(" ".join(errors or []).split())
    text = text.removeprefix("1 error occurred: * ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TransitEngine:
    """The Transit secrets engine at one address and mount, spoken to through hvac.

    Each call opens its own HTTP session and closes it, so a signer may be used from several
    threads at once (signgate signs images concurrently).
    """

    def __init__(self, settings: TransitSettings, ref: TransitKeyRef) -> None:
        self.settings = settings
        self.ref = ref
        self.kms = kms_name(ref.scheme)

    def read_key(self) -> TransitKey:
        return describe_transit_key(self.ref, self._existing_key_data())

    def create_key(self) -> TransitKey:
        # Transit answers a create of an existing key with success and leaves it as it is:
        # check first so that the user learns the key was not new.
        if self._read_key_data() is not None:
            raise KMSError(
                f"{self.ref}: the Transit key {self.ref.name!r} already exists in "
                f"{self._where()}; use it with --key {self.ref}, or choose another name"
            )
        with self._client("create the Transit key") as client:
            client.secrets.transit.create_key(
                self.ref.name, key_type=KEY_TYPE, exportable=False,
                mount_point=self.settings.mount,
            )
        return self.read_key()

    def retire_through_version(self) -> str:
        """Retire the reference's version and the older ones (see :func:`retirement_config`);
        what is retired."""
        if self.ref.version is None:
            raise _whole_key_refusal(self.ref)
        data = self._existing_key_data()
        describe_transit_key(self.ref, data)  # refuses keys that are not ecdsa-p256
        config = retirement_config(self.ref, data)
        retired = _version_range(list(range(1, self.ref.version + 1)))
        if config is None:
            return f"{self.ref}: {retired} retired already in {self._where()}"
        with self._client("configure the Transit key") as client:
            # Posted as is: hvac's own check wants min_encryption_version above
            # min_decryption_version, where Transit takes them equal.
            client.adapter.post(
                f"/v1/{self.settings.mount}/keys/{self.ref.name}/config", json=config
            )
        return (
            f"{self.ref}: {retired} retired in {self._where()} "
            f"(min_decryption_version {config['min_decryption_version']})"
        )

    def add_version(self) -> TransitKey:
        """Rotate the key: Transit makes version latest+1, which unversioned references use."""
        describe_transit_key(self.ref, self._existing_key_data())  # an ecdsa-p256 key
        with self._client("rotate the Transit key") as client:
            client.secrets.transit.rotate_key(self.ref.name, mount_point=self.settings.mount)
        return self.read_key()

    def sign_digest(self, digest: bytes, version: int) -> bytes:
        """Transit's DER signature over a SHA-256 ``digest`` with key ``version``."""
        with self._client("sign with the Transit key") as client:
            reply = client.adapter.post(
                f"/v1/{self.settings.mount}/sign/{self.ref.name}/sha2-256",
                json={
                    "input": base64.b64encode(digest).decode("ascii"),
                    "prehashed": True,
                    "key_version": version,
                    "marshaling_algorithm": "asn1",
                },
            )
        try:
            signature = reply["data"]["signature"]
        except (KeyError, TypeError) as e:
            raise KMSError(f"{self.ref}: Transit's sign reply has no signature") from e
        signed_version, der = parse_signature_reply(self.ref, signature)
        if signed_version != version:
            raise KMSError(
                f"{self.ref}: Transit signed with version {signed_version}, not {version}"
            )
        return der

    def _existing_key_data(self) -> Mapping[str, Any]:
        data = self._read_key_data()
        if data is None:
            raise KMSError(
                f"{self.ref}: no Transit key {self.ref.name!r} at mount "
                f"{self.settings.mount!r} of {self._where()}"
            )
        return data

    def _read_key_data(self) -> Mapping[str, Any] | None:
        """The key's description, or None if there is no such key."""
        try:
            with self._client("read the Transit key", missing_key_is_error=False) as client:
                reply = client.secrets.transit.read_key(
                    self.ref.name, mount_point=self.settings.mount
                )
        except _MissingKey:
            return None
        try:
            return cast(Mapping[str, Any], reply["data"])
        except (KeyError, TypeError) as e:
            raise KMSError(f"{self.ref}: unexpected reply reading the Transit key") from e

    def _where(self) -> str:
        return f"{self.kms} at {self.settings.display_address}"

    @contextmanager
    def _client(self, action: str, *, missing_key_is_error: bool = True) -> Iterator[Any]:
        hvac = require_extra("hvac", "vault", self.ref.scheme)
        vault_errors = require_extra("hvac.exceptions", "vault", self.ref.scheme)
        import requests

        settings = self.settings
        client = hvac.Client(
            url=settings.address,
            token=settings.token,
            verify=settings.ca_cert or True,
            namespace=settings.namespace,
            timeout=REQUEST_TIMEOUT_SECONDS,
        )
        try:
            yield client
        except vault_errors.VaultError as e:
            if isinstance(e, vault_errors.InvalidPath) and not e.errors:
                # A 404 without errors: the mount exists, the key does not.
                if not missing_key_is_error:
                    raise _MissingKey from e
                raise KMSError(
                    f"{self.ref}: no Transit key {self.ref.name!r} at mount "
                    f"{settings.mount!r} of {self._where()}"
                ) from e
            raise KMSError(f"{self.ref}: {self._refusal(vault_errors, e, action)}") from e
        except requests.exceptions.SSLError as e:
            raise KMSError(
                f"{self.ref}: TLS failure talking to {self._where()} (set VAULT_CACERT to "
                "the CA that issued its certificate)"
            ) from e
        except requests.exceptions.RequestException as e:
            raise KMSError(
                f"{self.ref}: cannot reach {self._where()}: {_connection_failure(e)}"
            ) from e
        finally:
            client.adapter.close()

    def _refusal(self, vault_errors: Any, error: Exception, action: str) -> str:
        where = self._where()
        detail = _one_line(getattr(error, "errors", None))
        if isinstance(error, vault_errors.Forbidden):
            return (
                f"{where} denied permission to {action}: the token is invalid or expired, "
                "or its policy does not allow it"
            )
        if isinstance(error, vault_errors.Unauthorized):
            return f"{where} refused the token to {action}"
        if isinstance(error, vault_errors.InvalidPath):
            return (
                f"no secrets engine is mounted at {self.settings.mount!r} in {where} "
                "(set TRANSIT_SECRET_ENGINE_PATH to the Transit mount)"
            )
        if "signing key not found" in detail:
            return f"no Transit key {self.ref.name!r} at mount {self.settings.mount!r} of {where}"
        if isinstance(error, vault_errors.VaultDown):
            return f"{where} is sealed or unavailable"
        return f"{where} failed to {action}: {detail or type(error).__name__}"


class _MissingKey(Exception):
    """A read found no key of that name (the mount exists)."""


def _connection_failure(error: Exception) -> str:
    # requests nests the OS error several levels deep; its strerror is the useful part.
    match = re.search(r"\[Errno -?\d+\] ([^'\"\)]+)", str(error))
    if match:
        return match.group(1).strip()
    if "timed out" in str(error).lower():
        return "timed out"
    return type(error).__name__


class TransitBackend:
    """``hashivault://`` or ``openbao://`` keys.

    ``environ`` and ``token_file`` default to the process environment and ``~/.vault-token``,
    read at each use.
    """

    def __init__(
        self,
        scheme: str,
        environ: Mapping[str, str] | None = None,
        token_file: Path | None = None,
    ) -> None:
        self.scheme = scheme
        self._environ = environ
        self._token_file = token_file

    def signer(self, location: str, password: PasswordSource) -> Signer:
        engine = self._engine(location)
        key = engine.read_key()
        version = key.signing_version(engine.ref)
        return DigestSigner(
            key.public_keys[version],
            lambda digest: engine.sign_digest(digest, version),
            f"{engine.ref} (version {version})",
        )

    def public_key(self, location: str, password: PasswordSource) -> PublicKey:
        engine = self._engine(location)
        key = engine.read_key()
        return key.public_keys[key.signing_version(engine.ref)]

    def public_keys(self, location: str, password: PasswordSource) -> list[PublicKey]:
        engine = self._engine(location)
        key = engine.read_key()
        return [key.public_keys[version] for version in key.versions_for(engine.ref)]

    def create_key(self, location: str, password: PasswordSource) -> PublicKey:
        engine = self._engine(location)
        if engine.ref.version is not None:
            raise KMSError(
                f"{engine.ref}: a new key starts at version 1; create it without ?version"
            )
        key = engine.create_key()
        return key.public_keys[key.latest_version]

    def disable_key(self, location: str) -> str:
        """Retire the version ``location`` names and every older one (Transit keeps versions
        by threshold); a reference without a version is refused."""
        return self._engine(location).retire_through_version()

    def can_disable(self, location: str) -> str | None:
        """A reference without a version cannot be disabled: Transit retires versions only."""
        try:
            ref = parse_transit_ref(self.scheme, location)
        except KMSError as e:
            return e.diagnostics()
        return _whole_key_refusal(ref).diagnostics() if ref.version is None else None

    def add_key_version(self, location: str) -> PublicKey:
        engine = self._engine(location)
        key = engine.add_version()
        return key.public_keys[key.latest_version]

    def _engine(self, location: str) -> TransitEngine:
        ref = parse_transit_ref(self.scheme, location)
        environ = os.environ if self._environ is None else self._environ
        token_file = self._token_file or Path.home() / ".vault-token"
        return TransitEngine(transit_settings(ref, environ, token_file), ref)


def backend(scheme: str) -> TransitBackend:
    return TransitBackend(scheme)
