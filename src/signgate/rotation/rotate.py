"""Rotating a registry's signatures from OLD to NEW (the I/O shell around plan.py).

The order (plan, trust both, re-sign, retire OLD, clean) and why it never refuses a signed
image are described in :mod:`signgate.rotation.plan`. Each step is journalled before the run
goes on, so that a run stopped anywhere continues from the journal, and redoing a step that
already happened changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from signgate.errors import Error, PolicyError, UsageError
from signgate.fileio import write_file_atomically
from signgate.keys.model import PublicKey, Signer
from signgate.keys.password import fixed_password
from signgate.keys.refs import load_public_keys
from signgate.policy import parse_policy
from signgate.reference import ImageReference, Repository
from signgate.registry import IMAGE_CONCURRENCY, RegistryClient
from signgate.rotation.inventory import build_inventory
from signgate.rotation.journal import Journal
from signgate.rotation.plan import (
    WorkItem,
    add_key_to_rules,
    clean_id,
    clean_targets,
    remove_key_from_rules,
    replay,
    work_list,
)
from signgate.signatures.attachments import clean
from signgate.signatures.sign import sign_digest
from signgate.signatures.verify import verify_image

# Called with the name of each point the run passes once that point's journal record is
# durable ("plan", "trust", "resign:N", "resign", "retire", "clean:N", "clean"). A test seam:
# a hook that raises stops the run there, as a crash would.
T = TypeVar("T")

Checkpoint = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class RotationKeys:
    """OLD (a public key and how the policy may name it) and NEW (a signer and its reference
    as the policy should name it: a public key file or a KMS URI)."""

    old: PublicKey
    old_ref: str
    new_signer: Signer
    new_ref: str


@dataclass
class RotationReport:
    """``resigned`` counts this run's signatures, ``skipped`` those an earlier run made;
    ``removed`` counts OLD's signatures removed over the whole rotation, as journalled (a
    removal a crash interrupted before its record is done but not counted)."""

    plan: tuple[WorkItem, ...] = ()
    resigned: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    removed: int = 0
    rules_trusting_new: list[str] = field(default_factory=list)
    rules_retired: list[str] = field(default_factory=list)
    seconds: float = 0.0
    finished: bool = False
    retried_responses: int = 0  # 429 and 5xx answers the client retried (filled by the caller)

    def summary(self) -> dict[str, Any]:
        return {
            "work_items": len(self.plan),
            "resigned": self.resigned,
            "skipped": self.skipped,
            "failed": dict(self.failed),
            "signatures_removed": self.removed,
            "rules_trusting_new": self.rules_trusting_new,
            "rules_retired": self.rules_retired,
            "seconds": round(self.seconds, 3),
            "retried_responses": self.retried_responses,
            "finished": self.finished,
        }


async def plan_rotation(
    client: RegistryClient,
    target: str,
    old: PublicKey,
    repositories: Sequence[str] = (),
    concurrency: int = IMAGE_CONCURRENCY,
) -> list[WorkItem]:
    """The work list: one item per signature OLD made (what ``--dry-run`` prints)."""
    inventory = await build_inventory(
        client, target, [old], repositories=repositories, concurrency=concurrency
    )
    return work_list(inventory, old.key_id)


def names_same_key(ref: str, key: PublicKey, key_ref: str) -> bool:
    """Whether the policy's key reference ``ref`` names ``key`` (given as ``key_ref``)."""
    if ref == key_ref:
        return True
    try:
        # No password: a policy names public keys; anything needing one is not this key.
        return key in load_public_keys([ref], fixed_password(b""))
    except Error:
        return False


async def _noop(_: str) -> None:
    return None


async def _run_bounded(
    work: Callable[[T], Coroutine[Any, Any, None]], items: Sequence[T], limit: int
) -> None:
    """``work`` on every item, ``limit`` at a time; the first exception stops them all."""
    semaphore = asyncio.Semaphore(limit)

    async def bounded(item: T) -> None:
        async with semaphore:
            await work(item)

    try:
        async with asyncio.TaskGroup() as group:
            for item in items:
                group.create_task(bounded(item))
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None


class _Rotation:
    def __init__(
        self,
        client: RegistryClient,
        target: str,
        keys: RotationKeys,
        journal: Journal,
        policy_path: Path | None,
        repositories: Sequence[str],
        concurrency: int,
        checkpoint: Checkpoint,
    ) -> None:
        self.client = client
        self.target = target
        self.keys = keys
        self.journal = journal
        self.policy_path = policy_path
        self.repositories = repositories
        self.concurrency = concurrency
        self.checkpoint = checkpoint
        self.report = RotationReport()

    async def run(self) -> RotationReport:
        started = time.monotonic()
        state = replay(self.journal.records)
        header = {
            "type": "start",
            "old": self.keys.old.key_id,
            "new": self.keys.new_signer.public_key().key_id,
            "target": self.target,
        }
        if state.header is None:
            self.journal.append(header)
        elif any(state.header.get(k) != v for k, v in header.items() if k != "type"):
            raise UsageError(
                f"{self.journal.path}: this journal belongs to another rotation "
                f"({state.header.get('target')}); use a new journal file"
            )
        if state.plan is None:
            items = await plan_rotation(
                self.client, self.target, self.keys.old, self.repositories, self.concurrency
            )
            self.journal.append({"type": "plan", "items": [i.to_json() for i in items]})
            state = replay(self.journal.records)
            await self.checkpoint("plan")
        assert state.plan is not None
        self.report.plan = state.plan
        if "trust" not in state.completed:
            self.journal.append({"type": "begin", "phase": "trust"})
            self.report.rules_trusting_new = self._edit_policy(add_key_to_rules)
            self.journal.append({"type": "end", "phase": "trust"})
            await self.checkpoint("trust")
        if "resign" not in state.completed:
            self.journal.append({"type": "begin", "phase": "resign"})
            await self._resign(state.plan, state.resigned)
            if self.report.failed:
                self.report.seconds = time.monotonic() - started
                return self.report
            self.journal.append({"type": "end", "phase": "resign"})
            await self.checkpoint("resign")
        else:
            self.report.skipped = len(state.plan)
        if "retire" not in state.completed:
            self.journal.append({"type": "begin", "phase": "retire"})
            self.report.rules_retired = self._edit_policy(remove_key_from_rules)
            self.journal.append({"type": "end", "phase": "retire"})
            await self.checkpoint("retire")
        self.report.removed = state.removed
        if "clean" not in state.completed:
            self.journal.append({"type": "begin", "phase": "clean"})
            await self._clean(state.plan, state.cleaned)
            if self.report.failed:
                self.report.seconds = time.monotonic() - started
                return self.report
            self.journal.append({"type": "end", "phase": "clean"})
            await self.checkpoint("clean")
        self.report.finished = True
        self.report.seconds = time.monotonic() - started
        return self.report

    def _edit_policy(
        self, edit: Callable[[str, Callable[[str], bool], str, str], tuple[str, list[str]]]
    ) -> list[str]:
        path = self.policy_path
        if path is None:
            return []
        try:
            text = path.read_text(encoding="utf-8")
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except (OSError, UnicodeDecodeError) as e:
            raise PolicyError(f"{path}: cannot read the policy: {e}") from e
        references = parse_policy(text, str(path)).key_references()
        keys = self.keys
        old_refs = {
            r for r in references
            if r != keys.new_ref and names_same_key(r, keys.old, keys.old_ref)
        }
        edited, changed = edit(text, old_refs.__contains__, keys.new_ref, str(path))
        if edited != text:
            try:
                write_file_atomically(path, edited.encode(), mode=mode, overwrite=True)
            except OSError as e:
                raise PolicyError(f"{path}: cannot write the policy: {e.strerror or e}") from e
        return changed

    async def _resign(self, plan: Sequence[WorkItem], done: set[str]) -> None:
        todo = [item for item in plan if item.item_id not in done]
        self.report.skipped = len(plan) - len(todo)
        new_key = self.keys.new_signer.public_key()
        count = 0

        async def one(item: WorkItem) -> None:
            nonlocal count
            reference = ImageReference(Repository.parse(item.repository), digest=item.digest)
            annotations: Mapping[str, str] = dict(item.annotations)
            try:
                await sign_digest(
                    self.client, self.keys.new_signer, reference, item.digest, annotations
                )
                check = await verify_image(self.client, reference, [new_key], annotations)
                if not check.ok:
                    raise UsageError(f"read back: {check.reason()}")
            except Error as e:
                self.report.failed[f"{item.repository}@{item.digest}"] = e.diagnostics()
                return
            self.journal.append({"type": "item", "phase": "resign", "id": item.item_id})
            self.report.resigned += 1
            count += 1
            await self.checkpoint(f"resign:{count}")

        await _run_bounded(one, todo, self.concurrency)

    async def _clean(self, plan: Sequence[WorkItem], done: set[str]) -> None:
        count = 0

        async def one(target: tuple[str, str]) -> None:
            nonlocal count
            repository, digest = target
            reference = ImageReference(Repository.parse(repository), digest=digest)
            try:
                outcomes = await clean(self.client, reference, ["signature"], key=self.keys.old)
            except Error as e:
                self.report.failed[clean_id(repository, digest)] = e.diagnostics()
                return
            removed = sum(max(o.removed, 0) for o in outcomes)
            self.journal.append(
                {"type": "item", "phase": "clean", "id": clean_id(repository, digest),
                 "removed": removed}
            )
            self.report.removed += removed
            count += 1
            await self.checkpoint(f"clean:{count}")

        todo = [t for t in clean_targets(plan) if clean_id(*t) not in done]
        await _run_bounded(one, todo, self.concurrency)


async def rotate(
    client: RegistryClient,
    target: str,
    keys: RotationKeys,
    journal: Journal,
    *,
    policy_path: Path | None = None,
    repositories: Sequence[str] = (),
    concurrency: int = IMAGE_CONCURRENCY,
    checkpoint: Checkpoint | None = None,
) -> RotationReport:
    """Run (or resume, from ``journal``) the rotation of ``target`` from OLD to NEW."""
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    rotation = _Rotation(
        client, target, keys, journal, policy_path, repositories, concurrency,
        checkpoint or _noop,
    )
    return await rotation.run()
