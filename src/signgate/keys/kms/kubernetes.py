"""``k8s://NAMESPACE/SECRET``: a cosign key pair kept in a Kubernetes Secret, as cosign keeps it.

The Secret holds three data keys: ``cosign.key`` (the encrypted private key, cosign's format),
``cosign.pub`` (its public key, PEM) and ``cosign.password`` (the password that opens
``cosign.key``). Signing reads the Secret and decrypts the key with the password stored beside
it; verifying reads only ``cosign.pub``; ``generate-key-pair --kms k8s://ns/name`` creates the
Secret with a fresh P-256 pair.
https://github.com/sigstore/cosign/blob/main/pkg/cosign/kubernetes/secret.go

The API is reached with the official client (the ``k8s`` extra), configured as client-go
configures cosign: the kubeconfig files (``KUBECONFIG``, else ``~/.kube/config``) when there are
any, else the pod's service account.
https://github.com/kubernetes/client-go/blob/master/tools/clientcmd/merged_client_builder.go

Messages name the Secret and the API server, never the token or a key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from signgate.errors import KeyMaterialError, KMSError, WrongPassword
from signgate.keys.cosign_format import decrypt_private_key, encrypt_private_key
from signgate.keys.kms import require_extra
from signgate.keys.model import PrivateKeySigner, PublicKey, Signer
from signgate.keys.password import PasswordSource

SCHEME = "k8s"
PRIVATE_KEY_FIELD = "cosign.key"
PUBLIC_KEY_FIELD = "cosign.pub"
PASSWORD_FIELD = "cosign.password"

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# (connect, read) seconds for each API request, so that a silent server cannot hang a CI job.
REQUEST_TIMEOUT = (10.0, 30.0)

_NAMESPACE_MAX = 63
_SECRET_NAME_MAX = 253
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_NAMESPACE = re.compile(_DNS_LABEL)
_SECRET_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_SERVER_MESSAGE_MAX = 300
# "[Errno 111] Connection refused", "[Errno -2] Name or service not known"
_OS_ERROR = re.compile(r"\[Errno -?\d+\] ([^)'\"]+)")


# --- the reference (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class SecretLocation:
    """Where a key pair lives: the Secret ``name`` in ``namespace``."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ref(self) -> str:
        return f"{SCHEME}://{self}"


def parse_secret_location(location: str) -> SecretLocation:
    """``NAMESPACE/SECRET`` (the reference without ``k8s://``), each a valid Kubernetes name."""
    ref = f"{SCHEME}://{location}"
    parts = location.split("/")
    if len(parts) != 2 or not all(parts):
        raise KMSError(f"{ref}: expected {SCHEME}://NAMESPACE/SECRET")
    namespace, name = parts
    if len(namespace) > _NAMESPACE_MAX or not _NAMESPACE.fullmatch(namespace):
        raise KMSError(
            f"{ref}: {namespace!r} is not a Kubernetes namespace name (lowercase letters, "
            f"digits and '-', at most {_NAMESPACE_MAX})"
        )
    if len(name) > _SECRET_NAME_MAX or not _SECRET_NAME.fullmatch(name):
        raise KMSError(
            f"{ref}: {name!r} is not a Kubernetes Secret name (lowercase letters, digits, "
            f"'-' and '.', at most {_SECRET_NAME_MAX})"
        )
    return SecretLocation(namespace, name)


# --- which cluster, with which credentials (pure) ---------------------------------------------


@dataclass(frozen=True)
class KubeconfigFiles:
    """The kubeconfig files that exist, merged in order as client-go merges them."""

    paths: tuple[Path, ...]


@dataclass(frozen=True)
class ServiceAccount:
    """The pod's own service account: API address from the environment, token and CA from
    ``directory``."""

    host: str
    port: str
    directory: Path


ClusterAccess = KubeconfigFiles | ServiceAccount


def find_cluster_access(
    environ: Mapping[str, str],
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
    exists: Callable[[Path], bool] = Path.is_file,
) -> ClusterAccess | None:
    """Where the client's configuration comes from, by client-go's loading rules.

    The files named in ``KUBECONFIG`` (``os.pathsep``-separated, missing ones skipped), or
    ``~/.kube/config`` when it is unset or empty; with none of them, the in-cluster service
    account when ``KUBERNETES_SERVICE_HOST``/``_PORT`` are set and its token exists; else None.
    """
    listed = environ.get("KUBECONFIG", "")
    if listed:
        candidates = [Path(p).expanduser() for p in listed.split(os.pathsep) if p]
    else:
        home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
        candidates = [home / ".kube" / "config"]
    found = tuple(path for path in candidates if exists(path))
    if found:
        return KubeconfigFiles(found)
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    if host and port and exists(service_account_dir / "token"):
        return ServiceAccount(host, port, service_account_dir)
    return None


# --- the Secret's contents (pure) -------------------------------------------------------------


def secret_manifest(
    location: SecretLocation, private_key_pem: bytes, public_key_pem: bytes, password: bytes
) -> dict[str, Any]:
    """The core/v1 Secret that cosign's ``generate-key-pair --kms k8s://...`` creates."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": location.name, "namespace": location.namespace},
        "type": "Opaque",
        "data": {
            PRIVATE_KEY_FIELD: _b64(private_key_pem),
            PUBLIC_KEY_FIELD: _b64(public_key_pem),
            PASSWORD_FIELD: _b64(password),
        },
    }


def secret_field(location: SecretLocation, data: Mapping[str, str] | None, field: str) -> bytes:
    """One data key's bytes (the API returns them base64-encoded); a KMSError if it is absent."""
    value = (data or {}).get(field)
    if value is None:
        raise KMSError(f"{location.ref}: secret {location} has no {field!r} data key")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise KMSError(f"{location.ref}: {field!r} in secret {location} is not base64") from e


def status_message(body: str | None) -> str:
    """The ``message`` of a Kubernetes Status body, on one line; "" when there is none."""
    try:
        document = json.loads(body or "")
    except ValueError:
        return ""
    message = document.get("message") if isinstance(document, dict) else None
    if not isinstance(message, str):
        return ""
    return " ".join(message.split())[:_SERVER_MESSAGE_MAX]


# --- the backend ------------------------------------------------------------------------------


class KubernetesSecretKeys:
    """The ``k8s://`` key backend (a :class:`~signgate.keys.refs.KeyBackend` and
    :class:`~signgate.keys.refs.KeyCreator`).

    ``environ`` and ``service_account_dir`` default to the process's own and the standard
    mount; tests point them elsewhere.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        service_account_dir: Path = SERVICE_ACCOUNT_DIR,
    ) -> None:
        self._environ = environ
        self._service_account_dir = service_account_dir

    def signer(self, location: str, password: PasswordSource) -> Signer:
        """The key in ``cosign.key``, opened with ``cosign.password`` from the same Secret.

        ``password`` is not asked for: the Secret carries its own, as cosign reads it.
        """
        secret = parse_secret_location(location)
        data = self._read(secret)
        private_pem = secret_field(secret, data, PRIVATE_KEY_FIELD)
        # cosign reads a missing cosign.password as the empty password (Go's nil []byte).
        stored = (data or {}).get(PASSWORD_FIELD)
        secret_password = b"" if stored is None else secret_field(secret, data, PASSWORD_FIELD)
        source = f"{secret.ref} ({PRIVATE_KEY_FIELD})"
        try:
            key = decrypt_private_key(private_pem, secret_password, source=source)
        except WrongPassword as e:
            stated = repr(PASSWORD_FIELD) if stored is not None else "the empty password"
            raise KMSError(
                f"{secret.ref}: {stated} in secret {secret} does not open {PRIVATE_KEY_FIELD!r}"
            ) from e
        except KeyMaterialError as e:
            raise KMSError(str(e)) from e
        return PrivateKeySigner(key)

    def public_key(self, location: str, password: PasswordSource) -> PublicKey:
        """The key in ``cosign.pub``, as ``cosign verify --key k8s://...`` reads it."""
        secret = parse_secret_location(location)
        pem = secret_field(secret, self._read(secret), PUBLIC_KEY_FIELD)
        try:
            return PublicKey.from_pem(pem)
        except KeyMaterialError as e:
            raise KMSError(f"{secret.ref}: {PUBLIC_KEY_FIELD!r}: {e}") from e

    def create_key(self, location: str, password: PasswordSource) -> PublicKey:
        """A fresh ECDSA P-256 pair, encrypted with ``password``, stored with that password in
        a new Secret; refused if the Secret exists."""
        secret = parse_secret_location(location)
        with self._core_api(secret) as api:
            # The password is asked for only once the cluster is known to be configured.
            chosen = password()
            key = ec.generate_private_key(ec.SECP256R1())
            public = PublicKey(key.public_key())
            manifest = secret_manifest(
                secret, encrypt_private_key(key, chosen), public.pem(), chosen
            )
            with _api_errors(api, secret, "create"):
                api.core.create_namespaced_secret(
                    secret.namespace, manifest, _request_timeout=REQUEST_TIMEOUT
                )
        return public

    def _read(self, secret: SecretLocation) -> Mapping[str, str] | None:
        with self._core_api(secret) as api, _api_errors(api, secret, "get"):
            found = api.core.read_namespaced_secret(
                secret.name, secret.namespace, _request_timeout=REQUEST_TIMEOUT
            )
        data: Mapping[str, str] | None = found.data
        return data

    @contextmanager
    def _core_api(self, secret: SecretLocation) -> Iterator[_CoreAPI]:
        client = require_extra("kubernetes.client", "k8s", SCHEME)
        configuration = self._configuration(client, secret)
        # client-go retries no connection errors; urllib3's default (3 retries, each logged as
        # a warning on stderr) would only delay the one-line error.
        configuration.retries = 0
        with client.ApiClient(configuration) as api_client:
            yield _CoreAPI(client.CoreV1Api(api_client), client.ApiException, configuration.host)

    def _configuration(self, client: ModuleType, secret: SecretLocation) -> Any:
        environ = os.environ if self._environ is None else self._environ
        access = find_cluster_access(environ, self._service_account_dir)
        if access is None:
            raise KMSError(
                f"{secret.ref}: no Kubernetes configuration: set KUBECONFIG, create "
                "~/.kube/config, or run in a pod with a service account"
            )
        import yaml

        config = require_extra("kubernetes.config", "k8s", SCHEME)
        configuration = client.Configuration()
        try:
            if isinstance(access, KubeconfigFiles):
                files = os.pathsep.join(str(path) for path in access.paths)
                config.load_kube_config(config_file=files, client_configuration=configuration)
            else:
                config.incluster_config.InClusterConfigLoader(
                    token_filename=str(access.directory / "token"),
                    cert_filename=str(access.directory / "ca.crt"),
                    environ=environ,
                ).load_and_set(configuration)
        except (config.ConfigException, yaml.YAMLError, OSError, ValueError, KeyError) as e:
            where = (
                "kubeconfig " + ", ".join(str(path) for path in access.paths)
                if isinstance(access, KubeconfigFiles)
                else f"service account in {access.directory}"
            )
            reason = " ".join(str(e).split())[:_SERVER_MESSAGE_MAX] or type(e).__name__
            raise KMSError(f"{secret.ref}: cannot use the {where}: {reason}") from e
        return configuration


@dataclass(frozen=True)
class _CoreAPI:
    """The SDK's CoreV1Api (untyped), its exception class, and the server it talks to."""

    core: Any
    api_exception: type[Exception]
    host: str


@contextmanager
def _api_errors(api: _CoreAPI, secret: SecretLocation, verb: str) -> Iterator[None]:
    """Turn the SDK's and urllib3's exceptions into one-line KMSErrors naming the Secret."""
    import urllib3.exceptions

    server = f"the Kubernetes API at {api.host}"
    try:
        yield
    except api.api_exception as e:
        status = getattr(e, "status", None)
        if not status:
            # The SDK reports some transport failures (TLS) as status 0, the cause in reason.
            raise _transport_error(getattr(e, "reason", None), secret, server) from e
        said = status_message(getattr(e, "body", None))
        raise _status_error(status, said, secret, verb, server) from e
    except urllib3.exceptions.MaxRetryError as e:
        raise _transport_error(e.reason, secret, server) from e
    except urllib3.exceptions.HTTPError as e:
        raise _transport_error(e, secret, server) from e


def _status_error(
    status: int, said: str, secret: SecretLocation, verb: str, server: str
) -> KMSError:
    ref = secret.ref
    because = f": {said}" if said else ""
    if status == 401:
        return KMSError(f"{ref}: {server} refused the credentials (401 Unauthorized)")
    if status == 403:
        return KMSError(f"{ref}: permission denied to {verb} secret {secret}{because}")
    if status == 404 and verb == "create":
        return KMSError(f"{ref}: namespace {secret.namespace} not found at {server}")
    if status == 404:
        return KMSError(f"{ref}: secret {secret} not found at {server}")
    if status == 409 and verb == "create":
        return KMSError(f"{ref}: secret {secret} already exists; delete it or choose another name")
    return KMSError(f"{ref}: {server} answered {status} to {verb} secret {secret}{because}")


def _transport_error(cause: object, secret: SecretLocation, server: str) -> KMSError:
    import ssl

    import urllib3.exceptions

    text = str(cause)
    if isinstance(cause, urllib3.exceptions.SSLError | ssl.SSLError) or "SSLError" in text:
        return KMSError(f"{secret.ref}: TLS with {server} failed: {_tls_reason(text)}")
    # NewConnectionError is a ConnectTimeoutError in urllib3 2: test it first.
    if isinstance(cause, urllib3.exceptions.NewConnectionError):
        errors = _OS_ERROR.findall(text)
        return KMSError(f"{secret.ref}: cannot reach {server}: {_reason(errors)}")
    if isinstance(cause, urllib3.exceptions.TimeoutError):
        return KMSError(f"{secret.ref}: {server} did not answer in time")
    if isinstance(cause, urllib3.exceptions.ProtocolError):
        return KMSError(f"{secret.ref}: {server} broke the connection off (is it HTTPS?)")
    return KMSError(f"{secret.ref}: cannot reach {server}: {type(cause).__name__}")


def _reason(os_errors: list[str]) -> str:
    return os_errors[-1].strip().lower() if os_errors else "connection failed"


def _tls_reason(text: str) -> str:
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "the server certificate could not be verified"
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return "the server does not speak TLS"
    return "handshake failed"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def backend(scheme: str) -> KubernetesSecretKeys:
    """The backend for ``k8s://`` references (the process's environment)."""
    return KubernetesSecretKeys()
