"""inventory and rotate: a registry's signatures, and moving them from one key to another."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from signgate.cli.options import RegistryFlags, registry_options, run
from signgate.errors import UsageError

if TYPE_CHECKING:
    from signgate.rotation.inventory import DigestEntry, Inventory


def _registry_options(registry: RegistryFlags, target: str) -> Any:
    from signgate.reference import ImageReference
    from signgate.rotation.inventory import split_target

    host, _ = split_target(target)
    return registry.options_for([ImageReference.parse(f"{host}/x")])


def _key_label(key_id: str, names: dict[str, str]) -> str:
    return names.get(key_id, key_id)


def _row(entry: DigestEntry, names: dict[str, str]) -> dict[str, Any]:
    return {
        "repository": str(entry.repository),
        "digest": entry.digest,
        "tags": list(entry.tags),
        "index": list(entry.parents),
        "signed": entry.signed,
        "keys": [_key_label(k, names) for k in entry.key_ids],
        "unknown_signatures": entry.unknown_signatures,
    }


def format_inventory(inventory: Inventory, output: str) -> str:
    names = dict(inventory.key_names)
    rows = [_row(e, names) for e in inventory.entries]
    if output == "json":
        return json.dumps(rows, indent=2) + "\n"
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["repository", "digest", "tags", "index", "signed", "keys", "unknown"])
        for r in rows:
            writer.writerow([
                r["repository"], r["digest"], " ".join(r["tags"]), " ".join(r["index"]),
                "yes" if r["signed"] else "no", " ".join(r["keys"]), r["unknown_signatures"],
            ])
        return buffer.getvalue()
    lines = []
    for r in rows:
        keys = ", ".join(r["keys"]) or "-"
        if r["unknown_signatures"]:
            keys += f" (+{r['unknown_signatures']} by other keys)"
        signed = "signed" if r["signed"] else "unsigned"
        tags = ",".join(r["tags"]) or ("(index child)" if r["index"] else "(no tag)")
        lines.append(f"{r['repository']}@{r['digest']}\t{tags}\t{signed}\t{keys}")
    return "\n".join(lines) + ("\n" if lines else "")


@click.command()
@click.option("--key", "key_refs", multiple=True, help="Public key to name signatures by.")
@click.option("--repositories", multiple=True, help="Repository glob (repeatable).")
@click.option(
    "--format", "output", type=click.Choice(["table", "json", "csv"]), default="table",
    show_default=True,
)
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True)
@registry_options
@click.argument("target", metavar="REGISTRY[/PREFIX]")
def inventory(
    key_refs: tuple[str, ...],
    repositories: tuple[str, ...],
    output: str,
    concurrency: int,
    registry: RegistryFlags,
    target: str,
) -> None:
    """List every digest in REGISTRY, its tags, and the keys that signed it."""
    from signgate.keys import load_public_key
    from signgate.keys.refs import display_key_ref
    from signgate.registry import RegistryClient
    from signgate.rotation.inventory import build_inventory

    keys = [load_public_key(ref) for ref in key_refs]
    names = {k.key_id: display_key_ref(ref) for k, ref in zip(keys, key_refs, strict=True)}

    async def walk() -> Inventory:
        async with RegistryClient(_registry_options(registry, target)) as client:
            return await build_inventory(
                client, target, keys, names, repositories, concurrency
            )

    click.echo(format_inventory(run(walk()), output), nl=False)


def _policy_ref_for(new_key: str, new_public_key: str | None) -> str:
    """How the policy names NEW: given, or the ``.pub`` beside a ``.key``, or the reference."""
    if new_public_key:
        return new_public_key
    if new_key.endswith(".key") and "://" not in new_key:
        return new_key[: -len(".key")] + ".pub"
    return new_key


@click.command()
@click.option("--old-key", required=True, help="The key being retired (public or private).")
@click.option("--new-key", required=True, help="The private key that signs from now on.")
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
@click.option("--resume", is_flag=True, help="Continue from the journal (the default anyway).")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--repositories", multiple=True, help="Repository glob (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the work list and stop.")
@click.option("--create-new-key", is_flag=True, help="Create NEW first (KMS or key file).")
@registry_options
@click.argument("target", metavar="REGISTRY[/PREFIX]")
def rotate(
    old_key: str,
    new_key: str,
    new_public_key: str | None,
    policy_path: Path | None,
    journal_path: Path | None,
    resume: bool,
    concurrency: int,
    repositories: tuple[str, ...],
    dry_run: bool,
    create_new_key: bool,
    registry: RegistryFlags,
    target: str,
) -> None:
    """Re-sign everything OLD signed with NEW, in an order that never refuses an image."""
    from signgate.keys import load_public_key, load_signer, password_source
    from signgate.keys.files import generate_key_pair
    from signgate.keys.refs import create_key, split_key_ref
    from signgate.registry import RegistryClient
    from signgate.rotation.journal import Journal
    from signgate.rotation.rotate import RotationKeys, RotationReport, plan_rotation
    from signgate.rotation.rotate import rotate as run_rotation

    old = load_public_key(old_key)
    if dry_run:
        async def plan() -> list[Any]:
            async with RegistryClient(_registry_options(registry, target)) as client:
                return await plan_rotation(client, target, old, repositories, concurrency)

        items = run(plan())
        for item in items:
            annotations = ",".join(f"{k}={v}" for k, v in item.annotations)
            click.echo(f"{item.repository}@{item.digest}\t{annotations}")
        click.echo(f"{len(items)} signatures by OLD to re-sign", err=True)
        return
    if journal_path is None:
        raise UsageError("rotate needs --journal FILE (to resume after a crash)")
    if policy_path is None:
        # Without the policy, nothing makes verifiers trust NEW before OLD's signatures go.
        raise UsageError("rotate needs --policy FILE, the policy the verifiers enforce")
    if resume and not journal_path.exists():
        raise UsageError(f"{journal_path}: no journal to resume")
    if create_new_key:
        scheme, _ = split_key_ref(new_key)
        if scheme:
            create_key(new_key, password_source(confirm=True))
        elif new_key.endswith(".key"):
            if not Path(new_key).exists():  # a resumed run created it already
                generate_key_pair(new_key[: -len(".key")], password_source(confirm=True))
        else:
            raise UsageError("--create-new-key needs a KMS URI or a PREFIX.key file name")
    signer = load_signer(new_key, password_source(confirm=False))
    keys = RotationKeys(old, old_key, signer, _policy_ref_for(new_key, new_public_key))

    retried: list[int | str] = []

    def observe(status: int | str) -> None:
        if status == 429 or (isinstance(status, int) and status in (502, 503, 504)):
            retried.append(status)

    options = replace(_registry_options(registry, target), on_response=observe)

    async def rotate_all() -> RotationReport:
        with Journal(journal_path) as journal:
            async with RegistryClient(options) as client:
                return await run_rotation(
                    client, target, keys, journal, policy_path=policy_path,
                    repositories=repositories, concurrency=concurrency,
                )

    report = run(rotate_all())
    report.retried_responses = len(retried)
    click.echo(json.dumps(report.summary(), indent=2))
    for subject, reason in report.failed.items():
        click.echo(f"signgate: {subject}: {reason}", err=True)
    if not report.finished:
        click.echo(
            "signgate: rotation stopped; fix the failures and run the same command again "
            "to continue from the journal",
            err=True,
        )
        sys.exit(1)
