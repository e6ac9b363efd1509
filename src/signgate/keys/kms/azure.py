"""``azurekms://VAULT-HOST/KEY[/VERSION]``: ECDSA P-256 keys in Azure Key Vault (or a Managed
HSM), through the official ``azure-keyvault-keys`` and ``azure-identity`` SDKs
(``signgate[azure]``).

As cosign (https://github.com/sigstore/sigstore/blob/main/pkg/signature/kms/azure/client.go):
the vault is ``https://VAULT-HOST/`` (``azurekms://myvault.vault.azure.net/mykey``);
credentials come from ``DefaultAzureCredential`` (``AZURE_CLIENT_ID``/``AZURE_TENANT_ID``/
``AZURE_CLIENT_SECRET`` or a certificate, workload identity, managed identity, ``az login``...);
``AZURE_ENVIRONMENT`` picks the US Government or China cloud's sign-in authority.

Key versions: ``azurekms://HOST/KEY/VERSION`` pins one. Without it, signing uses the key's
current version, and a verifier trusts every enabled version, so rotating the key in Key Vault
keeps the signatures already pushed valid until their version is disabled.

Retiring and adding versions: disabling ``azurekms://HOST/KEY/VERSION`` sets that version's
``enabled`` attribute to false (never deleted). A reference without a version stands for every
enabled version, so disabling it disables the key's only enabled version and refuses a key with
several: name the one meant. A new version is made as Key Vault makes one, by creating the key
again under its name, with the current version's type, operations and tags.

Key Vault signs the SHA-256 digest with ``ES256`` and returns raw r||s (JWS form); signgate
stores ASN.1 DER, as cosign does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from signgate.errors import KMSError
from signgate.keys.kms import DigestSigner, require_extra
from signgate.keys.model import PublicKey, Signer
from signgate.keys.password import PasswordSource

SCHEME: Final = "azurekms"

require_extra("azure.keyvault.keys", "azure", SCHEME)

from azure.core.credentials import TokenCredential  # noqa: E402
from azure.core.exceptions import (  # noqa: E402
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import HttpTransport  # noqa: E402
from azure.keyvault.keys import (  # noqa: E402
    KeyClient,
    KeyCurveName,
    KeyOperation,
    KeyProperties,
    KeyType,
    KeyVaultKey,
)
from azure.keyvault.keys.crypto import CryptographyClient, SignatureAlgorithm  # noqa: E402

# cosign's referenceRegex is ^azurekms://([^/]+)/([^/]+)(/[a-z0-9]*)?$ ; the host and the key
# name are held here to what a URL and Key Vault take (a key name is 1-127 letters, digits and
# dashes), so that a mistyped reference fails here rather than as an odd HTTP error.
_REFERENCE = re.compile(
    r"([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?)"
    r"/([A-Za-z0-9-]{1,127})(?:/([a-z0-9]*))?"
)
EC_KEY_TYPES: Final = frozenset({KeyType.ec, KeyType.ec_hsm})
SIGNATURE_SIZE: Final = 64  # r||s, 32 bytes each, for P-256

# cosign's AZURE_ENVIRONMENT values and the sign-in authority each one means.
_AUTHORITY_HOSTS: Final[Mapping[str, str | None]] = {
    "AZUREUSGOVERNMENT": "login.microsoftonline.us",
    "AZUREUSGOVERNMENTCLOUD": "login.microsoftonline.us",
    "AZURECHINACLOUD": "login.chinacloudapi.cn",
    "AZURECLOUD": None,
    "AZUREPUBLICCLOUD": None,
}


@dataclass(frozen=True)
class AzureKeyName:
    """A parsed ``azurekms://`` reference: a vault, a key and maybe one version."""

    vault_host: str
    key: str
    version: str | None = None

    @property
    def vault_url(self) -> str:
        return f"https://{self.vault_host}/"

    def __str__(self) -> str:
        suffix = f"/{self.version}" if self.version else ""
        return f"{SCHEME}://{self.vault_host}/{self.key}{suffix}"


def parse_azure_key_name(location: str) -> AzureKeyName:
    """The key named by ``location`` (the reference without ``azurekms://``).

    An empty version (a trailing ``/``) means the current version, as in cosign.
    """
    match = _REFERENCE.fullmatch(location)
    if match is None:
        raise KMSError(
            f"{SCHEME}://{location}: not an Azure Key Vault key reference; expected "
            f"{SCHEME}://VAULT-HOST/KEY[/VERSION], as in "
            f"{SCHEME}://myvault.vault.azure.net/mykey"
        )
    host, key, version = match.groups()
    return AzureKeyName(host, key, version or None)


def authority_host(environ: Mapping[str, str]) -> str | None:
    """The Microsoft Entra sign-in host ``AZURE_ENVIRONMENT`` names (None: the SDK's default,
    which honours ``AZURE_AUTHORITY_HOST``)."""
    environment = environ.get("AZURE_ENVIRONMENT", "").upper()
    if not environment:
        return None
    if environment not in _AUTHORITY_HOSTS:
        known = ", ".join(sorted(_AUTHORITY_HOSTS))
        raise KMSError(f"{SCHEME}://: AZURE_ENVIRONMENT={environment!r} is not one of {known}")
    return _AUTHORITY_HOSTS[environment]


def public_key_from_jwk(name: AzureKeyName, key: KeyVaultKey) -> PublicKey:
    """The P-256 public key of a Key Vault key; a KMSError if it is anything else."""
    jwk = key.key
    curve = getattr(jwk, "crv", None)
    if key.key_type not in EC_KEY_TYPES:
        raise KMSError(
            f"{name}: the key is {_text(key.key_type)}; signgate needs an EC P-256 key"
        )
    if curve != KeyCurveName.p_256:
        raise KMSError(f"{name}: the key is EC {_text(curve)}; signgate needs an EC P-256 key")
    x, y = getattr(jwk, "x", None), getattr(jwk, "y", None)
    if not isinstance(x, bytes) or not isinstance(y, bytes):
        raise KMSError(f"{name}: Azure Key Vault returned a key without its x and y")
    try:
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
        )
        return PublicKey(numbers.public_key())
    except ValueError as e:
        raise KMSError(f"{name}: Azure Key Vault returned a point not on P-256") from e


def _text(value: object) -> str:
    # The SDK's enums are str subclasses whose str() is "KeyType.ec"; people know the value.
    return str(value.value) if isinstance(value, Enum) else str(value)


def _newest_first(versions: list[KeyProperties]) -> list[KeyProperties]:
    oldest_first = sorted(
        versions, key=lambda p: p.created_on.timestamp() if p.created_on else 0
    )
    return oldest_first[::-1]


def der_from_jws(name: AzureKeyName, signature: bytes) -> bytes:
    """ASN.1 DER from the fixed-width r||s Key Vault returns for ES256."""
    if len(signature) != SIGNATURE_SIZE:
        raise KMSError(
            f"{name}: Azure Key Vault returned a {len(signature)}-byte ES256 signature, "
            f"not {SIGNATURE_SIZE}"
        )
    half = SIGNATURE_SIZE // 2
    return encode_dss_signature(
        int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
    )


class AzureKeyVault:
    """The ``azurekms://`` backend.

    ``credential`` defaults to a ``DefaultAzureCredential`` made on first use; ``transport`` is
    azure-core's HTTP transport (by default the SDK's own). ``hardware_protected`` makes
    ``create_key`` ask for an ``EC-HSM`` key (a Premium vault or a Managed HSM).
    """

    def __init__(
        self,
        credential: TokenCredential | None = None,
        transport: HttpTransport[Any, Any] | None = None,
        *,
        hardware_protected: bool = False,
    ) -> None:
        self._credential = credential
        self._transport = transport
        self._hardware_protected = hardware_protected

    def signer(self, location: str, password: PasswordSource) -> Signer:
        name = parse_azure_key_name(location)
        key = self._get_key(name, name.version)
        if key.key_operations and KeyOperation.sign not in key.key_operations:
            operations = ", ".join(_text(op) for op in key.key_operations)
            raise KMSError(f"{name}: the key does not allow sign (key_ops: {operations})")
        public_key = public_key_from_jwk(name, key)
        # The version just read, even when the reference names none: the signature must be
        # made by the key whose public half is checked against it.
        version = key.properties.version
        return DigestSigner(
            public_key,
            lambda digest: self._sign_digest(name, key, digest),
            f"{SCHEME}://{name.vault_host}/{name.key}/{version}",
        )

    def public_key(self, location: str, password: PasswordSource) -> PublicKey:
        name = parse_azure_key_name(location)
        return public_key_from_jwk(name, self._get_key(name, name.version))

    def public_keys(self, location: str, password: PasswordSource) -> list[PublicKey]:
        name = parse_azure_key_name(location)
        if name.version is not None:
            return [public_key_from_jwk(name, self._get_key(name, name.version))]
        with self._errors(name, "list the key versions"), self._key_client(name) as client:
            try:
                listed = list(client.list_properties_of_key_versions(name.key))
            except HttpResponseError as e:
                if e.status_code != 403:
                    raise
                # cosign needs only keys/get to verify; an identity without keys/list
                # trusts the current version alone, as cosign does.
                return [public_key_from_jwk(name, self._read_key(client, name, None))]
            enabled = _newest_first([p for p in listed if p.enabled and p.version])
            if not enabled:
                raise KMSError(f"{name}: the key has no enabled version in Azure Key Vault")
            keys = [self._read_key(client, name, p.version) for p in enabled]
        return [public_key_from_jwk(name, key) for key in keys]

    def create_key(self, location: str, password: PasswordSource) -> PublicKey:
        name = parse_azure_key_name(location)
        if name.version is not None:
            raise KMSError(f"{name}: Key Vault names a new key's version; drop /{name.version}")
        # Key Vault's create on an existing name makes a new version of that key (a silent
        # rotation), so an existing key is refused first.
        with self._errors(name, "look for the key"), self._key_client(name) as client:
            try:
                client.get_key(name.key)
            except ResourceNotFoundError:
                pass
            else:
                raise KMSError(f"{name}: the key exists already in Azure Key Vault")
        with self._errors(name, "create the key"), self._key_client(name) as client:
            key = client.create_ec_key(
                name.key,
                curve=KeyCurveName.p_256,
                key_operations=[KeyOperation.sign, KeyOperation.verify],
                hardware_protected=self._hardware_protected,
                tags={"use": "sigstore"},  # cosign's tag on the keys it makes
            )
        return public_key_from_jwk(name, key)

    def disable_key(self, location: str) -> str:
        """Set ``enabled`` false on the named version; without a version, on the key's only
        enabled version (a key with several is refused)."""
        name = parse_azure_key_name(location)
        with self._errors(name, "disable the key version"), self._key_client(name) as client:
            version = name.version
            if version is None:
                listed = client.list_properties_of_key_versions(name.key)
                enabled = _newest_first([p for p in listed if p.enabled and p.version])
                if not enabled:
                    return f"{name}: no enabled version left in Azure Key Vault"
                if len(enabled) > 1:
                    versions = ", ".join(str(p.version) for p in enabled)
                    raise KMSError(
                        f"{name}: the key has {len(enabled)} enabled versions ({versions}); "
                        f"name the one to disable, as in {name}/{enabled[-1].version}"
                    )
                version = enabled[0].version
            shown = f"{SCHEME}://{name.vault_host}/{name.key}/{version}"
            if client.get_key(name.key, version).properties.enabled is False:
                return f"{shown}: disabled already in Azure Key Vault"
            client.update_key_properties(name.key, version, enabled=False)
        return f"{shown}: disabled in Azure Key Vault"

    def add_key_version(self, location: str) -> PublicKey:
        """A new version of the key, of the current version's type, operations and tags."""
        name = parse_azure_key_name(location)
        with self._errors(name, "create a key version"), self._key_client(name) as client:
            current = client.get_key(name.key)
            public_key_from_jwk(name, current)  # an EC P-256 key, or refused here
            key = client.create_ec_key(
                name.key,
                curve=KeyCurveName.p_256,
                key_operations=current.key_operations
                or [KeyOperation.sign, KeyOperation.verify],
                hardware_protected=current.key_type == KeyType.ec_hsm,
                tags=current.properties.tags,
            )
        return public_key_from_jwk(name, key)

    def _get_key(self, name: AzureKeyName, version: str | None) -> KeyVaultKey:
        with self._errors(name, "read the key"), self._key_client(name) as client:
            return self._read_key(client, name, version)

    @staticmethod
    def _read_key(client: KeyClient, name: AzureKeyName, version: str | None) -> KeyVaultKey:
        key = client.get_key(name.key, version)
        if key.properties.enabled is False:
            raise KMSError(f"{name}: version {key.properties.version} is disabled")
        return key

    def _sign_digest(self, name: AzureKeyName, key: KeyVaultKey, digest: bytes) -> bytes:
        with self._errors(name, "sign"), CryptographyClient(
            key, self._token_credential(), **self._client_options()
        ) as crypto:
            result = crypto.sign(SignatureAlgorithm.es256, digest)
        return der_from_jws(name, result.signature)

    def _key_client(self, name: AzureKeyName) -> KeyClient:
        return KeyClient(name.vault_url, self._token_credential(), **self._client_options())

    def _client_options(self) -> dict[str, Any]:
        return {} if self._transport is None else {"transport": self._transport}

    def _token_credential(self) -> TokenCredential:
        if self._credential is None:
            require_extra("azure.identity", "azure", SCHEME)
            from azure.identity import DefaultAzureCredential

            authority = authority_host(os.environ)
            self._credential = (
                DefaultAzureCredential(authority=authority)
                if authority
                else DefaultAzureCredential()
            )
        return self._credential

    @contextmanager
    def _errors(self, name: AzureKeyName, action: str) -> Iterator[None]:
        # Key Vault's and azure-identity's messages are not repeated: the latter can quote
        # token endpoints and configuration; the status and Key Vault's error code say enough.
        try:
            yield
        except ResourceNotFoundError as e:
            raise KMSError(f"{name}: no such key in Azure Key Vault {name.vault_host}") from e
        except ClientAuthenticationError as e:
            raise KMSError(
                f"{name}: no Azure credentials that Key Vault accepts (DefaultAzureCredential: "
                "AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, workload or managed "
                "identity, az login)"
            ) from e
        except HttpResponseError as e:
            code = f" {e.error.code}" if e.error is not None and e.error.code else ""
            if e.status_code == 403:
                raise KMSError(
                    f"{name}: permission denied to {action} (HTTP 403{code}): the identity "
                    "needs the key permission or a Key Vault Crypto role"
                ) from e
            raise KMSError(
                f"{name}: Azure Key Vault refused to {action} (HTTP {e.status_code}{code})"
            ) from e
        except (ServiceRequestError, ServiceResponseError) as e:
            raise KMSError(f"{name}: cannot reach Azure Key Vault at {name.vault_url}") from e
        except AzureError as e:
            raise KMSError(
                f"{name}: Azure Key Vault failed to {action} ({type(e).__name__})"
            ) from e
        except ValueError as e:
            # The SDK's refusal of a challenge from a host that is not a Key Vault.
            raise KMSError(
                f"{name}: {name.vault_host} did not answer as Azure Key Vault does"
            ) from e


def backend(scheme: str) -> AzureKeyVault:
    return AzureKeyVault()
