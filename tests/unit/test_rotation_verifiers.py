from __future__ import annotations

import asyncio

import httpx
import pytest

from signgate.errors import UsageError
from signgate.rotation.verifiers import (
    Verifiers,
    check_verifier_url,
    describe_unconfirmed,
    trusted_key_ids,
    wait_for_verifiers,
)

A, B, C = ("a" * 64, "b" * 64, "c" * 64)

METRICS = f"""\
# HELP signgate_trusted_key_info 1 for each key some rule verifies with now.
# TYPE signgate_trusted_key_info gauge
signgate_trusted_key_info{{key_id="{A}"}} 1.0
signgate_trusted_key_info{{replica="w-1",key_id="{B}"}} 1 1712345678000
signgate_trusted_key_info{{key_id="{C}"}} 0.0
signgate_trusted_key_info_created{{key_id="{C}"}} 1.7e9
signgate_policy_info{{sha256="{C}"}} 1.0
"""


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        (METRICS, {A, B}),
        ("", set()),
        (f'signgate_trusted_key_info{{key_id="{A.upper()}"}} 1.0\n', set()),
        (f'signgate_trusted_key_info{{key_id="{A[:63]}"}} 1.0\n', set()),
        (f'signgate_trusted_key_info{{key_id="{A}"}} NaN\n', {A}),
        (f'signgate_trusted_key_info{{key_id="{A}"}} one\n', set()),
        (f'# signgate_trusted_key_info{{key_id="{A}"}} 1.0\n', set()),
    ],
)
def test_the_keys_a_verifier_reports(text: str, ids: set[str]) -> None:
    assert trusted_key_ids(text) == ids


@pytest.mark.parametrize(
    "url",
    ["https://webhook.example/metrics", "https://10.0.0.1:8443/metrics",
     "http://127.0.0.1:8443/metrics", "http://localhost/metrics", "http://[::1]:9/metrics"],
)
def test_verifier_urls_a_rotation_may_ask(url: str) -> None:
    assert check_verifier_url(url) == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://webhook.signgate.svc:8443/metrics", "plain http only to a loopback address"),
        ("http://user@10.0.0.1/metrics", "plain http only to a loopback address"),
        ("webhook:8443/metrics", "want the webhook's metrics URL"),
        ("https:///metrics", "want the webhook's metrics URL"),
    ],
)
def test_verifier_urls_a_rotation_refuses(url: str, problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        check_verifier_url(url)


class Replicas:
    """Verifiers behind a transport: each URL answers with the keys it is given, or fails."""

    def __init__(self, answers: dict[str, list[set[str] | int | None]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.asked.append(url)
        queue = self.answers[url]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if answer is None:
            raise httpx.ConnectError("connection refused", request=request)
        if isinstance(answer, int):
            return httpx.Response(answer)
        text = "".join(f'signgate_trusted_key_info{{key_id="{k}"}} 1.0\n' for k in answer)
        return httpx.Response(200, text=text)


def wait(replicas: Replicas, key_id: str, trusted: bool, seconds: float) -> dict[str, str]:
    verifiers = Verifiers(tuple(replicas.answers), wait_seconds=seconds)
    transport = httpx.MockTransport(replicas)
    return dict(asyncio.run(wait_for_verifiers(verifiers, key_id, trusted, transport=transport)))


def test_waiting_until_every_verifier_trusts_a_key() -> None:
    replicas = Replicas({
        "https://one/metrics": [{A}, {A, B}],
        "https://two/metrics": [None, 503, {B}],
    })
    assert wait(replicas, B, True, 60) == {}
    # A verifier that confirmed is not asked again.
    assert replicas.asked.count("https://one/metrics") == 2
    assert replicas.asked.count("https://two/metrics") == 3


def test_waiting_until_no_verifier_trusts_a_key() -> None:
    replicas = Replicas({"https://one/metrics": [{A, B}, {B}], "https://two/metrics": [{B}]})
    assert wait(replicas, A, False, 60) == {}


def test_verifiers_that_do_not_confirm_in_time_are_named_with_what_they_said() -> None:
    replicas = Replicas({
        "https://one/metrics": [{A}],
        "https://two/metrics": [None],
        "https://three/metrics": [{B}],
        "https://four/metrics": [404],
    })
    unconfirmed = wait(replicas, B, True, 0)
    assert unconfirmed == {
        "https://one/metrics": "does not trust it yet",
        "https://two/metrics": "unreachable (ConnectError: connection refused)",
        "https://four/metrics": "answered HTTP 404",
    }
    assert describe_unconfirmed({"https://one/metrics": "still trusts it"}, "OLD (k)", False,
                                900) == {
        "verifier https://one/metrics":
            "did not confirm within 900 s that it no longer trusts OLD (k): still trusts it"
    }
