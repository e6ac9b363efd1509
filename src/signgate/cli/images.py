"""sign, verify, triangulate, tree, clean: the commands that work on images in a registry."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, get_args

import click

from signgate.cli.options import RegistryFlags, registry_options, run
from signgate.errors import InvalidReference, UsageError
from signgate.reference import ImageReference
from signgate.signatures.formats import DEFAULT_SIGN_FORMAT, SIGNATURE_FORMATS, SignatureFormat

if TYPE_CHECKING:
    from signgate.signatures.sign import SignOutcome

ANNOTATION_HELP = "Annotation k=v: with sign, added to the payload; with verify, required."
FORMAT_CHOICES = [str(f) for f in SIGNATURE_FORMATS]


def parse_annotations(pairs: Sequence[str]) -> dict[str, str]:
    annotations = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"annotation {pair!r} is not of the form key=value")
        annotations[name] = value
    return annotations


def parse_reference(image: str) -> ImageReference:
    """An image named on the command line; a malformed one is a usage error (exit 2)."""
    try:
        return ImageReference.parse(image)
    except InvalidReference as e:
        raise UsageError(e.diagnostics()) from e


def parse_references(images: Sequence[str]) -> list[ImageReference]:
    return [parse_reference(image) for image in images]


def failure_line(reference: ImageReference, reason: str) -> str:
    """``reference: reason``, naming the image once when the reason already starts with it."""
    if reason.startswith(f"{reference}:"):
        return reason
    return f"{reference}: {reason}"


@click.command()
@click.option("--key", "key_ref", required=True, help="Private key: file, env://VAR or KMS URI.")
@click.option("-a", "--annotations", "annotations", multiple=True, help=ANNOTATION_HELP)
@click.option("--recursive", is_flag=True, help="Also sign every image of a multi-platform index.")
@click.option("-y", "--yes", is_flag=True, help="Accepted for cosign compatibility; never asks.")
@click.option(
    "--tlog-upload",
    type=click.BOOL,
    default=False,
    show_default=True,
    help="signgate signs offline; only false is accepted.",
)
@click.option(
    "--format", "signature_format", type=click.Choice(FORMAT_CHOICES),
    default=str(DEFAULT_SIGN_FORMAT), show_default=True,
    help="bundle: cosign 3's Sigstore bundle referrer (cosign 2 cannot verify it); "
    "classic: cosign 2's sha256-HEX.sig image.",
)
@registry_options
@click.argument("images", nargs=-1, required=True)
def sign(
    key_ref: str,
    annotations: tuple[str, ...],
    recursive: bool,
    yes: bool,
    tlog_upload: bool,
    signature_format: str,
    registry: RegistryFlags,
    images: tuple[str, ...],
) -> None:
    """Sign IMAGE(s) by digest and push the signatures beside them."""
    from signgate.keys import load_signer, password_source
    from signgate.registry import RegistryClient
    from signgate.signatures.sign import sign_images

    if tlog_upload:
        raise UsageError("signgate does not upload to a transparency log; use --tlog-upload=false")
    wanted = parse_annotations(annotations)
    references = parse_references(images)
    signer = load_signer(key_ref, password_source(confirm=False))

    for reference in references:
        if reference.digest is None:
            click.echo(
                f"Note: {reference} names a tag; signgate signs the digest it resolves to now. "
                "Sign by digest to be sure which image you sign.",
                err=True,
            )

    async def sign_all() -> list[SignOutcome]:
        async with RegistryClient(registry.options_for(references)) as client:
            return await sign_images(
                client, signer, references, wanted, recursive,
                signature_format=SignatureFormat(signature_format),
            )

    failures = 0
    for outcome in run(sign_all()):
        if outcome.error is not None:
            failures += 1
            click.echo(f"signgate: {failure_line(outcome.reference, outcome.error)}", err=True)
        for signed in outcome.signed:
            verb = "Already signed" if signed.already_signed else "Pushed signature"
            click.echo(
                f"{verb}: {signed.reference.repository}@{signed.digest} -> "
                f"{signed.signature_location}",
                err=True,
            )
    if failures:
        sys.exit(1)


@click.command()
@click.option(
    "--key", "key_refs", required=True, multiple=True,
    help="Public key: file, env://VAR or KMS URI (repeatable: any of them may match).",
)
@click.option("-a", "--annotations", "annotations", multiple=True, help=ANNOTATION_HELP)
@click.option(
    "--insecure-ignore-tlog",
    type=click.BOOL,
    default=True,
    is_flag=False,
    flag_value=True,
    help="Accepted for cosign compatibility: signgate verifies key signatures offline.",
)
@click.option("-o", "--output", type=click.Choice(["json", "text"]), default="json")
@click.option(
    "--format", "signature_format", type=click.Choice([*FORMAT_CHOICES, "any"]),
    default="any", show_default=True, help="The signature format to accept.",
)
@registry_options
@click.argument("images", nargs=-1, required=True)
def verify(
    key_refs: tuple[str, ...],
    annotations: tuple[str, ...],
    insecure_ignore_tlog: bool,
    output: str,
    signature_format: str,
    registry: RegistryFlags,
    images: tuple[str, ...],
) -> None:
    """Verify that every IMAGE has a signature by one of the keys; print the payloads."""
    from signgate.keys import load_public_keys
    from signgate.registry import RegistryClient
    from signgate.signatures.verify import ImageVerification, verify_images

    required = parse_annotations(annotations)
    references = parse_references(images)
    keys = load_public_keys(key_refs)
    formats = (
        SIGNATURE_FORMATS if signature_format == "any" else (SignatureFormat(signature_format),)
    )

    async def verify_all() -> list[ImageVerification]:
        async with RegistryClient(registry.options_for(references)) as client:
            return await verify_images(client, references, keys, required, formats=formats)

    failures = 0
    for result in run(verify_all()):
        if not result.ok:
            failures += 1
            click.echo(f"signgate: {failure_line(result.reference, result.reason())}", err=True)
            continue
        click.echo(
            f"\nVerification for {result.reference} --\n"
            "The following checks were performed on each of these signatures:\n"
            "  - The cosign claims were validated\n"
            "  - The signatures were verified against the specified public key",
            err=True,
        )
        documents = [check.payload.document for check in result.verified if check.payload]
        if output == "json":
            click.echo(json.dumps(documents, separators=(",", ":")))
        else:
            for check in result.verified:
                key_id = check.key.key_id if check.key else "?"
                click.echo(f"{result.reference.repository}@{result.digest} signed by {key_id}")
    if failures:
        sys.exit(1)


ATTACHMENT_TYPES = ("signature", "attestation", "sbom")


@click.command()
@click.option("--type", "kind", type=click.Choice(ATTACHMENT_TYPES), default="signature")
@registry_options
@click.argument("image")
def triangulate(kind: str, registry: RegistryFlags, image: str) -> None:
    """Print where IMAGE's signatures (or attestations, SBOMs) are stored."""
    from signgate.registry import RegistryClient
    from signgate.signatures.attachments import AttachmentType, attachment_location
    from signgate.signatures.verify import resolve_digest

    reference = parse_reference(image)
    assert kind in get_args(AttachmentType)

    async def locate() -> ImageReference:
        async with RegistryClient(registry.options_for([reference])) as client:
            digest = await resolve_digest(client, reference)
        return attachment_location(reference, digest, kind)  # type: ignore[arg-type]

    click.echo(str(run(locate())))


@click.command()
@click.option("--key", "key_refs", multiple=True, help="Public key(s) to name signatures by.")
@registry_options
@click.argument("image")
def tree(key_refs: tuple[str, ...], registry: RegistryFlags, image: str) -> None:
    """List IMAGE's signatures, attestations and SBOMs, classic and bundle."""
    from signgate.keys import load_public_keys
    from signgate.registry import RegistryClient
    from signgate.signatures.attachments import Attachment, attachment_tree

    reference = parse_reference(image)
    keys = load_public_keys(key_refs) if key_refs else []

    async def walk() -> tuple[str, list[Attachment]]:
        async with RegistryClient(registry.options_for([reference])) as client:
            return await attachment_tree(client, reference, keys)

    digest, attachments = run(walk())
    click.echo(f"Supply chain artifacts for {reference.repository}@{digest}")
    if not attachments:
        click.echo("└── (none)")
    for i, attachment in enumerate(attachments):
        last = i == len(attachments) - 1
        in_format = " (bundles)" if attachment.format == "bundle" else ""
        click.echo(
            f"{'└──' if last else '├──'} {attachment.kind}s{in_format}: {attachment.location}"
        )
        indent = "    " if last else "│   "
        for j, attached in enumerate(attachment.layers):
            branch = "└──" if j == len(attachment.layers) - 1 else "├──"
            by = f" (key {attached.key_id})" if attached.key_id else ""
            click.echo(f"{indent}{branch} {attached.layer.digest}{by}")


@click.command()
@click.option("--key", "key_ref", default=None, help="Remove only signatures by this key.")
@click.option(
    "--type", "kind", type=click.Choice([*ATTACHMENT_TYPES, "all"]), default="all",
    show_default=True,
)
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@registry_options
@click.argument("image")
def clean(
    key_ref: str | None, kind: str, force: bool, registry: RegistryFlags, image: str
) -> None:
    """Remove IMAGE's signatures (all, or only KEY's), attestations and SBOMs, in both formats."""
    from signgate.keys import load_public_key
    from signgate.keys.refs import display_key_ref
    from signgate.registry import RegistryClient
    from signgate.signatures.attachments import AttachmentType, CleanOutcome
    from signgate.signatures.attachments import clean as clean_attachments

    reference = parse_reference(image)
    if key_ref is not None and kind not in ("signature", "all"):
        raise UsageError("--key applies to signatures; use --type signature")
    kinds: list[AttachmentType] = (
        ["signature", "attestation", "sbom"] if kind == "all" else [kind]  # type: ignore[list-item]
    )
    if key_ref is not None:
        kinds = ["signature"]
    key = load_public_key(key_ref) if key_ref is not None else None
    if not force:
        attachments = "attachments" if kind == "all" else f"{kind} attachments"
        what = f"the signatures by {display_key_ref(key_ref)}" if key_ref else f"all {attachments}"
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to remove {what} of {reference} without -f")
        click.confirm(f"Remove {what} of {reference}?", abort=True)

    async def remove() -> list[CleanOutcome]:
        async with RegistryClient(registry.options_for([reference])) as client:
            return await clean_attachments(client, reference, kinds, key)

    outcomes = run(remove())
    if not outcomes:
        click.echo(f"Nothing to remove for {reference}", err=True)
    for outcome in outcomes:
        if outcome.format == "bundle":
            click.echo(
                f"Removed {outcome.removed} {outcome.kind} bundle(s) listed in "
                f"{outcome.location}, kept {outcome.kept}",
                err=True,
            )
        elif outcome.deleted_image:
            click.echo(f"Removed {outcome.location}", err=True)
        else:
            click.echo(
                f"Removed {outcome.removed} signature(s) from {outcome.location}, "
                f"kept {outcome.kept}",
                err=True,
            )
