"""Registry authentication: the Bearer token challenge flow and Basic auth, as an httpx flow.

A registry answers an anonymous request with 401 and a ``WWW-Authenticate`` challenge. For
``Bearer realm=..,service=..,scope=..`` we ask the realm for a token (with Basic credentials
if we have any) and send the request again with it; for ``Basic`` we send the credentials.
Tokens are kept per (registry, scopes) until shortly before they expire, so a session asks
for each token once. https://distribution.github.io/distribution/spec/auth/token/
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from signgate.errors import RegistryError, Unauthorized
from signgate.registry.errors import registry_error_text

# A token with no expires_in lives 60 seconds (token spec, "Token Response Fields").
DEFAULT_TOKEN_SECONDS = 60
# Renew a little before the server's deadline so a request does not race the expiry.
_EXPIRY_MARGIN_SECONDS = 10
_MAX_TOKEN_RESPONSE_BYTES = 1 << 20
CLIENT_ID = "signgate"


class LoginCredentials(Protocol):
    """What a registry login holds (``signgate.registry.credentials.Credentials`` fits)."""

    @property
    def username(self) -> str | None: ...

    @property
    def password(self) -> str | None: ...

    @property
    def identity_token(self) -> str | None: ...


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: lower-case scheme, parameters by lower-case name."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME = re.compile(rf"[\s,]*({_TOKEN})")
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*')
_TOKEN68 = re.compile(r"\s*[A-Za-z0-9._~+/-]+=*\s*(?=,|$)")
_QUOTED_PAIR = re.compile(r"\\(.)")


def parse_www_authenticate(values: str | Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (RFC 9110 section 11.6.1) into challenges.

    Several challenges may share one header value; parsing stops at the first malformed part.
    """
    texts = [values] if isinstance(values, str) else list(values)
    challenges: list[Challenge] = []
    for text in texts:
        position = 0
        while position < len(text):
            scheme = _SCHEME.match(text, position)
            if scheme is None:
                break
            position = scheme.end()
            params: dict[str, str] = {}
            token68 = _TOKEN68.match(text, position)
            if token68 is not None and _PARAM.match(text, position) is None:
                position = token68.end()
            else:
                while True:
                    param = _PARAM.match(text, position)
                    if param is None:
                        break
                    name, quoted, plain = param.groups()
                    value = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else plain
                    params[name.lower()] = value
                    position = param.end()
                    if text.startswith(",", position):
                        following = _PARAM.match(text, position + 1)
                        if following is None:
                            break
                        position += 1
                    else:
                        break
            challenges.append(Challenge(scheme.group(1).lower(), params))
            rest = text[position:].lstrip()
            if rest and not rest.startswith(","):
                break
    return challenges


def merge_scopes(*groups: Iterable[str]) -> tuple[str, ...]:
    """Union of token scopes, actions merged per resource: sorted, one entry per resource.

    ``repository:a:pull`` and ``repository:a:push`` become ``repository:a:pull,push``.
    """
    actions: dict[tuple[str, str], set[str]] = {}
    for group in groups:
        for scope in group:
            resource_type, _, rest = scope.partition(":")
            name, _, action_text = rest.rpartition(":")
            if not resource_type or not name:
                continue
            wanted = actions.setdefault((resource_type, name), set())
            wanted.update(a for a in action_text.split(",") if a)
    return tuple(
        f"{resource_type}:{name}:{','.join(sorted(wanted))}"
        for (resource_type, name), wanted in sorted(actions.items())
    )


def repository_scope(path: str, *actions: str) -> str:
    return f"repository:{path}:{','.join(actions)}"


CATALOG_SCOPE = "registry:catalog:*"


class AuthCache:
    """What a session learned about registry auth: tokens with expiry, Basic registries.

    ``clock`` is a monotonic seconds source (a seam for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[tuple[str, tuple[str, ...]], tuple[str, float]] = {}
        self._basic_registries: set[str] = set()

    def token(self, registry: str, scopes: tuple[str, ...]) -> str | None:
        entry = self._tokens.get((registry, scopes))
        if entry is None:
            return None
        token, expires_at = entry
        if self._clock() >= expires_at:
            del self._tokens[(registry, scopes)]
            return None
        return token

    def store_token(
        self, registry: str, scopes: tuple[str, ...], token: str, lifetime_seconds: float
    ) -> None:
        margin = min(_EXPIRY_MARGIN_SECONDS, lifetime_seconds / 2)
        self._tokens[(registry, scopes)] = (token, self._clock() + lifetime_seconds - margin)

    def uses_basic(self, registry: str) -> bool:
        return registry in self._basic_registries

    def remember_basic(self, registry: str) -> None:
        self._basic_registries.add(registry)


def addresses_registry(url: httpx.URL, registry: str) -> bool:
    """Whether ``url`` points at ``registry`` (host[:port]; a missing port is the scheme's)."""
    default_ports = {"https": 443, "http": 80}
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        port_text = rest[1:]
    else:
        host, _, port_text = registry.partition(":")
    port = int(port_text) if port_text.isdigit() else default_ports.get(url.scheme)
    return url.host.lower() == host.lower() and (url.port or default_ports.get(url.scheme)) == port


def basic_authorization(username: str, password: str) -> str:
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def token_request(
    challenge: Challenge, scopes: tuple[str, ...], credentials: LoginCredentials | None
) -> httpx.Request:
    """The request for a token at the challenge's realm.

    With an identity token (``docker login`` to an OAuth2 registry) it is the OAuth2 refresh
    grant, as docker does; otherwise a GET with Basic credentials, or anonymous.
    """
    realm = httpx.URL(challenge.params["realm"])
    service = challenge.params.get("service")
    if credentials is not None and credentials.identity_token:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": credentials.identity_token,
            "client_id": CLIENT_ID,
            "scope": " ".join(scopes),
        }
        if service:
            form["service"] = service
        return httpx.Request("POST", realm, data=form)
    params: list[tuple[str, str]] = []
    if service:
        params.append(("service", service))
    params.extend(("scope", scope) for scope in scopes)
    headers = {}
    if credentials is not None and credentials.username and credentials.password is not None:
        headers["Authorization"] = basic_authorization(credentials.username, credentials.password)
    url = realm.copy_merge_params(tuple(params)) if params else realm
    return httpx.Request("GET", url, headers=headers)


def parse_token_response(
    status: int, body: bytes, registry: str, *, sent_credentials: bool
) -> tuple[str, float]:
    """The token and its lifetime in seconds from the realm's reply; raise if refused."""
    server = f"registry {registry}: the auth server"
    if status in (401, 403):
        reason = registry_error_text(body) or f"HTTP {status}"
        what = "refused the credentials" if sent_credentials else "refused anonymous access"
        raise Unauthorized(f"{server} {what} ({reason})")
    if status != 200:
        reason = registry_error_text(body) or f"HTTP {status}"
        raise RegistryError(f"{server} failed to issue a token ({reason})")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RegistryError(f"{server} replied with invalid JSON") from e
    if not isinstance(document, dict):
        raise RegistryError(f"{server} replied without a token")
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not token:
        raise RegistryError(f"{server} replied without a token")
    lifetime = document.get("expires_in")
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_SECONDS
    return token, float(lifetime)


class RegistryAuth(httpx.Auth):
    """The auth flow for requests to one registry that need ``scopes``.

    Built per request by the client; the :class:`AuthCache` is shared by the session.
    """

    def __init__(
        self,
        registry: str,
        scopes: Iterable[str],
        credentials: LoginCredentials | None,
        cache: AuthCache,
    ) -> None:
        self.registry = registry
        self.scopes = merge_scopes(scopes)
        self.credentials = credentials
        self.cache = cache

    def _basic(self) -> str | None:
        credentials = self.credentials
        if credentials is None or not credentials.username or credentials.password is None:
            return None
        if credentials.identity_token and not credentials.password:
            return None  # an OAuth2 refresh token is for the token endpoint only
        return basic_authorization(credentials.username, credentials.password)

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        raise RuntimeError("RegistryAuth works only with httpx.AsyncClient")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if not addresses_registry(request.url, self.registry):
            # Never hand a registry's token or password to another host (an upload
            # location or a redirect elsewhere).
            yield request
            return
        token = self.cache.token(self.registry, self.scopes)
        basic = self._basic()
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        elif basic is not None and self.cache.uses_basic(self.registry):
            request.headers["Authorization"] = basic
        response = yield request
        if response.status_code != 401:
            return
        challenges = parse_www_authenticate(response.headers.get_list("www-authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer" and "realm" in c.params), None)
        if bearer is not None:
            scopes = merge_scopes(self.scopes, bearer.params.get("scope", "").split())
            token_response = yield token_request(bearer, scopes, self.credentials)
            body = await _read_token_reply(token_response, self.registry)
            token, lifetime = parse_token_response(
                token_response.status_code,
                body,
                self.registry,
                sent_credentials=self.credentials is not None,
            )
            self.cache.store_token(self.registry, self.scopes, token, lifetime)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request
            return
        if any(c.scheme == "basic" for c in challenges) and basic is not None:
            if request.headers.get("Authorization") == basic:
                return
            self.cache.remember_basic(self.registry)
            request.headers["Authorization"] = basic
            yield request


async def _read_token_reply(response: httpx.Response, registry: str) -> bytes:
    # httpx reads every response of an auth flow itself once the flow moves on, so the body
    # is read with aread(); a declared oversized reply is refused before reading it.
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > _MAX_TOKEN_RESPONSE_BYTES:
        raise RegistryError(f"registry {registry}: the auth server sent an oversized reply")
    return await response.aread()
