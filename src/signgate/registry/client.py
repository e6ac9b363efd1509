"""The async OCI distribution client used by every command (sign, verify, rotate, webhook).

HTTPS by default. Plain HTTP only for registries the user names insecure (reached over TLS
without verification when they speak it) and for loopback registries (TLS still verified
when they speak it), as docker does: for those, ``/v2/`` is probed over HTTPS once and the
client falls back to HTTP only when the server does not speak TLS at all, never when its
certificate fails verification.

Everything fetched is checked against its digest; nothing the registry *says* about a digest
is trusted. Spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable, Collection, Container, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# httpx's own reading of the proxy environment, as its trust_env does it (see _network_mounts)
from httpx._utils import URLPattern, get_environment_proxies

from signgate import __version__
from signgate.digests import compute_digest, parse_digest
from signgate.errors import DigestMismatch, NotFound, RegistryError, UsageError
from signgate.reference import Repository, signature_tag
from signgate.registry.auth import (
    CATALOG_SCOPE,
    AuthCache,
    LoginCredentials,
    RegistryAuth,
    repository_scope,
)
from signgate.registry.credentials import Credentials, lookup_credentials
from signgate.registry.errors import (
    certificate_error,
    error_for_response,
    error_for_transport,
    one_line,
    retry_after_seconds,
    tls_protocol_error,
)
from signgate.registry.mediatypes import MANIFEST_ACCEPT, OCI_INDEX
from signgate.registry.transport import StreamTransport

USER_AGENT = f"signgate/{__version__}"
MAX_CONNECTIONS = 100
# How many images the commands work on at once over one client. Against a registry on the same
# machine, 16 or 32 were no faster than 8 (benchmarks/verify_bench.py): the registry's CPU is the
# limit there. Eight concurrent images still hide a remote registry's round trips eight times
# over.
IMAGE_CONCURRENCY = 8
MAX_KEEPALIVE_CONNECTIONS = 20
KEEPALIVE_SECONDS = 30.0
DEFAULT_MAX_BLOB_BYTES = 64 << 20

_MAX_ERROR_BODY_BYTES = 64 << 10
_MAX_LIST_PAGE_BYTES = 16 << 20
_MAX_PAGES = 10_000
# As go-containerregistry (and so cosign) retries. 500 included: distribution's filesystem
# driver rewrites a tag's link file in place, so a read racing a manifest PUT to the same tag
# (a signature being appended, a rotation cleaning) can get a transient 500.
_RETRIED_STATUSES = frozenset({408, 500, 502, 503, 504})
# A kept-alive connection the server closed, or a reset mid-request: safe to send again
# when the request is idempotent.
_CONNECTION_RESETS = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
_ACCEPT_MANIFESTS = {"Accept": ", ".join(MANIFEST_ACCEPT)}


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach registries.

    ``insecure_registries``: hosts (host[:port]; a bare host covers every port) reached over
    plain HTTP or unverified TLS, because the user named them. Loopback registries
    (localhost, 127.0.0.0/8, [::1]) may use plain HTTP too, as docker does, but their TLS
    certificates are still verified.

    ``username``/``password`` (the ``--registry-*`` flags) take precedence over the docker
    config in ``docker_config_dir`` (default: ``$DOCKER_CONFIG`` or ``~/.docker``).

    ``transport`` replaces the network (a test seam: ``httpx.MockTransport``, or a transport
    wrapping the real one).
    """

    insecure_registries: Collection[str] = ()
    username: str | None = None
    password: str | None = None
    docker_config_dir: Path | None = None
    ca_bundle: Path | None = None  # extra CA file trusted for TLS
    max_manifest_bytes: int = 4 * 1024 * 1024
    max_retries: int = 4
    timeout_seconds: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)
    transport: httpx.AsyncBaseTransport | None = None
    retry_backoff_seconds: float = 0.5  # doubled at each retry
    max_retry_wait_seconds: float = 60.0  # bound on any one wait, Retry-After included
    # Told each response's status, or "error" for a transport failure (the webhook's metrics).
    on_response: Callable[[int | str], None] | None = None


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as stored: exact bytes, its digest (checked), and media type."""

    media_type: str
    digest: str
    raw: bytes

    def json(self) -> dict[str, Any]:
        value = json.loads(self.raw)
        if not isinstance(value, dict):
            raise ValueError("manifest is not a JSON object")
        return value


@dataclass(frozen=True)
class Referrers:
    """Manifests referring to a digest: their descriptors, and where they were listed.

    ``api`` is false when the registry has no referrers API and the fallback index (``index``,
    None when absent) was read instead; a writer must then update that index itself.
    """

    descriptors: tuple[dict[str, Any], ...]
    api: bool
    index: Manifest | None


def split_host_port(registry: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) into the bare host and the port, if any."""
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = registry.partition(":")
    return host.lower(), int(port_text) if port_text.isdigit() else None


def is_loopback(registry: str) -> bool:
    host, _ = split_host_port(registry)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _subject(repo: Repository, reference: str) -> str:
    separator = "@" if ":" in reference else ":"
    return f"{repo}{separator}{reference}"


def _pull(repo: Repository) -> str:
    return repository_scope(repo.path, "pull")


def _push(repo: Repository) -> str:
    return repository_scope(repo.path, "pull", "push")


def _load_trust(context: ssl.SSLContext, ca_bundle: Path | None) -> None:
    """Trust the system's roots, as cosign (Go) does, plus ``ca_bundle``.

    SSL_CERT_FILE and SSL_CERT_DIR are honoured; a hashed certificate directory is read lazily
    by OpenSSL (one file per issuer looked up); certifi's bundle is the fallback where the
    system has no roots.
    """
    defaults = ssl.get_default_verify_paths()
    cafile = os.environ.get("SSL_CERT_FILE")
    capath = os.environ.get("SSL_CERT_DIR") or defaults.capath
    try:
        if cafile:
            context.load_verify_locations(cafile=cafile)
        elif capath and os.path.isdir(capath) and any(Path(capath).glob("*.0")):
            context.load_verify_locations(capath=capath)
        else:
            import certifi

            context.load_verify_locations(cafile=certifi.where())
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load the system's CA certificates: {one_line(str(e))}") from e
    if ca_bundle is not None:
        try:
            context.load_verify_locations(cafile=str(ca_bundle))
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"cannot load the CA bundle {ca_bundle}: {one_line(str(e))}") from e


def _tls_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@functools.cache
def _unverified_tls_context() -> ssl.SSLContext:
    context = _tls_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _stream_transport(tls_context: Callable[[], ssl.SSLContext]) -> StreamTransport:
    return StreamTransport(
        tls_context,
        max_connections=MAX_CONNECTIONS,
        max_idle_connections=MAX_KEEPALIVE_CONNECTIONS,
        idle_seconds=KEEPALIVE_SECONDS,
    )


def _media_type(content_type: str | None, raw: bytes) -> str:
    declared = (content_type or "").split(";")[0].strip()
    if declared in MANIFEST_ACCEPT:
        return declared
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return declared
    body_type = document.get("mediaType") if isinstance(document, dict) else None
    if isinstance(body_type, str) and body_type:
        return body_type
    return declared


def _check_claimed_digest(claimed: str | None, raw: bytes, subject: str) -> None:
    """The registry's Docker-Content-Digest is not trusted, but a disagreeing one is a sign
    of tampering or corruption."""
    if not claimed:
        return
    parsed = parse_digest(claimed.strip())
    if parsed is None:
        return
    actual = compute_digest(raw, parsed[0])
    if actual != claimed.strip():
        raise DigestMismatch(
            f"{subject}: the registry says the digest is {claimed.strip()} "
            f"but the content it served has digest {actual}"
        )


class RegistryClient:
    """One connection pool per process; use as ``async with RegistryClient(opts) as client``."""

    def __init__(self, options: RegistryOptions | None = None) -> None:
        self.options = options or RegistryOptions()
        self._insecure = frozenset(
            h.strip().lower().removeprefix("https://").removeprefix("http://").rstrip("/")
            for h in self.options.insecure_registries
        )
        self._tls: ssl.SSLContext | None = None  # see _verified_tls
        transport = self.options.transport
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
        if transport is None:
            transport = _stream_transport(self._verified_tls)
            mounts = self._network_mounts()
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(self.options.timeout_seconds),
            headers={"User-Agent": USER_AGENT},
            transport=transport,
            mounts=mounts,
        )
        self._auth_cache = AuthCache()
        self._origins: dict[str, str] = {}
        self._origin_locks: dict[str, asyncio.Lock] = {}
        self._credentials: dict[str, LoginCredentials | None] = {}

    def _network_mounts(self) -> dict[str, httpx.AsyncBaseTransport | None]:
        """The transports for proxied origins and insecure hosts (None: the client's own).

        httpx reads HTTP(S)_PROXY, ALL_PROXY and NO_PROXY only when it builds its transport
        itself; read here as it reads them, a proxied origin goes through httpx's transport
        and the proxy. Insecure hosts get TLS without verification, proxied or not.
        """
        limits = httpx.Limits(
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
            keepalive_expiry=KEEPALIVE_SECONDS,
        )
        proxies = sorted(get_environment_proxies().items(), key=lambda item: URLPattern(item[0]))
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {
            pattern: None
            if proxy is None
            else httpx.AsyncHTTPTransport(verify=self._verified_tls(), limits=limits, proxy=proxy)
            for pattern, proxy in proxies
        }
        unverified: StreamTransport | None = None
        for host in self._insecure:
            url = httpx.URL(f"https://{host}/")
            proxy = next((p for pattern, p in proxies if URLPattern(pattern).matches(url)), None)
            if proxy is not None:
                transport: httpx.AsyncBaseTransport = httpx.AsyncHTTPTransport(
                    verify=False, limits=limits, proxy=proxy
                )
            else:
                unverified = unverified or _stream_transport(_unverified_tls_context)
                transport = unverified
            mounts[f"https://{host}"] = transport
        return mounts

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- manifests ---------------------------------------------------------------------------

    async def get_manifest(self, repo: Repository, reference: str) -> Manifest:
        """GET a manifest by tag or digest; digest checked, size bounded. NotFound if absent.

        By tag, the digest is computed from the bytes served.
        """
        subject = _subject(repo, reference)
        expected = self._digest_reference(reference, subject)
        async with self._stream(
            "GET",
            repo.registry,
            f"/v2/{repo.path}/manifests/{reference}",
            scopes=[_pull(repo)],
            subject=subject,
            ok={200},
            headers=_ACCEPT_MANIFESTS,
        ) as response:
            raw = await self._read_bounded(
                response, self.options.max_manifest_bytes, repo.registry, f"{subject}: manifest"
            )
        digest = compute_digest(raw, expected[0] if expected else "sha256")
        if expected is not None and digest != reference:
            raise DigestMismatch(
                f"{subject}: the registry served a manifest whose digest is {digest}"
            )
        _check_claimed_digest(response.headers.get("docker-content-digest"), raw, subject)
        return Manifest(_media_type(response.headers.get("content-type"), raw), digest, raw)

    async def head_manifest(self, repo: Repository, reference: str) -> str | None:
        """The digest a tag or digest resolves to, or None if it does not exist.

        This is the registry's word (Docker-Content-Digest); without it the manifest is
        fetched and hashed. :meth:`get_manifest` by the digest verifies the content.
        """
        subject = _subject(repo, reference)
        expected = self._digest_reference(reference, subject)
        async with self._stream(
            "HEAD",
            repo.registry,
            f"/v2/{repo.path}/manifests/{reference}",
            scopes=[_pull(repo)],
            subject=subject,
            ok={200, 404},
            headers=_ACCEPT_MANIFESTS,
        ) as response:
            status = response.status_code
            claimed = str(response.headers.get("docker-content-digest", "")).strip()
        if status == 404:
            return None
        if expected is not None:
            return reference
        if parse_digest(claimed) is not None:
            return claimed
        return (await self.get_manifest(repo, reference)).digest

    async def put_manifest(
        self, repo: Repository, reference: str, raw: bytes, media_type: str
    ) -> str:
        """PUT a manifest under a tag or digest; returns its digest."""
        subject = _subject(repo, reference)
        expected = self._digest_reference(reference, subject)
        if expected is not None and compute_digest(raw, expected[0]) != reference:
            raise DigestMismatch(f"{subject}: the manifest to push does not have this digest")
        async with self._stream(
            "PUT",
            repo.registry,
            f"/v2/{repo.path}/manifests/{reference}",
            scopes=[_push(repo)],
            subject=subject,
            ok={200, 201, 202},
            headers={"Content-Type": media_type},
            content=raw,
        ) as response:
            claimed = response.headers.get("docker-content-digest")
        _check_claimed_digest(claimed, raw, subject)
        return compute_digest(raw)

    async def delete_manifest(self, repo: Repository, digest: str) -> None:
        """DELETE a manifest by digest (registries delete only by digest). NotFound if absent."""
        subject = _subject(repo, digest)
        self._required_digest(digest, subject)
        async with self._stream(
            "DELETE",
            repo.registry,
            f"/v2/{repo.path}/manifests/{digest}",
            scopes=[repository_scope(repo.path, "delete")],
            subject=subject,
            ok={200, 202},
        ):
            pass

    async def referrers(
        self, repo: Repository, digest: str, artifact_type: str | None = None
    ) -> Referrers:
        """The descriptors of manifests whose ``subject`` is ``digest``.

        From the referrers API (OCI distribution 1.1) when the registry answers it, else from
        the fallback index at tag ``sha256-HEX`` (absent: no referrers). Filtered by
        ``artifact_type`` when given, also when the registry does not filter.
        """
        subject = _subject(repo, digest)
        self._required_digest(digest, subject)
        params = {"artifactType": artifact_type} if artifact_type else None
        async with self._stream(
            "GET",
            repo.registry,
            f"/v2/{repo.path}/referrers/{digest}",
            scopes=[_pull(repo)],
            subject=f"{subject}: referrers",
            ok={200, 404},
            headers={"Accept": OCI_INDEX},
            params=params,
        ) as response:
            status = response.status_code
            raw = b""
            if status == 200:
                raw = await self._read_bounded(
                    response, self.options.max_manifest_bytes, repo.registry,
                    f"{subject}: referrers",
                )
        index: Manifest | None = None
        if status == 200:
            try:
                document = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise RegistryError(f"{subject}: the referrers list is not JSON") from e
        else:
            tag = signature_tag(digest, "")
            try:
                index = await self.get_manifest(repo, tag)
            except NotFound:
                return Referrers((), api=False, index=None)
            try:
                document = index.json()
            except ValueError as e:
                raise RegistryError(f"{repo}:{tag}: the fallback index is not JSON") from e
        entries = document.get("manifests") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            entries = []
        descriptors = tuple(
            e for e in entries
            if isinstance(e, dict)
            and (artifact_type is None or e.get("artifactType") == artifact_type)
        )
        return Referrers(descriptors, api=status == 200, index=index)

    # -- blobs -------------------------------------------------------------------------------

    async def get_blob(
        self, repo: Repository, digest: str, max_bytes: int = DEFAULT_MAX_BLOB_BYTES
    ) -> bytes:
        """GET a blob, hashed as it streams, bounded by ``max_bytes``, checked against its
        digest."""
        subject = _subject(repo, digest)
        algorithm = self._required_digest(digest, subject)
        hasher = hashlib.new(algorithm)
        async with self._stream(
            "GET",
            repo.registry,
            f"/v2/{repo.path}/blobs/{digest}",
            scopes=[_pull(repo)],
            subject=subject,
            ok={200},
            follow_redirects=True,
        ) as response:
            data = await self._read_bounded(
                response, max_bytes, repo.registry, f"{subject}: blob", on_chunk=hasher.update
            )
        actual = f"{algorithm}:{hasher.hexdigest()}"
        if actual != digest:
            raise DigestMismatch(f"{subject}: the registry served a blob whose digest is {actual}")
        return data

    async def blob_exists(self, repo: Repository, digest: str) -> bool:
        subject = _subject(repo, digest)
        self._required_digest(digest, subject)
        async with self._stream(
            "HEAD",
            repo.registry,
            f"/v2/{repo.path}/blobs/{digest}",
            scopes=[_pull(repo)],
            subject=subject,
            ok={200, 404},
            follow_redirects=True,
        ) as response:
            return response.status_code == 200

    async def push_blob(
        self,
        repo: Repository,
        data: bytes,
        *,
        mount_from: Repository | None = None,
        chunk_size: int | None = None,
    ) -> str:
        """Upload a blob unless present (monolithic, or chunked when chunk_size is set);
        cross-repository mount from ``mount_from`` when given. Returns its digest."""
        digest = compute_digest(data)
        if await self.blob_exists(repo, digest):
            return digest
        subject = _subject(repo, digest)
        scopes = [_push(repo)]
        params: dict[str, str] = {}
        if mount_from is not None and mount_from.registry == repo.registry:
            scopes.append(_pull(mount_from))
            params = {"mount": digest, "from": mount_from.path}
        async with self._stream(
            "POST",
            repo.registry,
            f"/v2/{repo.path}/blobs/uploads/",
            scopes=scopes,
            subject=subject,
            ok={201, 202},
            params=params,
            idempotent=False,
        ) as response:
            if response.status_code == 201:
                return digest  # mounted
            location = self._location(response, subject)
        if chunk_size is not None:
            if chunk_size <= 0:
                raise UsageError("chunk size must be positive")
            for start in range(0, len(data), chunk_size):
                chunk = data[start : start + chunk_size]
                async with self._stream(
                    "PATCH",
                    repo.registry,
                    location,
                    scopes=scopes,
                    subject=subject,
                    ok={202},
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{start}-{start + len(chunk) - 1}",
                    },
                    content=chunk,
                    idempotent=False,
                ) as response:
                    location = self._location(response, subject)
            body = b""
        else:
            body = data
        async with self._stream(
            "PUT",
            repo.registry,
            location,
            scopes=scopes,
            subject=subject,
            ok={201, 204},
            params={"digest": digest},
            headers={"Content-Type": "application/octet-stream"},
            content=body,
            idempotent=False,
        ) as response:
            claimed = str(response.headers.get("docker-content-digest", "")).strip()
        if claimed and parse_digest(claimed) and claimed != digest:
            raise DigestMismatch(f"{subject}: the registry stored the blob as {claimed}")
        return digest

    # -- listings ----------------------------------------------------------------------------

    async def list_tags(self, repo: Repository, *, page_size: int | None = None) -> list[str]:
        """All tags, in the registry's order, following Link pagination (``n`` per page)."""
        return await self._paginate(
            repo.registry,
            f"/v2/{repo.path}/tags/list",
            "tags",
            scopes=[_pull(repo)],
            subject=str(repo),
            page_size=page_size,
        )

    async def catalog(self, registry: str, *, page_size: int | None = None) -> list[str]:
        """All repository paths, following Link pagination (``n`` per page)."""
        return await self._paginate(
            registry,
            "/v2/_catalog",
            "repositories",
            scopes=[CATALOG_SCOPE],
            subject=f"registry {registry}",
            page_size=page_size,
        )

    async def _paginate(
        self,
        registry: str,
        path: str,
        key: str,
        *,
        scopes: list[str],
        subject: str,
        page_size: int | None,
    ) -> list[str]:
        origin = await self._origin(registry)
        url: httpx.URL | None = httpx.URL(origin + path)
        if page_size is not None:
            url = httpx.URL(origin + path, params={"n": page_size})
        items: list[str] = []
        seen: set[str] = set()
        while url is not None:
            if str(url) in seen or len(seen) >= _MAX_PAGES:
                raise RegistryError(f"{subject}: the registry's pagination does not end")
            seen.add(str(url))
            async with self._stream(
                "GET", registry, url, scopes=scopes, subject=subject, ok={200}
            ) as response:
                body = await self._read_bounded(
                    response, _MAX_LIST_PAGE_BYTES, registry, f"{subject}: listing"
                )
                next_link = response.links.get("next", {}).get("url")
            items.extend(self._list_page(body, key, subject))
            url = None
            if next_link:
                url = response.url.join(next_link)
                if (url.scheme, url.netloc) != (response.url.scheme, response.url.netloc):
                    raise RegistryError(f"{subject}: the registry's next page is on another host")
        return items

    @staticmethod
    def _list_page(body: bytes, key: str, subject: str) -> list[str]:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RegistryError(f"{subject}: the registry sent a listing that is not JSON") from e
        values = document.get(key) if isinstance(document, dict) else None
        if values is None:
            return []  # distribution answers "tags": null for a repository without tags
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise RegistryError(f"{subject}: the registry sent a malformed listing")
        return list(values)

    # -- plumbing ----------------------------------------------------------------------------

    @staticmethod
    def _digest_reference(reference: str, subject: str) -> tuple[str, str] | None:
        """(algorithm, hex) for a digest reference, None for a tag; refuse other digests."""
        parsed = parse_digest(reference)
        if parsed is None and ":" in reference:
            raise UsageError(f"{subject}: not a sha256 or sha512 digest")
        return parsed

    @staticmethod
    def _required_digest(digest: str, subject: str) -> str:
        """The algorithm of ``digest``; refuse anything that is not a digest we can check."""
        parsed = parse_digest(digest)
        if parsed is None:
            raise UsageError(f"{subject}: not a sha256 or sha512 digest")
        return parsed[0]

    @staticmethod
    def _location(response: httpx.Response, subject: str) -> httpx.URL:
        location = response.headers.get("location")
        if not location:
            raise RegistryError(f"{subject}: the registry gave no upload location")
        return response.url.join(location)

    def _is_insecure(self, registry: str) -> bool:
        host, _ = split_host_port(registry)
        return registry.lower() in self._insecure or host in self._insecure

    async def _origin(self, registry: str) -> str:
        """``https://registry`` or, for insecure and loopback registries without TLS,
        ``http://registry``; probed once per client."""
        known = self._origins.get(registry)
        if known is not None:
            return known
        if not (self._is_insecure(registry) or is_loopback(registry)):
            self._verified_tls()  # a CA bundle that cannot be read fails here, before a request
            self._origins[registry] = f"https://{registry}"
            return self._origins[registry]
        lock = self._origin_locks.setdefault(registry, asyncio.Lock())
        async with lock:
            if registry not in self._origins:
                self._origins[registry] = await self._probe_origin(registry)
        return self._origins[registry]

    def _verified_tls(self) -> ssl.SSLContext:
        """The context of verified TLS connections (registries, token servers, redirects),
        made on first use: a run against a plain-HTTP loopback registry never pays for it."""
        if self._tls is None:
            context = _tls_context()
            _load_trust(context, self.options.ca_bundle)
            self._tls = context
        return self._tls

    async def _probe_origin(self, registry: str) -> str:
        if not self._is_insecure(registry):
            # A loopback registry not named insecure: ask in plain HTTP first, which a TLS
            # server refuses with a 400 (Go's "Client sent an HTTP request to an HTTPS server")
            # or by closing the connection.
            try:
                response = await self._http.get(f"http://{registry}/v2/")
                await response.aread()
            except _CONNECTION_RESETS:
                pass
            except httpx.TransportError as e:
                self._observe("error")
                raise error_for_transport(e, registry) from e
            else:
                if not (response.status_code == 400 and b"HTTPS" in response.content):
                    return f"http://{registry}"
            self._verified_tls()
            return f"https://{registry}"
        try:
            response = await self._http.get(f"https://{registry}/v2/")
        except httpx.TransportError as e:
            if certificate_error(e) is None and (
                tls_protocol_error(e) is not None or isinstance(e, _CONNECTION_RESETS)
            ):
                return f"http://{registry}"
            self._observe("error")
            raise error_for_transport(e, registry) from e
        await response.aclose()
        return f"https://{registry}"

    async def _login(self, registry: str) -> LoginCredentials | None:
        if self.options.username is not None:
            return Credentials(self.options.username, self.options.password or "")
        if registry not in self._credentials:
            self._credentials[registry] = await asyncio.to_thread(
                lookup_credentials, registry, self.options.docker_config_dir
            )
        return self._credentials[registry]

    def _observe(self, status: int | str) -> None:
        if self.options.on_response is not None:
            self.options.on_response(status)

    def _retry_wait(self, response: httpx.Response, attempt: int) -> float:
        wait = retry_after_seconds(response.headers)
        if wait is None:
            wait = self.options.retry_backoff_seconds * 2**attempt
        return min(wait, self.options.max_retry_wait_seconds)

    @asynccontextmanager
    async def _stream(
        self,
        method: str,
        registry: str,
        target: str | httpx.URL,
        *,
        scopes: Iterable[str],
        subject: str,
        ok: Container[int],
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        idempotent: bool = True,
        follow_redirects: bool = False,
    ) -> AsyncIterator[httpx.Response]:
        """Send with auth and bounded retries; yield the streaming response if its status is
        in ``ok``, else raise the error its status and body describe."""
        url = (
            target
            if isinstance(target, httpx.URL)
            else httpx.URL(await self._origin(registry) + target)
        )
        if params:
            url = url.copy_merge_params(params)
        credentials = await self._login(registry)
        auth = RegistryAuth(registry, scopes, credentials, self._auth_cache)
        attempt = 0
        while True:
            request = self._http.build_request(method, url, headers=headers, content=content)
            try:
                response = await self._http.send(
                    request, auth=auth, stream=True, follow_redirects=follow_redirects
                )
            except httpx.TransportError as e:
                self._observe("error")
                reset = idempotent and isinstance(e, _CONNECTION_RESETS)
                if reset and attempt < self.options.max_retries:
                    await asyncio.sleep(self.options.retry_backoff_seconds * 2**attempt)
                    attempt += 1
                    continue
                raise error_for_transport(e, registry) from e
            except httpx.HTTPError as e:
                raise RegistryError(f"{subject}: {one_line(str(e))}") from e
            status = response.status_code
            self._observe(status)
            retryable = status == 429 or (idempotent and status in _RETRIED_STATUSES)
            if retryable and attempt < self.options.max_retries:
                wait = self._retry_wait(response, attempt)
                await response.aclose()
                await asyncio.sleep(wait)
                attempt += 1
                continue
            try:
                if status not in ok:
                    body = await self._read_error_body(response)
                    raise error_for_response(
                        status,
                        body,
                        subject,
                        sent_credentials=credentials is not None,
                        retry_after=response.headers.get("retry-after"),
                    )
                yield response
            finally:
                await response.aclose()
            return

    @staticmethod
    async def _read_error_body(response: httpx.Response) -> bytes:
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                if len(body) >= _MAX_ERROR_BODY_BYTES:
                    break
        except httpx.HTTPError:
            pass  # the status already says what went wrong; the body only adds detail
        return bytes(body[:_MAX_ERROR_BODY_BYTES])

    @staticmethod
    async def _read_bounded(
        response: httpx.Response,
        limit: int,
        registry: str,
        what: str,
        *,
        on_chunk: Callable[[bytes], object] | None = None,
    ) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RegistryError(f"{what} is larger than {limit} bytes")
        data = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                data.extend(chunk)
                if len(data) > limit:
                    raise RegistryError(f"{what} is larger than {limit} bytes")
                if on_chunk is not None:
                    on_chunk(chunk)
        except httpx.TransportError as e:
            raise error_for_transport(e, registry) from e
        except httpx.HTTPError as e:
            raise RegistryError(f"{what}: {one_line(str(e))}") from e
        return bytes(data)
