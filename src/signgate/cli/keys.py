"""``generate-key-pair``, ``import-key-pair`` and ``public-key``: cosign's key commands."""

from __future__ import annotations

from pathlib import Path

import click

from signgate.errors import KeyFileExists
from signgate.keys import files
from signgate.keys.password import password_source
from signgate.keys.refs import load_public_key

_FORCE_HELP = "Overwrite existing key files."
_PASSWORD_NOTE = (
    "The password comes from COSIGN_PASSWORD if set (even empty), else a prompt on a "
    "terminal, else all of stdin."
)


@click.command("generate-key-pair", epilog=_PASSWORD_NOTE)
@click.option(
    "--output-key-prefix",
    default=files.DEFAULT_KEY_PREFIX,
    show_default=True,
    help="Write PREFIX.key and PREFIX.pub.",
)
@click.option("--force", is_flag=True, help=_FORCE_HELP)
@click.option(
    "--kms",
    "kms_ref",
    default=None,
    help="Create the key in a KMS (e.g. hashivault://NAME, awskms:///alias/NAME, "
    "pkcs11:token=T;object=O, k8s://NAMESPACE/SECRET) and write only PREFIX.pub.",
)
def generate_key_pair(output_key_prefix: str, force: bool, kms_ref: str | None) -> None:
    """Generate an ECDSA P-256 key pair, as cosign does: encrypted in PREFIX.key, or in a KMS."""
    if kms_ref is not None:
        from signgate.keys.refs import create_key, display_key_ref

        pub_path = files.KeyPairFiles.for_prefix(output_key_prefix).public_key
        if pub_path.exists() and not force:
            raise KeyFileExists(f"{pub_path} already exists; pass --force to overwrite")
        key = create_key(kms_ref, password_source(confirm=True))
        files.write_public_key(pub_path, key, force=force)
        click.echo(f"Key created in {display_key_ref(kms_ref)}", err=True)
        click.echo(f"Public key written to {pub_path}", err=True)
        return
    written = files.generate_key_pair(output_key_prefix, password_source(confirm=True), force=force)
    _report(written)


@click.command("import-key-pair", epilog=_PASSWORD_NOTE)
@click.option(
    "--key",
    "key_path",
    "-k",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Plain PEM private key: PKCS#8, SEC1 (EC) or PKCS#1 (RSA).",
)
@click.option(
    "--output-key-prefix",
    default=files.DEFAULT_IMPORT_KEY_PREFIX,
    show_default=True,
    help="Write PREFIX.key and PREFIX.pub.",
)
@click.option("--force", is_flag=True, help=_FORCE_HELP)
def import_key_pair(key_path: Path, output_key_prefix: str, force: bool) -> None:
    """Encrypt an existing private key into cosign's key file format."""
    written = files.import_key_pair(
        key_path, output_key_prefix, password_source(confirm=True), force=force
    )
    _report(written)


@click.command("public-key", epilog=_PASSWORD_NOTE)
@click.option(
    "--key",
    "key_ref",
    "-k",
    required=True,
    help="Key reference: a key file (private or public), env://VAR or a KMS URI.",
)
def public_key(key_ref: str) -> None:
    """Print the public key (PEM) of a key."""
    key = load_public_key(key_ref, password_source(confirm=False))
    click.echo(key.pem().decode("ascii"), nl=False)


def _report(written: files.KeyPairFiles) -> None:
    click.echo(f"Private key written to {written.private_key}", err=True)
    click.echo(f"Public key written to {written.public_key}", err=True)
