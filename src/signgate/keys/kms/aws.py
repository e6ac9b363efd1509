"""``awskms://[ENDPOINT]/KEY``: ECDSA P-256 keys in AWS KMS, through boto3 (``signgate[aws]``).

KEY is a key id, a key ARN, ``alias/NAME`` or an alias ARN, as cosign spells them
(https://github.com/sigstore/sigstore/blob/main/pkg/signature/kms/aws/client.go). An ENDPOINT
in the reference means ``https://ENDPOINT``, as in cosign; without one the SDK picks it
(``AWS_ENDPOINT_URL_KMS``, ``AWS_ENDPOINT_URL``, the shared config, then AWS itself). The
region comes from an ARN, else ``AWS_REGION``, else the SDK (``AWS_DEFAULT_REGION``, the
profile); credentials come from the SDK's standard chain.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signgate.errors import KMSError, UnsupportedKey
from signgate.keys.kms import der_signature, require_extra
from signgate.keys.model import PublicKey, Signer
from signgate.keys.password import PasswordSource

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

    from signgate.keys.refs import KeyBackend

SCHEME: Final = "awskms"
KEY_SPEC: Final = "ECC_NIST_P256"
KEY_USAGE: Final = "SIGN_VERIFY"
SIGNING_ALGORITHM: Final = "ECDSA_SHA_256"
# The largest message KMS Sign takes with MessageType=RAW.
RAW_MESSAGE_LIMIT: Final = 4096
MessageType = Literal["RAW", "DIGEST"]

_T = TypeVar("_T")

# cosign's key id pattern, multi-Region keys (mrk-...) included.
_KEY_ID = r"m?r?k?-?[A-Fa-f0-9]{8}-?[A-Fa-f0-9]{4}-?[A-Fa-f0-9]{4}-?[A-Fa-f0-9]{4}-?[A-Fa-f0-9]{12}"
# AWS's rule for alias names (cosign takes anything after "alias/"; KMS would refuse the rest).
_ALIAS = r"alias/[A-Za-z0-9/_-]+"
_ARN = r"arn:(?:aws|aws-us-gov|aws-cn):kms:(?P<region>[a-z0-9-]+):\d{12}:"
_KEY_FORMS = [
    re.compile(rf"(?P<key>{_KEY_ID})"),
    re.compile(rf"(?P<key>{_ARN}key/{_KEY_ID})"),
    re.compile(rf"(?P<key>(?P<alias>{_ALIAS}))"),
    re.compile(rf"(?P<key>{_ARN}(?P<alias>{_ALIAS}))"),
]
_ENDPOINT = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
_GRAMMAR = (
    "expected awskms://[ENDPOINT]/KEY, KEY a key id, a key ARN, alias/NAME or an alias ARN"
)


@dataclass(frozen=True)
class AwsKeyReference:
    """A parsed ``awskms://`` reference."""

    endpoint: str
    """HOST[:PORT] from the reference; "" leaves the endpoint to the SDK."""
    key: str
    """The key as KMS takes it in ``KeyId``: key id, key ARN, ``alias/NAME`` or alias ARN."""
    region: str | None
    """The region of an ARN."""
    alias: str | None
    """``alias/NAME`` when the reference names an alias (the form CreateAlias takes)."""

    @property
    def endpoint_url(self) -> str | None:
        return f"https://{self.endpoint}" if self.endpoint else None

    def __str__(self) -> str:
        return f"{SCHEME}://{self.endpoint}/{self.key}"


def parse_reference(location: str) -> AwsKeyReference:
    """Parse ``ENDPOINT/KEY``, an ``awskms://`` reference without its scheme."""
    endpoint, slash, key = location.partition("/")
    if not slash:
        raise _invalid(location, "no KEY after the endpoint")
    if endpoint and _ENDPOINT.fullmatch(endpoint) is None:
        raise _invalid(location, "ENDPOINT must be HOST[:PORT]")
    for form in _KEY_FORMS:
        match = form.fullmatch(key)
        if match is not None:
            groups = match.groupdict()
            return AwsKeyReference(endpoint, key, groups.get("region"), groups.get("alias"))
    if endpoint == "alias":
        raise _invalid(location, "an alias follows a third slash, as in awskms:///alias/NAME")
    raise _invalid(location, _GRAMMAR)


def _invalid(location: str, reason: str) -> KMSError:
    # Never echo a user:password@ someone put in the endpoint (no key form has an "@").
    shown = f"{SCHEME}://{location.rpartition('@')[2]}"
    return KMSError(f"invalid {SCHEME} reference {shown!r}: {reason}")


def signing_key_problem(response: Mapping[str, Any]) -> str | None:
    """Why the key GetPublicKey describes cannot sign for signgate; None if it can."""
    # moto answers with only CustomerMasterKeySpec, the field KeySpec replaced.
    spec = response.get("KeySpec") or response.get("CustomerMasterKeySpec") or "unknown"
    usage = response.get("KeyUsage") or "ENCRYPT_DECRYPT"
    if spec == KEY_SPEC and usage == KEY_USAGE:
        return None
    return f"the key is {spec} for {usage}; signgate needs {KEY_SPEC} for {KEY_USAGE}"


# KeyState values in which a key does not sign, and what to say about them.
_STATE_PROBLEMS: Final = {
    "Disabled": "the key is disabled",
    "PendingDeletion": "the key is pending deletion",
    "PendingReplicaDeletion": "the key is pending deletion",
    "Unavailable": "the key is unavailable (its custom key store is disconnected)",
    "PendingImport": "the key has no key material yet (PendingImport)",
    "Creating": "the key is still being created",
}
# Key states that already keep a key from signing: disabling leaves these as they are.
_OUT_OF_USE_STATES: Final = frozenset({"Disabled", "PendingDeletion", "PendingReplicaDeletion"})


def key_state_problem(metadata: Mapping[str, Any]) -> str | None:
    """Why a key DescribeKey describes cannot be used now; None if it is Enabled."""
    state = str(metadata.get("KeyState") or ("Enabled" if metadata.get("Enabled") else ""))
    if state == "Enabled":
        return None
    return _STATE_PROBLEMS.get(state, f"the key is in state {state or 'unknown'}, not Enabled")


_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
    }
)
_DENIED_CODES = frozenset({"AccessDeniedException", "AccessDenied"})
_WRONG_KEY_TYPE_CODES = frozenset({"UnsupportedOperationException", "InvalidKeyUsageException"})
_XML_ERROR_CODE = re.compile(r"<Code>([^<]+)</Code>")


def error_code(response: Mapping[str, Any]) -> str:
    """The AWS error code of a ClientError's response."""
    error = response.get("Error", {})
    code = str(error.get("Code", ""))
    if code.isdigit():
        # moto's IAM checks answer in the Query protocol's XML even for JSON services like
        # KMS, so botocore sees only the HTTP status; the real code is inside the XML.
        inner = _XML_ERROR_CODE.search(str(error.get("Message", "")))
        if inner is not None:
            return inner.group(1)
    return code


def describe_failure(error: Exception, operation: str) -> str:
    """What went wrong in ``kms:<operation>`` (or before any, when "") in words that never
    carry a credential."""
    from botocore import exceptions as aws

    if isinstance(error, aws.ClientError):
        code = error_code(error.response)
        if code == "NotFoundException":
            return "no such key or alias"
        if code in _DENIED_CODES:
            return f"kms:{operation} denied to these credentials ({code})"
        if code in _CREDENTIAL_CODES:
            return (
                f"the KMS refused the AWS credentials ({code}); check AWS_PROFILE, "
                "AWS_ACCESS_KEY_ID or the role"
            )
        if code == "DisabledException":
            return "the key is disabled"
        if code in _WRONG_KEY_TYPE_CODES:
            return (
                f"the key cannot do kms:{operation} ({code}); signgate needs {KEY_SPEC} "
                f"for {KEY_USAGE}"
            )
        if code == "AlreadyExistsException":
            return "the alias exists already"
        message = " ".join(str(error.response.get("Error", {}).get("Message", "")).split())
        return f"kms:{operation} failed: {code}" + (f": {message}" if message else "")
    if isinstance(error, aws.SSLError):
        return "TLS verification of the KMS endpoint failed (AWS_CA_BUNDLE names a private CA)"
    if isinstance(error, aws.ReadTimeoutError):
        return f"the KMS did not answer kms:{operation} in time"
    if isinstance(error, aws.ConnectionError | aws.ConnectionClosedError):
        return "cannot connect to the KMS"
    if isinstance(error, aws.NoRegionError):
        return "no AWS region: set AWS_REGION or name the key by its ARN"
    if isinstance(error, aws.NoCredentialsError):
        return (
            "no AWS credentials found (environment, shared config and credentials files, "
            "SSO, container or instance role)"
        )
    if isinstance(error, aws.ProfileNotFound):
        return str(error)
    if "Credential" in type(error).__name__:
        # The text of a credential provider's failure may quote what it read: leave it out.
        return f"the AWS credentials could not be loaded ({type(error).__name__})"
    failed = f"kms:{operation}" if operation else "the AWS SDK"
    return f"{failed} failed: {' '.join(str(error).split())}"


class AwsKms:
    """One reference bound to a KMS client; every SDK failure leaves as a one-line KMSError."""

    def __init__(self, ref: AwsKeyReference, client: KMSClient) -> None:
        self.ref = ref
        self._client = client

    @classmethod
    def connect(cls, ref: AwsKeyReference) -> AwsKms:
        require_extra("boto3", "aws", SCHEME)
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        region = ref.region or os.environ.get("AWS_REGION") or None
        try:
            client = boto3.session.Session().client(
                "kms",
                region_name=region,
                endpoint_url=ref.endpoint_url,
                # botocore waits 60 s for a connection by default, on each retry.
                config=Config(connect_timeout=10, read_timeout=30),
            )
        except BotoCoreError as e:
            raise KMSError(f"{ref}: {describe_failure(e, '')}") from e
        return cls(ref, client)

    def close(self) -> None:
        self._client.close()

    @property
    def where(self) -> str:
        """The reference, the endpoint and the region, for messages."""
        endpoint = urlsplit(self._client.meta.endpoint_url)
        # An endpoint URL from the environment may carry user:password@; show only the host.
        shown = urlunsplit(endpoint._replace(netloc=endpoint.netloc.rpartition("@")[2]))
        return f"{self.ref} at {shown} ({self._client.meta.region_name})"

    def _call(self, operation: str, call: Callable[[], _T]) -> _T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except (ClientError, BotoCoreError) as e:
            raise KMSError(f"{self.where}: {describe_failure(e, operation)}") from e

    def public_key(self, key: str | None = None) -> tuple[PublicKey, str]:
        """The key's public key and its key id (as KMS names it: the key ARN); a KMSError if
        the key is not enabled."""
        # Real AWS refuses GetPublicKey and Sign on a disabled key, but moto answers both, so
        # the state is read first: a disabled key gives the same one-line refusal on both.
        # cosign reads the key's metadata too (fetchCMK calls DescribeKey), so the credentials
        # cosign needs suffice: https://github.com/sigstore/sigstore/blob/main/pkg/signature/
        # kms/aws/client.go
        problem = key_state_problem(self._describe(key or self.ref.key))
        if problem is not None:
            raise KMSError(f"{self.where}: {problem}")
        response = self._call(
            "GetPublicKey", lambda: self._client.get_public_key(KeyId=key or self.ref.key)
        )
        problem = signing_key_problem(response)
        if problem is not None:
            raise KMSError(f"{self.where}: {problem}")
        try:
            loaded = serialization.load_der_public_key(response["PublicKey"])
            public_key = PublicKey(loaded)
        except (ValueError, UnsupportedAlgorithm, UnsupportedKey) as e:
            raise KMSError(f"{self.where}: the KMS returned an unreadable public key") from e
        if not isinstance(loaded, ec.EllipticCurvePublicKey) or loaded.curve.name != "secp256r1":
            raise KMSError(f"{self.where}: the public key is not ECDSA P-256")
        return public_key, response["KeyId"]

    def sign(self, key_id: str, message: bytes, message_type: MessageType) -> bytes:
        response = self._call(
            "Sign",
            lambda: self._client.sign(
                KeyId=key_id,
                Message=message,
                MessageType=message_type,
                SigningAlgorithm=SIGNING_ALGORITHM,
            ),
        )
        return response["Signature"]

    def disable(self) -> str:
        """DisableKey on the key the reference names (an alias stays, pointing to it)."""
        metadata = self._describe(self.ref.key)
        key_id = metadata["KeyId"]
        state = metadata.get("KeyState")
        if state in _OUT_OF_USE_STATES:
            return f"{self.where}: key {key_id} is {state} already"
        # DisableKey takes a key id or ARN, not an alias.
        self._call("DisableKey", lambda: self._client.disable_key(KeyId=key_id))
        return f"{self.where}: key {key_id} disabled"

    def _describe(self, key: str) -> Mapping[str, Any]:
        described = self._call("DescribeKey", lambda: self._client.describe_key(KeyId=key))
        return described["KeyMetadata"]

    def create(self) -> PublicKey:
        """A new non-exportable P-256 signing key under the reference's alias."""
        alias = self.ref.alias
        if alias is None:
            raise KMSError(
                f"{self.ref}: a new key needs a name: use an alias, as in awskms:///alias/NAME"
            )
        existing = self._existing_key(self.ref.key)
        if existing is not None:
            raise KMSError(f"{self.where}: {alias} exists already (key {existing})")
        created = self._call(
            "CreateKey",
            lambda: self._client.create_key(
                KeySpec=KEY_SPEC,
                KeyUsage=KEY_USAGE,
                Description=f"signgate image signing key ({alias})",
            ),
        )
        key_id = created["KeyMetadata"]["KeyId"]
        try:
            self._call(
                "CreateAlias",
                lambda: self._client.create_alias(AliasName=alias, TargetKeyId=key_id),
            )
        except KMSError:
            self._discard(key_id)
            raise
        return self.public_key(key_id)[0]

    def _existing_key(self, alias_key: str) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            described = self._client.describe_key(KeyId=alias_key)
        except (ClientError, BotoCoreError) as e:
            if isinstance(e, ClientError) and error_code(e.response) == "NotFoundException":
                return None
            raise KMSError(f"{self.where}: {describe_failure(e, 'DescribeKey')}") from e
        return described["KeyMetadata"]["KeyId"]

    def _discard(self, key_id: str) -> None:
        # The alias could not be made (another creator won the race, or no permission): the
        # nameless key would only cost money, so it goes; if even that fails, the error about
        # the alias is the one worth showing.
        with contextlib.suppress(Exception):
            self._client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)


class AwsKmsSigner:
    """A :class:`~signgate.keys.model.Signer` whose P-256 key stays in AWS KMS."""

    def __init__(self, kms: AwsKms, public_key: PublicKey, key_id: str) -> None:
        self._kms = kms
        self._public_key = public_key
        # The key GetPublicKey answered for, not the alias: if the alias moves meanwhile,
        # signing still uses the key whose public half we hold.
        self._key_id = key_id

    def public_key(self) -> PublicKey:
        return self._public_key

    def sign(self, payload: bytes) -> bytes:
        # Real AWS KMS takes MessageType=DIGEST as the SHA-256 digest, but moto ignores it and
        # hashes the digest again, giving a signature over the wrong message (and cosign's own
        # awskms signing through moto fails to verify for that reason). With MessageType=RAW
        # both hash the message themselves with SHA-256 (ECDSA_SHA_256), so RAW is correct on
        # both; it takes at most 4096 bytes, and only a larger payload (many annotations) goes
        # as DIGEST, correct on real AWS and caught below on moto. The payload is public
        # anyway: it is stored next to the signature.
        # https://docs.aws.amazon.com/kms/latest/APIReference/API_Sign.html#KMS-Sign-request-MessageType
        message_type: MessageType
        if len(payload) <= RAW_MESSAGE_LIMIT:
            message, message_type = payload, "RAW"
        else:
            message, message_type = hashlib.sha256(payload).digest(), "DIGEST"
        signature = der_signature(self._kms.sign(self._key_id, message, message_type))
        if not self._public_key.verify(signature, payload):
            raise KMSError(
                f"{self._kms.where}: the signature returned does not verify with the key's "
                f"public key (MessageType={message_type})"
            )
        return signature

    def __repr__(self) -> str:
        return f"AwsKmsSigner({self._kms.ref})"


class AwsKmsBackend:
    """``awskms://`` references: sign, public key, create (under an alias), disable.

    AWS KMS keys have no versions a reference can name (KMS rotates only symmetric key
    material, behind the same key): moving to a new key pair means a new key.
    """

    def signer(self, location: str, password: PasswordSource) -> Signer:
        kms = AwsKms.connect(parse_reference(location))
        try:
            public_key, key_id = kms.public_key()
        except KMSError:
            kms.close()
            raise
        return AwsKmsSigner(kms, public_key, key_id)

    def public_key(self, location: str, password: PasswordSource) -> PublicKey:
        kms = AwsKms.connect(parse_reference(location))
        try:
            return kms.public_key()[0]
        finally:
            kms.close()

    def create_key(self, location: str, password: PasswordSource) -> PublicKey:
        kms = AwsKms.connect(parse_reference(location))
        try:
            return kms.create()
        finally:
            kms.close()

    def disable_key(self, location: str) -> str:
        kms = AwsKms.connect(parse_reference(location))
        try:
            return kms.disable()
        finally:
            kms.close()


def backend(scheme: str) -> KeyBackend:
    return AwsKmsBackend()
