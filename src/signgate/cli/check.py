"""``signgate check``: what the webhook would answer for manifests, without a cluster.

The same admission controller as ``signgate serve`` decides; each manifest is reviewed as the
CREATE the API server would send for it, and AdmissionReview files as they are. A team runs it
on ``kubectl get pods -A -o json`` to audit what already runs before it turns enforcement on.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from signgate.cli.options import RegistryFlags, registry_options, run
from signgate.errors import KeyMaterialError, UsageError

if TYPE_CHECKING:
    from signgate.policy import Policy
    from signgate.registry import RegistryOptions
    from signgate.webhook.decision import AdmissionDecision
    from signgate.webhook.review import AdmissionReview

# Reviews checked at once: distinct images share the client's pool, see IMAGE_CONCURRENCY.
REVIEW_CONCURRENCY = 8
SHORT_DIGEST_LENGTH = len("sha256:") + 12
TABLE_COLUMNS = ("RESOURCE", "IMAGE", "DIGEST", "VERDICT", "REASON")


@dataclass(frozen=True)
class Resource:
    """One object to check, with where it was read."""

    source: str
    review: AdmissionReview

    @property
    def name(self) -> str:
        """``Kind namespace/name`` as a person reads it."""
        request = self.review.request
        name = request.name or _metadata_name(request.object) or "(unnamed)"
        namespace = request.workload_namespace
        where = f"{namespace}/{name}" if namespace else name
        return f"{request.kind.kind} {where}"


@dataclass(frozen=True)
class Checked:
    resource: Resource
    decision: AdmissionDecision


def _metadata_name(obj: Mapping[str, Any] | None) -> str:
    metadata = (obj or {}).get("metadata")
    if isinstance(metadata, Mapping):
        for key in ("name", "generateName"):
            if isinstance(metadata.get(key), str) and metadata[key]:
                return str(metadata[key])
    return ""


def read_documents(path: str) -> list[object]:
    """Every document of a JSON or (multi-document) YAML file; ``-`` is stdin."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text") from e
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_documents(text, path)


def parse_documents(text: str, source: str) -> list[object]:
    """JSON (the output of ``kubectl -o json``) is parsed as JSON, anything else as YAML."""
    if text.lstrip().startswith(("{", "[")):
        try:
            return [json.loads(text)]
        except ValueError:
            pass  # YAML flow style starts with "{" too
    import yaml

    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UsageError(f"{source}{where}: not JSON or YAML: {problem}") from e


def objects_in(document: object, where: str) -> Iterator[Mapping[str, Any]]:
    """The objects of a document: itself, or the items of a ``List`` (``kubectl get -o json``)
    and of typed lists such as ``PodList``, whose items may omit apiVersion and kind."""
    if isinstance(document, list):
        for index, item in enumerate(document):
            yield from objects_in(item, f"{where}[{index}]")
        return
    if not isinstance(document, Mapping):
        raise UsageError(f"{where}: not a Kubernetes object")
    kind = document.get("kind")
    items = document.get("items")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(items, list):
        item_kind = kind.removesuffix("List")
        for index, item in enumerate(items):
            if isinstance(item, Mapping) and item_kind and "kind" not in item:
                item = {"apiVersion": document.get("apiVersion"), "kind": item_kind, **item}
            yield from objects_in(item, f"{where}.items[{index}]")
        return
    yield document


def resources_in(documents: Sequence[object], source: str, namespace: str) -> list[Resource]:
    """The review for each object: AdmissionReviews as written, other objects as the CREATE
    the API server would send (in ``namespace`` when they name none)."""
    from signgate.errors import MalformedReview
    from signgate.webhook.review import REVIEW_KIND, parse_review, review_for_manifest

    resources = []
    for number, document in enumerate(documents, start=1):
        where = f"{source} (document {number})" if len(documents) > 1 else source
        for obj in objects_in(document, where):
            try:
                if obj.get("kind") == REVIEW_KIND:
                    review = parse_review(obj)
                else:
                    review = review_for_manifest(obj, namespace=namespace)
            except MalformedReview as e:
                raise UsageError(f"{where}: {e.diagnostics()}") from e
            resources.append(Resource(source, review))
    return resources


async def check_resources(
    policy: Policy,
    options: RegistryOptions,
    resources: Sequence[Resource],
    deadline_seconds: float,
) -> list[Checked]:
    """Each resource's decision by the webhook's own controller."""
    import asyncio
    import logging

    from signgate.webhook.controller import AdmissionController, ControllerSettings

    # What the webhook logs as warnings (keys not loaded, stale verdicts) is in the results
    # here; only unexpected failures (logged with their traceback) are worth printing too.
    logging.getLogger("signgate.webhook").setLevel(logging.ERROR)

    # Keys are loaded once; nothing runs long enough to refresh them.
    settings = ControllerSettings(deadline_seconds=deadline_seconds, key_refresh_seconds=1e9)
    async with AdmissionController(policy, options, settings) as controller:
        if not controller.ready:
            raise KeyMaterialError("; ".join(controller.readiness_problems()))
        limit = asyncio.Semaphore(REVIEW_CONCURRENCY)

        async def one(resource: Resource) -> Checked:
            async with limit:
                return Checked(resource, await controller.review(resource.review))

        return list(await asyncio.gather(*(one(r) for r in resources)))


def _short(digest: str | None) -> str:
    if not digest:
        return "-"
    return digest[:SHORT_DIGEST_LENGTH]


def table_rows(results: Sequence[Checked]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for result in results:
        decision = result.decision
        for outcome in decision.outcomes:
            rows.append(
                (
                    result.resource.name,
                    outcome.image.image,
                    _short(outcome.digest),
                    outcome.verdict.value,
                    outcome.reason,
                )
            )
        if not decision.allowed and not decision.outcomes:
            rows.append((result.resource.name, "-", "-", "denied", decision.message))
    return rows


def format_table(rows: Sequence[tuple[str, ...]]) -> str:
    all_rows = [TABLE_COLUMNS, *rows]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(TABLE_COLUMNS) - 1)]
    lines = []
    for row in all_rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def json_document(results: Sequence[Checked]) -> dict[str, Any]:
    resources = []
    for result in results:
        request = result.resource.review.request
        decision = result.decision
        resources.append(
            {
                "source": result.resource.source,
                "kind": request.kind.kind,
                "namespace": request.workload_namespace,
                "name": request.name or _metadata_name(request.object),
                "allowed": decision.allowed,
                "message": decision.message,
                "warnings": list(decision.warnings),
                "images": [
                    {
                        "container": outcome.image.container,
                        "image": outcome.image.image,
                        "digest": outcome.digest,
                        "verdict": outcome.verdict.value,
                        "rule": outcome.rule,
                        "reason": outcome.reason,
                    }
                    for outcome in decision.outcomes
                ],
            }
        )
    return {"allowed": all(r.decision.allowed for r in results), "resources": resources}


@click.command()
@click.option(
    "--policy",
    "policy_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The webhook's policy file.",
)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.option(
    "-n",
    "--namespace",
    default="default",
    show_default=True,
    help="Namespace of manifests that name none (rules select namespaces).",
)
@click.option(
    "--timeout",
    "timeout_seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds each resource may take, as the webhook's deadline.",
)
@registry_options
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, allow_dash=True)
)
def check(
    policy_path: Path,
    output: str,
    namespace: str,
    timeout_seconds: float,
    registry: RegistryFlags,
    files: tuple[str, ...],
) -> None:
    """Check what the webhook would answer for the workloads in FILE(s): manifests (YAML or
    JSON, multi-document, List objects such as `kubectl get pods -A -o json`) or
    AdmissionReview files; `-` reads stdin. Exits 1 if anything would be refused."""
    from signgate.policy import load_policy
    from signgate.webhook.review import request_images

    policy = load_policy(policy_path)
    resources = [
        resource
        for path in files
        for resource in resources_in(read_documents(path), path, namespace)
    ]
    references = [
        image.reference
        for resource in resources
        for image in request_images(resource.review.request)
        if image.reference is not None
    ]
    results = run(
        check_resources(policy, registry.options_for(references), resources, timeout_seconds)
    )
    if output == "json":
        click.echo(json.dumps(json_document(results), indent=2))
    else:
        rows = table_rows(results)
        if rows:
            click.echo(format_table(rows))
    refused = sum(not r.decision.allowed for r in results)
    images = sum(len(r.decision.outcomes) for r in results)
    click.echo(
        f"{len(results)} resource{'s' if len(results) != 1 else ''}, "
        f"{images} image{'s' if images != 1 else ''}: "
        f"{refused} resource{'s' if refused != 1 else ''} would be refused",
        err=True,
    )
    if refused:
        sys.exit(1)
