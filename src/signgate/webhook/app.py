"""The webhook's ASGI application: AdmissionReview in, AdmissionReview out, probes and metrics.

A plain ASGI 3 callable (no framework): five routes do not need one, and every microsecond of a
warm review is the API server's latency.

- ``POST /validate``: the answer without a patch (a validating webhook may not patch).
- ``POST /mutate``: the same answer, plus the JSONPatch pinning verified tags to digests.
- ``GET /healthz``: the process serves. ``GET /readyz``: the controller and TLS are ready
  (503 with the reasons otherwise). ``GET /metrics``: Prometheus text.

A body that is not a usable review is answered with HTTP 400 and the reason; the API server then
applies the webhook's ``failurePolicy``. Anything unexpected while deciding is a denial with a
generic message (fail closed) and a traceback in the log, never a crash of the server.
Dry-run requests get the same answer as real ones: the webhook has no side effects.
https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol

from signgate.errors import MalformedReview
from signgate.webhook.decision import AdmissionDecision
from signgate.webhook.logs import json_line, log_time
from signgate.webhook.review import AdmissionRequest, AdmissionReview, parse_review_json

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The API server refuses request bodies over 3 MiB, and a stored object is at most etcd's
# 1.5 MiB; an UPDATE review carries the object and its stored version, so a real review can
# exceed 3 MiB a little. 4 MiB admits every real review and bounds what a client can make us hold.
MAX_REVIEW_BYTES = 4 << 20

FAILED_CLOSED_MESSAGE = (
    "signgate could not decide on this request (internal error; see the webhook's log), "
    "so it is refused"
)

DECISION_LOGGER = "signgate.webhook.decisions"
decision_log = logging.getLogger(DECISION_LOGGER)
log = logging.getLogger("signgate.webhook")


class ReviewController(Protocol):
    """What the application needs of :class:`signgate.webhook.controller.AdmissionController`."""

    @property
    def ready(self) -> bool: ...

    def readiness_problems(self) -> list[str]: ...

    def known_decision(self, review: AdmissionReview) -> AdmissionDecision | None: ...

    async def review(self, review: AdmissionReview) -> AdmissionDecision: ...


class MetricsText(Protocol):
    """What the application needs of :class:`signgate.webhook.metrics.WebhookMetrics`."""

    def render(self) -> tuple[bytes, str]: ...


_REVIEW_PATHS = {"/validate": False, "/mutate": True}  # path -> answers with the patch
_PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"


class WebhookApp:
    """The ASGI application. ``readiness`` adds problems of the shell around the controller
    (TLS not loaded, say) to ``/readyz``; ``clock`` measures each review's latency;
    ``write_decision`` writes each decision's log line (by default a record of the
    ``signgate.webhook.decisions`` logger carrying the line)."""

    def __init__(
        self,
        controller: ReviewController,
        metrics: MetricsText,
        *,
        readiness: Callable[[], Sequence[str]] = lambda: (),
        max_review_bytes: int = MAX_REVIEW_BYTES,
        clock: Callable[[], float] = time.perf_counter,
        write_decision: Callable[[str], None] | None = None,
    ) -> None:
        self.controller = controller
        self.metrics = metrics
        self.readiness = readiness
        self.max_review_bytes = max_review_bytes
        self.clock = clock
        self.write_decision = write_decision

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _acknowledge_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path in _REVIEW_PATHS:
            if method != "POST":
                await _respond(send, 405, b"use POST\n", _TEXT, [(b"allow", b"POST")])
                return
            await self._review(scope, receive, send, with_patch=_REVIEW_PATHS[path])
        elif path in _PROBE_PATHS:
            if method not in ("GET", "HEAD"):
                await _respond(send, 405, b"use GET\n", _TEXT, [(b"allow", b"GET, HEAD")])
                return
            status, body, content_type = self._probe(path)
            await _respond(send, status, body, content_type)  # uvicorn drops a HEAD's body
        else:
            await _respond(send, 404, b"not found\n", _TEXT)

    def _probe(self, path: str) -> tuple[int, bytes, bytes]:
        if path == "/healthz":
            return 200, b"ok\n", _TEXT
        if path == "/readyz":
            problems = self.problems()
            if problems:
                return 503, "".join(f"not ready: {p}\n" for p in problems).encode(), _TEXT
            return 200, b"ready\n", _TEXT
        body, content_type = self.metrics.render()
        return 200, body, content_type.encode("latin-1")

    def problems(self) -> list[str]:
        """Why the webhook is not ready; empty when it is."""
        problems = list(self.readiness())
        if not self.controller.ready:
            problems.extend(self.controller.readiness_problems() or ["the controller is starting"])
        return problems

    async def _review(
        self, scope: Scope, receive: Receive, send: Send, *, with_patch: bool
    ) -> None:
        started = self.clock()
        try:
            body = await _read_body(scope, receive, self.max_review_bytes)
            review = parse_review_json(body)
            # Found here (once, then kept) so that an object the webhook cannot read is a 400
            # rather than a denial.
            review.request.images  # noqa: B018
        except MalformedReview as e:
            reason = e.diagnostics()
            log.warning("refused a malformed AdmissionReview: %s", reason)
            await _respond(send, 400, f"malformed AdmissionReview: {reason}\n".encode(), _TEXT)
            return
        request = review.request
        try:
            decision = self.controller.known_decision(review) or await self.controller.review(
                review
            )
            response = decision.response_body(request.uid, with_patch=with_patch)
        except Exception:
            log.exception("deciding on request %s failed; refusing it", request.uid)
            decision = AdmissionDecision.denial(FAILED_CLOSED_MESSAGE)
            response = decision.response_body(request.uid, with_patch=False)
        if decision_log.isEnabledFor(logging.INFO):
            line = decision_line(
                request, decision, self.clock() - started, with_patch=with_patch,
                created=time.time(),
            )
            if self.write_decision is None:
                decision_log.info(line, extra={"json_line": line})
            else:
                self.write_decision(line)
        await _respond(send, 200, response, _JSON)


def decision_line(
    request: AdmissionRequest, decision: AdmissionDecision, latency_seconds: float,
    *, with_patch: bool, created: float,
) -> str:
    """The decision's log line: what the request was, what was decided and why
    (:attr:`AdmissionDecision.log_fields`, serialised once per decision), and how long it took."""
    verdict = "allowed" if decision.allowed else "denied"
    entry = {
        "time": log_time(created),
        "level": "info",
        "logger": DECISION_LOGGER,
        "message": f"admission {verdict}",
        "event": "admission",
        "uid": request.uid,
        "endpoint": "mutate" if with_patch else "validate",
        "namespace": request.workload_namespace,
        "kind": request.kind.kind,
        "sub_resource": request.sub_resource,
        "name": request.name or _object_name(request),
        "operation": request.operation.value,
        "dry_run": request.dry_run,
        "patched": len(decision.patch) if with_patch and decision.allowed else 0,
        "latency_ms": round(latency_seconds * 1000, 3),
    }
    return json_line(entry, decision.log_fields_json)


def _object_name(request: AdmissionRequest) -> str:
    """The object's name when the request has none yet (``generateName`` on CREATE)."""
    metadata = (request.object or request.old_object or {}).get("metadata")
    if not isinstance(metadata, dict):
        return ""
    name = metadata.get("name") or metadata.get("generateName")
    return name if isinstance(name, str) else ""


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refused as soon as it is known to be over ``limit`` bytes: by its
    Content-Length, or while it streams in (chunked, or a length that lies)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise MalformedReview(f"the body is {int(value)} bytes, over the {limit} byte bound")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise MalformedReview("the client went away before sending the whole body")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise MalformedReview(f"the body is over the {limit} byte bound")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _acknowledge_lifespan(receive: Receive, send: Send) -> None:
    """Start-up and shutdown are the server's (:mod:`signgate.webhook.server`); the application
    only acknowledges them when the server speaks the lifespan protocol."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
