"""The webhook's Prometheus metrics, in a registry of their own (no process-wide globals).

:class:`~signgate.webhook.controller.AdmissionController` records admissions, cache lookups and
registry responses; the ASGI app only renders them for ``GET /metrics``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# Cached answers take well under a millisecond; the deadline is 8 s by default.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 8.0, 10.0
)


def is_registry_error(status: int | str) -> bool:
    """Whether a registry response says the registry is in trouble: a transport failure
    (``"error"``), a rate limit or a server error. 401 is the normal start of a token login
    and 404 a normal answer ("no signatures"), so neither counts."""
    if isinstance(status, str):
        return True
    return status == 429 or status >= 500


class WebhookMetrics:
    """Admissions by result with their latency, cache hits and misses, registry responses."""

    def __init__(self) -> None:
        # Imported here: the controller (and so `signgate check`) uses is_registry_error without
        # paying for prometheus_client.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        self._admissions = Counter(
            "signgate_admissions",
            "Admission reviews answered, by result (allowed, warned, denied, error).",
            ["result"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "signgate_admission_duration_seconds",
            "Time to answer one admission review.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._cache = Counter(
            "signgate_cache_lookups",
            "Cache lookups by cache (decision, verdict, tag) and result (hit, miss).",
            ["cache", "result"],
            registry=self.registry,
        )
        self._registry_responses = Counter(
            "signgate_registry_responses",
            "Registry HTTP responses by status; 'error' for a transport failure.",
            ["status"],
            registry=self.registry,
        )
        self._registry_errors = Counter(
            "signgate_registry_errors",
            "Registry responses that say the registry is failing (429, 5xx, transport errors), "
            "by status.",
            ["status"],
            registry=self.registry,
        )

        self._policy = Gauge(
            "signgate_policy_info",
            "1 for the policy in force, labelled with the SHA-256 of its file: a key rotation "
            "waits until every replica serves the policy that trusts the new key.",
            ["sha256"],
            registry=self.registry,
        )
        self._policy_loaded = Gauge(
            "signgate_policy_loaded_timestamp_seconds",
            "When the policy in force was loaded (Unix time).",
            registry=self.registry,
        )
        self._policy_sha256: str | None = None
        self._trusted = Gauge(
            "signgate_trusted_key_info",
            "1 for each key (id: SHA-256 of its public key DER) some rule verifies with now: a "
            "key rotation waits until every replica trusts NEW, and no longer OLD.",
            ["key_id"],
            registry=self.registry,
        )
        self._trusted_ids: set[str] = set()

        # labels() hashes and locks on every call; a review counts several times, so each
        # labelled child is looked up once and kept.
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_admission(self, verdict: str, seconds: float) -> None:
        self._child(self._admissions, verdict).inc()
        self._latency.observe(seconds)

    def policy_in_force(self, sha256: str) -> None:
        if self._policy_sha256 is not None:
            self._policy.remove(self._policy_sha256)
        self._policy.labels(sha256).set(1)
        self._policy_sha256 = sha256
        self._policy_loaded.set_to_current_time()

    def trusted_keys(self, key_ids: set[str]) -> None:
        for gone in self._trusted_ids - key_ids:
            self._trusted.remove(gone)
        for key_id in key_ids - self._trusted_ids:
            self._trusted.labels(key_id).set(1)
        self._trusted_ids = set(key_ids)

    def cache(self, name: str, hit: bool) -> None:
        self._child(self._cache, name, "hit" if hit else "miss").inc()

    def registry_response(self, status: int | str) -> None:
        label = str(status)
        self._child(self._registry_responses, label).inc()
        if is_registry_error(status):
            self._child(self._registry_errors, label).inc()

    def registry_requests(self) -> int:
        """Registry responses and transport failures seen so far, all statuses together."""
        return int(
            sum(
                sample.value
                for metric in self._registry_responses.collect()
                for sample in metric.samples
                if sample.name.endswith("_total")
            )
        )

    def render(self) -> tuple[bytes, str]:
        """The body and content type of ``GET /metrics``."""
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
