"""Key pair files on disk: ``PREFIX.key`` (encrypted, mode 0600) and ``PREFIX.pub`` (0644)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from signgate.errors import KeyFileExists, KeyMaterialError
from signgate.fileio import write_file_atomically
from signgate.keys.cosign_format import (
    decrypt_private_key,
    encrypt_private_key,
    parse_unencrypted_private_key,
)
from signgate.keys.model import PublicKey, SigningKeyTypes
from signgate.keys.password import PasswordSource

DEFAULT_KEY_PREFIX = "cosign"
# cosign's import-key-pair default, so that an import never clobbers a generated cosign.key.
DEFAULT_IMPORT_KEY_PREFIX = "import-cosign"

PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644


@dataclass(frozen=True)
class KeyPairFiles:
    private_key: Path
    public_key: Path

    @classmethod
    def for_prefix(cls, prefix: str | Path) -> KeyPairFiles:
        return cls(Path(f"{prefix}.key"), Path(f"{prefix}.pub"))


def generate_key_pair(
    prefix: str | Path, password: PasswordSource, *, force: bool = False
) -> KeyPairFiles:
    """A new ECDSA P-256 key pair written as ``PREFIX.key`` and ``PREFIX.pub``."""
    files = KeyPairFiles.for_prefix(prefix)
    _refuse_existing(files, force=force)
    write_key_pair(files, ec.generate_private_key(ec.SECP256R1()), password, force=force)
    return files


def import_key_pair(
    key_path: Path, prefix: str | Path, password: PasswordSource, *, force: bool = False
) -> KeyPairFiles:
    """Encrypt a plain PEM private key (PKCS#8, SEC1 or PKCS#1) into cosign's format."""
    files = KeyPairFiles.for_prefix(prefix)
    key = parse_unencrypted_private_key(read_key_file(key_path), source=str(key_path))
    _refuse_existing(files, force=force)
    write_key_pair(files, key, password, force=force)
    return files


def write_key_pair(
    files: KeyPairFiles, key: SigningKeyTypes, password: PasswordSource, *, force: bool
) -> None:
    """Encrypt ``key`` and write both files; without ``force`` neither may exist beforehand."""
    _refuse_existing(files, force=force)
    private_pem = encrypt_private_key(key, password())
    public_pem = PublicKey(key.public_key()).pem()
    _write(files.private_key, private_pem, mode=PRIVATE_KEY_MODE, force=force)
    try:
        _write(files.public_key, public_pem, mode=PUBLIC_KEY_MODE, force=force)
    except BaseException:
        if not force:
            # The private key file is ours alone (it did not exist): leave no half pair.
            files.private_key.unlink(missing_ok=True)
        raise


def write_public_key(path: Path, key: PublicKey, *, force: bool) -> None:
    """Write a public key PEM (mode 0644), refusing to overwrite without ``force``."""
    _write(path, key.pem(), mode=PUBLIC_KEY_MODE, force=force)


def read_private_key(path: Path, password: PasswordSource) -> SigningKeyTypes:
    """The private key in a cosign encrypted key file."""
    return decrypt_private_key(read_key_file(path), password(), source=str(path))


def read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KeyMaterialError(f"cannot read key file {path}: {e.strerror or e}") from e


def _refuse_existing(files: KeyPairFiles, *, force: bool) -> None:
    if force:
        return
    for path in (files.private_key, files.public_key):
        if path.exists():
            raise KeyFileExists(f"{path} already exists; pass --force to overwrite")


def _write(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    try:
        write_file_atomically(path, data, mode=mode, overwrite=force)
    except FileExistsError as e:
        raise KeyFileExists(f"{path} already exists; pass --force to overwrite") from e
    except OSError as e:
        raise KeyMaterialError(f"cannot write {path}: {e.strerror or e}") from e
