"""The verification path between an admission request and its decision, shared by the webhook
and ``signgate check``: resolve tags, verify signatures with each rule's keys, cache, decide.

- Tags are resolved with a HEAD (the registry's word, cached ``tag_ttl_seconds``); the image is
  then fetched by that digest and its digest checked, so what is verified is what gets pinned.
- Verdicts are cached per (digest, rule, the rule's keys) for ``verdict_ttl_seconds``, bounded
  in entries (least recently used first out). Only verdicts that meet the rule's threshold are
  cached: an image signed a moment after a refusal is admitted at the next attempt.
- Concurrent requests for one digest and rule share one verification (:class:`SingleFlight`),
  so a Deployment scaled to 500 replicas costs one verification; the distinct images of one
  review are verified concurrently.
- Every review answers within ``deadline_seconds``: an image whose registry has not answered
  by then is refused with a reason saying so, and the registry client's timeouts and retry
  backoff are shortened to fit inside the deadline.
- With ``stale_if_error_seconds`` a digest verified within that window stays allowed, with an
  admission warning saying so, while its registry fails (timeouts, transport errors, 429, 5xx;
  never a digest mismatch or signatures that no longer verify).
- The keys of every rule are loaded at start and every ``key_refresh_seconds``; until all of a
  rule's keys have loaded, the images that rule must verify are refused (fail closed).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from signgate.errors import Error, KeyMaterialError, UsageError, VerificationError
from signgate.keys.password import PASSWORD_ENV
from signgate.keys.refs import display_key_ref, load_public_keys
from signgate.policy import Policy, Rule
from signgate.reference import ImageReference, Repository
from signgate.registry import INDEX_MEDIA_TYPES, RegistryClient, RegistryOptions
from signgate.signatures.verify import ImageVerification, verify_image
from signgate.webhook.decision import AdmissionDecision, ImageVerdict, decide, images_to_verify
from signgate.webhook.metrics import is_registry_error
from signgate.webhook.review import AdmissionRequest, AdmissionReview

if TYPE_CHECKING:
    from signgate.keys.model import PublicKey
    from signgate.webhook.metrics import WebhookMetrics

log = logging.getLogger("signgate.webhook")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

INTERNAL_ERROR_MESSAGE = (
    "signgate could not check this request (internal error; see the webhook's log), so it is "
    "refused until it can be checked"
)
# Key loading is retried this soon after a failure, doubling up to key_refresh_seconds.
FIRST_KEY_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class ControllerSettings:
    """How the controller caches and how long it may take.

    ``child_platform`` picks the child of a multi-platform index that a rule with
    ``require_child_signature`` verifies: the AdmissionReview does not say which node (and so
    which platform) the pod will run on, so the cluster's platform is configured here.
    """

    deadline_seconds: float = 8.0
    verdict_ttl_seconds: float = 300.0
    tag_ttl_seconds: float = 30.0
    max_cache_entries: int = 10_000
    stale_if_error_seconds: float = 0.0
    key_refresh_seconds: float = 300.0
    child_platform: str = "linux/amd64"

    def __post_init__(self) -> None:
        if self.deadline_seconds <= 0:
            raise UsageError("the review deadline must be positive")
        if self.key_refresh_seconds <= 0:
            raise UsageError("the key refresh interval must be positive")
        if self.max_cache_entries < 1:
            raise UsageError("the caches need room for at least one entry")
        if min(self.verdict_ttl_seconds, self.tag_ttl_seconds, self.stale_if_error_seconds) < 0:
            raise UsageError("cache lifetimes cannot be negative")
        parse_platform(self.child_platform)


def parse_platform(text: str) -> tuple[str, str, str | None]:
    """``linux/amd64`` or ``linux/arm/v7`` into (os, architecture, variant)."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"platform {text!r} is not os/architecture[/variant]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def platform_child(index: dict[str, Any], platform: str) -> str | None:
    """The digest of the image for ``platform`` in a multi-platform index, or None (pure).

    A variant in ``platform`` must match; without one, any variant of the architecture does.
    """
    os_name, architecture, variant = parse_platform(platform)
    for entry in index.get("manifests") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
            continue
        found = entry.get("platform")
        if not isinstance(found, dict):
            continue
        if found.get("os") != os_name or found.get("architecture") != architecture:
            continue
        if variant is not None and found.get("variant") != variant:
            continue
        digest: str = entry["digest"]
        return digest
    return None


class TimedCache(Generic[K, V]):
    """At most ``max_entries`` values, the least recently used evicted first, each stamped with
    ``clock()`` when stored. A lookup names the age it accepts; entries older than
    ``retain_seconds`` are dropped when met."""

    def __init__(self, max_entries: int, retain_seconds: float, clock: Callable[[], float]) -> None:
        self.max_entries = max_entries
        self.retain_seconds = retain_seconds
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.evictions = 0  # entries pushed out to keep within max_entries, ever

    def lookup(self, key: K, max_age: float) -> tuple[V, float] | None:
        """The value and its age in seconds, if stored less than ``max_age`` seconds ago."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_at, value = entry
        age = self._clock() - stored_at
        if age >= self.retain_seconds:
            del self._entries[key]
            return None
        if age >= max_age:
            return None
        self._entries.move_to_end(key)
        return value, age

    def get(self, key: K, max_age: float) -> V | None:
        found = self.lookup(key, max_age)
        return None if found is None else found[0]

    def put(self, key: K, value: V) -> None:
        self._entries[key] = (self._clock(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)


class SingleFlight(Generic[K, V]):
    """Concurrent calls with one key share one run of the work.

    The first caller starts the work as a task of its own, and every caller waits on it
    through :func:`asyncio.shield`: a caller that gives up (its deadline passed) does not cancel
    the work the others wait for. The key is free again once the work ends.
    """

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    async def run(self, key: K, work: Callable[[], Coroutine[Any, Any, V]]) -> V:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(work())
            self._tasks[key] = task
            task.add_done_callback(functools.partial(self._finished, key))
        return await asyncio.shield(task)

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            # Marks a failure as retrieved, so asyncio does not log it when every caller had
            # already given up; callers still waiting receive it through shield.
            task.exception()

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        """Cancel the work in flight and wait for it to end."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def webhook_registry_options(
    options: RegistryOptions,
    settings: ControllerSettings,
    on_response: Callable[[int | str], None],
) -> RegistryOptions:
    """``options`` with timeouts and retry waits that fit inside one review's deadline.

    The deadline cancels whatever is still running, so these bounds only decide what a person
    reads: with four retries backing off from 1/32 of the deadline (0.25 s of 8 s) a registry
    that keeps answering 503 is reported as such within 4 s rather than as a timeout.
    """
    deadline = settings.deadline_seconds
    previous = options.on_response

    def observe(status: int | str) -> None:
        if previous is not None:
            previous(status)
        on_response(status)

    return replace(
        options,
        timeout_seconds=min(options.timeout_seconds, deadline),
        retry_backoff_seconds=min(options.retry_backoff_seconds, deadline / 32),
        max_retry_wait_seconds=min(options.max_retry_wait_seconds, deadline / 4),
        on_response=observe,
    )


# The registry statuses seen by the verification running in this task (see _watch_registry).
_REGISTRY_STATUSES: contextvars.ContextVar[list[int | str] | None] = contextvars.ContextVar(
    "signgate_registry_statuses", default=None
)


def _watch_registry() -> list[int | str]:
    """Record the registry statuses the current task sees from now on (each flight runs in a
    task of its own, with its own copy of the context)."""
    statuses: list[int | str] = []
    _REGISTRY_STATUSES.set(statuses)
    return statuses


def _registry_failed(statuses: Sequence[int | str]) -> bool:
    return any(is_registry_error(status) for status in statuses)


def _password_from_environment() -> bytes:
    """A policy naming an encrypted private key: its password from ``COSIGN_PASSWORD`` only,
    since a server has no one to prompt."""
    value = os.environ.get(PASSWORD_ENV)
    if value is None:
        raise KeyMaterialError(f"the key is encrypted; set {PASSWORD_ENV} to open it")
    return os.fsencode(value)


def _load_key(ref: str) -> list[PublicKey] | str:
    """The public keys of one reference, or why they cannot be loaded (runs in a thread)."""
    try:
        return load_public_keys([ref], _password_from_environment)
    except Error as e:
        return e.diagnostics()
    except Exception as e:  # a KMS SDK's own exception that its backend did not wrap
        log.exception("loading key %s failed", display_key_ref(ref))
        return f"unexpected {type(e).__name__} (see the log)"


@dataclass(frozen=True)
class _RuleKeys:
    """The loaded keys of one rule; ``fingerprint`` (their ids) is part of the verdict cache
    key, so that verdicts made with keys since rotated away are never reused."""

    keys: tuple[PublicKey, ...]
    fingerprint: tuple[str, ...]


@dataclass(frozen=True)
class _Resolution:
    """A tag's digest, or why it could not be resolved; ``warning`` when the digest is a stale
    one kept because the registry fails."""

    digest: str | None
    failure: str = ""
    warning: str | None = None


@dataclass(frozen=True)
class _Pending:
    """An image to verify, with its rule, the rule's keys, and its digest when known."""

    reference: ImageReference
    rule: Rule
    keys: _RuleKeys
    digest: str | None


_VerdictKey = tuple[str, str, tuple[str, ...]]  # digest, rule name, key fingerprint
_TagKey = tuple[Repository, str]
# The namespace and, for each image, where it is, its container, its text and whether it changed.
_DecisionKey = tuple[str, tuple[tuple[tuple[str | int, ...], str, str, bool], ...]]


@dataclass(frozen=True)
class _KnownDecision:
    """A decision made from the caches alone: valid until the first entry it was made from
    expires, under the policy and keys it was made with (a key refresh starts afresh), and
    while no cache has evicted anything since (an evicted entry must be verified again)."""

    decision: AdmissionDecision
    valid_until: float
    policy: Policy
    rule_keys: dict[str, _RuleKeys]
    evictions: int

    def is_current(
        self, policy: Policy, rule_keys: dict[str, _RuleKeys], evictions: int
    ) -> bool:
        return (
            policy is self.policy and rule_keys is self.rule_keys and evictions == self.evictions
        )


class AdmissionController:
    """Answers admission reviews: the policy, the registry and the keys behind one call."""

    def __init__(
        self,
        policy: Policy,
        registry: RegistryOptions,
        settings: ControllerSettings = ControllerSettings(),
        *,
        metrics: WebhookMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.settings = settings
        self._metrics = metrics
        self._options = webhook_registry_options(registry, settings, self._registry_response)
        self._client: RegistryClient | None = None
        self._started = False
        self._closed = False
        self._keys: dict[str, tuple[PublicKey, ...]] = {}
        self._key_problems: dict[str, str] = {}
        self._rule_keys: dict[str, _RuleKeys] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        stale = settings.stale_if_error_seconds
        self._verdicts: TimedCache[_VerdictKey, ImageVerdict] = TimedCache(
            settings.max_cache_entries, max(settings.verdict_ttl_seconds, stale), clock
        )
        self._tags: TimedCache[_TagKey, str] = TimedCache(
            settings.max_cache_entries, max(settings.tag_ttl_seconds, stale), clock
        )
        self._verifications: SingleFlight[_VerdictKey, ImageVerdict] = SingleFlight()
        self._resolutions: SingleFlight[_TagKey, _Resolution] = SingleFlight()
        self._clock = clock
        self._decisions: OrderedDict[_DecisionKey, _KnownDecision] = OrderedDict()

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the registry client and load every rule's keys. Keys that fail to load keep
        the controller unready (their images are refused) and are retried in the background."""
        if self._started:
            return
        self._client = RegistryClient(self._options)
        self._started = True
        await self.refresh_keys()
        self._refresh_task = asyncio.create_task(self._refresh_keys_forever())

    async def __aenter__(self) -> AdmissionController:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            await asyncio.gather(self._refresh_task, return_exceptions=True)
        await self._verifications.aclose()
        await self._resolutions.aclose()
        if self._client is not None:
            await self._client.aclose()

    @property
    def ready(self) -> bool:
        return self._started and not self._closed and not self.readiness_problems()

    def readiness_problems(self) -> list[str]:
        """Why the controller is not ready, one sentence each (empty when ready)."""
        if not self._started:
            return ["the admission controller has not started"]
        if self._closed:
            return ["the admission controller is shutting down"]
        problems = []
        for rule in self.policy.rules:
            for ref in rule.keys:
                if ref not in self._keys:
                    reason = self._key_problems.get(ref, "not loaded yet")
                    problems.append(
                        f"rule {rule.name!r}: key {display_key_ref(ref)} is not loaded: {reason}"
                    )
        return problems

    async def refresh_keys(self) -> None:
        """Load every key reference of the policy again (KMS references too, each in a thread).

        A key that loaded before and now fails keeps its last loaded value: a KMS outage must
        not take a serving webhook out of rotation. A key never loaded keeps its rule unready.
        """
        await self._load_keys(self.policy.key_references())
        self._trust(self._keys_of_rules(self.policy))

    async def replace_policy(self, policy: Policy) -> list[str]:
        """Serve ``policy`` from the next review on, once every key it names has loaded; the
        problems that kept it from being served (then the current policy stays), else none.

        Keeping the policy in force when a new key cannot load is what a rotation needs: the
        policy that trusts OLD and NEW must never give way to one that trusts neither.
        """
        problems = await self._load_keys(
            [ref for ref in policy.key_references() if ref not in self._keys]
        )
        if problems:
            return [
                f"key {display_key_ref(ref)} could not be loaded: {reason}"
                for ref, reason in problems.items()
            ]
        # One step, no await between: every review sees the old policy and keys or the new.
        self._trust(self._keys_of_rules(policy))
        self.policy = policy
        return []

    def _trust(self, rule_keys: dict[str, _RuleKeys]) -> None:
        self._rule_keys = rule_keys
        if self._metrics is not None:
            self._metrics.trusted_keys({k for rule in rule_keys.values() for k in rule.fingerprint})

    async def _load_keys(self, refs: Sequence[str]) -> dict[str, str]:
        """Load ``refs`` into the key table; why each that failed did (its old value stays)."""
        results = await asyncio.gather(*(asyncio.to_thread(_load_key, ref) for ref in refs))
        failed = {}
        for ref, result in zip(refs, results, strict=True):
            if isinstance(result, str):
                failed[ref] = self._key_problems[ref] = result
                if ref in self._keys:
                    log.warning(
                        "key %s could not be refreshed, keeping the loaded one: %s",
                        display_key_ref(ref),
                        result,
                    )
                else:
                    log.warning("key %s could not be loaded: %s", display_key_ref(ref), result)
            else:
                self._keys[ref] = tuple(result)
                self._key_problems.pop(ref, None)
        return failed

    def _keys_of_rules(self, policy: Policy) -> dict[str, _RuleKeys]:
        rule_keys = {}
        for rule in policy.rules:
            if rule.verifies and all(ref in self._keys for ref in rule.keys):
                keys = tuple(dict.fromkeys(k for ref in rule.keys for k in self._keys[ref]))
                fingerprint = tuple(sorted({k.key_id for k in keys}))
                rule_keys[rule.name] = _RuleKeys(keys, fingerprint)
        return rule_keys

    async def _refresh_keys_forever(self) -> None:
        retry = FIRST_KEY_RETRY_SECONDS
        while True:
            if self._key_problems:
                await asyncio.sleep(min(retry, self.settings.key_refresh_seconds))
                retry *= 2
            else:
                await asyncio.sleep(self.settings.key_refresh_seconds)
                retry = FIRST_KEY_RETRY_SECONDS
            try:
                await self.refresh_keys()
            except Exception:
                log.exception("refreshing the policy's keys failed")

    # -- reviews -----------------------------------------------------------------------------

    async def review(self, review: AdmissionReview) -> AdmissionDecision:
        """The answer to one review, within the deadline. Never raises (cancellation aside): an
        unexpected failure is logged and answered with a denial (fail closed)."""
        started = time.perf_counter()
        try:
            decision = await self._review(review)
        except Exception:
            log.exception(
                "admission review %s failed unexpectedly; refused", review.request.uid
            )
            decision = AdmissionDecision.denial(INTERNAL_ERROR_MESSAGE)
            result = "error"
        else:
            result = _result_of(decision)
        if self._metrics is not None:
            self._metrics.observe_admission(result, time.perf_counter() - started)
        return decision

    def known_decision(self, review: AdmissionReview) -> AdmissionDecision | None:
        """The decision kept for a review of the same images in the same namespace, while every
        cache entry it was made from is fresh; None when the review must be decided. Synchronous:
        a Deployment's thousandth replica costs no task switch."""
        if self._closed:
            return None
        started = time.perf_counter()
        decision = self._kept_decision(_decision_key(review.request), self._clock())
        if decision is not None and self._metrics is not None:
            self._metrics.observe_admission(_result_of(decision), time.perf_counter() - started)
        return decision

    def _kept_decision(self, decision_key: _DecisionKey, now: float) -> AdmissionDecision | None:
        """The kept decision for ``decision_key`` if it still holds (counted as a cache hit);
        one that no longer holds is dropped."""
        known = self._decisions.get(decision_key)
        if known is None:
            return None
        if known.valid_until > now and known.is_current(
            self.policy, self._rule_keys, self._evictions()
        ):
            self._decisions.move_to_end(decision_key)
            self._count_cache("decision", True)
            return known.decision
        del self._decisions[decision_key]
        return None

    async def _review(self, review: AdmissionReview) -> AdmissionDecision:
        request = review.request
        now = self._clock()
        decision_key = _decision_key(request)
        kept = self._kept_decision(decision_key, now)
        if kept is not None:
            return kept
        self._count_cache("decision", False)
        # A decision made only from fresh cache entries (or no registry at all) holds until the
        # first of them expires: until then every review of the same images decides the same.
        valid_until = now + self.settings.verdict_ttl_seconds
        evictions = self._evictions()
        verdicts: dict[ImageReference, ImageVerdict] = {}
        pending: list[_Pending] = []
        rule_keys = self._rule_keys
        for reference, rule in images_to_verify(review, self.policy):
            keys = rule_keys.get(rule.name)
            if keys is None:
                verdicts[reference] = ImageVerdict(None, ok=False, reason=self._keys_missing(rule))
                continue
            digest = reference.digest
            if digest is None:
                tag = self._tags.lookup(_tag_key(reference), self.settings.tag_ttl_seconds)
                self._count_cache("tag", tag is not None)
                if tag is not None:
                    digest, age = tag
                    valid_until = min(valid_until, now - age + self.settings.tag_ttl_seconds)
            cached = None if digest is None else self._fresh_verdict(digest, rule, keys)
            if cached is not None:
                verdict, age = cached
                verdicts[reference] = verdict
                valid_until = min(valid_until, now - age + self.settings.verdict_ttl_seconds)
            else:
                pending.append(_Pending(reference, rule, keys, digest))
        if pending:
            await self._verify_within_deadline(pending, verdicts)
        decision = decide(review, self.policy, verdicts)
        if not pending:
            self._decisions[decision_key] = _KnownDecision(
                decision, valid_until, self.policy, rule_keys, evictions
            )
            while len(self._decisions) > self.settings.max_cache_entries:
                self._decisions.popitem(last=False)
        return decision

    async def _verify_within_deadline(
        self, pending: list[_Pending], verdicts: dict[ImageReference, ImageVerdict]
    ) -> None:
        async def one(image: _Pending) -> None:
            verdicts[image.reference] = await self._verdict(image)

        try:
            async with asyncio.timeout(self.settings.deadline_seconds):
                if len(pending) == 1:
                    await one(pending[0])
                else:
                    async with asyncio.TaskGroup() as group:
                        for image in pending:
                            group.create_task(one(image))
        except TimeoutError:
            for image in pending:
                if image.reference not in verdicts:
                    verdicts[image.reference] = self._late_verdict(image)

    def _evictions(self) -> int:
        return self._tags.evictions + self._verdicts.evictions

    def _keys_missing(self, rule: Rule) -> str:
        missing = [display_key_ref(ref) for ref in rule.keys if ref not in self._keys]
        return (
            f"its keys are not loaded ({', '.join(missing)}), so the webhook refuses the "
            "images this rule verifies until they are"
        )

    def _fresh_verdict(
        self, digest: str, rule: Rule, keys: _RuleKeys
    ) -> tuple[ImageVerdict, float] | None:
        """The cached verdict and its age, if it is younger than the verdict TTL."""
        found = self._verdicts.lookup(
            (digest, rule.name, keys.fingerprint), self.settings.verdict_ttl_seconds
        )
        self._count_cache("verdict", found is not None)
        return found

    async def _verdict(self, image: _Pending) -> ImageVerdict:
        """The verdict for an image whose fresh verdict is not cached."""
        reference, rule, keys = image.reference, image.rule, image.keys
        warning = None
        digest = image.digest
        if digest is None:
            resolution = await self._resolutions.run(
                _tag_key(reference), lambda: self._resolve(reference)
            )
            if resolution.digest is None:
                return ImageVerdict(None, ok=False, reason=resolution.failure)
            digest, warning = resolution.digest, resolution.warning
            fresh = self._fresh_verdict(digest, rule, keys)
            if fresh is not None:
                return _with_warning(fresh[0], warning)
        key = (digest, rule.name, keys.fingerprint)
        pinned = reference.with_digest(digest)
        verdict = await self._verifications.run(key, lambda: self._verify(pinned, rule, keys, key))
        return _with_warning(verdict, warning)

    async def _resolve(self, reference: ImageReference) -> _Resolution:
        """Resolve a tag with the registry (one flight per tag); never raises an Error."""
        statuses = _watch_registry()
        key = _tag_key(reference)
        try:
            async with asyncio.timeout(self.settings.deadline_seconds):
                digest = await self._registry().head_manifest(
                    reference.repository, reference.identifier
                )
        except TimeoutError:
            failure, outage = self._slow_registry(reference), True
        except Error as e:
            failure, outage = e.diagnostics(), _registry_failed(statuses)
        else:
            if digest is None:
                return _Resolution(None, f"{reference}: the tag does not exist in the registry")
            self._tags.put(key, digest)
            return _Resolution(digest)
        if outage and self.settings.stale_if_error_seconds > 0:
            found = self._tags.lookup(key, self.settings.stale_if_error_seconds)
            if found is not None:
                digest, age = found
                warning = (
                    f"the registry is failing ({failure}); the tag was resolved to {digest} "
                    f"{age:.0f} s ago (stale-if-error)"
                )
                log.warning("%s: %s", reference, warning)
                return _Resolution(digest, warning=warning)
        return _Resolution(None, failure)

    async def _verify(
        self, reference: ImageReference, rule: Rule, keys: _RuleKeys, key: _VerdictKey
    ) -> ImageVerdict:
        """Verify ``reference`` (by digest) under ``rule`` (one flight per digest and rule);
        a verdict that meets the rule's threshold is cached. Never raises an Error."""
        statuses = _watch_registry()
        try:
            async with asyncio.timeout(self.settings.deadline_seconds):
                verdict, unread = await self._verify_signatures(reference, rule, keys)
        except TimeoutError:
            verdict = ImageVerdict(reference.digest, False, self._slow_registry(reference))
            outage = True
        except Error as e:
            verdict = ImageVerdict(reference.digest, False, e.diagnostics())
            outage = _registry_failed(statuses)
        else:
            # Signatures that were read and judged are a verdict, whatever else failed.
            outage = unread and _registry_failed(statuses)
        if verdict.ok and len(verdict.key_ids) >= rule.threshold:
            self._verdicts.put(key, verdict)
            return verdict
        if outage:
            stale = self._stale_verdict(key, verdict.reason)
            if stale is not None:
                log.warning("%s: %s", reference, stale.warning)
                return stale
        return verdict

    async def _verify_signatures(
        self, reference: ImageReference, rule: Rule, keys: _RuleKeys
    ) -> tuple[ImageVerdict, bool]:
        """The verdict, and whether it failed before any signature could be judged."""
        client = self._registry()
        verification = await verify_image(
            client, reference, keys.keys, rule.annotations, formats=rule.formats
        )
        verdict = ImageVerdict.from_verification(verification)
        if not verification.ok or not rule.require_child_signature:
            return verdict, _unread(verification)
        child = await self._platform_child(reference)
        if child is None:
            return verdict, False  # an image, not an index: its own signature is the child's
        child_verification = await verify_image(
            client, child, keys.keys, rule.annotations, formats=rule.formats
        )
        if not child_verification.ok:
            reason = (
                f"the {self.settings.child_platform} image {child.digest} of the index: "
                f"{child_verification.reason()}"
            )
            return ImageVerdict(verdict.digest, False, reason), _unread(child_verification)
        # A key counts when it signed both the index and the child.
        both = verdict.key_ids & ImageVerdict.from_verification(child_verification).key_ids
        return replace(verdict, key_ids=both), False

    async def _platform_child(self, reference: ImageReference) -> ImageReference | None:
        """The configured platform's image in the index ``reference`` names (None when it is
        not an index)."""
        manifest = await self._registry().get_manifest(reference.repository, reference.identifier)
        if manifest.media_type not in INDEX_MEDIA_TYPES:
            return None
        try:
            document = manifest.json()
        except ValueError as e:
            raise VerificationError(f"{reference}: the index is not valid JSON") from e
        digest = platform_child(document, self.settings.child_platform)
        if digest is None:
            raise VerificationError(
                f"{reference}: the index has no {self.settings.child_platform} image"
            )
        return ImageReference(reference.repository, None, digest)

    def _late_verdict(self, image: _Pending) -> ImageVerdict:
        """The verdict for an image still unverified when the deadline passed."""
        reference, rule, keys = image.reference, image.rule, image.keys
        reason = self._slow_registry(reference)
        digest = image.digest
        if digest is None and self.settings.stale_if_error_seconds > 0:
            digest = self._tags.get(_tag_key(reference), self.settings.stale_if_error_seconds)
        if digest is not None:
            stale = self._stale_verdict((digest, rule.name, keys.fingerprint), reason)
            if stale is not None:
                log.warning("%s: %s", reference, stale.warning)
                return stale
        return ImageVerdict(None, ok=False, reason=reason)

    def _stale_verdict(self, key: _VerdictKey, failure: str) -> ImageVerdict | None:
        """A success within the stale-if-error window, with a warning saying why it is used."""
        window = self.settings.stale_if_error_seconds
        if window <= 0:
            return None
        found = self._verdicts.lookup(key, window)
        if found is None:
            return None
        verdict, age = found
        warning = (
            f"the registry is failing ({failure}); allowed on the verification of {age:.0f} s "
            f"ago (stale-if-error, up to {window:g} s)"
        )
        return replace(verdict, warning=warning)

    def _slow_registry(self, reference: ImageReference) -> str:
        return (
            f"the registry {reference.registry} did not answer within the "
            f"{self.settings.deadline_seconds:g} s deadline (slow or not answering)"
        )

    def _registry(self) -> RegistryClient:
        if self._client is None:
            raise RuntimeError("the admission controller has not started")
        return self._client

    def _registry_response(self, status: int | str) -> None:
        if self._metrics is not None:
            self._metrics.registry_response(status)
        statuses = _REGISTRY_STATUSES.get()
        if statuses is not None:
            statuses.append(status)

    def _count_cache(self, name: str, hit: bool) -> None:
        if self._metrics is not None:
            self._metrics.cache(name, hit)


def _decision_key(request: AdmissionRequest) -> _DecisionKey:
    return request.workload_namespace, tuple(
        (image.path, image.container, image.image, image.changed) for image in request.images
    )


def _result_of(decision: AdmissionDecision) -> str:
    if not decision.allowed:
        return "denied"
    return "warned" if decision.warnings else "allowed"


def _tag_key(reference: ImageReference) -> _TagKey:
    return reference.repository, reference.identifier


def _unread(verification: ImageVerification) -> bool:
    """True when verification stopped before judging any signature (a registry failure, or
    no signature image)."""
    return verification.error is not None and not verification.checks


def _with_warning(verdict: ImageVerdict, warning: str | None) -> ImageVerdict:
    if warning is None or not verdict.ok:
        return verdict
    if verdict.warning:
        warning = f"{warning}; {verdict.warning}"
    return replace(verdict, warning=warning)
