"""A stand-in for kube-apiserver calling admission webhooks: no API server can run here.

:class:`ApiServerStandIn` does what the API server's admission chain does with a webhook
(https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/):

- builds an AdmissionReview ``admission.k8s.io/v1`` request from a real manifest: a fresh uid,
  kind/resource and requestKind/requestResource, subResource, operation, userInfo, object and
  oldObject as each operation carries them, dryRun, and the operation's options;
- POSTs it over TLS to the webhook's path with ``?timeout=Ns``, verifying the server against
  the webhook's caBundle, and gives up after ``timeoutSeconds`` as the API server does;
- checks the response as the API server does (a 200 AdmissionReview v1 of the same uid with a
  boolean ``allowed``; a patch only from a mutating webhook, and only of type JSONPatch), and
  raises :class:`WebhookCallFailed` otherwise: with ``failurePolicy: Fail`` that refuses the
  request;
- applies a mutating webhook's JSONPatch to the object, then sends the patched object to the
  validating webhook (:meth:`ApiServerStandIn.admit`).
"""

from __future__ import annotations

import base64
import copy
import json
import ssl
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

API_VERSION = "admission.k8s.io/v1"
REVIEW_KIND = "AdmissionReview"

# kind -> (group, plural resource) of the workload kinds signgate admits.
RESOURCES: Mapping[str, tuple[str, str]] = {
    "Pod": ("", "pods"),
    "ReplicationController": ("", "replicationcontrollers"),
    "Deployment": ("apps", "deployments"),
    "ReplicaSet": ("apps", "replicasets"),
    "StatefulSet": ("apps", "statefulsets"),
    "DaemonSet": ("apps", "daemonsets"),
    "Job": ("batch", "jobs"),
    "CronJob": ("batch", "cronjobs"),
}

OPTIONS_KIND = {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions", "DELETE": "DeleteOptions"}

DEFAULT_USER = {
    "username": "system:serviceaccount:kube-system:replicaset-controller",
    "uid": "5d3c1b9e-6f0e-4c55-9d43-7a4b5f6c0e11",
    "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system",
               "system:authenticated"],
}


class WebhookCallFailed(Exception):
    """The API server could not use the webhook's answer (``failurePolicy: Fail`` refuses)."""


@dataclass(frozen=True)
class WebhookCall:
    """One call: the review sent and the ``response`` the webhook returned."""

    review: dict[str, Any]
    response: dict[str, Any]

    @property
    def uid(self) -> str:
        uid: str = self.review["request"]["uid"]
        return uid

    @property
    def allowed(self) -> bool:
        allowed: bool = self.response["allowed"]
        return allowed

    @property
    def message(self) -> str:
        message: str = (self.response.get("status") or {}).get("message", "")
        return message

    @property
    def warnings(self) -> list[str]:
        warnings: list[str] = self.response.get("warnings") or []
        return warnings

    @property
    def patch(self) -> list[dict[str, Any]] | None:
        """The decoded JSONPatch, or None when the webhook sent none."""
        if "patch" not in self.response:
            return None
        operations: list[dict[str, Any]] = json.loads(base64.b64decode(self.response["patch"]))
        return operations


@dataclass(frozen=True)
class Admission:
    """What the admission chain did: the mutating call, the object after its patch, and the
    validating call on that object (None when the mutating webhook refused already)."""

    mutating: WebhookCall
    admitted_object: dict[str, Any] | None
    validating: WebhookCall | None = None

    @property
    def allowed(self) -> bool:
        return self.validating is not None and self.validating.allowed


@dataclass
class ApiServerStandIn:
    """Calls a webhook at ``base_url`` as kube-apiserver would; use as a context manager."""

    base_url: str
    ca_bundle: Path
    timeout_seconds: float = 10.0
    validate_path: str = "/validate"
    mutate_path: str = "/mutate"
    user_info: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_USER))
    _client: httpx.Client = field(init=False, repr=False)

    def __post_init__(self) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        self._client = httpx.Client(
            base_url=self.base_url, verify=context, timeout=self.timeout_seconds
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ApiServerStandIn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Building requests ------------------------------------------------------------------------

    def review_for(
        self,
        manifest: Mapping[str, Any],
        operation: str = "CREATE",
        *,
        old: Mapping[str, Any] | None = None,
        sub_resource: str = "",
        dry_run: bool = False,
        namespace: str = "default",
    ) -> dict[str, Any]:
        """The AdmissionReview the API server sends for ``operation`` on ``manifest``.

        CREATE carries the object; UPDATE the object and ``old``; DELETE only ``oldObject``
        (``manifest``, the stored object). ``sub_resource`` is e.g. ``ephemeralcontainers``
        (an UPDATE of the pod, ``old`` the pod before).
        """
        kind = manifest["kind"]
        group, _, version = manifest["apiVersion"].rpartition("/")
        resource_group, resource = RESOURCES[kind]
        assert group == resource_group, f"{kind} is in group {resource_group!r}, not {group!r}"
        metadata = manifest.get("metadata") or {}
        namespace = metadata.get("namespace") or namespace
        obj: dict[str, Any] | None = _with_namespace(manifest, namespace)
        old_obj = None if old is None else _with_namespace(old, namespace)
        if operation == "DELETE":
            obj, old_obj = None, obj
        elif operation == "UPDATE" and old_obj is None:
            raise ValueError("an UPDATE carries the stored object: pass old=")
        gvk = {"group": group, "version": version, "kind": kind}
        gvr = {"group": group, "version": version, "resource": resource}
        options: dict[str, Any] | None = None
        if operation in OPTIONS_KIND:
            options = {"apiVersion": "meta.k8s.io/v1", "kind": OPTIONS_KIND[operation]}
            if dry_run:
                options["dryRun"] = ["All"]
            if operation == "DELETE":
                options["propagationPolicy"] = "Background"
            else:
                options["fieldManager"] = "kubectl-client-side-apply"
        request: dict[str, Any] = {
            "uid": str(uuid.uuid4()),
            "kind": gvk,
            "resource": gvr,
            "requestKind": dict(gvk),
            "requestResource": dict(gvr),
            "name": metadata.get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": copy.deepcopy(dict(self.user_info)),
            "object": obj,
            "oldObject": old_obj,
            "dryRun": dry_run,
            "options": options,
        }
        if sub_resource:
            request["subResource"] = sub_resource
            request["requestSubResource"] = sub_resource
        return {"apiVersion": API_VERSION, "kind": REVIEW_KIND, "request": request}

    # Calling the webhook ----------------------------------------------------------------------

    def call(self, path: str, review: Mapping[str, Any], *, mutating: bool) -> WebhookCall:
        """POST ``review`` and check the answer as the API server does."""
        body = json.dumps(review).encode()
        try:
            reply = self._client.post(
                path,
                params={"timeout": f"{self.timeout_seconds:g}s"},
                content=body,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
        except httpx.TimeoutException as e:
            raise WebhookCallFailed(
                f"failed calling webhook: context deadline exceeded ({e!r})"
            ) from e
        except httpx.TransportError as e:
            raise WebhookCallFailed(f"failed calling webhook: {e!r}") from e
        if reply.status_code != 200:
            raise WebhookCallFailed(
                f"failed calling webhook: HTTP {reply.status_code}: {reply.text.strip()}"
            )
        try:
            document = reply.json()
        except ValueError as e:
            raise WebhookCallFailed(f"the webhook's answer is not JSON: {e}") from e
        response = check_response(document, review["request"]["uid"], mutating=mutating)
        return WebhookCall(copy.deepcopy(dict(review)), response)

    def validate(self, manifest: Mapping[str, Any], operation: str = "CREATE",
                 **request: Any) -> WebhookCall:
        """Send a review of ``manifest`` to the validating path."""
        review = self.review_for(manifest, operation, **request)
        return self.call(self.validate_path, review, mutating=False)

    def mutate(self, manifest: Mapping[str, Any], operation: str = "CREATE",
               **request: Any) -> WebhookCall:
        """Send a review of ``manifest`` to the mutating path."""
        review = self.review_for(manifest, operation, **request)
        return self.call(self.mutate_path, review, mutating=True)

    def admit(self, manifest: Mapping[str, Any], operation: str = "CREATE",
              **request: Any) -> Admission:
        """The admission chain: the mutating webhook, its patch applied, then the validating
        webhook on the patched object."""
        mutating = self.mutate(manifest, operation, **request)
        if not mutating.allowed:
            return Admission(mutating, None)
        obj = mutating.review["request"]["object"]
        patched = apply_json_patch(obj, mutating.patch or [])
        validating = self.validate(patched, operation, **request)
        return Admission(mutating, patched, validating)

    def post_raw(self, path: str, body: bytes | Iterable[bytes],
                 headers: Mapping[str, str] | None = None) -> httpx.Response:
        """Send any body over the same TLS connection pool (what no API server would send)."""
        return self._client.post(path, content=body, headers=dict(headers or {}))

    def get(self, path: str) -> httpx.Response:
        return self._client.get(path)


def check_response(document: Any, uid: str, *, mutating: bool) -> dict[str, Any]:
    """The ``response`` of a webhook's AdmissionReview, checked as the API server checks it
    (k8s.io/apiserver/pkg/admission/plugin/webhook/request/admissionreview.go)."""
    if not isinstance(document, dict):
        raise WebhookCallFailed("the webhook's answer is not an object")
    if document.get("apiVersion") != API_VERSION or document.get("kind") != REVIEW_KIND:
        raise WebhookCallFailed(
            f"expected webhook response of {API_VERSION}, Kind={REVIEW_KIND}, got "
            f"{document.get('apiVersion')}, Kind={document.get('kind')}"
        )
    response = document.get("response")
    if not isinstance(response, dict):
        raise WebhookCallFailed("webhook response was absent")
    if response.get("uid") != uid:
        raise WebhookCallFailed(f"expected response.uid={uid!r}, got {response.get('uid')!r}")
    if not isinstance(response.get("allowed"), bool):
        raise WebhookCallFailed(f"response.allowed is not a boolean: {response.get('allowed')!r}")
    status = response.get("status")
    if status is not None and not isinstance(status, dict):
        raise WebhookCallFailed("response.status is not an object")
    warnings = response.get("warnings")
    if warnings is not None and (
        not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings)
    ):
        raise WebhookCallFailed("response.warnings is not a list of strings")
    has_patch = "patch" in response or "patchType" in response
    if has_patch and not mutating:
        raise WebhookCallFailed("validating webhook may not return a patch")
    if has_patch:
        if response.get("patchType") != "JSONPatch":
            raise WebhookCallFailed(
                f"unsupported patchType {response.get('patchType')!r}: only JSONPatch"
            )
        try:
            operations = json.loads(base64.b64decode(response["patch"], validate=True))
        except (KeyError, ValueError, TypeError) as e:
            raise WebhookCallFailed(f"response.patch is not base64 JSON: {e}") from e
        if not isinstance(operations, list):
            raise WebhookCallFailed("response.patch is not a JSON array of operations")
    return response


def apply_json_patch(document: Any, operations: Iterable[Mapping[str, Any]]) -> Any:
    """RFC 6902 ``add``, ``remove``, ``replace`` and ``test`` on a copy of ``document``
    (``move`` and ``copy`` are refused: the webhook has no use for them)."""
    result = copy.deepcopy(document)
    for operation in operations:
        op = operation["op"]
        *parents, last = _pointer_segments(operation["path"])
        target = result
        for segment in parents:
            target = target[_index(target, segment)]
        if op == "test":
            if target[_index(target, last)] != operation["value"]:
                raise WebhookCallFailed(f"patch test failed at {operation['path']}")
        elif op == "replace":
            target[_index(target, last)] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del target[_index(target, last)]
        elif op == "add":
            value = copy.deepcopy(operation["value"])
            if isinstance(target, list):
                position = len(target) if last == "-" else int(last)
                if not 0 <= position <= len(target):
                    raise WebhookCallFailed(f"patch add out of range at {operation['path']}")
                target.insert(position, value)
            else:
                target[last] = value
        else:
            raise WebhookCallFailed(f"patch operation {op!r} is not supported by the stand-in")
    return result


def _pointer_segments(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise WebhookCallFailed(f"patch path {pointer!r} is not a JSON pointer")
    return [s.replace("~1", "/").replace("~0", "~") for s in pointer[1:].split("/")]


def _index(target: Any, segment: str) -> Any:
    if isinstance(target, list):
        if not segment.isdigit() or int(segment) >= len(target):
            raise WebhookCallFailed(f"patch path segment {segment!r} is not in the list")
        return int(segment)
    if not isinstance(target, dict) or segment not in target:
        raise WebhookCallFailed(f"patch path segment {segment!r} does not exist")
    return segment


def _with_namespace(manifest: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    """The object as the API server hands it on: a copy with its namespace filled in."""
    obj = copy.deepcopy(dict(manifest))
    obj.setdefault("metadata", {})["namespace"] = namespace
    return obj
