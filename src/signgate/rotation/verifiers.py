"""Asking the verifiers which keys they trust, so that a rotation waits for a fact, not a guess.

Each replica of the webhook lists on ``GET /metrics`` one sample
``signgate_trusted_key_info{key_id="<SHA-256 of the key's DER>"} 1`` per key some rule of the
policy it serves verifies with. A rotation asks every verifier it is given until each reports
NEW (before re-signing) and until none reports OLD any more (before OLD's signatures go).
Parsing and URL rules are pure; :func:`wait_for_verifiers` is the I/O.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from signgate.errors import UsageError
from signgate.registry.client import is_loopback
from signgate.registry.transport import StreamTransport

TRUSTED_KEY_METRIC = "signgate_trusted_key_info"
# How long `rotate` waits, by default, for the verifiers to confirm a change (a ConfigMap takes
# about a minute to reach its pods, a KMS key version up to the webhook's 300 s --key-refresh).
DEFAULT_VERIFIER_WAIT = 900.0
# Pause between two rounds of questions, doubling from the first to the second.
POLL_SECONDS = (0.5, 5.0)
REQUEST_SECONDS = 5.0

_SAMPLE = re.compile(
    r"^" + TRUSTED_KEY_METRIC + r"\{(?P<labels>[^}]*)\}[ \t]+(?P<value>\S+)(?:[ \t]+\S+)?[ \t]*$",
    re.MULTILINE,
)
_KEY_ID_LABEL = re.compile(r'(?:^|,)\s*key_id="([0-9a-f]{64})"')


def trusted_key_ids(metrics: str) -> set[str]:
    """The key ids a verifier's Prometheus text says it trusts (samples whose value is not 0)."""
    found = set()
    for sample in _SAMPLE.finditer(metrics):
        key_id = _KEY_ID_LABEL.search(sample["labels"])
        try:
            value = float(sample["value"])
        except ValueError:
            continue
        if key_id is not None and value != 0:
            found.add(key_id.group(1))
    return found


def check_verifier_url(url: str) -> str:
    """``url`` if a rotation may ask it: https, or plain http to a loopback address (a
    port-forward, a sidecar); a :class:`UsageError` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--verifier {url!r}: want the webhook's metrics URL, https://HOST/metrics")
    if parts.scheme == "http" and not is_loopback(parts.netloc.rpartition("@")[2]):
        raise UsageError(
            f"--verifier {url}: plain http only to a loopback address; use https "
            "(with --verifier-cacert for the webhook's CA)"
        )
    return url


@dataclass(frozen=True)
class Verifiers:
    """The verifiers to ask: metrics URLs, the CA that signed their certificates (None: the
    system's), and how long to wait for them to confirm a change."""

    urls: tuple[str, ...]
    cacert: Path | None = None
    wait_seconds: float = DEFAULT_VERIFIER_WAIT

    def tls(self) -> ssl.SSLContext:
        if self.cacert is None:
            return ssl.create_default_context()
        try:
            return ssl.create_default_context(cafile=str(self.cacert))
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"--verifier-cacert {self.cacert}: cannot load it: {e}") from e


Progress = Callable[[int, int], None]
"""Told (verifiers confirmed, verifiers) after each round."""


def _no_progress(done: int, total: int) -> None:
    return None


async def wait_for_verifiers(
    verifiers: Verifiers,
    key_id: str,
    trusted: bool,
    progress: Progress = _no_progress,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Mapping[str, str]:
    """Ask every verifier until each reports ``key_id`` among its trusted keys (``trusted``) or
    no longer reports it (not ``trusted``), for at most ``verifiers.wait_seconds``.

    A verifier that does not answer is asked again until then. Returns, for each verifier that
    did not confirm in time, what it last said (empty: all confirmed).
    """
    deadline = time.monotonic() + verifiers.wait_seconds
    pending: dict[str, str] = dict.fromkeys(verifiers.urls, "not asked")
    total = len(pending)
    pause, longest = POLL_SECONDS
    if transport is None:
        context = verifiers.tls()  # a CA file that does not load stops the run here
        transport = StreamTransport(lambda: context)
    async with httpx.AsyncClient(transport=transport, follow_redirects=False) as http:

        async def ask(url: str) -> tuple[str, str | None]:
            timeout = max(0.5, min(REQUEST_SECONDS, deadline - time.monotonic()))
            try:
                reply = await http.get(url, timeout=timeout)
            except httpx.HTTPError as e:
                return url, f"unreachable ({type(e).__name__}: {' '.join(str(e).split())})"
            if reply.status_code != 200:
                return url, f"answered HTTP {reply.status_code}"
            if (key_id in trusted_key_ids(reply.text)) == trusted:
                return url, None
            return url, "still trusts it" if not trusted else "does not trust it yet"

        while True:
            for url, problem in await asyncio.gather(*(ask(url) for url in pending)):
                if problem is None:
                    del pending[url]
                else:
                    pending[url] = problem
            progress(total - len(pending), total)
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                return pending
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, longest)


def describe_unconfirmed(
    unconfirmed: Mapping[str, str], key: str, trusted: bool, waited: float
) -> dict[str, str]:
    """One failure line per verifier that did not confirm: ``verifier URL`` -> why."""
    wanted = f"that it trusts {key}" if trusted else f"that it no longer trusts {key}"
    return {
        f"verifier {url}": f"did not confirm within {waited:g} s {wanted}: {problem}"
        for url, problem in sorted(unconfirmed.items())
    }


def verifier_urls(urls: Sequence[str]) -> tuple[str, ...]:
    """The URLs checked and without repeats, in the order given."""
    return tuple(dict.fromkeys(check_verifier_url(url) for url in urls))
