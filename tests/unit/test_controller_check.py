"""``signgate check``'s reading of manifests and its table (pure parts), and its start-up cost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from signgate.cli.check import format_table, objects_in, parse_documents, resources_in
from signgate.errors import UsageError
from tests.unit.test_review import admission_review

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "a", "namespace": "shop"},
    "spec": {"containers": [{"name": "c", "image": "nginx:1.25"}]},
}


def test_json_is_one_document_and_yaml_may_hold_many() -> None:
    assert parse_documents(json.dumps(POD), "pod.json") == [POD]
    yaml_text = "---\nkind: A\n---\n# nothing\n---\nkind: B\n"
    assert parse_documents(yaml_text, "x.yaml") == [{"kind": "A"}, {"kind": "B"}]
    # YAML flow style also starts with "{".
    assert parse_documents("{kind: Pod}", "x.yaml") == [{"kind": "Pod"}]


def test_yaml_errors_name_the_file_and_line() -> None:
    with pytest.raises(UsageError, match=r"^broken.yaml:2: not JSON or YAML"):
        parse_documents("kind: Pod\n  spec: [\n", "broken.yaml")


def test_lists_are_flattened() -> None:
    listing = {"apiVersion": "v1", "kind": "List", "items": [POD, {**POD, "kind": "Pod"}]}
    assert list(objects_in(listing, "x")) == [POD, POD]
    # A typed list from the API leaves kind and apiVersion out of its items.
    typed = {"apiVersion": "v1", "kind": "PodList", "items": [{"metadata": {"name": "b"}}]}
    assert list(objects_in(typed, "x")) == [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b"}}
    ]
    assert list(objects_in([POD, [POD]], "x")) == [POD, POD]
    with pytest.raises(UsageError, match=r"^x\[0\]: not a Kubernetes object"):
        list(objects_in(["text"], "x"))


def test_manifests_become_creates_and_reviews_stay_as_they_are() -> None:
    review = admission_review(POD, operation="UPDATE", old=POD)
    (as_manifest, as_review) = resources_in([POD, review], "f.yaml", namespace="default")
    assert as_manifest.review.request.operation == "CREATE"
    assert as_manifest.name == "Pod shop/a"
    assert as_review.review.request.operation == "UPDATE"
    unnamespaced = {**POD, "metadata": {"generateName": "web-"}}
    (resource,) = resources_in([unnamespaced], "f.yaml", namespace="audit")
    assert resource.name == "Pod audit/web-"
    with pytest.raises(UsageError, match=r"^f.yaml \(document 2\): manifest: needs apiVersion"):
        resources_in([POD, {"metadata": {}}], "f.yaml", namespace="default")


def test_table_aligns_all_columns_but_the_last() -> None:
    table = format_table([("Pod a/b", "nginx", "-", "denied", "why"), ("P", "x", "-", "ok", "")])
    assert table.splitlines() == [
        "RESOURCE  IMAGE  DIGEST  VERDICT  REASON",
        "Pod a/b   nginx  -       denied   why",
        "P         x      -       ok",
    ]


def test_importing_the_command_loads_no_network_yaml_or_metrics_stack() -> None:
    code = (
        "import sys, signgate.cli.main, signgate.cli.check;"
        "print(sorted(m for m in ('httpx', 'cryptography', 'yaml', 'prometheus_client',"
        " 'signgate.webhook.controller') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
