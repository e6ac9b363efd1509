"""inventory and rotate: a registry's signatures, and moving them from one key to another."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from signgate.cli.options import RegistryFlags, registry_options, run
from signgate.errors import UsageError

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

    from signgate.rotation.inventory import DigestEntry, Inventory, Progress
    from signgate.rotation.settings import Shard


def _registry_options(registry: RegistryFlags, target: str) -> Any:
    from signgate.reference import ImageReference
    from signgate.rotation.inventory import split_target

    host, _ = split_target(target)
    return registry.options_for([ImageReference.parse(f"{host}/x")])


def _key_label(key_id: str, names: dict[str, str]) -> str:
    return names.get(key_id, key_id)


def _row(entry: DigestEntry, names: dict[str, str]) -> dict[str, Any]:
    formats = entry.formats()
    return {
        "repository": str(entry.repository),
        "digest": entry.digest,
        "tags": list(entry.tags),
        "index": list(entry.parents),
        "signed": entry.signed,
        "keys": [_key_label(k, names) for k in entry.key_ids],
        # Per key: the formats of its signatures (classic: a .sig image; bundle: cosign 3's).
        "formats": {
            _key_label(k, names): [str(f) for f in formats[k]] for k in entry.key_ids
        },
        "unknown_signatures": entry.unknown_signatures,
        "unknown_formats": [str(f) for f in formats.get(None, ())],
    }


def _key_with_formats(key: str, formats: list[str]) -> str:
    return f"{key} [{'+'.join(formats)}]"


def format_inventory(inventory: Inventory, output: str) -> str:
    names = dict(inventory.key_names)
    rows = [_row(e, names) for e in inventory.entries]
    if output == "json":
        return json.dumps(rows, indent=2) + "\n"
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(
            ["repository", "digest", "tags", "index", "signed", "keys", "formats", "unknown"]
        )
        for r in rows:
            writer.writerow([
                r["repository"], r["digest"], " ".join(r["tags"]), " ".join(r["index"]),
                "yes" if r["signed"] else "no", " ".join(r["keys"]),
                " ".join(f"{k}={'+'.join(f)}" for k, f in r["formats"].items()),
                r["unknown_signatures"],
            ])
        return buffer.getvalue()
    lines = []
    for r in rows:
        keys = ", ".join(_key_with_formats(k, f) for k, f in r["formats"].items()) or "-"
        if r["unknown_signatures"]:
            keys += f" (+{r['unknown_signatures']} by other keys)"
        signed = "signed" if r["signed"] else "unsigned"
        tags = ",".join(r["tags"]) or ("(index child)" if r["index"] else "(no tag)")
        lines.append(f"{r['repository']}@{r['digest']}\t{tags}\t{signed}\t{keys}")
    return "\n".join(lines) + ("\n" if lines else "")


class TerminalProgress:
    """One progress bar per phase on a terminal (stderr), so that stdout stays the report."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._bar: ProgressBar[int] | None = None
        self._phase: tuple[str, int] | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self._phase != (phase, total):
            self.close()
            self._phase = (phase, total)
            if total > 0:
                self._bar = click.progressbar(
                    length=total, label=f"{phase:<13}", file=self._stream, show_pos=True,
                )
                self._bar.__enter__()
        if self._bar is not None and done > self._bar.pos:
            self._bar.update(done - self._bar.pos)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.render_finish()
            self._bar = None


@contextmanager
def terminal_progress() -> Iterator[Progress | None]:
    """Progress bars when stderr is a terminal; None (nothing drawn) otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    progress = TerminalProgress(sys.stderr)
    try:
        yield progress
    finally:
        progress.close()


def _shard(text: str | None) -> Shard | None:
    from signgate.rotation.settings import parse_shard

    return None if text is None else parse_shard(text)


SHARD_HELP = (
    "Only shard I of N: the repositories whose name hashes to I (0 <= I < N), so that N "
    "workers share a registry."
)


@click.command()
@click.option("--key", "key_refs", multiple=True, help="Public key to name signatures by.")
@click.option("--repositories", multiple=True, help="Repository glob (repeatable).")
@click.option(
    "--format", "output", type=click.Choice(["table", "json", "csv"]), default="table",
    show_default=True,
)
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--shard", "shard_text", metavar="I/N", default=None, help=SHARD_HELP)
@registry_options
@click.argument("target", metavar="REGISTRY[/PREFIX]")
def inventory(
    key_refs: tuple[str, ...],
    repositories: tuple[str, ...],
    output: str,
    concurrency: int,
    shard_text: str | None,
    registry: RegistryFlags,
    target: str,
) -> None:
    """List every digest in REGISTRY, its tags, and the keys that signed it."""
    from signgate.keys import load_public_key
    from signgate.keys.refs import display_key_ref
    from signgate.registry import RegistryClient
    from signgate.rotation.inventory import build_inventory

    shard = _shard(shard_text)
    keys = [load_public_key(ref) for ref in key_refs]
    names = {k.key_id: display_key_ref(ref) for k, ref in zip(keys, key_refs, strict=True)}

    async def walk(progress: Progress | None) -> Inventory:
        async with RegistryClient(_registry_options(registry, target)) as client:
            return await build_inventory(
                client, target, keys, names, repositories, concurrency,
                shard=shard, progress=progress,
            )

    with terminal_progress() as progress:
        found = run(walk(progress))
    click.echo(format_inventory(found, output), nl=False)


def _policy_ref_for(new_key: str, new_public_key: str | None) -> str:
    """How the policy names NEW: given, or the ``.pub`` beside a ``.key``, or the reference."""
    if new_public_key:
        return new_public_key
    if new_key.endswith(".key") and "://" not in new_key:
        return new_key[: -len(".key")] + ".pub"
    return new_key


def _absolute_key_ref(ref: str | None) -> str | None:
    """A key file's reference as an absolute path, so that a resumed run finds it from any
    directory; other references as given."""
    from signgate.keys.refs import split_key_ref

    if ref is None or split_key_ref(ref)[0]:
        return ref
    return os.path.abspath(ref)


def _normal_target(target: str | None) -> str | None:
    from signgate.rotation.inventory import split_target

    if target is None:
        return None
    host, prefix = split_target(target)
    return f"{host}/{prefix}" if prefix else host


def _signature_repository() -> str | None:
    from signgate.reference import Repository

    value = os.environ.get("COSIGN_REPOSITORY")
    return str(Repository.parse(value)) if value else None


@click.command()
@click.option("--old-key", default=None, help="The key being retired (public or private).")
@click.option("--new-key", default=None, help="The private key that signs from now on.")
@click.option(
    "--new-public-key", default=None,
    help="How the policy names NEW (default: NEW.pub beside NEW.key, or the KMS URI).",
)
@click.option(
    "--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="The policy file the verifiers enforce: NEW is added, then OLD removed, in place.",
)
@click.option(
    "--journal", "journal_path", type=click.Path(dir_okay=False, path_type=Path),
    help="Where each step is recorded; run the same command again to continue from it.",
)
@click.option(
    "--resume", is_flag=True,
    help="Continue the rotation the journal records; the options it was started with are "
    "read from the journal.",
)
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--repositories", multiple=True, help="Repository glob (repeatable).")
@click.option("--shard", "shard_text", metavar="I/N", default=None, help=SHARD_HELP)
@click.option(
    "--shard-wait", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
    help="With --shard: how long to wait for the other shards to re-sign before retiring "
    "OLD (default: as long as it takes; 0: stop, and continue when run again).",
)
@click.option(
    "--propagation-delay", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
    help="How long the verifiers take to see a policy change or a new KMS key version: "
    "OLD's signatures are removed no sooner than this after NEW became trusted (default: "
    "0 with --verifier, which confirms instead, else 360; a resumed run keeps the first "
    "run's).",
)
@click.option(
    "--verifier", "verifiers", multiple=True, metavar="URL",
    help="A webhook replica's metrics URL (https, or http on loopback; repeatable): the run "
    "waits until each trusts NEW before re-signing, and no longer trusts OLD before clean.",
)
@click.option(
    "--verifier-cacert", type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None, metavar="FILE", help="CA certificate (PEM) of the verifiers' TLS.",
)
@click.option(
    "--verifier-wait", type=click.FloatRange(min=0), default=900.0, show_default=True,
    metavar="SECONDS",
    help="How long to wait for the verifiers to confirm; then the run stops (exit 1), and "
    "the same command continues it.",
)
@click.option(
    "--policy-hook", default=None, metavar="CMD",
    help="Shell command run after each policy edit (trust NEW, retire OLD) with "
    "SIGNGATE_POLICY set to the policy file: delivers it to the verifiers, e.g. kubectl "
    "apply of their ConfigMap. Its failure stops the run; it runs again on resume.",
)
@click.option("--dry-run", is_flag=True, help="Print the work list and stop.")
@click.option("--create-new-key", is_flag=True, help="Create NEW first (KMS or key file).")
@click.option(
    "--disable-old-key", is_flag=True,
    help="Last, disable (never delete) OLD in its KMS.",
)
@registry_options
@click.argument("target", metavar="[REGISTRY[/PREFIX]]", required=False)
def rotate(
    old_key: str | None,
    new_key: str | None,
    new_public_key: str | None,
    policy_path: Path | None,
    journal_path: Path | None,
    resume: bool,
    concurrency: int,
    repositories: tuple[str, ...],
    shard_text: str | None,
    shard_wait: float | None,
    propagation_delay: float | None,
    verifiers: tuple[str, ...],
    verifier_cacert: Path | None,
    verifier_wait: float,
    policy_hook: str | None,
    dry_run: bool,
    create_new_key: bool,
    disable_old_key: bool,
    registry: RegistryFlags,
    target: str | None,
) -> None:
    """Re-sign everything OLD signed with NEW, in an order that never refuses an image."""
    from signgate.keys import load_public_key, password_source
    from signgate.registry import RegistryClient
    from signgate.rotation.journal import Journal
    from signgate.rotation.plan import replay
    from signgate.rotation.rotate import (
        RotationReport,
        default_propagation_delay,
        plan_rotation,
        prepare_keys,
    )
    from signgate.rotation.rotate import rotate as run_rotation
    from signgate.rotation.settings import (
        GivenSettings,
        check_disable_old_key,
        check_key_version_refs,
        resolve_settings,
    )
    from signgate.rotation.verifiers import Verifiers, verifier_urls

    shard = _shard(shard_text)
    verifier_urls(verifiers)
    if old_key is not None:
        check_disable_old_key(old_key, disable_old_key)
    if old_key is not None and new_key is not None:
        check_key_version_refs(old_key, new_key)
    if dry_run:
        if old_key is None or target is None:
            raise UsageError("rotate --dry-run needs --old-key and REGISTRY[/PREFIX]")
        old = load_public_key(old_key)
        scope = target

        async def plan(progress: Progress | None) -> list[Any]:
            async with RegistryClient(_registry_options(registry, scope)) as client:
                return await plan_rotation(
                    client, scope, old, repositories, concurrency, shard=shard,
                    progress=progress,
                )

        with terminal_progress() as progress:
            items = run(plan(progress))
        for item in items:
            annotations = ",".join(f"{k}={v}" for k, v in item.annotations)
            formats = "+".join(item.formats)
            click.echo(f"{item.repository}@{item.digest}\t{formats}\t{annotations}")
        click.echo(f"{len(items)} signatures by OLD to re-sign", err=True)
        return
    if journal_path is None:
        raise UsageError("rotate needs --journal FILE (to resume after a crash)")
    if resume and not journal_path.exists():
        raise UsageError(f"{journal_path}: no journal to resume")
    given = GivenSettings(
        target=_normal_target(target),
        old_ref=_absolute_key_ref(old_key),
        new_ref=_absolute_key_ref(new_key),
        new_policy_ref=(
            _policy_ref_for(new_key, new_public_key) if new_key else new_public_key
        ),
        policy=None if policy_path is None else str(policy_path.resolve()),
        shard=shard,
        repositories=repositories,
        signature_repository=_signature_repository(),
        create_new_key=create_new_key,
        disable_old_key=disable_old_key,
        verifiers=verifiers,
        verifier_cacert=None if verifier_cacert is None else str(verifier_cacert.resolve()),
        policy_hook=policy_hook,
        propagation_delay=propagation_delay,
    )
    retried: list[int | str] = []

    def observe(status: int | str) -> None:
        if status == 429 or (isinstance(status, int) and status in (502, 503, 504)):
            retried.append(status)

    with Journal(journal_path) as journal:
        if resume and not journal.records:
            raise UsageError(f"{journal_path}: no rotation to resume")
        settings = resolve_settings(replay(journal.records).header, given, str(journal_path))
        options = replace(_registry_options(registry, settings.target), on_response=observe)
        cacert = settings.verifier_cacert
        confirming = Verifiers(
            settings.verifiers, None if cacert is None else Path(cacert), verifier_wait
        )
        delay = (
            default_propagation_delay(settings.verifiers) if settings.propagation_delay is None
            else settings.propagation_delay
        )

        async def rotate_all(progress: Progress | None) -> RotationReport:
            keys = await prepare_keys(
                journal, settings, password_source(confirm=False),
                password_source(confirm=True),
            )
            async with RegistryClient(options) as client:
                return await run_rotation(
                    client, settings.target, keys, journal,
                    policy_path=Path(settings.policy), repositories=settings.repositories,
                    concurrency=concurrency, shard=settings.shard,
                    disable_old_key=settings.disable_old_key, shard_wait=shard_wait,
                    propagation_delay=delay, progress=progress, verifiers=confirming,
                    policy_hook=settings.policy_hook,
                )

        with terminal_progress() as progress:
            report = run(rotate_all(progress))
    report.retried_responses = len(retried)
    click.echo(json.dumps(report.summary(), indent=2))
    for subject, reason in report.failed.items():
        click.echo(f"signgate: {subject}: {reason}", err=True)
    if report.waiting_for_shards:
        click.echo(
            f"signgate: shard {settings.shard} has re-signed its share; "
            f"{len(report.waiting_for_shards)} repositories of other shards still carry "
            "signatures by OLD alone, so OLD stays trusted; run the same command again "
            "once those shards have re-signed",
            err=True,
        )
    elif not report.finished:
        click.echo(
            "signgate: rotation stopped; fix the failures and run the same command again "
            "to continue from the journal",
            err=True,
        )
    if not report.finished:
        sys.exit(1)
