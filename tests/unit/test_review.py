"""AdmissionReview v1 parsing, the images of each workload kind, UPDATE changes and pin patches."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from signgate.errors import Error, MalformedReview
from signgate.reference import ImageReference
from signgate.webhook.review import (
    AdmissionReview,
    ContainerImage,
    GroupVersionKind,
    GroupVersionResource,
    Operation,
    container_images,
    json_pointer,
    parse_review,
    parse_review_json,
    pin_patch,
    request_images,
    review_for_manifest,
)

DIGEST_A = "sha256:" + "a1" * 32
DIGEST_B = "sha256:" + "b2" * 32
DIGEST_C = "sha256:" + "c3" * 32

POD = """
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  initContainers:
    - name: migrate
      image: registry.example.com/team/migrate:2.3.1
      command: [/migrate, up]
  containers:
    - name: web
      image: registry.example.com/team/web:1.4.0
      ports: [{containerPort: 8080}]
    - name: proxy
      image: nginx:1.25
  ephemeralContainers:
    - name: debugger
      image: busybox:1.36
      targetContainerName: web
"""

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      initContainers:
        - name: migrate
          image: registry.example.com/team/migrate:2.3.1
      containers:
        - name: web
          image: registry.example.com/team/web:1.4.0
          resources: {limits: {memory: 256Mi}}
"""

REPLICA_SET = """
apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: web-7d4b9c, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: registry.example.com/team/web:1.4.0
"""

STATEFUL_SET = """
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: shop}
spec:
  serviceName: db
  replicas: 3
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
        - name: postgres
          image: docker.io/library/postgres:16.3
          volumeMounts: [{name: data, mountPath: /var/lib/postgresql/data}]
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        accessModes: [ReadWriteOnce]
        resources: {requests: {storage: 10Gi}}
"""

DAEMON_SET = """
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: node-exporter, namespace: monitoring}
spec:
  selector: {matchLabels: {app: node-exporter}}
  template:
    metadata: {labels: {app: node-exporter}}
    spec:
      hostNetwork: true
      containers:
        - name: node-exporter
          image: quay.io/prometheus/node-exporter:v1.8.1
"""

JOB = """
apiVersion: batch/v1
kind: Job
metadata: {name: backfill, namespace: shop}
spec:
  backoffLimit: 2
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: backfill
          image: registry.example.com/team/backfill@DIGEST_C
""".replace("DIGEST_C", DIGEST_C)

REPLICATION_CONTROLLER = """
apiVersion: v1
kind: ReplicationController
metadata: {name: legacy, namespace: shop}
spec:
  replicas: 1
  selector: {app: legacy}
  template:
    metadata: {labels: {app: legacy}}
    spec:
      containers:
        - name: legacy
          image: localhost:5000/legacy
"""

CRON_JOB = """
apiVersion: batch/v1
kind: CronJob
metadata: {name: report, namespace: shop}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          initContainers:
            - name: fetch
              image: registry.example.com/team/fetch:0.9
          containers:
            - name: report
              image: registry.example.com/team/report:3.0.0
"""

TEMPLATE = ("spec", "template", "spec")

# (manifest, [(path to the image, container, image)])
WORKLOADS: dict[str, tuple[str, list[tuple[tuple[str | int, ...], str, str]]]] = {
    "Pod": (
        POD,
        [
            (("spec", "containers", 0, "image"), "web", "registry.example.com/team/web:1.4.0"),
            (("spec", "containers", 1, "image"), "proxy", "nginx:1.25"),
            (
                ("spec", "initContainers", 0, "image"),
                "migrate",
                "registry.example.com/team/migrate:2.3.1",
            ),
            (("spec", "ephemeralContainers", 0, "image"), "debugger", "busybox:1.36"),
        ],
    ),
    "Deployment": (
        DEPLOYMENT,
        [
            ((*TEMPLATE, "containers", 0, "image"), "web", "registry.example.com/team/web:1.4.0"),
            (
                (*TEMPLATE, "initContainers", 0, "image"),
                "migrate",
                "registry.example.com/team/migrate:2.3.1",
            ),
        ],
    ),
    "ReplicaSet": (
        REPLICA_SET,
        [((*TEMPLATE, "containers", 0, "image"), "web", "registry.example.com/team/web:1.4.0")],
    ),
    "StatefulSet": (
        STATEFUL_SET,
        [((*TEMPLATE, "containers", 0, "image"), "postgres", "docker.io/library/postgres:16.3")],
    ),
    "DaemonSet": (
        DAEMON_SET,
        [
            (
                (*TEMPLATE, "containers", 0, "image"),
                "node-exporter",
                "quay.io/prometheus/node-exporter:v1.8.1",
            )
        ],
    ),
    "Job": (
        JOB,
        [
            (
                (*TEMPLATE, "containers", 0, "image"),
                "backfill",
                "registry.example.com/team/backfill@" + DIGEST_C,
            )
        ],
    ),
    "ReplicationController": (
        REPLICATION_CONTROLLER,
        [((*TEMPLATE, "containers", 0, "image"), "legacy", "localhost:5000/legacy")],
    ),
    "CronJob": (
        CRON_JOB,
        [
            (
                ("spec", "jobTemplate", *TEMPLATE, "containers", 0, "image"),
                "report",
                "registry.example.com/team/report:3.0.0",
            ),
            (
                ("spec", "jobTemplate", *TEMPLATE, "initContainers", 0, "image"),
                "fetch",
                "registry.example.com/team/fetch:0.9",
            ),
        ],
    ),
}


def manifest(text: str) -> dict[str, Any]:
    document = yaml.safe_load(text)
    assert isinstance(document, dict)
    return document


def admission_review(
    obj: dict[str, Any] | None,
    *,
    operation: str = "CREATE",
    old: dict[str, Any] | None = None,
    sub_resource: str = "",
    uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002",
) -> dict[str, Any]:
    """An AdmissionReview v1 request as the API server sends it for ``obj`` (or ``old``)."""
    subject = obj if obj is not None else old
    assert subject is not None
    group, _, version = subject["apiVersion"].rpartition("/")
    kind = {"group": group, "version": version, "kind": subject["kind"]}
    resource_name = "pods" if subject["kind"] == "EphemeralContainers" else None
    resource = {
        "group": group,
        "version": version,
        "resource": resource_name or subject["kind"].lower() + "s",
    }
    metadata = subject.get("metadata", {})
    options_kind = {
        "CREATE": "CreateOptions",
        "UPDATE": "UpdateOptions",
        "DELETE": "DeleteOptions",
        "CONNECT": "PodExecOptions",
    }[operation]
    request: dict[str, Any] = {
        "uid": uid,
        "kind": kind,
        "resource": resource,
        "requestKind": kind,
        "requestResource": resource,
        "name": metadata.get("name", ""),
        "namespace": metadata.get("namespace", "default"),
        "operation": operation,
        "userInfo": {
            "username": "system:serviceaccount:kube-system:replicaset-controller",
            "uid": "b5a4d2c1-0f3e-4b6a-9c8d-7e6f5a4b3c2d",
            "groups": ["system:serviceaccounts", "system:authenticated"],
        },
        "object": obj,
        "oldObject": old,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": options_kind},
    }
    if sub_resource:
        request["subResource"] = sub_resource
        request["requestSubResource"] = sub_resource
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def apply_replace_patch(document: Any, operations: list[dict[str, Any]]) -> Any:
    """A tiny RFC 6902 applier for ``replace`` (the path must exist) with RFC 6901 unescaping."""
    result = copy.deepcopy(document)
    for operation in operations:
        assert operation["op"] == "replace", operation
        assert operation["path"].startswith("/"), operation
        segments = [
            s.replace("~1", "/").replace("~0", "~") for s in operation["path"].split("/")[1:]
        ]
        target = result
        for segment in segments[:-1]:
            target = target[int(segment)] if isinstance(target, list) else target[segment]
        last: Any = segments[-1]
        if isinstance(target, list):
            last = int(last)
            assert 0 <= last < len(target), operation
        else:
            assert last in target, operation
        target[last] = operation["value"]
    return result


def test_parse_review_types_every_field() -> None:
    document = admission_review(manifest(POD))
    document["request"]["dryRun"] = True
    review = parse_review(document)
    request = review.request
    assert request.uid == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert request.kind == GroupVersionKind("", "v1", "Pod")
    assert request.resource == GroupVersionResource("", "v1", "pods")
    assert request.request_kind == GroupVersionKind("", "v1", "Pod")
    assert request.request_resource == GroupVersionResource("", "v1", "pods")
    assert request.sub_resource == ""
    assert request.operation is Operation.CREATE
    assert (request.namespace, request.name) == ("shop", "web")
    assert request.user_info.username == "system:serviceaccount:kube-system:replicaset-controller"
    assert request.user_info.groups == ("system:serviceaccounts", "system:authenticated")
    assert request.dry_run is True
    assert request.object == manifest(POD)
    assert request.old_object is None
    assert request.workload_namespace == "shop"


def test_parse_review_json_and_immutability() -> None:
    body = json.dumps(admission_review(manifest(DEPLOYMENT))).encode()
    review = parse_review_json(body)
    assert review.request.kind.kind == "Deployment"
    with pytest.raises(AttributeError):
        review.request.uid = "other"  # type: ignore[misc]


def _without(path: str) -> Any:
    def edit(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = document
        for key in parents:
            target = target[key]
        del target[last]

    return edit


def _set(path: str, value: Any) -> Any:
    def edit(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = document
        for key in parents:
            target = target[key]
        target[last] = value

    return edit


MALFORMED = [
    (_set("apiVersion", "admission.k8s.io/v1beta1"),
     "apiVersion: 'admission.k8s.io/v1beta1' is not 'admission.k8s.io/v1'"),
    (_without("apiVersion"), "apiVersion: None is not 'admission.k8s.io/v1'"),
    (_set("kind", "AdmissionResponse"), "kind: 'AdmissionResponse' is not 'AdmissionReview'"),
    (_set("kind", "A" * 1000), "kind: '" + "A" * 76 + "... is not 'AdmissionReview'"),
    (_without("request"), "request: missing"),
    (_set("request", [1, 2]), "request: must be an object"),
    (_without("request.uid"), "request.uid: missing"),
    (_set("request.uid", ""), "request.uid: missing"),
    (_set("request.uid", 42), "request.uid: must be a string"),
    (_set("request.operation", "PATCH"),
     "request.operation: 'PATCH' is not one of CREATE, UPDATE, DELETE, CONNECT"),
    (_without("request.operation"),
     "request.operation: '' is not one of CREATE, UPDATE, DELETE, CONNECT"),
    (_without("request.kind"), "request.kind: missing"),
    (_set("request.kind", "Pod"), "request.kind: must be an object"),
    (_set("request.kind", {"group": "", "version": "v1"}), "request.kind.kind: missing"),
    (_set("request.object", None), "request.object: missing for CREATE"),
    (_set("request.object", ["not", "an", "object"]), "request.object: must be an object"),
    (_set("request.dryRun", "yes"), "request.dryRun: must be true or false"),
    (_set("request.userInfo", {"username": "x", "groups": "admins"}),
     "request.userInfo.groups: must be a list of strings"),
    (_set("request.namespace", 7), "request.namespace: must be a string"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "reason"), MALFORMED)
def test_malformed_reviews_are_refused_with_a_reason(edit: Any, reason: str) -> None:
    document = admission_review(manifest(POD))
    edit(document)
    with pytest.raises(MalformedReview) as caught:
        parse_review(document)
    assert caught.value.diagnostics() == reason
    assert isinstance(caught.value, Error)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "the body is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (b"{\"apiVersion\": ", "the body is not JSON: Expecting value: line 1 column 16 (char 15)"),
        (b'{"a": "\xff"}',
         "the body is not JSON: 'utf-8' codec can't decode byte 0xff in position 7: invalid start "
         "byte"),
        (b"[]", "review: must be an object"),
        (b"null", "review: must be an object"),
    ],
)  # fmt: skip
def test_bodies_that_are_not_reviews(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedReview) as caught:
        parse_review_json(body)
    assert caught.value.diagnostics() == reason


@pytest.mark.parametrize("kind", WORKLOADS)
def test_images_of_each_workload_kind(kind: str) -> None:
    text, expected = WORKLOADS[kind]
    review = parse_review(admission_review(manifest(text)))
    images = request_images(review.request)
    assert [(i.path, i.container, i.image) for i in images] == expected
    assert all(i.changed for i in images)
    assert [i.reference for i in images] == [
        ImageReference.parse(image) for _, _, image in expected
    ]


@pytest.mark.parametrize(
    ("apiVersion", "kind"),
    [
        ("v1", "ConfigMap"),
        ("v1", "Service"),
        ("autoscaling/v1", "Scale"),
        ("example.com/v1", "Pod"),  # a custom resource that happens to be called Pod
        ("extensions/v1beta1", "Deployment"),  # removed in Kubernetes 1.16
    ],
)
def test_kinds_without_containers_have_no_images(apiVersion: str, kind: str) -> None:
    obj = {
        "apiVersion": apiVersion,
        "kind": kind,
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "a", "image": "nginx"}]},
    }
    assert request_images(parse_review(admission_review(obj)).request) == []


def test_invalid_image_is_reported_not_raised() -> None:
    pod = manifest(POD)
    pod["spec"]["containers"][1]["image"] = "Nginx:latest"
    pod["spec"]["containers"].append({"name": "idless", "image": "nginx:bad tag"})
    images = request_images(parse_review(admission_review(pod)).request)
    bad = [i for i in images if i.reference is None]
    assert [(i.container, i.problem) for i in bad] == [
        (
            "proxy",
            "invalid image reference 'Nginx:latest': repository name 'library/Nginx' must be "
            "lowercase",
        ),
        (
            "idless",
            "invalid image reference 'nginx:bad tag': invalid tag 'bad tag' (want up to 128 "
            "letters, digits, '_', '.' or '-', not starting with '.' or '-')",
        ),
    ]


def test_containers_without_image_are_skipped() -> None:
    deployment = manifest(DEPLOYMENT)
    del deployment["spec"]["template"]["spec"]["initContainers"][0]["image"]
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = ""
    assert request_images(parse_review(admission_review(deployment)).request) == []
    del deployment["spec"]["template"]
    assert request_images(parse_review(admission_review(deployment)).request) == []


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_set("spec", "nope"), "request.object.spec: must be an object"),
        (_set("spec.containers", {"name": "web"}),
         "request.object.spec.containers: must be a list"),
        (_set("spec.containers", ["web"]), "request.object.spec.containers[0]: must be an object"),
        (_set("spec.initContainers", [{"name": "m", "image": 3}]),
         "request.object.spec.initContainers[0].image: must be a string"),
        (_set("spec.containers", [{"name": 3, "image": "nginx"}]),
         "request.object.spec.containers[0].name: must be a string"),
    ],
)  # fmt: skip
def test_malformed_pod_specs(edit: Any, reason: str) -> None:
    pod = manifest(POD)
    edit(pod)
    review = parse_review(admission_review(pod))
    with pytest.raises(MalformedReview) as caught:
        request_images(review.request)
    assert caught.value.diagnostics() == reason


def test_template_spec_malformed_names_the_template() -> None:
    cron_job = manifest(CRON_JOB)
    cron_job["spec"]["jobTemplate"]["spec"]["template"] = []
    review = parse_review(admission_review(cron_job))
    with pytest.raises(
        MalformedReview,
        match=r"^request\.object\.spec\.jobTemplate\.spec\.template: must be an object$",
    ):
        request_images(review.request)  # fmt: skip


def _changed(review: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(i.image, i.changed) for i in request_images(parse_review(review).request)]


def test_update_scale_down_changes_no_image() -> None:
    old = manifest(DEPLOYMENT)
    new = copy.deepcopy(old)
    new["spec"]["replicas"] = 0
    assert _changed(admission_review(new, operation="UPDATE", old=old)) == [
        ("registry.example.com/team/web:1.4.0", False),
        ("registry.example.com/team/migrate:2.3.1", False),
    ]


def test_update_with_a_new_tag_changes_that_image_only() -> None:
    old = manifest(DEPLOYMENT)
    new = copy.deepcopy(old)
    new["spec"]["template"]["spec"]["containers"][0]["image"] = (
        "registry.example.com/team/web:1.5.0"
    )
    assert _changed(admission_review(new, operation="UPDATE", old=old)) == [
        ("registry.example.com/team/web:1.5.0", True),
        ("registry.example.com/team/migrate:2.3.1", False),
    ]


def test_update_unpinning_a_pinned_image_is_a_change() -> None:
    old = manifest(REPLICA_SET)
    old["spec"]["template"]["spec"]["containers"][0]["image"] += "@" + DIGEST_A
    new = manifest(REPLICA_SET)
    assert _changed(admission_review(new, operation="UPDATE", old=old)) == [
        ("registry.example.com/team/web:1.4.0", True)
    ]


def test_update_moving_an_image_between_containers_is_no_change() -> None:
    old = manifest(POD)
    new = copy.deepcopy(old)
    containers = new["spec"]["containers"]
    containers[0]["image"], containers[1]["image"] = containers[1]["image"], containers[0]["image"]
    assert all(
        not changed for _, changed in _changed(admission_review(new, operation="UPDATE", old=old))
    )


def test_update_with_a_malformed_stored_object_verifies_everything() -> None:
    old = manifest(POD)
    old["spec"]["containers"] = "broken"
    assert all(
        changed
        for _, changed in _changed(admission_review(manifest(POD), operation="UPDATE", old=old))
    )


def test_update_without_old_object_verifies_everything() -> None:
    assert all(
        changed for _, changed in _changed(admission_review(manifest(POD), operation="UPDATE"))
    )


def test_ephemeral_containers_subresource_on_a_pod() -> None:
    """Kubernetes 1.22+: ``kubectl debug`` updates pods/ephemeralcontainers with the whole Pod."""
    old = manifest(POD)
    del old["spec"]["ephemeralContainers"]
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"] = [
        {"name": "debugger-x7k2p", "image": "busybox:1.36", "targetContainerName": "web"}
    ]
    document = admission_review(
        new, operation="UPDATE", old=old, sub_resource="ephemeralcontainers"
    )
    review = parse_review(document)
    assert review.request.sub_resource == "ephemeralcontainers"
    new_images = [i for i in request_images(review.request) if i.changed]
    assert [(i.pointer, i.container, i.image) for i in new_images] == [
        ("/spec/ephemeralContainers/0/image", "debugger-x7k2p", "busybox:1.36")
    ]
    assert new_images[0].container_list == "ephemeralContainers"


def test_ephemeral_containers_subresource_before_kubernetes_1_22() -> None:
    """The object was an EphemeralContainers, holding only the ephemeral containers."""
    old: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "EphemeralContainers",
        "metadata": {"name": "web", "namespace": "shop"},
        "ephemeralContainers": [{"name": "debugger-a", "image": "busybox:1.36"}],
    }
    new = copy.deepcopy(old)
    new["ephemeralContainers"].append({"name": "debugger-b", "image": "alpine:3.20"})
    review = parse_review(
        admission_review(new, operation="UPDATE", old=old, sub_resource="ephemeralcontainers")
    )
    assert review.request.kind == GroupVersionKind("", "v1", "EphemeralContainers")
    assert [(i.pointer, i.image, i.changed) for i in request_images(review.request)] == [
        ("/ephemeralContainers/0/image", "busybox:1.36", False),
        ("/ephemeralContainers/1/image", "alpine:3.20", True),
    ]


@pytest.mark.parametrize("operation", ["DELETE", "CONNECT"])
def test_delete_and_connect_carry_nothing_to_check(operation: str) -> None:
    pod = manifest(POD)
    document = admission_review(None, operation=operation, old=pod)
    review = parse_review(document)
    assert review.request.operation == operation
    assert request_images(review.request) == []


def test_review_for_manifest_is_the_create_the_api_server_would_send() -> None:
    review = review_for_manifest(manifest(CRON_JOB))
    request = review.request
    assert request.kind == GroupVersionKind("batch", "v1", "CronJob")
    assert request.resource == GroupVersionResource("batch", "v1", "cronjobs")
    assert (request.operation, request.namespace, request.name) == (
        Operation.CREATE,
        "shop",
        "report",
    )
    assert [i.image for i in request_images(request)] == [
        image for _, _, image in WORKLOADS["CronJob"][1]
    ]
    pod = manifest(POD)
    del pod["metadata"]["namespace"]
    request = review_for_manifest(pod, namespace="elsewhere").request
    assert (request.kind, request.namespace) == (GroupVersionKind("", "v1", "Pod"), "elsewhere")
    with pytest.raises(MalformedReview, match="needs apiVersion and kind"):
        review_for_manifest({"metadata": {}})


def test_workload_namespace_falls_back_to_the_object() -> None:
    document = admission_review(manifest(POD))
    del document["request"]["namespace"]
    assert parse_review(document).request.workload_namespace == "shop"
    del document["request"]["object"]["metadata"]["namespace"]
    assert parse_review(document).request.workload_namespace == ""


@pytest.mark.parametrize(
    ("path", "pointer"),
    [
        ((), ""),
        (("spec", "containers", 0, "image"), "/spec/containers/0/image"),
        (("a/b", "m~n", "~1"), "/a~1b/m~0n/~01"),
        (("",), "/"),
    ],
)
def test_json_pointer_escapes_per_rfc_6901(path: tuple[str | int, ...], pointer: str) -> None:
    assert json_pointer(path) == pointer


def test_escaped_pointers_reach_their_target() -> None:
    document = {"a/b": {"m~n": ["x", "y"]}}
    patch = [{"op": "replace", "path": json_pointer(("a/b", "m~n", 1)), "value": "z"}]
    assert apply_replace_patch(document, patch) == {"a/b": {"m~n": ["x", "z"]}}


@pytest.mark.parametrize("kind", WORKLOADS)
def test_pin_patch_pins_every_tag_of_each_kind(kind: str) -> None:
    text, expected = WORKLOADS[kind]
    obj = manifest(text)
    images = request_images(parse_review(admission_review(obj)).request)
    digests = {i.reference: DIGEST_A for i in images if i.reference is not None}
    patched = apply_replace_patch(obj, pin_patch(images, digests))
    after = {
        i.image for i in container_images(patched, parse_review(admission_review(obj)).request.kind)
    }
    want = {image if "@" in image else f"{image}@{DIGEST_A}" for _, _, image in expected}
    assert after == want
    assert all(ImageReference.parse(image).digest for image in after)


def test_pin_patch_skips_digests_and_unverified_images() -> None:
    pod = manifest(POD)
    pod["spec"]["containers"][1]["image"] = "nginx:1.25@" + DIGEST_C
    images = request_images(parse_review(admission_review(pod)).request)
    web = ImageReference.parse("registry.example.com/team/web:1.4.0")
    nginx = ImageReference.parse("nginx:1.25@" + DIGEST_C)
    patch = pin_patch(images, {web: DIGEST_A, nginx: DIGEST_B})
    assert patch == [
        {
            "op": "replace",
            "path": "/spec/containers/0/image",
            "value": "registry.example.com/team/web:1.4.0@" + DIGEST_A,
        }
    ]
    patched = apply_replace_patch(pod, patch)
    assert [c["image"] for c in patched["spec"]["containers"]] == [
        "registry.example.com/team/web:1.4.0@" + DIGEST_A,
        "nginx:1.25@" + DIGEST_C,
    ]
    assert patched["spec"]["initContainers"] == pod["spec"]["initContainers"]


def test_pin_patch_keeps_the_image_as_written() -> None:
    image = ContainerImage(
        ("spec", "containers", 0, "image"), "web", "nginx", ImageReference.parse("nginx")
    )
    assert pin_patch([image], {ImageReference.parse("docker.io/library/nginx"): DIGEST_B}) == [
        {"op": "replace", "path": "/spec/containers/0/image", "value": "nginx@" + DIGEST_B}
    ]


def test_pin_patch_refuses_a_malformed_digest() -> None:
    image = ContainerImage(
        ("spec", "containers", 0, "image"), "web", "nginx", ImageReference.parse("nginx")
    )
    with pytest.raises(Error, match="invalid digest"):
        pin_patch([image], {ImageReference.parse("nginx"): "sha256:nothex"})


def test_reviews_compare_by_value() -> None:
    document = admission_review(manifest(JOB))
    assert parse_review(document) == parse_review(copy.deepcopy(document))
    assert isinstance(parse_review(document), AdmissionReview)
