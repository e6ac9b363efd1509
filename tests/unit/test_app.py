"""The webhook's ASGI application over httpx's ASGI transport, with a controller that decides
from a table of verdicts through the real decision code (the registry work is the controller's,
tested on its own)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest

from signgate.policy import parse_policy
from signgate.reference import ImageReference
from signgate.webhook.app import FAILED_CLOSED_MESSAGE, MAX_REVIEW_BYTES, WebhookApp
from signgate.webhook.decision import AdmissionDecision, ImageVerdict, decide
from signgate.webhook.review import AdmissionReview
from signgate.webhook.server import JsonLogFormatter

pytestmark = pytest.mark.anyio

UID = "0f6a7c3e-1b7e-4d6b-9a53-2c1f2e8d9a10"
DIGEST = "sha256:" + "ab" * 32
KEY_ID = "cd" * 32
SIGNED = "registry.example.com/team/web:1.4.0"
UNSIGNED = "registry.example.com/team/api:2.0"

POLICY = parse_policy(
    """\
unmatched: deny
rules:
  - name: platform
    images: ["registry.k8s.io/**"]
    action: allow
  - name: team
    images: ["registry.example.com/team/**"]
    keys: [/etc/signgate/cosign.pub]
"""
)

VERDICTS = {
    ImageReference.parse(SIGNED): ImageVerdict(DIGEST, ok=True, key_ids=frozenset({KEY_ID})),
    ImageReference.parse(UNSIGNED): ImageVerdict(
        "sha256:" + "ef" * 32, ok=False, reason="no signature verified with the rule's keys"
    ),
}


class TableController:
    """Decides with the real :func:`decide` from fixed verdicts; records what it was asked."""

    def __init__(self, *, ready: bool = True, problems: Sequence[str] = ()) -> None:
        self.ready = ready
        self.problems = list(problems)
        self.reviews: list[AdmissionReview] = []
        self.failure: Exception | None = None
        self.known: AdmissionDecision | None = None
        self.known_failure: Exception | None = None

    def readiness_problems(self) -> list[str]:
        return self.problems

    def known_decision(self, review: AdmissionReview) -> AdmissionDecision | None:
        if self.known_failure is not None:
            raise self.known_failure
        return self.known

    async def review(self, review: AdmissionReview) -> AdmissionDecision:
        self.reviews.append(review)
        if self.failure is not None:
            raise self.failure
        return decide(review, POLICY, VERDICTS)


class FixedMetrics:
    def render(self) -> tuple[bytes, str]:
        return b"# HELP signgate_admissions_total x\n", "text/plain; version=0.0.4; charset=utf-8"


def pod(*images: str, name: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
        },
    }


def review_document(obj: dict[str, Any] | None, **request: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "uid": UID,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "shop",
        "name": "web",
        "operation": "CREATE",
        "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
        "object": obj,
        "oldObject": None,
        "dryRun": False,
    }
    body.update(request)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": body}


@pytest.fixture
def controller() -> TableController:
    return TableController()


@pytest.fixture
def readiness() -> list[str]:
    return []


@pytest.fixture
async def client(
    controller: TableController, readiness: list[str]
) -> AsyncIterator[httpx.AsyncClient]:
    app = WebhookApp(controller, FixedMetrics(), readiness=lambda: readiness)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://webhook") as client:
        yield client


def decision_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The decision log lines as the server writes them (JSON), decoded."""
    formatter = JsonLogFormatter()
    return [
        json.loads(formatter.format(r))
        for r in caplog.records
        if r.name == "signgate.webhook.decisions"
    ]


async def test_validate_answers_with_the_same_uid_and_no_patch(
    client: httpx.AsyncClient,
) -> None:
    reply = await client.post("/validate", json=review_document(pod(SIGNED)))
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": UID, "allowed": True},
    }


async def test_mutate_pins_the_verified_tag_to_its_digest(client: httpx.AsyncClient) -> None:
    reply = await client.post("/mutate", json=review_document(pod(SIGNED)))
    response = reply.json()["response"]
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(response["patch"])) == [
        {"op": "replace", "path": "/spec/containers/0/image", "value": f"{SIGNED}@{DIGEST}"}
    ]


async def test_a_denial_names_the_image_and_why(client: httpx.AsyncClient) -> None:
    for path in ("/validate", "/mutate"):
        reply = await client.post(path, json=review_document(pod(SIGNED, UNSIGNED)))
        response = reply.json()["response"]
        assert response["allowed"] is False
        assert "patch" not in response
        assert response["status"]["code"] == 403
        assert response["status"]["message"] == (
            f"image {UNSIGNED!r} of container 'c1': rule 'team' requires a signature by key "
            "/etc/signgate/cosign.pub: no signature verified with the rule's keys"
        )


async def test_dry_run_gets_the_same_answer(client: httpx.AsyncClient) -> None:
    real = await client.post("/mutate", json=review_document(pod(SIGNED, UNSIGNED)))
    dry = await client.post("/mutate", json=review_document(pod(SIGNED, UNSIGNED), dryRun=True))
    assert dry.json() == real.json()


async def test_each_decision_is_one_structured_log_record(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await client.post("/mutate", json=review_document(pod(SIGNED, "registry.k8s.io/pause:3.9")))
    await client.post("/validate", json=review_document(pod(UNSIGNED), dryRun=True))
    allowed, denied = decision_records(caplog)
    for record in (allowed, denied):
        assert record.pop("logger") == "signgate.webhook.decisions"
        assert record.pop("level") == "info"
        assert record.pop("message") == f"admission {record['verdict']}"
        assert record.pop("time").endswith("+00:00")
    latency = allowed.pop("latency_ms")
    assert isinstance(latency, float)
    assert latency >= 0
    assert allowed == {
        "event": "admission",
        "uid": UID,
        "endpoint": "mutate",
        "namespace": "shop",
        "kind": "Pod",
        "sub_resource": "",
        "name": "web",
        "operation": "CREATE",
        "dry_run": False,
        "verdict": "allowed",
        "rules": ["platform", "team"],
        "reason": "",
        "images": [
            {
                "image": SIGNED,
                "container": "c0",
                "digest": DIGEST,
                "verdict": "allowed",
                "rule": "team",
                "reason": f"verified by rule 'team' with key {KEY_ID[:12]}",
            },
            {
                "image": "registry.k8s.io/pause:3.9",
                "container": "c1",
                "digest": None,
                "verdict": "allowed",
                "rule": "platform",
                "reason": "allowed by rule 'platform' without verification",
            },
        ],
        "warnings": [],
        "audit": [],
        "patched": 1,
    }
    assert denied["verdict"] == "denied"
    assert denied["dry_run"] is True
    assert denied["endpoint"] == "validate"
    assert denied["patched"] == 0
    assert denied["reason"].startswith(f"image {UNSIGNED!r} of container 'c0'")
    assert denied["images"][0]["digest"] == "sha256:" + "ef" * 32


async def test_delete_is_answered_without_images(
    client: httpx.AsyncClient, controller: TableController
) -> None:
    reply = await client.post(
        "/validate", json=review_document(None, operation="DELETE", oldObject=pod(UNSIGNED))
    )
    assert reply.json()["response"] == {"uid": UID, "allowed": True}
    assert controller.reviews[0].request.operation == "DELETE"


async def test_an_unexpected_failure_is_a_denial_with_a_generic_message(
    client: httpx.AsyncClient, controller: TableController, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    controller.failure = RuntimeError("token=hunter2 leaked into an exception")
    reply = await client.post("/mutate", json=review_document(pod(SIGNED)))
    assert reply.status_code == 200
    assert reply.json()["response"] == {
        "uid": UID,
        "allowed": False,
        "status": {"code": 403, "message": FAILED_CLOSED_MESSAGE},
    }
    assert "hunter2" not in reply.text
    (failure,) = [r for r in caplog.records if r.exc_info]
    assert failure.levelno == logging.ERROR
    assert UID in failure.getMessage()
    assert decision_records(caplog)[0]["verdict"] == "denied"
    # The server goes on answering.
    controller.failure = None
    reply = await client.post("/mutate", json=review_document(pod(SIGNED)))
    assert reply.json()["response"]["allowed"] is True


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = document
        for parent in parents:
            target = target[parent]
        target[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_set("apiVersion", "admission.k8s.io/v1beta1"),
         "apiVersion: 'admission.k8s.io/v1beta1' is not 'admission.k8s.io/v1'"),
        (_set("kind", "Pod"), "kind: 'Pod' is not 'AdmissionReview'"),
        (_set("request.uid", ""), "request.uid: missing"),
        (_set("request.object.spec.containers", {"name": "c0"}),
         "request.object.spec.containers: must be a list"),
    ],
)
async def test_malformed_reviews_get_400_with_the_reason(
    client: httpx.AsyncClient,
    controller: TableController,
    edit: Callable[[dict[str, Any]], None],
    reason: str,
) -> None:
    document = review_document(pod(SIGNED))
    edit(document)
    reply = await client.post("/validate", json=document)
    assert reply.status_code == 400
    assert reply.text == f"malformed AdmissionReview: {reason}\n"
    assert controller.reviews == []


async def test_a_body_that_is_not_json_gets_400(client: httpx.AsyncClient) -> None:
    reply = await client.post("/mutate", content=b"{not json")
    assert reply.status_code == 400
    assert reply.text.startswith("malformed AdmissionReview: the body is not JSON: ")


async def test_a_body_over_the_bound_is_refused_by_its_length(client: httpx.AsyncClient) -> None:
    body = b" " * (MAX_REVIEW_BYTES + 1)
    reply = await client.post("/validate", content=body)
    assert reply.status_code == 400
    assert reply.text == (
        f"malformed AdmissionReview: the body is {MAX_REVIEW_BYTES + 1} bytes, "
        f"over the {MAX_REVIEW_BYTES} byte bound\n"
    )


async def test_a_streamed_body_over_the_bound_is_refused_while_it_streams(
    client: httpx.AsyncClient,
) -> None:
    chunks_sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        for _ in range(8):
            chunks_sent += 1
            yield b" " * (1 << 20)

    reply = await client.post("/validate", content=chunks())
    assert reply.status_code == 400
    assert reply.text == (
        f"malformed AdmissionReview: the body is over the {MAX_REVIEW_BYTES} byte bound\n"
    )


async def test_a_body_just_under_the_bound_is_read(client: httpx.AsyncClient) -> None:
    document = review_document(pod(SIGNED))
    text = json.dumps(document)
    padded = text + " " * (MAX_REVIEW_BYTES - len(text))
    reply = await client.post("/validate", content=padded.encode())
    assert reply.status_code == 200
    assert reply.json()["response"]["allowed"] is True


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/validate", 405, "POST"),
        ("PUT", "/mutate", 405, "POST"),
        ("POST", "/healthz", 405, "GET, HEAD"),
        ("DELETE", "/metrics", 405, "GET, HEAD"),
        ("POST", "/", 404, None),
        ("GET", "/validate/extra", 404, None),
    ],
)
async def test_wrong_method_or_path(
    client: httpx.AsyncClient, method: str, path: str, status: int, allow: str | None
) -> None:
    reply = await client.request(method, path)
    assert reply.status_code == status
    assert reply.headers.get("allow") == allow


async def test_probes_and_metrics(client: httpx.AsyncClient) -> None:
    health = await client.get("/healthz")
    assert (health.status_code, health.text) == (200, "ok\n")
    ready = await client.get("/readyz")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert metrics.text == "# HELP signgate_admissions_total x\n"
    head = await client.head("/readyz")
    assert head.status_code == 200


async def test_not_ready_lists_every_reason(
    client: httpx.AsyncClient, controller: TableController, readiness: list[str]
) -> None:
    controller.ready = False
    controller.problems = ["key hashivault://release: OpenBao answered 503"]
    readiness.append("no TLS certificate loaded")
    reply = await client.get("/readyz")
    assert reply.status_code == 503
    assert reply.text == (
        "not ready: no TLS certificate loaded\n"
        "not ready: key hashivault://release: OpenBao answered 503\n"
    )
    # Liveness does not depend on readiness.
    assert (await client.get("/healthz")).status_code == 200


async def test_a_controller_not_ready_without_a_reason_still_says_so(
    client: httpx.AsyncClient, controller: TableController
) -> None:
    controller.ready = False
    reply = await client.get("/readyz")
    assert (reply.status_code, reply.text) == (503, "not ready: the controller is starting\n")


async def test_a_known_decision_answers_without_deciding_again(
    client: httpx.AsyncClient, controller: TableController
) -> None:
    controller.known = AdmissionDecision.denial("kept from before")
    reply = await client.post("/validate", json=review_document(pod(SIGNED)))
    response = reply.json()["response"]
    assert response["uid"] == UID
    assert response["allowed"] is False
    assert response["status"]["message"] == "kept from before"
    assert controller.reviews == []


async def test_a_failure_looking_up_a_known_decision_is_a_denial(
    client: httpx.AsyncClient, controller: TableController
) -> None:
    controller.known_failure = RuntimeError("a bug")
    reply = await client.post("/validate", json=review_document(pod(SIGNED)))
    assert reply.status_code == 200
    response = reply.json()["response"]
    assert response["allowed"] is False
    assert response["status"]["message"] == FAILED_CLOSED_MESSAGE
