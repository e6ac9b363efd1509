"""Turn registry replies and transport failures into one-line signgate errors (pure).

Registries explain failures in a JSON body (``{"errors": [{"code", "message", "detail"}]}``,
https://github.com/opencontainers/distribution-spec/blob/main/spec.md#error-codes); the
sentence names the registry and the repository or reference, the code and the message, and
never anything we sent (tokens, passwords).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

import httpx

from signgate.errors import (
    Denied,
    NotFound,
    RateLimited,
    RegistryError,
    TLSFailure,
    Unauthorized,
    Unreachable,
)

_MAX_MESSAGE_CHARS = 300

INSECURE_HINT = "pass --allow-insecure-registry only if you trust the network"


def one_line(text: str, limit: int = _MAX_MESSAGE_CHARS) -> str:
    """Collapse whitespace and bound the length of text that came from a server."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def registry_error_text(body: bytes) -> str | None:
    """``code: message`` from the first entry of a registry's JSON error body, if any."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    errors = document.get("errors")
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return None
    code = errors[0].get("code")
    message = errors[0].get("message")
    parts = [
        one_line(str(part)) for part in (code, message) if isinstance(part, str) and part.strip()
    ]
    if not parts:
        return None
    if len(parts) == 2 and parts[0].replace("_", " ").lower() == parts[1].lower():
        parts = parts[1:]
    if len(parts) == 2:
        return f"{parts[0].lower()}: {parts[1]}"
    return parts[0]


def error_for_response(
    status: int,
    body: bytes,
    subject: str,
    *,
    sent_credentials: bool = True,
    retry_after: str | None = None,
) -> RegistryError:
    """The error for a reply with an unexpected status about ``subject``.

    ``subject`` names what was asked for (``127.0.0.1:5000/demo:v1``, or ``registry X``).
    """
    explained = registry_error_text(body)
    if status == 404:
        return NotFound(f"{subject}: {_message_only(body) or 'not found'}")
    if status == 401:
        reason = explained or "unauthorized"
        if sent_credentials:
            return Unauthorized(f"{subject}: {reason}; the registry refused the credentials")
        return Unauthorized(
            f"{subject}: {reason}; no credentials for this registry "
            "(docker login, or --registry-username/--registry-password)"
        )
    if status == 403:
        reason = _message_only(body) or "access to the resource is denied"
        return Denied(f"{subject}: denied: {reason}")
    if status == 429:
        wait = f" (Retry-After: {one_line(retry_after, 40)})" if retry_after else ""
        return RateLimited(f"{subject}: rate limited by the registry, gave up retrying{wait}")
    if explained:
        return RegistryError(f"{subject}: HTTP {status}: {explained}")
    return RegistryError(f"{subject}: HTTP {status}")


def _message_only(body: bytes) -> str | None:
    try:
        document = json.loads(body)
        message = document["errors"][0]["message"]
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        return None
    if isinstance(message, str) and message.strip():
        return one_line(message)
    return registry_error_text(body)


def _exception_chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def certificate_error(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a transport error, if that is what it is."""
    for link in _exception_chain(error):
        if isinstance(link, ssl.SSLCertVerificationError):
            return link
    return None


def tls_protocol_error(error: BaseException) -> ssl.SSLError | None:
    """A TLS failure other than certificate verification (e.g. the server speaks plain HTTP)."""
    for link in _exception_chain(error):
        if isinstance(link, ssl.SSLError) and not isinstance(link, ssl.SSLCertVerificationError):
            return link
    return None


def _socket_reason(error: BaseException) -> str | None:
    for link in _exception_chain(error):
        if (
            isinstance(link, OSError)
            and link.errno is not None
            and not isinstance(link, ssl.SSLError)
        ):
            # asyncio words refusals as "Connect call failed (addr)": say what errno means.
            if isinstance(link, socket.gaierror):
                reason = link.strerror or str(link)
            else:
                reason = os.strerror(link.errno)
            return one_line(reason).lower()
    return None


def _ssl_reason(error: ssl.SSLError) -> str:
    reason = getattr(error, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.replace("_", " ").lower()
    return one_line(str(error))


def error_for_transport(error: httpx.TransportError, registry: str) -> RegistryError:
    """The error for a request that got no HTTP reply at all."""
    host = _host_of(error, registry)
    who = f"registry {registry}" if host == registry else f"{host} (auth server of {registry})"
    certificate = certificate_error(error)
    if certificate is not None:
        reason = one_line(certificate.verify_message or _ssl_reason(certificate))
        return TLSFailure(
            f"TLS certificate of {who} could not be verified: {reason}; {INSECURE_HINT}"
        )
    protocol = tls_protocol_error(error)
    if protocol is not None:
        return TLSFailure(
            f"TLS handshake with {who} failed: {_ssl_reason(protocol)} "
            f"(if it serves plain HTTP, {INSECURE_HINT})"
        )
    if isinstance(error, httpx.ConnectTimeout):
        return Unreachable(f"cannot connect to {who}: connection timed out")
    if isinstance(error, httpx.ConnectError):
        reason = _socket_reason(error) or one_line(str(error)).lower() or "connection failed"
        return Unreachable(f"cannot connect to {who}: {reason}")
    if isinstance(error, httpx.TimeoutException):
        return RegistryError(f"{who} did not answer in time")
    reason = _socket_reason(error) or one_line(str(error)) or type(error).__name__
    return RegistryError(f"connection to {who} failed: {reason}")


def _host_of(error: httpx.TransportError, registry: str) -> str:
    try:
        url = error.request.url
    except RuntimeError:
        return registry
    return url.netloc.decode("ascii")


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
