"""AdmissionReview v1 requests, typed as the Kubernetes JSON is, and the images they carry (pure).

Request fields: https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/#request
Unknown fields are ignored (the API server adds fields over time); missing or mistyped fields the
webhook needs raise :class:`MalformedReview`, which the server answers with HTTP 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cached_property
from typing import Any

from signgate.errors import InvalidReference, MalformedReview
from signgate.reference import ImageReference

API_VERSION = "admission.k8s.io/v1"
REVIEW_KIND = "AdmissionReview"


class Operation(StrEnum):
    CREATE = "CREATE"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    CONNECT = "CONNECT"


_OPERATIONS = {o.value: o for o in Operation}  # a dict look-up costs a fraction of Operation(text)


@dataclass(frozen=True)
class GroupVersionKind:
    group: str
    version: str
    kind: str


@dataclass(frozen=True)
class GroupVersionResource:
    group: str
    version: str
    resource: str


@dataclass(frozen=True)
class UserInfo:
    username: str = ""
    uid: str = ""
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdmissionRequest:
    """``request`` of an AdmissionReview. ``object`` and ``old_object`` are the JSON objects as
    sent (read-only by convention): the object being admitted and, on UPDATE, its stored
    version."""

    uid: str
    kind: GroupVersionKind
    resource: GroupVersionResource
    operation: Operation
    sub_resource: str = ""
    request_kind: GroupVersionKind | None = None
    request_resource: GroupVersionResource | None = None
    request_sub_resource: str = ""
    namespace: str = ""
    name: str = ""
    user_info: UserInfo = UserInfo()
    dry_run: bool = False
    object: Mapping[str, Any] | None = field(default=None, hash=False, repr=False)
    old_object: Mapping[str, Any] | None = field(default=None, hash=False, repr=False)

    @cached_property
    def images(self) -> tuple[ContainerImage, ...]:
        """The images a CREATE or UPDATE would run (:func:`request_images`), found once: the
        app, the controller and :func:`~signgate.webhook.decision.decide` all need them."""
        return tuple(_images_of_request(self))

    @property
    def workload_namespace(self) -> str:
        """The namespace the policy's selectors see: the request's, else the object's."""
        if self.namespace:
            return self.namespace
        metadata = (self.object or {}).get("metadata")
        namespace = metadata.get("namespace") if isinstance(metadata, Mapping) else None
        return namespace if isinstance(namespace, str) else ""


@dataclass(frozen=True)
class AdmissionReview:
    """An AdmissionReview ``admission.k8s.io/v1`` with its request."""

    request: AdmissionRequest


def parse_review_json(body: bytes | str) -> AdmissionReview:
    """Parse a request body; raise :class:`MalformedReview` when it is not a usable review."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise MalformedReview(f"the body is not JSON: {' '.join(str(e).split())}") from e
    return parse_review(document)


def parse_review(document: object) -> AdmissionReview:
    """Type an AdmissionReview decoded from JSON; raise :class:`MalformedReview` naming the
    field when it is not a usable ``admission.k8s.io/v1`` request."""
    review = _mapping(document, "review")
    api_version = review.get("apiVersion")
    if api_version != API_VERSION:
        raise MalformedReview(f"apiVersion: {_shown(api_version)} is not {API_VERSION!r}")
    if review.get("kind") != REVIEW_KIND:
        raise MalformedReview(f"kind: {_shown(review.get('kind'))} is not {REVIEW_KIND!r}")
    if "request" not in review:
        raise MalformedReview("request: missing")
    request = _mapping(review["request"], "request")
    uid = _string(request, "uid", "request")
    if not uid:
        raise MalformedReview("request.uid: missing")
    if "kind" not in request:
        raise MalformedReview("request.kind: missing")
    operation_text = _string(request, "operation", "request")
    operation = _OPERATIONS.get(operation_text)
    if operation is None:
        raise MalformedReview(
            f"request.operation: {_shown(operation_text)} is not one of "
            f"{', '.join(o.value for o in Operation)}"
        )
    kind = _group_version_kind(request["kind"], "request.kind")
    if not kind.kind:
        raise MalformedReview("request.kind.kind: missing")
    user_info = _mapping(request.get("userInfo") or {}, "request.userInfo")
    groups = user_info.get("groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise MalformedReview("request.userInfo.groups: must be a list of strings")
    dry_run = request.get("dryRun") or False
    if not isinstance(dry_run, bool):
        raise MalformedReview("request.dryRun: must be true or false")
    objects = {}
    for key in ("object", "oldObject"):
        value = request.get(key)
        objects[key] = None if value is None else _mapping(value, f"request.{key}")
    if operation in (Operation.CREATE, Operation.UPDATE) and objects["object"] is None:
        raise MalformedReview(f"request.object: missing for {operation.value}")
    return AdmissionReview(
        AdmissionRequest(
            uid=uid,
            kind=kind,
            resource=_group_version_resource(request.get("resource") or {}, "request.resource"),
            operation=operation,
            sub_resource=_string(request, "subResource", "request"),
            request_kind=(
                None
                if request.get("requestKind") is None
                else _group_version_kind(request["requestKind"], "request.requestKind")
            ),
            request_resource=(
                None
                if request.get("requestResource") is None
                else _group_version_resource(request["requestResource"], "request.requestResource")
            ),
            request_sub_resource=_string(request, "requestSubResource", "request"),
            namespace=_string(request, "namespace", "request"),
            name=_string(request, "name", "request"),
            user_info=UserInfo(
                username=_string(user_info, "username", "request.userInfo"),
                uid=_string(user_info, "uid", "request.userInfo"),
                groups=tuple(groups),
            ),
            dry_run=dry_run,
            object=objects["object"],
            old_object=objects["oldObject"],
        )
    )


def review_for_manifest(
    manifest: Mapping[str, Any], *, namespace: str = "default", uid: str = "signgate-check"
) -> AdmissionReview:
    """The CREATE review the API server would send for ``manifest`` (``signgate check``);
    ``namespace`` stands in where the manifest names none."""
    manifest = _mapping(manifest, "manifest")
    api_version = _string(manifest, "apiVersion", "manifest")
    kind = _string(manifest, "kind", "manifest")
    if not api_version or not kind:
        raise MalformedReview("manifest: needs apiVersion and kind")
    group, _, version = api_version.rpartition("/")
    metadata = _mapping(manifest.get("metadata") or {}, "manifest.metadata")
    return AdmissionReview(
        AdmissionRequest(
            uid=uid,
            kind=GroupVersionKind(group, version, kind),
            resource=GroupVersionResource(group, version, kind.lower() + "s"),
            operation=Operation.CREATE,
            namespace=_string(metadata, "namespace", "manifest.metadata") or namespace,
            name=_string(metadata, "name", "manifest.metadata"),
            user_info=UserInfo(username="signgate-check"),
            dry_run=True,
            object=manifest,
        )
    )


def _shown(value: object) -> str:
    """A value from the request as an error message quotes it: bounded, one line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if type(value) is dict:  # what JSON decodes to; the ABC check costs far more per field
        return value
    if not isinstance(value, Mapping):
        raise MalformedReview(f"{path}: must be an object")
    return value


def _string(mapping: Mapping[str, Any], key: str, path: str) -> str:
    value = mapping.get(key)
    if type(value) is str:
        return value
    if value is None:
        return ""
    raise MalformedReview(f"{path}.{key}: must be a string")


# A cluster sends a handful of kinds and resources: each is built once and shared.
_KINDS: dict[tuple[str, str, str], GroupVersionKind] = {}
_RESOURCES: dict[tuple[str, str, str], GroupVersionResource] = {}
_MAX_INTERNED = 1024


def _group_version_kind(value: object, path: str) -> GroupVersionKind:
    mapping = _mapping(value, path)
    key = (
        _string(mapping, "group", path),
        _string(mapping, "version", path),
        _string(mapping, "kind", path),
    )
    kind = _KINDS.get(key)
    if kind is None:
        kind = GroupVersionKind(*key)
        if len(_KINDS) < _MAX_INTERNED:
            _KINDS[key] = kind
    return kind


def _group_version_resource(value: object, path: str) -> GroupVersionResource:
    mapping = _mapping(value, path)
    key = (
        _string(mapping, "group", path),
        _string(mapping, "version", path),
        _string(mapping, "resource", path),
    )
    resource = _RESOURCES.get(key)
    if resource is None:
        resource = GroupVersionResource(*key)
        if len(_RESOURCES) < _MAX_INTERNED:
            _RESOURCES[key] = resource
    return resource


# Where each workload kind keeps its pod spec. EphemeralContainers is the object of the
# pods/ephemeralcontainers subresource before Kubernetes 1.22 (after it, a Pod):
# https://github.com/kubernetes/kubernetes/pull/101034
_POD_TEMPLATE_SPEC = ("spec", "template", "spec")
POD_SPEC_PATHS: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("", "Pod"): ("spec",),
    ("", "EphemeralContainers"): (),
    ("", "ReplicationController"): _POD_TEMPLATE_SPEC,
    ("apps", "Deployment"): _POD_TEMPLATE_SPEC,
    ("apps", "ReplicaSet"): _POD_TEMPLATE_SPEC,
    ("apps", "StatefulSet"): _POD_TEMPLATE_SPEC,
    ("apps", "DaemonSet"): _POD_TEMPLATE_SPEC,
    ("batch", "Job"): _POD_TEMPLATE_SPEC,
    ("batch", "CronJob"): ("spec", "jobTemplate", *_POD_TEMPLATE_SPEC),
}
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")


@dataclass(frozen=True)
class ContainerImage:
    """One container's image: where it sits in the object, as written, and as parsed.

    ``reference`` is None when the text is not a valid reference; ``problem`` says why.
    ``changed`` is False on UPDATE for an image the stored object already had.
    """

    path: tuple[str | int, ...]
    container: str
    image: str
    reference: ImageReference | None
    problem: str | None = None
    changed: bool = True

    @property
    def pointer(self) -> str:
        """The RFC 6901 JSON pointer to the image field."""
        return json_pointer(self.path)

    @property
    def container_list(self) -> str:
        """``containers``, ``initContainers`` or ``ephemeralContainers``."""
        return str(self.path[-3])


def json_pointer(path: Iterable[str | int]) -> str:
    """An RFC 6901 JSON pointer: each segment after ``/``, with ``~`` and ``/`` escaped."""
    return "".join("/" + str(s).replace("~", "~0").replace("/", "~1") for s in path)


def container_images(
    obj: Mapping[str, Any], kind: GroupVersionKind, where: str = "object"
) -> list[ContainerImage]:
    """The images of every container of a workload object, in document order; none for a kind
    that runs no containers. Containers without an image (a template a controller fills in)
    are skipped. ``where`` names the object in :class:`MalformedReview` messages."""
    spec_path = POD_SPEC_PATHS.get((kind.group, kind.kind))
    if spec_path is None:
        return []
    spec: object = _mapping(obj, where)
    for depth, segment in enumerate(spec_path):
        spec = _mapping(spec, ".".join((where, *spec_path[:depth]))).get(segment)
        if spec is None:
            return []
    spec = _mapping(spec, ".".join((where, *spec_path)))
    images = []
    for list_name in CONTAINER_LISTS:
        containers = spec.get(list_name)
        if containers is None:
            continue
        list_path = (*spec_path, list_name)
        if not isinstance(containers, list):
            raise MalformedReview(f"{'.'.join((where, *list_path))}: must be a list")
        for index, container in enumerate(containers):
            if type(container) is not dict:
                container = _mapping(container, _container_path(where, list_path, index))
            image = container.get("image")
            if image is None or image == "":
                continue
            if type(image) is not str:
                raise MalformedReview(
                    f"{_container_path(where, list_path, index)}.image: must be a string"
                )
            name = container.get("name")
            if type(name) is not str:
                name = _string(container, "name", _container_path(where, list_path, index))
            try:
                reference: ImageReference | None = ImageReference.parse(image)
                problem = None
            except InvalidReference as e:
                reference, problem = None, e.diagnostics()
            images.append(
                ContainerImage((*list_path, index, "image"), name, image, reference, problem)
            )
    return images


def _container_path(where: str, list_path: tuple[str, ...], index: int) -> str:
    """How a message names a container, e.g. ``request.object.spec.containers[0]``."""
    return f"{'.'.join((where, *list_path))}[{index}]"


def request_images(request: AdmissionRequest) -> list[ContainerImage]:
    """The images a CREATE or UPDATE would run; none for DELETE and CONNECT.

    Found once per request and kept (:attr:`AdmissionRequest.images`).
    """
    return list(request.images)


def _images_of_request(request: AdmissionRequest) -> list[ContainerImage]:
    """See :func:`request_images`.

    On UPDATE an image whose text the stored object already has anywhere in its pod spec is
    marked unchanged: it was admitted before, so scaling, relabelling or a status update never
    waits for a registry. Moving an image between containers changes nothing that runs.
    """
    if request.operation not in (Operation.CREATE, Operation.UPDATE) or request.object is None:
        return []
    images = container_images(request.object, request.kind, "request.object")
    if request.operation is Operation.UPDATE and request.old_object is not None:
        try:
            before = {
                image.image
                for image in container_images(request.old_object, request.kind, "request.oldObject")
            }
        except MalformedReview:
            before = set()
        images = [replace(image, changed=image.image not in before) for image in images]
    return images


def pin_patch(
    images: Iterable[ContainerImage], digests: Mapping[ImageReference, str]
) -> list[dict[str, str]]:
    """RFC 6902 ``replace`` operations turning each ``name:tag`` whose reference has a digest
    in ``digests`` into ``name:tag@digest``, as written otherwise. Images already given by
    digest are left alone."""
    operations = []
    for image in images:
        reference = image.reference
        if reference is None or reference.digest is not None or reference not in digests:
            continue
        pinned = f"{image.image}@{digests[reference]}"
        ImageReference.parse(pinned)  # a malformed digest raises InvalidReference here
        operations.append({"op": "replace", "path": image.pointer, "value": pinned})
    return operations
