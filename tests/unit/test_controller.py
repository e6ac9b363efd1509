"""The admission controller's verification path against a registry in memory (httpx's
MockTransport): caches with an injected clock, single flight, the deadline, stale-if-error,
keys that fail to load, and its pure helpers."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signgate.digests import compute_digest
from signgate.errors import UsageError
from signgate.keys.model import PrivateKeySigner
from signgate.policy import parse_policy
from signgate.reference import ImageReference, Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image, push_index
from signgate.signatures.sign import sign_digest
from signgate.webhook.controller import (
    INTERNAL_ERROR_MESSAGE,
    AdmissionController,
    ControllerSettings,
    SingleFlight,
    TimedCache,
    parse_platform,
    platform_child,
    webhook_registry_options,
)
from signgate.webhook.decision import AdmissionDecision, Verdict
from signgate.webhook.metrics import WebhookMetrics, is_registry_error
from signgate.webhook.review import AdmissionReview, parse_review
from tests.unit.test_review import admission_review

HOST = "registry.test"

# -- pure helpers ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_timed_cache_expires_entries_by_the_age_each_lookup_accepts() -> None:
    clock = FakeClock()
    cache: TimedCache[str, int] = TimedCache(10, retain_seconds=100, clock=clock)
    cache.put("a", 1)
    clock.advance(29)
    assert cache.get("a", max_age=30) == 1
    assert cache.lookup("a", max_age=30) == (1, 29)
    clock.advance(1)
    assert cache.get("a", max_age=30) is None  # expired for a fresh read...
    assert cache.get("a", max_age=100) == 1  # ...still there for a stale one
    clock.advance(70)
    assert cache.get("a", max_age=1000) is None  # past retain_seconds: dropped
    assert len(cache) == 0
    cache.put("a", 2)
    assert cache.get("a", max_age=30) == 2  # a new put restamps


def test_timed_cache_evicts_the_least_recently_used() -> None:
    clock = FakeClock()
    cache: TimedCache[str, int] = TimedCache(2, retain_seconds=100, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a", 10) == 1  # "a" used: "b" is now the oldest
    cache.put("c", 3)
    assert len(cache) == 2
    assert cache.get("b", 10) is None
    assert cache.get("a", 10) == 1
    assert cache.get("c", 10) == 3


@pytest.mark.anyio
async def test_single_flight_runs_concurrent_work_once() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def work() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return calls

    waiters = [asyncio.create_task(flight.run("k", work)) for _ in range(100)]
    await asyncio.sleep(0)
    assert len(flight) == 1
    release.set()
    assert await asyncio.gather(*waiters) == [1] * 100
    assert calls == 1
    assert len(flight) == 0
    # Once the work ended, the key is free: the next call runs it again.
    assert await flight.run("k", work) == 2
    assert await flight.run("other", work) == 3


@pytest.mark.anyio
async def test_single_flight_caller_giving_up_does_not_cancel_the_others() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    release = asyncio.Event()

    async def work() -> str:
        await release.wait()
        return "done"

    impatient = asyncio.create_task(flight.run("k", work))
    patient = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    impatient.cancel()
    await asyncio.gather(impatient, return_exceptions=True)
    release.set()
    assert await patient == "done"


@pytest.mark.anyio
async def test_single_flight_failure_reaches_every_waiter() -> None:
    flight: SingleFlight[str, str] = SingleFlight()

    async def work() -> str:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    results = await asyncio.gather(
        *(flight.run("k", work) for _ in range(3)), return_exceptions=True
    )
    assert [str(r) for r in results] == ["boom"] * 3
    assert len(flight) == 0


@pytest.mark.anyio
async def test_single_flight_aclose_cancels_work_in_flight() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    waiter = asyncio.create_task(flight.run("k", lambda: asyncio.sleep(3600, "never")))
    await asyncio.sleep(0)
    await flight.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(flight) == 0


INDEX = {
    "manifests": [
        {"digest": "sha256:" + "1" * 64, "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": "sha256:" + "2" * 64, "platform": {"os": "linux", "architecture": "amd64"}},
        {
            "digest": "sha256:" + "3" * 64,
            "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
        },
        {"digest": "sha256:" + "4" * 64},  # an attestation manifest has no platform
    ]
}


@pytest.mark.parametrize(
    ("platform", "digest"),
    [
        ("linux/amd64", "sha256:" + "2" * 64),
        ("linux/arm64", "sha256:" + "1" * 64),
        ("linux/arm/v7", "sha256:" + "3" * 64),
        ("linux/arm", "sha256:" + "3" * 64),
        ("linux/arm/v6", None),
        ("windows/amd64", None),
    ],
)
def test_platform_child(platform: str, digest: str | None) -> None:
    assert platform_child(INDEX, platform) == digest


@pytest.mark.parametrize("platform", ["linux", "linux/", "/amd64", "a/b/c/d", ""])
def test_malformed_platforms_are_refused(platform: str) -> None:
    with pytest.raises(UsageError, match="os/architecture"):
        parse_platform(platform)


@pytest.mark.parametrize(
    "settings",
    [
        {"deadline_seconds": 0},
        {"key_refresh_seconds": -1},
        {"max_cache_entries": 0},
        {"verdict_ttl_seconds": -1},
        {"child_platform": "amd64"},
    ],
)
def test_settings_are_checked(settings: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        ControllerSettings(**settings)


def test_registry_options_fit_inside_the_deadline() -> None:
    seen: list[object] = []
    given = RegistryOptions(on_response=lambda status: seen.append(("given", status)))
    options = webhook_registry_options(
        given, ControllerSettings(deadline_seconds=8.0), lambda status: seen.append(status)
    )
    assert options.timeout_seconds == 8.0
    assert options.retry_backoff_seconds == 0.25
    assert options.max_retry_wait_seconds == 2.0
    # Every retry's wait, backing off, fits in half the deadline.
    waits = [options.retry_backoff_seconds * 2**n for n in range(options.max_retries)]
    assert sum(waits) < 8.0 / 2
    assert options.on_response is not None
    options.on_response(503)
    assert seen == [("given", 503), 503]


@pytest.mark.parametrize(
    ("status", "error"),
    [(200, False), (401, False), (404, False), (429, True), (500, True), (503, True),
     ("error", True)],
)
def test_which_registry_statuses_are_errors(status: int | str, error: bool) -> None:
    assert is_registry_error(status) is error


# -- a registry in memory -------------------------------------------------------------------

_MANIFEST_PATH = re.compile(r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)")
_BLOB_PATH = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})")
_UPLOAD_PATH = re.compile(r"/v2/(?P<name>.+)/blobs/uploads/(?P<id>[^/]*)")


@dataclass
class MemoryRegistry:
    """Enough of the distribution API to push and sign images, with faults on demand:
    ``hang`` never answers, ``status`` answers every request with it (``failures`` times, or
    always when None), ``explode`` raises a non-HTTP exception (a bug)."""

    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    hang: bool = False
    status: int | None = None
    failures: int | None = None
    explode: bool = False
    _uploads: Iterator[int] = field(default_factory=itertools.count)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if self.hang:
            await asyncio.sleep(3600)
        if self.explode:
            raise RuntimeError("a bug")
        if self.status is not None and (self.failures is None or self.failures > 0):
            if self.failures is not None:
                self.failures -= 1
            return httpx.Response(self.status, headers={"Retry-After": "0"})
        path = request.url.path
        if path == "/v2/":
            return httpx.Response(200)
        if match := _UPLOAD_PATH.fullmatch(path):
            if request.method == "POST":
                location = f"/v2/{match['name']}/blobs/uploads/{next(self._uploads)}"
                return httpx.Response(202, headers={"Location": location})
            upload = await request.aread()
            self.blobs[compute_digest(upload)] = upload
            return httpx.Response(201)
        if match := _BLOB_PATH.fullmatch(path):
            data = self.blobs.get(match["digest"])
            if data is None:
                return httpx.Response(404)
            body = b"" if request.method == "HEAD" else data
            return httpx.Response(200, content=body, headers={"Content-Length": str(len(data))})
        if match := _MANIFEST_PATH.fullmatch(path):
            name, ref = match["name"], match["ref"]
            if request.method == "PUT":
                raw = await request.aread()
                digest = compute_digest(raw)
                self.manifests[(name, digest)] = (request.headers["content-type"], raw)
                if not ref.startswith("sha256:"):
                    self.tags[(name, ref)] = digest
                return httpx.Response(201, headers={"Docker-Content-Digest": digest})
            digest = ref if ref.startswith("sha256:") else self.tags.get((name, ref), "")
            found = self.manifests.get((name, digest))
            if found is None:
                return httpx.Response(404)
            media_type, raw = found
            headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
            return httpx.Response(
                200, content=b"" if request.method == "HEAD" else raw, headers=headers
            )
        return httpx.Response(404)

    def reads(self) -> list[str]:
        requests, self.requests = self.requests, []
        return requests


def new_signer() -> PrivateKeySigner:
    return PrivateKeySigner(ec.generate_private_key(ec.SECP256R1()))


def write_public_key(signer: PrivateKeySigner, path: Path) -> Path:
    path.write_bytes(signer.public_key().pem())
    return path


@dataclass
class Setup:
    registry: MemoryRegistry
    options: RegistryOptions
    signer: PrivateKeySigner
    key_file: Path

    async def push(self, repository: str, tag: str, content: bytes) -> str:
        async with RegistryClient(self.options) as client:
            return await push_image(client, Repository(HOST, repository), tag, content=content)

    async def push_index(self, repository: str, tag: str, content: bytes) -> tuple[str, list[str]]:
        async with RegistryClient(self.options) as client:
            return await push_index(
                client,
                Repository(HOST, repository),
                tag,
                content=content,
                platforms=[("linux", "amd64"), ("linux", "arm64")],
            )

    async def sign(
        self,
        repository: str,
        digest: str,
        signer: PrivateKeySigner | None = None,
        annotations: dict[str, str] | None = None,
    ) -> None:
        async with RegistryClient(self.options) as client:
            reference = ImageReference(Repository(HOST, repository))
            await sign_digest(client, signer or self.signer, reference, digest, annotations)

    def policy(self, extra: str = "", mode: str = "enforce") -> str:
        return f"""\
rules:
  - name: ours
    images: ["{HOST}/team/**"]
    keys: [{self.key_file}]
    mode: {mode}
{extra}"""


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    registry = MemoryRegistry()
    signer = new_signer()
    return Setup(
        registry,
        RegistryOptions(transport=registry.transport(), max_retries=1, retry_backoff_seconds=0),
        signer,
        write_public_key(signer, tmp_path / "cosign.pub"),
    )


@pytest.fixture
async def signed(setup: Setup) -> str:
    """team/web:v1, signed; the registry's request log is empty afterwards."""
    digest = await setup.push("team/web", "v1", b"web")
    await setup.sign("team/web", digest)
    setup.registry.reads()
    return digest


def pod(*images: str, namespace: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"containers": [{"name": f"c{i}", "image": img} for i, img in enumerate(images)]},
    }


def review_of(obj: dict[str, Any], operation: str = "CREATE", old: Any = None) -> AdmissionReview:
    return parse_review(admission_review(obj, operation=operation, old=old))


WEB = f"{HOST}/team/web:v1"


@pytest.fixture
async def controller_factory(
    setup: Setup,
) -> AsyncIterator[Any]:
    controllers: list[AdmissionController] = []

    async def make(policy: str | None = None, **settings: Any) -> AdmissionController:
        clock = settings.pop("clock", FakeClock())
        metrics = settings.pop("metrics", WebhookMetrics())
        controller = AdmissionController(
            parse_policy(policy or setup.policy()),
            setup.options,
            ControllerSettings(**settings),
            metrics=metrics,
            clock=clock,
        )
        controllers.append(controller)
        await controller.start()
        return controller

    yield make
    for controller in controllers:
        await controller.aclose()


def sample(metrics: WebhookMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# -- verification through the controller ----------------------------------------------------


@pytest.mark.anyio
async def test_signed_image_is_allowed_and_pinned(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    controller = await controller_factory()
    assert controller.ready
    assert controller.readiness_problems() == []
    decision = await controller.review(review_of(pod(WEB)))
    assert decision.allowed, decision.message
    assert decision.patch == (
        {"op": "replace", "path": "/spec/containers/0/image", "value": f"{WEB}@{signed}"},
    )
    # A tag: HEAD to resolve it, the manifest by digest, the signature image; the payload is
    # the predictable one, so no blob fetch.
    assert setup.registry.reads() == [
        "HEAD /v2/team/web/manifests/v1",
        f"GET /v2/team/web/manifests/{signed}",
        f"GET /v2/team/web/manifests/{signed.replace(':', '-')}.sig",
    ]


@pytest.mark.anyio
async def test_cached_verdicts_and_tags_expire_with_their_ttl(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    clock = FakeClock()
    metrics = WebhookMetrics()
    controller = await controller_factory(
        clock=clock, metrics=metrics, tag_ttl_seconds=30, verdict_ttl_seconds=300
    )
    assert (await controller.review(review_of(pod(WEB)))).allowed
    assert len(setup.registry.reads()) == 3
    clock.advance(29)
    assert (await controller.review(review_of(pod(WEB)))).allowed
    assert setup.registry.reads() == []
    assert sample(metrics, "signgate_cache_lookups_total", cache="tag", result="hit") == 1
    assert sample(metrics, "signgate_cache_lookups_total", cache="verdict", result="hit") == 1
    clock.advance(1)  # the tag expired, the verdict not: only the tag is resolved again
    assert (await controller.review(review_of(pod(WEB)))).allowed
    assert setup.registry.reads() == ["HEAD /v2/team/web/manifests/v1"]
    clock.advance(300)  # both expired
    assert (await controller.review(review_of(pod(WEB)))).allowed
    assert len(setup.registry.reads()) == 3
    # By digest, no tag to resolve: a cached verdict costs nothing.
    assert (await controller.review(review_of(pod(f"{HOST}/team/web@{signed}")))).allowed
    assert setup.registry.reads() == []


@pytest.mark.anyio
async def test_a_decision_made_from_the_caches_is_reused_until_one_of_them_expires(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    clock = FakeClock()
    metrics = WebhookMetrics()
    controller = await controller_factory(
        clock=clock, metrics=metrics, tag_ttl_seconds=30, verdict_ttl_seconds=300
    )
    assert controller.known_decision(review_of(pod(WEB))) is None
    first = await controller.review(review_of(pod(WEB)))  # verified: not reusable
    assert controller.known_decision(review_of(pod(WEB))) is None
    clock.advance(10)
    second = await controller.review(review_of(pod(WEB)))  # from the caches: kept
    assert controller.known_decision(review_of(pod(WEB))) is second
    third = await controller.review(review_of(pod(WEB)))
    assert first.allowed
    assert second.allowed
    assert third is second
    assert sample(metrics, "signgate_cache_lookups_total", cache="decision", result="hit") == 2
    assert sample(metrics, "signgate_admissions_total", result="allowed") == 4
    assert setup.registry.reads()[-1].startswith("GET")  # only the first review's requests
    clock.advance(19.5)  # the tag, resolved at 0, is still fresh
    assert await controller.review(review_of(pod(WEB))) is second
    clock.advance(0.5)  # the tag expired: the kept decision goes with it
    assert controller.known_decision(review_of(pod(WEB))) is None
    fourth = await controller.review(review_of(pod(WEB)))
    assert fourth is not second
    assert fourth.allowed
    assert setup.registry.reads() == ["HEAD /v2/team/web/manifests/v1"]


@pytest.mark.anyio
async def test_a_kept_decision_is_per_namespace_and_per_image_set(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    controller = await controller_factory(
        setup.policy("    namespaces: {exclude: [dev-*]}\n") + "unmatched: deny\n"
    )
    for _ in range(3):
        assert (await controller.review(review_of(pod(WEB, namespace="shop")))).allowed
        excluded = await controller.review(review_of(pod(WEB, namespace="dev-1")))
        assert not excluded.allowed
        assert "matches no policy rule" in excluded.message
        both = await controller.review(review_of(pod(WEB, f"{HOST}/team/api:v9")))
        assert not both.allowed
        assert "api:v9" in both.message


@pytest.mark.anyio
async def test_verdict_cache_is_bounded(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    other = await setup.push("team/api", "v1", b"api")
    await setup.sign("team/api", other)
    setup.registry.reads()
    controller = await controller_factory(max_cache_entries=1)
    web, api = f"{HOST}/team/web@{signed}", f"{HOST}/team/api@{other}"
    for image in (web, web, api, web):
        assert (await controller.review(review_of(pod(image)))).allowed
    # web verified, then cached; api pushed it out; web verified again.
    assert len(setup.registry.reads()) == 3 * 2


@pytest.mark.anyio
async def test_concurrent_reviews_of_one_image_share_one_verification(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    single = await controller_factory()
    assert (await single.review(review_of(pod(WEB)))).allowed
    one_verification = setup.registry.reads()
    controller = await controller_factory()
    decisions = await asyncio.gather(
        *(controller.review(review_of(pod(WEB))) for _ in range(200))
    )
    assert all(d.allowed for d in decisions)
    assert setup.registry.reads() == one_verification


@pytest.mark.anyio
async def test_distinct_images_of_one_review_are_verified_concurrently(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    other = await setup.push("team/api", "v1", b"api")
    await setup.sign("team/api", other)
    setup.registry.reads()
    setup.registry.hang = True
    controller = await controller_factory(deadline_seconds=0.2)
    decision = await controller.review(review_of(pod(WEB, f"{HOST}/team/api:v1")))
    # Both tags were asked for before either answered.
    assert sorted(setup.registry.reads()) == [
        "HEAD /v2/team/api/manifests/v1",
        "HEAD /v2/team/web/manifests/v1",
    ]
    assert not decision.allowed


@pytest.mark.anyio
async def test_a_hanging_registry_is_a_denial_within_the_deadline(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    setup.registry.hang = True
    metrics = WebhookMetrics()
    controller = await controller_factory(deadline_seconds=0.2, metrics=metrics)
    decision = await controller.review(review_of(pod(WEB)))
    assert not decision.allowed
    assert f"the registry {HOST} did not answer within the 0.2 s deadline" in decision.message
    assert WEB in decision.message
    assert sample(metrics, "signgate_admissions_total", result="denied") == 1
    assert sample(metrics, "signgate_admission_duration_seconds_count") == 1


@pytest.mark.anyio
async def test_a_hanging_registry_under_a_warn_rule_is_admitted_with_a_warning(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    setup.registry.hang = True
    controller = await controller_factory(setup.policy(mode="warn"), deadline_seconds=0.2)
    decision = await controller.review(review_of(pod(WEB)))
    assert decision.allowed
    assert decision.patch == ()
    (warning,) = decision.warnings
    assert "would be refused" in warning
    assert "did not answer within the 0.2 s deadline" in warning


@pytest.mark.anyio
async def test_server_errors_are_retried_inside_the_deadline(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    setup.registry.status, setup.registry.failures = 503, 1
    metrics = WebhookMetrics()
    controller = await controller_factory(metrics=metrics)
    assert (await controller.review(review_of(pod(WEB)))).allowed
    assert len(setup.registry.reads()) == 4  # one 503, then the three reads
    assert sample(metrics, "signgate_registry_errors_total", status="503") == 1
    assert sample(metrics, "signgate_registry_responses_total", status="200") == 3


@pytest.mark.anyio
async def test_a_registry_that_keeps_failing_is_named_before_the_deadline(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    setup.registry.status = 429
    controller = await controller_factory()
    decision = await controller.review(review_of(pod(WEB)))
    assert not decision.allowed
    assert "rate limited by the registry" in decision.message
    assert len(setup.registry.reads()) == 2  # max_retries=1


@pytest.mark.anyio
async def test_stale_if_error_keeps_a_verified_digest_allowed_with_a_warning(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    clock = FakeClock()
    controller = await controller_factory(
        clock=clock, stale_if_error_seconds=3600, deadline_seconds=0.2
    )
    assert (await controller.review(review_of(pod(WEB)))).allowed
    setup.registry.status = 503
    clock.advance(600)  # both the tag and the verdict are past their TTL
    decision = await controller.review(review_of(pod(WEB)))
    assert decision.allowed, decision.message
    assert decision.patch[0]["value"] == f"{WEB}@{signed}"
    assert any("stale-if-error" in w and "HTTP 503" in w for w in decision.warnings)
    # By digest, with the registry hanging instead: the deadline passes, the verdict stays.
    setup.registry.status, setup.registry.hang = None, True
    by_digest = f"{HOST}/team/web@{signed}"
    decision = await controller.review(review_of(pod(by_digest)))
    assert decision.allowed
    assert any("stale-if-error" in w for w in decision.warnings)
    clock.advance(3600)  # outside the window
    decision = await controller.review(review_of(pod(by_digest)))
    assert not decision.allowed


@pytest.mark.anyio
async def test_without_stale_if_error_a_failing_registry_is_a_denial(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    clock = FakeClock()
    controller = await controller_factory(clock=clock)
    assert (await controller.review(review_of(pod(WEB)))).allowed
    setup.registry.status = 503
    clock.advance(600)
    decision = await controller.review(review_of(pod(WEB)))
    assert not decision.allowed
    assert "HTTP 503" in decision.message


@pytest.mark.anyio
async def test_stale_if_error_never_covers_signatures_that_no_longer_verify(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    clock = FakeClock()
    controller = await controller_factory(clock=clock, stale_if_error_seconds=3600)
    assert (await controller.review(review_of(pod(WEB)))).allowed
    # The signature image is replaced by one for another key, and the first read fails once.
    sig_tag = ("team/web", signed.replace(":", "-") + ".sig")
    setup.registry.tags.pop(sig_tag, None)
    await setup.sign("team/web", signed, signer=new_signer())
    setup.registry.reads()
    setup.registry.status, setup.registry.failures = 503, 1
    clock.advance(600)
    decision = await controller.review(review_of(pod(f"{HOST}/team/web@{signed}")))
    assert not decision.allowed
    assert "does not verify" in decision.message
    assert setup.registry.reads()[:2] == [f"GET /v2/team/web/manifests/{signed}"] * 2


@pytest.mark.anyio
async def test_unsigned_image_is_refused_and_refusals_are_not_cached(
    setup: Setup, controller_factory: Any
) -> None:
    digest = await setup.push("team/web", "v1", b"web")
    setup.registry.reads()
    controller = await controller_factory()
    decision = await controller.review(review_of(pod(WEB)))
    assert not decision.allowed
    assert "no signatures found" in decision.message
    await setup.sign("team/web", digest)
    assert (await controller.review(review_of(pod(WEB)))).allowed


@pytest.mark.anyio
async def test_a_verdict_short_of_the_threshold_is_not_cached(
    setup: Setup, signed: str, controller_factory: Any, tmp_path: Path
) -> None:
    second = new_signer()
    policy = f"""\
rules:
  - name: ours
    images: ["{HOST}/team/**"]
    keys: [{setup.key_file}, {write_public_key(second, tmp_path / "second.pub")}]
    threshold: 2
"""
    controller = await controller_factory(policy)
    decision = await controller.review(review_of(pod(WEB)))
    assert not decision.allowed
    assert "only 1 distinct key" in decision.message
    await setup.sign("team/web", signed, signer=second)
    assert (await controller.review(review_of(pod(WEB)))).allowed


@pytest.mark.anyio
async def test_index_signature_covers_its_children_unless_the_child_is_required(
    setup: Setup, controller_factory: Any
) -> None:
    index, (amd64, arm64) = await setup.push_index("team/multi", "v1", b"multi")
    await setup.sign("team/multi", index)
    image = f"{HOST}/team/multi:v1"
    plain = await controller_factory()
    assert (await plain.review(review_of(pod(image)))).allowed
    strict_policy = setup.policy() + "    require_child_signature: true\n"
    strict = await controller_factory(strict_policy)
    decision = await strict.review(review_of(pod(image)))
    assert not decision.allowed
    assert f"the linux/amd64 image {amd64} of the index: no signatures found" in decision.message
    await setup.sign("team/multi", arm64)
    assert not (await strict.review(review_of(pod(image)))).allowed
    await setup.sign("team/multi", amd64)
    decision = await strict.review(review_of(pod(image)))
    assert decision.allowed, decision.message
    assert decision.patch[0]["value"] == f"{image}@{index}"  # the index is what gets pinned
    arm = await controller_factory(strict_policy, child_platform="linux/arm64")
    assert (await arm.review(review_of(pod(image)))).allowed


@pytest.mark.anyio
async def test_a_child_signed_by_other_keys_does_not_count_towards_the_threshold(
    setup: Setup, controller_factory: Any, tmp_path: Path
) -> None:
    second = new_signer()
    second_key = write_public_key(second, tmp_path / "second.pub")
    index, (amd64, _) = await setup.push_index("team/multi", "v1", b"multi")
    await setup.sign("team/multi", index)
    await setup.sign("team/multi", index, signer=second)
    await setup.sign("team/multi", amd64)
    policy = f"""\
rules:
  - name: ours
    images: ["{HOST}/team/**"]
    keys: [{setup.key_file}, {second_key}]
    threshold: 2
    require_child_signature: true
"""
    controller = await controller_factory(policy)
    decision = await controller.review(review_of(pod(f"{HOST}/team/multi:v1")))
    assert not decision.allowed
    assert "only 1 distinct key" in decision.message
    await setup.sign("team/multi", amd64, signer=second)
    controller = await controller_factory(policy)
    assert (await controller.review(review_of(pod(f"{HOST}/team/multi:v1")))).allowed


@pytest.mark.anyio
async def test_update_with_unchanged_images_never_asks_the_registry(
    setup: Setup, controller_factory: Any
) -> None:
    setup.registry.hang = True
    metrics = WebhookMetrics()
    controller = await controller_factory(metrics=metrics)
    before = pod(WEB)
    after = {**before, "metadata": {**before["metadata"], "labels": {"scaled": "yes"}}}
    decision = await controller.review(review_of(after, "UPDATE", old=before))
    assert decision.allowed
    assert [o.verdict for o in decision.outcomes] == [Verdict.UNCHANGED]
    assert setup.registry.reads() == []
    assert metrics.registry_requests() == 0


@pytest.mark.anyio
async def test_keys_that_do_not_load_keep_the_controller_unready_and_refusing(
    setup: Setup, signed: str, controller_factory: Any, tmp_path: Path
) -> None:
    missing = tmp_path / "later.pub"
    policy = f"""\
rules:
  - name: later
    images: ["{HOST}/team/**"]
    keys: [{missing}]
  - name: static
    images: ["{HOST}/static/**"]
    action: allow
"""
    controller = await controller_factory(policy)
    assert not controller.ready
    (problem,) = controller.readiness_problems()
    assert problem.startswith(f"rule 'later': key {missing} is not loaded: ")
    decision = await controller.review(review_of(pod(WEB)))
    assert not decision.allowed
    assert f"its keys are not loaded ({missing})" in decision.message
    assert setup.registry.reads() == []
    # What needs no key is still answered: static rules, and UPDATEs that change no image.
    assert (await controller.review(review_of(pod(f"{HOST}/static/x:1")))).allowed
    assert (await controller.review(review_of(pod(WEB), "UPDATE", old=pod(WEB)))).allowed
    write_public_key(setup.signer, missing)
    await controller.refresh_keys()
    assert controller.ready
    assert (await controller.review(review_of(pod(WEB)))).allowed


@pytest.mark.anyio
async def test_the_refresh_loop_retries_keys_that_failed(
    setup: Setup, signed: str, controller_factory: Any, tmp_path: Path
) -> None:
    missing = tmp_path / "later.pub"
    policy = f"""\
rules:
  - name: later
    images: ["{HOST}/team/**"]
    keys: [{missing}]
"""
    controller = await controller_factory(policy, key_refresh_seconds=0.01)
    assert not controller.ready
    write_public_key(setup.signer, missing)
    async with asyncio.timeout(30):  # a guard only: the loop retries after 10 ms
        while not controller.ready:
            await asyncio.sleep(0.005)
    assert (await controller.review(review_of(pod(WEB)))).allowed


@pytest.mark.anyio
async def test_a_key_that_fails_to_refresh_keeps_its_last_value(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    controller = await controller_factory()
    setup.key_file.write_text("not a key")
    await controller.refresh_keys()
    assert controller.ready
    assert (await controller.review(review_of(pod(WEB)))).allowed


@pytest.mark.anyio
async def test_rotated_keys_do_not_reuse_verdicts_of_the_old_keys(
    setup: Setup, signed: str, controller_factory: Any
) -> None:
    controller = await controller_factory()
    assert (await controller.review(review_of(pod(WEB)))).allowed
    assert (await controller.review(review_of(pod(WEB)))).allowed  # decided from the caches
    write_public_key(new_signer(), setup.key_file)
    await controller.refresh_keys()
    decision = await controller.review(review_of(pod(WEB)))
    assert not decision.allowed
    assert "does not verify with the given keys" in decision.message


@pytest.mark.anyio
async def test_review_before_start_is_refused(setup: Setup) -> None:
    controller = AdmissionController(parse_policy(setup.policy()), setup.options)
    assert not controller.ready
    assert controller.readiness_problems() == ["the admission controller has not started"]
    decision = await controller.review(review_of(pod(WEB)))
    assert not decision.allowed
    assert "keys are not loaded" in decision.message
    await controller.aclose()


@pytest.mark.anyio
async def test_an_unexpected_failure_is_a_generic_denial_and_logged(
    setup: Setup, signed: str, controller_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    setup.registry.explode = True
    metrics = WebhookMetrics()
    controller = await controller_factory(metrics=metrics)
    decision = await controller.review(review_of(pod(WEB)))
    assert decision == AdmissionDecision.denial(INTERNAL_ERROR_MESSAGE)
    assert "a bug" not in decision.message
    assert any("RuntimeError: a bug" in (r.exc_text or "") for r in caplog.records)
    assert sample(metrics, "signgate_admissions_total", result="error") == 1


@pytest.mark.anyio
async def test_metrics_render(setup: Setup, signed: str, controller_factory: Any) -> None:
    metrics = WebhookMetrics()
    controller = await controller_factory(metrics=metrics)
    await controller.review(review_of(pod(WEB)))
    await controller.review(review_of(pod(WEB)))
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    text = body.decode()
    assert 'signgate_admissions_total{result="allowed"} 2.0' in text
    assert "signgate_admission_duration_seconds_bucket" in text
    assert 'signgate_cache_lookups_total{cache="verdict",result="hit"} 1.0' in text
    assert 'signgate_registry_responses_total{status="200"} 3.0' in text
    assert metrics.registry_requests() == 3
