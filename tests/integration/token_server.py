"""A small Bearer token server for distribution's ``auth: token`` (the tests' own).

It checks Basic credentials (or an OAuth2 refresh token) and issues an ES256 JWT whose
``x5c`` header carries a self-signed certificate the registry trusts via ``rootcertbundle``.
Anonymous requests get a token that grants nothing, as Docker Hub does for private
repositories. Token format: https://distribution.github.io/distribution/spec/auth/jwt/
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

TOKEN_SECONDS = 300


@dataclass(frozen=True)
class TokenRequest:
    """What a client asked for: ``username`` None when anonymous."""

    method: str
    scopes: tuple[str, ...]
    username: str | None
    granted: bool


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _access(scopes: tuple[str, ...]) -> list[dict[str, Any]]:
    access = []
    for scope in scopes:
        resource_type, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        access.append({"type": resource_type, "name": name, "actions": actions.split(",")})
    return access


@dataclass
class TokenServer:
    """Issue tokens for ``service`` as ``issuer`` to ``users`` (name -> password) and to
    holders of ``identity_tokens`` (refresh token -> name)."""

    directory: Path
    service: str = "signgate-test-registry"
    issuer: str = "signgate-test-token-server"
    users: dict[str, str] = field(default_factory=dict)
    identity_tokens: dict[str, str] = field(default_factory=dict)
    requests: list[TokenRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signgate test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self._key, hashes.SHA256())
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cert_file = self.directory / "token-signer.pem"
        self.cert_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        assert self._server is not None, "token server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/token"

    def registry_auth_config(self) -> dict[str, str]:
        """distribution's ``auth.token`` section for this server."""
        return {
            "realm": self.realm,
            "service": self.service,
            "issuer": self.issuer,
            "rootcertbundle": str(self.cert_file),
        }

    def issue(self, subject: str, scopes: tuple[str, ...]) -> str:
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + TOKEN_SECONDS,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": _access(scopes),
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                scopes = tuple(s for value in query.get("scope", []) for s in value.split())
                username = None
                authorization = self.headers.get("Authorization", "")
                if authorization.startswith("Basic "):
                    decoded = base64.b64decode(authorization[6:]).decode()
                    username, _, password = decoded.partition(":")
                    if server.users.get(username) != password:
                        server.requests.append(TokenRequest("GET", scopes, username, False))
                        self._refuse()
                        return
                server.requests.append(TokenRequest("GET", scopes, username, True))
                self._grant(username, scopes if username else ())

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                scopes = tuple(s for value in form.get("scope", []) for s in value.split())
                username = None
                if form.get("grant_type") == ["refresh_token"]:
                    username = server.identity_tokens.get(form.get("refresh_token", [""])[0])
                elif form.get("grant_type") == ["password"]:
                    name = form.get("username", [""])[0]
                    if server.users.get(name) == form.get("password", [None])[0]:
                        username = name
                server.requests.append(TokenRequest("POST", scopes, username, username is not None))
                if username is None:
                    self._refuse()
                    return
                self._grant(username, scopes)

            def _grant(self, username: str | None, scopes: tuple[str, ...]) -> None:
                token = server.issue(username or "", scopes)
                self._reply(
                    200, {"token": token, "access_token": token, "expires_in": TOKEN_SECONDS}
                )

            def _refuse(self) -> None:
                error = {"code": "UNAUTHORIZED", "message": "invalid username or password"}
                self._reply(401, {"errors": [error]})

            def _reply(self, status: int, document: dict[str, Any]) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
