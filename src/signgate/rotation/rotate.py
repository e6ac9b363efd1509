"""Rotating a registry's signatures from OLD to NEW (the I/O shell around plan.py).

The order (plan, trust both, re-sign, wait for the other shards, retire OLD, clean, disable
OLD) and why it never refuses a signed image are described in :mod:`signgate.rotation.plan`.
Each step is journalled before the run goes on, so that a run stopped anywhere continues from
the journal, and redoing a step that already happened changes nothing.

Signatures in either format are rotated in their format: OLD's classic signatures get classic
ones by NEW, OLD's bundles get bundles by NEW.
"""

from __future__ import annotations

import asyncio
import fcntl
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from signgate.errors import Error, KeyMaterialError, PolicyError, UsageError
from signgate.fileio import write_file_atomically
from signgate.keys.model import PublicKey, Signer
from signgate.keys.password import PasswordSource, fixed_password
from signgate.keys.refs import display_key_ref, load_public_keys, split_key_ref
from signgate.policy import parse_policy
from signgate.reference import ImageReference, Repository
from signgate.registry import IMAGE_CONCURRENCY, RegistryClient
from signgate.rotation.inventory import (
    Progress,
    build_inventory,
    list_repositories,
    no_progress,
    shared_signature_repository,
    split_target,
)
from signgate.rotation.journal import Journal
from signgate.rotation.plan import (
    KeyTest,
    WorkItem,
    add_key_to_rules,
    clean_id,
    clean_targets,
    remove_key_from_rules,
    replay,
    unfinished_items,
    work_list,
)
from signgate.rotation.policy_hook import run_policy_hook
from signgate.rotation.settings import RotationSettings, Shard, new_key_step
from signgate.rotation.verifiers import Verifiers, describe_unconfirmed, wait_for_verifiers
from signgate.signatures.attachments import clean
from signgate.signatures.formats import SignatureFormat
from signgate.signatures.sign import sign_digest, sign_digest_as_bundle
from signgate.signatures.verify import verify_image

T = TypeVar("T")

# Called with the name of each point the run passes once that point's journal record is
# durable ("new-key", "plan", "trust", "trust-hook", "confirm-new", "resign:N", "resign",
# "shards", "retire", "retire-hook", "confirm-old", "clean:N", "clean", "retire-key"). A test
# seam: a checkpoint that raises stops the run there, as a crash would.
Checkpoint = Callable[[str], Awaitable[None]]

# The progress phases a terminal shows, besides INVENTORY.
RESIGN, CLEAN, SHARDS, PROPAGATION = "re-sign", "clean", "other shards", "verifiers"
CONFIRM_NEW, CONFIRM_OLD = "NEW trusted", "OLD dropped"

# What `signgate rotate` waits by default between trusting NEW and removing OLD's signatures
# when no verifier is asked (--verifier): the webhook re-reads KMS keys every 300 s
# (--key-refresh), and a ConfigMap takes about a minute to reach its pods.
DEFAULT_PROPAGATION_DELAY = 360.0


def default_propagation_delay(verifiers: Sequence[str]) -> float:
    """No delay when verifiers confirm the change themselves; otherwise a guess that covers
    the webhook's defaults."""
    return 0.0 if verifiers else DEFAULT_PROPAGATION_DELAY


# How often a shard that has re-signed its share looks at the others' (doubling to the most).
SHARD_POLL_SECONDS = (1.0, 30.0)


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
    shard: Shard | None = None
    repositories: int = 0  # those holding signatures by OLD
    resigned: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    removed: int = 0
    rules_trusting_new: list[str] = field(default_factory=list)
    rules_retired: list[str] = field(default_factory=list)
    waiting_for_shards: list[str] = field(default_factory=list)
    new_key_created: str | None = None
    old_key_disabled: str | None = None
    seconds: float = 0.0
    finished: bool = False
    retried_responses: int = 0  # 429 and 5xx answers the client retried (filled by the caller)

    def summary(self) -> dict[str, Any]:
        by_format = {
            f.value: sum(1 for item in self.plan if f.value in item.formats)
            for f in SignatureFormat
        }
        return {
            "shard": None if self.shard is None else str(self.shard),
            "repositories_signed_by_old": self.repositories,
            "work_items": len(self.plan),
            "work_items_by_format": by_format,
            "resigned": self.resigned,
            "skipped": self.skipped,
            "failed": dict(self.failed),
            "signatures_removed": self.removed,
            "rules_trusting_new": self.rules_trusting_new,
            "rules_retired": self.rules_retired,
            "waiting_for_shards": self.waiting_for_shards,
            "new_key_created": self.new_key_created,
            "old_key_disabled": self.old_key_disabled,
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
    *,
    shard: Shard | None = None,
    progress: Progress | None = None,
) -> list[WorkItem]:
    """The work list: one item per signature OLD made (what ``--dry-run`` prints)."""
    inventory = await build_inventory(
        client, target, [old], repositories=repositories, concurrency=concurrency,
        shard=shard, progress=progress,
    )
    return work_list(inventory, old.key_id)


def names_same_key(ref: str, key: PublicKey, key_ref: str) -> bool:
    """Whether the policy's key reference ``ref`` names ``key`` (given as ``key_ref``)."""
    return ref == key_ref or key.key_id in _key_ids(ref)


def _key_ids(ref: str) -> set[str]:
    """The ids of the keys a verifier loads for ``ref`` (every live version of a KMS key)."""
    try:
        # No password: a policy names public keys; anything needing one is not this key.
        return {k.key_id for k in load_public_keys([ref], fixed_password(b""))}
    except Error:
        return set()


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


@contextmanager
def _policy_lock(policy: Path) -> Iterator[None]:
    """Shards editing one policy file take turns: each edit reads, edits and replaces the file,
    and two at once could undo each other. The lock is on the directory, since the file itself
    is replaced by every edit."""
    try:
        fd = os.open(policy.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise PolicyError(f"{policy}: cannot open its directory: {e.strerror or e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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
        shard: Shard | None,
        disable_old_key: bool,
        shard_wait: float | None,
        propagation_delay: float,
        progress: Progress,
        verifiers: Verifiers | None,
        policy_hook: str | None,
    ) -> None:
        self.client = client
        self.target = target
        self.keys = keys
        self.new_key = keys.new_signer.public_key()
        self.journal = journal
        self.policy_path = policy_path
        self.repositories = repositories
        self.concurrency = concurrency
        self.checkpoint = checkpoint
        self.shard = shard
        self.disable_old_key = disable_old_key
        self.shard_wait = shard_wait
        self.propagation_delay = propagation_delay
        self.progress = progress
        self.verifiers = verifiers if verifiers is not None and verifiers.urls else None
        self.policy_hook = policy_hook
        self.report = RotationReport(shard=shard)
        self._loaded_key_ids: dict[str, set[str]] = {}

    async def run(self) -> RotationReport:
        started = time.monotonic()
        try:
            await self._run()
        finally:
            self.report.seconds = time.monotonic() - started
        return self.report

    async def _run(self) -> None:
        self._check_journal()
        state = replay(self.journal.records)
        if state.new_key is not None and state.new_key.get("created"):
            self.report.new_key_created = str(state.new_key["key_id"])
        if state.plan is None:
            items = await plan_rotation(
                self.client, self.target, self.keys.old, self.repositories, self.concurrency,
                shard=self.shard, progress=self.progress,
            )
            self.journal.append({"type": "plan", "items": [i.to_json() for i in items]})
            state = replay(self.journal.records)
            await self.checkpoint("plan")
        assert state.plan is not None
        self.report.plan = state.plan
        self.report.repositories = len({item.repository for item in state.plan})
        if "trust" not in state.completed:
            self.journal.append({"type": "begin", "phase": "trust"})
            self.report.rules_trusting_new = self._edit_policy(add_key_to_rules)
            self.journal.append({"type": "end", "phase": "trust"})
            await self.checkpoint("trust")
        # Once OLD is retired, the retire step's own hook and confirmation supersede these.
        if "retire" not in state.completed:
            if not await self._deliver_policy("trust", state.completed):
                return
            if not await self._confirm(CONFIRM_NEW, state.completed):
                return
        if "resign" not in state.completed:
            self.journal.append({"type": "begin", "phase": "resign"})
            await self._resign(state.plan, state.resigned)
            if self.report.failed:
                return
            self.journal.append({"type": "end", "phase": "resign"})
            await self.checkpoint("resign")
        else:
            self.report.skipped = len(state.plan)
        if "shards" in state.phases() and "shards" not in state.completed:
            if not await self._wait_for_other_shards():
                return
            self.journal.append({"type": "end", "phase": "shards"})
            await self.checkpoint("shards")
        if "retire" not in state.completed:
            self.journal.append({"type": "begin", "phase": "retire"})
            self.report.rules_retired = self._edit_policy(remove_key_from_rules)
            self.journal.append({"type": "end", "phase": "retire"})
            await self.checkpoint("retire")
        self.report.removed = state.removed
        if "clean" not in state.completed:
            if not await self._deliver_policy("retire", state.completed):
                return
            await self._wait_for_verifiers()
            if not await self._confirm(CONFIRM_OLD, state.completed):
                return
            self.journal.append({"type": "begin", "phase": "clean"})
            await self._clean(state.plan, state.cleaned)
            if self.report.failed:
                return
            self.journal.append({"type": "end", "phase": "clean"})
            await self.checkpoint("clean")
        self.report.old_key_disabled = state.disabled
        if "retire-key" in state.phases() and "retire-key" not in state.completed:
            if not await self._disable_old_key():
                return
            await self.checkpoint("retire-key")
        self.report.finished = True

    def _check_journal(self) -> None:
        """Start the journal, or check that it belongs to this rotation; record NEW's key id."""
        state = replay(self.journal.records)
        registry, _ = split_target(self.target)
        shared = shared_signature_repository(registry)
        header = {
            "type": "start",
            "old": self.keys.old.key_id,
            "old_public_key": self.keys.old.pem().decode("ascii"),
            "target": self.target,
            "shard": None if self.shard is None else str(self.shard),
            "signature_repository": None if shared is None else str(shared),
            "disable_old_key": self.disable_old_key,
        }
        if state.header is None:
            self.journal.append(header)
        else:
            for name in ("old", "target", "shard", "signature_repository", "disable_old_key"):
                if name in state.header and state.header[name] != header[name]:
                    raise UsageError(
                        f"{self.journal.path}: this journal belongs to another rotation "
                        f"(its {name.replace('_', ' ')} was {state.header[name]}, not "
                        f"{header[name]}); use a new journal file"
                    )
        if self.new_key.key_id == self.keys.old.key_id:
            raise UsageError(
                "OLD and NEW are the same key; name a new key (or a new version of the key)"
            )
        recorded = (state.new_key or {}).get("key_id") or (state.header or {}).get("new")
        if recorded is None:
            self.journal.append(
                {"type": "new-key", "key_id": self.new_key.key_id, "created": False}
            )
        elif recorded != self.new_key.key_id:
            raise UsageError(
                f"{self.journal.path}: this rotation signs with the key {recorded}, and "
                f"--new-key is now {self.new_key.key_id}; use a new journal file"
            )

    def _ids(self, ref: str) -> set[str]:
        if ref not in self._loaded_key_ids:
            self._loaded_key_ids[ref] = _key_ids(ref)
        return self._loaded_key_ids[ref]

    def _trusts_old(self, ref: str) -> bool:
        return ref == self.keys.old_ref or self.keys.old.key_id in self._ids(ref)

    def _trusts_new(self, ref: str) -> bool:
        return ref == self.keys.new_ref or self.new_key.key_id in self._ids(ref)

    def _read_policy(self, path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PolicyError(f"{path}: cannot read the policy: {e}") from e

    def _edit_policy(
        self, edit: Callable[[str, KeyTest, str, str, KeyTest], tuple[str, list[str]]]
    ) -> list[str]:
        path = self.policy_path
        if path is None:
            return []
        with _policy_lock(path):
            text = self._read_policy(path)
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except OSError as e:
                raise PolicyError(f"{path}: cannot read the policy: {e.strerror or e}") from e
            edited, changed = edit(
                text, self._trusts_old, self.keys.new_ref, str(path), self._trusts_new
            )
            if edited != text:
                try:
                    write_file_atomically(path, edited.encode(), mode=mode, overwrite=True)
                except OSError as e:
                    raise PolicyError(
                        f"{path}: cannot write the policy: {e.strerror or e}"
                    ) from e
        return changed

    def _policy_trusts_old(self) -> bool:
        """Whether a rule of the policy file still names a key reference that stands for OLD:
        after the retire step, only one that stands for NEW too (a KMS key with both
        versions, which trusts OLD's version until it is disabled)."""
        if self.policy_path is None:
            return False
        policy = parse_policy(self._read_policy(self.policy_path), str(self.policy_path))
        return any(self._trusts_old(ref) for rule in policy.rules for ref in rule.keys)

    async def _deliver_policy(self, step: str, completed: set[str]) -> bool:
        """Run ``--policy-hook`` after the ``step`` edit, unless the journal shows it ran to
        the end; recorded before and after, so that one a crash cut short runs again."""
        phase = f"{step}-hook"
        if self.policy_hook is None or self.policy_path is None or phase in completed:
            return True
        self.journal.append({"type": "begin", "phase": phase})
        try:
            await run_policy_hook(self.policy_hook, self.policy_path, step)
        except Error as e:
            self.report.failed["policy hook"] = e.diagnostics()
            return False
        self.journal.append({"type": "end", "phase": phase})
        await self.checkpoint(phase)
        return True

    async def _confirm(self, which: str, completed: set[str]) -> bool:
        """With ``--verifier``: wait until every verifier trusts NEW (:data:`CONFIRM_NEW`), or
        no longer trusts OLD (:data:`CONFIRM_OLD`); False when one did not confirm in time.

        OLD is waited for only when the policy no longer trusts it. Where the rule names a KMS
        key that stands for OLD's version and NEW's (a key-version rotation), verifiers trust
        OLD's version until ``--disable-old-key`` disables it, after clean: nothing depends on
        that, as NEW was confirmed before re-signing and no signature by OLD is left by then.
        """
        phase = "confirm-new" if which == CONFIRM_NEW else "confirm-old"
        if self.verifiers is None or phase in completed:
            return True
        trusted = which == CONFIRM_NEW
        key = self.new_key if trusted else self.keys.old
        if not trusted and self._policy_trusts_old():
            self.journal.append({
                "type": "end", "phase": phase,
                "skipped": "the policy still trusts OLD through a key reference the retire "
                "step keeps (one that stands for NEW's key version too, until OLD is disabled)",
            })
            return True
        self.journal.append(
            {"type": "begin", "phase": phase, "verifiers": list(self.verifiers.urls)}
        )
        unconfirmed = await wait_for_verifiers(
            self.verifiers, key.key_id, trusted,
            lambda done, total: self.progress(which, done, total),
        )
        if unconfirmed:
            name = f"NEW ({key.key_id})" if trusted else f"OLD ({key.key_id})"
            self.report.failed.update(
                describe_unconfirmed(unconfirmed, name, trusted, self.verifiers.wait_seconds)
            )
            return False
        self.journal.append({"type": "end", "phase": phase})
        await self.checkpoint(phase)
        return True

    async def _sign_with_new(self, item: WorkItem, *, unless_signed: bool = False) -> None:
        """Sign ``item`` with NEW in each format OLD used, read it back and verify it; with
        ``unless_signed``, only where no such signature is there (one lost to a concurrent
        writer of the signature image or of the fallback index is written again)."""
        reference = ImageReference(Repository.parse(item.repository), digest=item.digest)
        annotations: Mapping[str, str] = dict(item.annotations)
        for signature_format in item.formats:
            formats = [signature_format]
            if unless_signed:
                check = await verify_image(
                    self.client, reference, [self.new_key], annotations, formats=formats
                )
                if check.ok:
                    continue
            sign = (
                sign_digest_as_bundle if signature_format == SignatureFormat.BUNDLE
                else sign_digest
            )
            await sign(self.client, self.keys.new_signer, reference, item.digest, annotations)
            check = await verify_image(
                self.client, reference, [self.new_key], annotations, formats=formats
            )
            if not check.ok:
                raise UsageError(f"read back ({signature_format}): {check.reason()}")

    async def _resign(self, plan: Sequence[WorkItem], done: set[str]) -> None:
        todo = [item for item in plan if item.item_id not in done]
        self.report.skipped = len(plan) - len(todo)
        count = attempted = 0
        self.progress(RESIGN, 0, len(todo))

        async def one(item: WorkItem) -> None:
            nonlocal count, attempted
            try:
                await self._sign_with_new(item)
            except Error as e:
                self.report.failed[f"{item.repository}@{item.digest}"] = e.diagnostics()
                return
            finally:
                attempted += 1
                self.progress(RESIGN, attempted, len(todo))
            self.journal.append({"type": "item", "phase": "resign", "id": item.item_id})
            self.report.resigned += 1
            count += 1
            await self.checkpoint(f"resign:{count}")

        await _run_bounded(one, todo, self.concurrency)

    async def _wait_for_other_shards(self) -> bool:
        """Whether every other shard has re-signed its share; with ``shard_wait`` None, waits
        as long as it takes. Retiring OLD before then would refuse their images."""
        assert self.shard is not None
        registry, prefix = split_target(self.target)
        names = await list_repositories(self.client, registry, prefix, self.repositories)
        pending = [name for name in names if not self.shard.holds(name)]
        total = len(pending)
        deadline = None if self.shard_wait is None else time.monotonic() + self.shard_wait
        pause, longest = SHARD_POLL_SECONDS
        while True:
            pending = await self._unfinished_repositories(registry, pending)
            self.progress(SHARDS, total - len(pending), total)
            if not pending:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.report.waiting_for_shards = [f"{registry}/{name}" for name in pending]
                return False
            await asyncio.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, longest)

    async def _unfinished_repositories(self, registry: str, names: list[str]) -> list[str]:
        if not names:
            return []
        inventory = await build_inventory(
            self.client, registry, [self.keys.old, self.new_key], repositories=names,
            concurrency=self.concurrency,
        )
        left = unfinished_items(inventory.entries, self.keys.old.key_id, self.new_key.key_id)
        return sorted({Repository.parse(item.repository).path for item in left})

    async def _wait_for_verifiers(self) -> None:
        """Until ``propagation_delay`` seconds after NEW became trusted (the journalled end of
        ``trust``, which follows NEW's creation): a verifier that has not yet read the new
        policy or KMS key version would refuse an image whose OLD signature is gone."""
        trusted_at = next(
            (float(r["time"]) for r in self.journal.records
             if r.get("type") == "end" and r.get("phase") == "trust"),
            time.time(),
        )
        total = math.ceil(self.propagation_delay)
        while (left := trusted_at + self.propagation_delay - time.time()) > 0:
            self.progress(PROPAGATION, max(0, total - math.ceil(left)), total)
            await asyncio.sleep(min(left, 1.0))
        self.progress(PROPAGATION, total, total)

    async def _clean(self, plan: Sequence[WorkItem], done: set[str]) -> None:
        count = attempted = 0
        items: dict[tuple[str, str], list[WorkItem]] = {}
        for item in plan:
            items.setdefault((item.repository, item.digest), []).append(item)

        async def one(target: tuple[str, str]) -> None:
            nonlocal count, attempted
            repository, digest = target
            reference = ImageReference(Repository.parse(repository), digest=digest)
            try:
                # OLD's signature goes only where NEW's is: another writer of the signature
                # image may have dropped NEW's since it was verified.
                for item in items[target]:
                    await self._sign_with_new(item, unless_signed=True)
                outcomes = await clean(self.client, reference, ["signature"], key=self.keys.old)
            except Error as e:
                self.report.failed[clean_id(repository, digest)] = e.diagnostics()
                return
            finally:
                attempted += 1
                self.progress(CLEAN, attempted, len(todo))
            removed = sum(max(o.removed, 0) for o in outcomes)
            self.journal.append(
                {"type": "item", "phase": "clean", "id": clean_id(repository, digest),
                 "removed": removed}
            )
            self.report.removed += removed
            count += 1
            await self.checkpoint(f"clean:{count}")

        todo = [t for t in clean_targets(plan) if clean_id(*t) not in done]
        self.progress(CLEAN, 0, len(todo))
        await _run_bounded(one, todo, self.concurrency)

    async def _disable_old_key(self) -> bool:
        """Disable (never delete) OLD in its KMS; redone harmlessly after a crash."""
        from signgate.keys.refs import disable_key

        self.journal.append({"type": "begin", "phase": "retire-key"})
        try:
            disabled = await asyncio.to_thread(disable_key, self.keys.old_ref)
        except Error as e:
            self.report.failed[display_key_ref(self.keys.old_ref)] = e.diagnostics()
            return False
        self.journal.append({"type": "end", "phase": "retire-key", "disabled": disabled})
        self.report.old_key_disabled = disabled
        return True


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
    shard: Shard | None = None,
    disable_old_key: bool = False,
    shard_wait: float | None = None,
    propagation_delay: float = 0.0,
    progress: Progress | None = None,
    verifiers: Verifiers | None = None,
    policy_hook: str | None = None,
) -> RotationReport:
    """Run (or resume, from ``journal``) the rotation of ``target`` from OLD to NEW.

    With ``shard``, only that shard's repositories; before retiring OLD it waits (at most
    ``shard_wait`` seconds, None: as long as it takes) until the other shards have re-signed
    theirs, and otherwise stops unfinished with :attr:`RotationReport.waiting_for_shards`.
    OLD's signatures are removed no sooner than ``propagation_delay`` seconds after NEW became
    trusted (the CLI's default is :func:`default_propagation_delay`).

    ``policy_hook`` (a shell command) runs after each edit of ``policy_path``, to deliver it
    to the verifiers. With ``verifiers``, the run waits after trusting NEW until each reports
    NEW's key id, and before clean until none reports OLD's; one that does not within
    ``verifiers.wait_seconds`` stops the run (a failure; run it again to continue).
    """
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    rotation = _Rotation(
        client, target, keys, journal, policy_path, repositories, concurrency,
        checkpoint or _noop, shard, disable_old_key, shard_wait, propagation_delay,
        progress or no_progress, verifiers, policy_hook,
    )
    return await rotation.run()


# -- starting from settings: what the rotate command runs ---------------------------------------


async def prepare_keys(
    journal: Journal,
    settings: RotationSettings,
    password: PasswordSource,
    creation_password: PasswordSource | None = None,
    checkpoint: Checkpoint | None = None,
) -> RotationKeys:
    """Record ``settings`` in a new journal, create NEW if asked (once, however often the run
    is resumed), and load both keys. OLD comes from the journal once recorded: disabling it
    may have made its KMS refuse to show it."""
    state = replay(journal.records)
    header = state.header or {}
    if "old_public_key" in header:
        old = PublicKey.from_pem(str(header["old_public_key"]).encode("ascii"))
    else:
        from signgate.keys.refs import load_public_key

        old = await asyncio.to_thread(load_public_key, settings.old_ref, password)
    if state.header is None:
        journal.append(
            {**settings.header(), "old": old.key_id, "old_public_key": old.pem().decode()}
        )
    if settings.create_new_key:
        await _ensure_new_key(
            journal, settings, old, password, creation_password or password,
            checkpoint or _noop,
        )
    from signgate.keys.refs import load_signer

    signer = await asyncio.to_thread(load_signer, settings.new_ref, password)
    return RotationKeys(old, settings.old_ref, signer, settings.new_policy_ref)


async def _ensure_new_key(
    journal: Journal,
    settings: RotationSettings,
    old: PublicKey,
    password: PasswordSource,
    creation_password: PasswordSource,
    checkpoint: Checkpoint,
) -> None:
    state = replay(journal.records)
    created = state.new_key if state.new_key and state.new_key.get("created") else None
    existing = await asyncio.to_thread(_existing_new_key_id, settings, old, password)
    step = new_key_step(
        None if created is None else str(created["key_id"]),
        state.new_key_creation_begun,
        existing,
    )
    if step == "use":
        return
    if step == "create":
        if not state.new_key_creation_begun:
            journal.append({"type": "begin", "phase": "create-key"})
        key_id = (await asyncio.to_thread(_create_new_key, settings, creation_password)).key_id
    else:
        assert existing is not None
        key_id = existing
    journal.append({
        "type": "new-key", "key_id": key_id, "created": True,
        "ref": display_key_ref(settings.new_ref),
    })
    await checkpoint("new-key")


def _existing_new_key_id(
    settings: RotationSettings, old: PublicKey, password: PasswordSource
) -> str | None:
    """The id of the key NEW names now; None when it does not exist (in a key-version
    rotation: while the key's latest version is still OLD)."""
    from signgate.keys.refs import load_public_key

    ref = settings.new_ref
    if settings.key_version_rotation:
        latest = load_public_key(ref, password).key_id
        return None if latest == old.key_id else latest
    scheme, location = split_key_ref(ref)
    if scheme == "":
        if not ref.endswith(".key"):
            raise UsageError("--create-new-key needs a KMS URI or a PREFIX.key file name")
        if not Path(location).exists():
            return None
        public = Path(location[: -len(".key")] + ".pub")
        if public.exists():
            return PublicKey.from_pem(public.read_bytes()).key_id
        return load_public_key(ref, password).key_id
    if scheme == "env":
        raise UsageError("--create-new-key needs a KMS URI or a PREFIX.key file name")
    try:
        return load_public_key(ref, password).key_id
    except KeyMaterialError:
        return None  # missing, most likely; creating it says what else is wrong


def _create_new_key(settings: RotationSettings, password: PasswordSource) -> PublicKey:
    ref = settings.new_ref
    if settings.key_version_rotation:
        from signgate.keys.refs import add_key_version

        return add_key_version(ref)
    scheme, location = split_key_ref(ref)
    if scheme == "":
        from signgate.keys.files import generate_key_pair

        files = generate_key_pair(location[: -len(".key")], password)
        return PublicKey.from_pem(files.public_key.read_bytes())
    from signgate.keys.refs import create_key

    return create_key(ref, password)
