"""A test double for kube-apiserver: the core/v1 Secret endpoints, on loopback, over HTTPS.

No kube-apiserver can run on these machines, so :class:`KubeAPIDouble` stands in for it. It
speaks exactly what a client of ``k8s://NAMESPACE/SECRET`` keys calls (the official Python client
in signgate, client-go in cosign):

- ``GET  /api/v1/namespaces/NS/secrets/NAME`` -> 200 Secret, or 404
- ``POST /api/v1/namespaces/NS/secrets`` -> 201 Secret, or 404 (no such namespace), 409 (exists)

with Bearer token authentication (401 for an unknown token) and an RBAC stand-in (each token is
a user allowed some verbs on secrets; 403 otherwise). Error bodies are ``metav1.Status``
objects shaped as the real API server writes them (kind, apiVersion, metadata, status, message,
reason, details, code): https://kubernetes.io/docs/reference/using-api/api-concepts/ and
k8s.io/apimachinery/pkg/api/errors. Anything else gets the API server's own 404 or 405.

Bodies are read as JSON only: client-go (cosign) writes Secrets as protobuf, which the double
answers with 415, so a Secret as cosign makes it is arranged with :meth:`KubeAPIDouble.put_secret`
from the files of ``cosign generate-key-pair``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
import ssl
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from tests.integration.registry_servers import ServerCertificate

_SECRET = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets/([^/]+)$")
_SECRETS = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets$")


@dataclass(frozen=True)
class Grant:
    """What a token stands for: a user, and the verbs it may use on secrets."""

    user: str
    verbs: frozenset[str]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    token: str | None
    content_type: str | None


@dataclass
class KubeAPIDouble:
    """Stands in for kube-apiserver's Secret API (see the module docstring).

    ``tokens`` maps bearer tokens to grants; ``namespaces`` exist; ``tls`` serves HTTPS (as
    every real API server does) when given, plain HTTP otherwise.
    """

    tokens: Mapping[str, Grant]
    namespaces: Iterable[str] = ("default",)
    tls: ServerCertificate | None = None
    requests: list[RecordedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._namespaces = set(self.namespaces)
        self._secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the double is not started"
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host!s}:{port}"

    # --- state, for tests to arrange and inspect ----------------------------------------------

    def put_secret(self, namespace: str, name: str, data: Mapping[str, bytes]) -> None:
        """Store a Secret as ``kubectl create secret generic`` would (values as raw bytes)."""
        encoded = {key: base64.b64encode(value).decode() for key, value in data.items()}
        with self._lock:
            self._namespaces.add(namespace)
            self._secrets[namespace, name] = self._stored(
                {"metadata": {"name": name}, "type": "Opaque", "data": encoded}, namespace
            )

    def secret(self, namespace: str, name: str) -> dict[str, Any]:
        """The stored Secret object, as the API would return it."""
        with self._lock:
            return _copy(self._secrets[namespace, name])

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes]:
        """The stored Secret's data, decoded."""
        data = self.secret(namespace, name).get("data") or {}
        return {key: base64.b64decode(value) for key, value in data.items()}

    def has_secret(self, namespace: str, name: str) -> bool:
        with self._lock:
            return (namespace, name) in self._secrets

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    # --- the API ------------------------------------------------------------------------------

    def _stored(self, secret: dict[str, Any], namespace: str) -> dict[str, Any]:
        metadata = dict(secret.get("metadata") or {})
        metadata.update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            resourceVersion=str(len(self._secrets) + 1),
            creationTimestamp=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        stored: dict[str, Any] = {"kind": "Secret", "apiVersion": "v1", "metadata": metadata}
        if secret.get("data"):
            stored["data"] = secret["data"]
        stored["type"] = secret.get("type") or "Opaque"
        return stored

    def _get(self, grant: Grant, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        if "get" not in grant.verbs:
            return _forbidden(grant, "get", namespace, name)
        with self._lock:
            secret = self._secrets.get((namespace, name))
            if secret is None:
                return _status(404, "NotFound", f'secrets "{name}" not found', name, "secrets")
            return 200, _copy(secret)

    def _create(
        self, grant: Grant, namespace: str, content_type: str | None, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        if "create" not in grant.verbs:
            return _forbidden(grant, "create", namespace, None)
        # The API server reads a body without Content-Type as its first media type, JSON.
        if (content_type or "application/json").split(";")[0].strip() != "application/json":
            return _status(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: application/json (the double reads JSON only, not {content_type})",
            )
        try:
            secret = json.loads(body)
        except ValueError:
            return _status(400, "BadRequest", "the request body is not JSON")
        if not isinstance(secret, dict) or secret.get("kind", "Secret") != "Secret":
            return _status(400, "BadRequest", "the body is not a v1 Secret")
        metadata = secret.get("metadata") or {}
        name = metadata.get("name")
        if not name:
            return _status(422, "Invalid", 'Secret "" is invalid: metadata.name: Required value')
        if metadata.get("namespace", namespace) != namespace:
            return _status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        for value in (secret.get("data") or {}).values():
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, TypeError, ValueError):
                return _status(
                    400,
                    "BadRequest",
                    'Secret in version "v1" cannot be handled as a Secret: illegal base64 data',
                )
        with self._lock:
            if namespace not in self._namespaces:
                return _status(
                    404, "NotFound", f'namespaces "{namespace}" not found', namespace, "namespaces"
                )
            if (namespace, name) in self._secrets:
                return _status(
                    409, "AlreadyExists", f'secrets "{name}" already exists', name, "secrets"
                )
            stored = self._stored(secret, namespace)
            self._secrets[namespace, name] = stored
            return 201, _copy(stored)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_PUT(self) -> None:
                self._serve("PUT")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                token = _bearer_token(self.headers.get("Authorization"))
                content_type = self.headers.get("Content-Type")
                double.requests.append(RecordedRequest(method, path, token, content_type))
                grant = double.tokens.get(token) if token is not None else None
                if grant is None:
                    self._reply(*_status(401, "Unauthorized", "Unauthorized"))
                    return
                one = _SECRET.match(path)
                collection = _SECRETS.match(path)
                if one and method == "GET":
                    self._reply(*double._get(grant, one.group(1), one.group(2)))
                elif collection and method == "POST":
                    self._reply(*double._create(grant, collection.group(1), content_type, body))
                elif one or collection:
                    self._reply(
                        *_status(
                            405,
                            "MethodNotAllowed",
                            "the server does not allow this method on the requested resource",
                        )
                    )
                else:
                    missing = "the server could not find the requested resource"
                    self._reply(*_status(404, "NotFound", missing))

            def _reply(self, code: int, document: dict[str, Any]) -> None:
                encoded = json.dumps(document).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(encoded)))
                self.end_headers()
                self.wfile.write(encoded)

        return Handler


def _copy(document: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(document))
    return copied


def _bearer_token(authorization: str | None) -> str | None:
    # The API server compares the scheme case-insensitively; the Python client's in-cluster
    # loader sends "bearer".
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _status(
    code: int, reason: str, message: str, name: str | None = None, kind: str | None = None
) -> tuple[int, dict[str, Any]]:
    details: dict[str, str] = {}
    if name is not None:
        details["name"] = name
    if kind is not None:
        details["kind"] = kind
    document: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details:
        document["details"] = details
    document["code"] = code
    return code, document


def _forbidden(
    grant: Grant, verb: str, namespace: str, name: str | None
) -> tuple[int, dict[str, Any]]:
    subject = f'secrets "{name}"' if name else "secrets"
    message = (
        f'{subject} is forbidden: User "{grant.user}" cannot {verb} resource "secrets" in API '
        f'group "" in the namespace "{namespace}"'
    )
    return _status(403, "Forbidden", message, name, "secrets")


@contextmanager
def running_kube_api(
    tokens: Mapping[str, Grant],
    namespaces: Iterable[str] = ("default",),
    tls: ServerCertificate | None = None,
) -> Iterator[KubeAPIDouble]:
    double = KubeAPIDouble(tokens, namespaces, tls)
    double.start()
    try:
        yield double
    finally:
        double.stop()


def write_kubeconfig(path: Path, server: str, token: str, ca_file: Path | None = None) -> Path:
    """A kubeconfig with one context: ``server``, trusted through ``ca_file``'s certificate
    (inline, as ``kubectl config view --raw`` shows it), and a bearer ``token``."""
    cluster: dict[str, Any] = {"server": server}
    if ca_file is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_file.read_bytes()).decode()
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "double", "cluster": cluster}],
        "users": [{"name": "signer", "user": {"token": token}}],
        "contexts": [{"name": "double", "context": {"cluster": "double", "user": "signer"}}],
        "current-context": "double",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))
    return path
