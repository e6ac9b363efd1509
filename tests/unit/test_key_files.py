"""Key pair files, the atomic writer, password sources, and the key commands as a user runs them."""

from __future__ import annotations

import fcntl
import io
import os
import select
import stat
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from signgate.errors import KeyFileExists, KeyMaterialError, UnsupportedKey, WrongPassword
from signgate.fileio import write_file_atomically
from signgate.keys import files
from signgate.keys.model import PublicKey
from signgate.keys.password import fixed_password, password_source
from tests.vectors import vector

SIGNGATE = Path(sys.executable).with_name("signgate")
PASSWORD = b"correct horse"


def never_asked() -> bytes:
    raise AssertionError("the password was asked for")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- generate / import / read -------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_generated_pair_round_trips_with_exact_modes(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        written = files.generate_key_pair(tmp_path / "cosign", fixed_password(PASSWORD))
    finally:
        os.umask(old)

    assert written == files.KeyPairFiles(tmp_path / "cosign.key", tmp_path / "cosign.pub")
    assert mode_of(written.private_key) == 0o600
    assert mode_of(written.public_key) == 0o644
    assert written.private_key.read_bytes().startswith(
        b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n"
    )
    key = files.read_private_key(written.private_key, fixed_password(PASSWORD))
    assert PublicKey(key.public_key()) == PublicKey.from_pem(written.public_key.read_bytes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cosign.key", "cosign.pub"]


def test_wrong_password_names_the_file(tmp_path: Path) -> None:
    written = files.generate_key_pair(tmp_path / "cosign", fixed_password(PASSWORD))
    with pytest.raises(WrongPassword) as caught:
        files.read_private_key(written.private_key, fixed_password(b"nope"))
    assert caught.value.diagnostics() == f"wrong password for {written.private_key}"
    assert "nope" not in caught.value.diagnostics()


@pytest.mark.parametrize("existing", ["cosign.key", "cosign.pub"])
def test_existing_files_are_not_overwritten_and_nothing_is_written(
    tmp_path: Path, existing: str
) -> None:
    (tmp_path / existing).write_bytes(b"precious")

    with pytest.raises(KeyFileExists) as caught:
        files.generate_key_pair(tmp_path / "cosign", never_asked)

    assert caught.value.diagnostics() == (
        f"{tmp_path / existing} already exists; pass --force to overwrite"
    )
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_bytes() == b"precious"


def test_force_overwrites_both_files(tmp_path: Path) -> None:
    first = files.generate_key_pair(tmp_path / "k", fixed_password(PASSWORD))
    old_public = first.public_key.read_bytes()
    first.private_key.chmod(0o644)

    second = files.generate_key_pair(tmp_path / "k", fixed_password(b"other"), force=True)

    assert second.public_key.read_bytes() != old_public
    assert mode_of(second.private_key) == 0o600
    files.read_private_key(second.private_key, fixed_password(b"other"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key", "k.pub"]


@pytest.mark.parametrize(
    "name",
    ["ec-p256-sec1", "ec-p256-pkcs8", "ec-p384-sec1", "ed25519-pkcs8", "rsa2048-pkcs1"],
)
def test_import_writes_the_same_public_key(tmp_path: Path, name: str) -> None:
    written = files.import_key_pair(
        vector("import-keys", f"{name}.pem"), tmp_path / "imported", fixed_password(PASSWORD)
    )
    expected = vector("import-keys", f"{name}.pub").read_bytes()
    assert written.public_key.read_bytes() == expected
    assert mode_of(written.private_key) == 0o600
    key = files.read_private_key(written.private_key, fixed_password(PASSWORD))
    assert PublicKey(key.public_key()) == PublicKey.from_pem(expected)


def test_refused_import_writes_nothing_and_asks_no_password(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedKey, match="RSA key size 1024 is too small; minimum 2048"):
        files.import_key_pair(
            vector("import-keys", "reject-rsa1024-pkcs1.pem"), tmp_path / "x", never_asked
        )
    assert list(tmp_path.iterdir()) == []


def test_unreadable_key_file_is_a_key_error(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match=r"cannot read key file .*missing.key: No such file"):
        files.read_private_key(tmp_path / "missing.key", never_asked)


# --- the atomic writer ----------------------------------------------------------------------


def test_atomic_write_creates_with_mode(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "f"
    write_file_atomically(target, b"data", mode=0o640, overwrite=False)
    assert target.read_bytes() == b"data"
    assert mode_of(target) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_atomic_write_refuses_existing_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_file_atomically(target, b"new", mode=0o600, overwrite=False)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_atomic_write_replaces_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    write_file_atomically(target, b"new", mode=0o600, overwrite=True)
    assert target.read_bytes() == b"new"
    assert mode_of(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_failed_replace_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "inside").write_bytes(b"")
    with pytest.raises(OSError, match=r"Is a directory|Directory not empty"):
        write_file_atomically(tmp_path / "d", b"new", mode=0o600, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_missing_directory_fails_without_debris(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_file_atomically(tmp_path / "no" / "f", b"x", mode=0o600, overwrite=False)
    assert list(tmp_path.iterdir()) == []


# --- password sources -----------------------------------------------------------------------


class CountingStdin(io.BytesIO):
    reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().read(size)


@pytest.mark.parametrize("value", ["", "pw", "with spaces\n"])
def test_cosign_password_is_used_even_when_empty(value: str) -> None:
    stdin = CountingStdin(b"from stdin")
    source = password_source(False, environ={"COSIGN_PASSWORD": value}, stdin=stdin)
    assert source() == value.encode()
    assert stdin.reads == 0


def test_piped_stdin_is_read_whole_and_as_is_once_and_only_when_needed() -> None:
    stdin = CountingStdin(b"pw\n\n")
    source = password_source(True, environ={}, stdin=stdin)
    assert stdin.reads == 0
    assert source() == b"pw\n\n"
    assert source() == b"pw\n\n"
    assert stdin.reads == 1


# --- the commands, run as a user runs them ----------------------------------------------------


def run_signgate(
    *args: str, cwd: Path, password: str | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSIGN_")}
    if password is not None:
        env["COSIGN_PASSWORD"] = password
    return subprocess.run(
        [str(SIGNGATE), *args], cwd=cwd, env=env, input=stdin, capture_output=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], expected: str) -> None:
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert stderr == f"signgate: {expected}\n"


def test_cli_generate_then_public_key(tmp_path: Path) -> None:
    generated = run_signgate("generate-key-pair", cwd=tmp_path, password="pw")
    assert generated.returncode == 0, generated.stderr
    assert generated.stderr.decode().splitlines() == [
        "Private key written to cosign.key",
        "Public key written to cosign.pub",
    ]

    shown = run_signgate("public-key", "--key", "cosign.key", cwd=tmp_path, password="pw")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == (tmp_path / "cosign.pub").read_bytes()

    from_public = run_signgate("public-key", "--key", "cosign.pub", cwd=tmp_path)
    assert from_public.stdout == shown.stdout


def test_cli_reads_a_piped_password_byte_for_byte(tmp_path: Path) -> None:
    generated = run_signgate(
        "generate-key-pair", "--output-key-prefix", "piped", cwd=tmp_path, stdin=b"pw\n"
    )
    assert generated.returncode == 0, generated.stderr
    key = tmp_path / "piped.key"
    files.read_private_key(key, fixed_password(b"pw\n"))
    with pytest.raises(WrongPassword):
        files.read_private_key(key, fixed_password(b"pw"))


def test_cli_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "cosign.key").write_bytes(b"precious")
    result = run_signgate("generate-key-pair", cwd=tmp_path, password="pw")
    assert_one_line_error(result, "cosign.key already exists; pass --force to overwrite")
    assert (tmp_path / "cosign.key").read_bytes() == b"precious"
    assert not (tmp_path / "cosign.pub").exists()

    forced = run_signgate("generate-key-pair", "--force", cwd=tmp_path, password="pw")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "cosign.key").read_bytes() != b"precious"


def test_cli_wrong_password_is_one_line_without_the_password(tmp_path: Path) -> None:
    assert run_signgate("generate-key-pair", cwd=tmp_path, password="right").returncode == 0
    result = run_signgate(
        "public-key", "--key", "cosign.key", cwd=tmp_path, password="hunter2-secret"
    )
    assert_one_line_error(result, "wrong password for cosign.key")
    assert b"hunter2" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["import-key-pair", "--key", str(vector("import-keys", "reject-rsa1024-pkcs1.pem"))],
            f"{vector('import-keys', 'reject-rsa1024-pkcs1.pem')}: "
            "RSA key size 1024 is too small; minimum 2048",
        ),
        (
            ["public-key", "--key", "missing.key"],
            "cannot read key file missing.key: No such file or directory",
        ),
        (
            ["public-key", "--key", "ftp://x"],
            "unknown key reference scheme ftp://; supported: a file path, awskms://, "
            "azurekms://, env://, gcpkms://, hashivault://, k8s://, openbao://, pkcs11:",
        ),
        (
            ["public-key", "--key", str(vector("encrypted-keys", "cosign-ci-test.key"))],
            f"wrong password for {vector('encrypted-keys', 'cosign-ci-test.key')}",
        ),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    assert_one_line_error(run_signgate(*args, cwd=tmp_path, password="hello"), expected)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_cli_corrupt_key_file_is_one_line(tmp_path: Path) -> None:
    good = vector("encrypted-keys", "cosign-keys-test-sigstore.key").read_bytes()
    (tmp_path / "broken.key").write_bytes(good[:200] + good[-40:])
    result = run_signgate("public-key", "--key", "broken.key", cwd=tmp_path, password="hello")
    assert result.returncode == 1
    assert result.stderr.decode().startswith("signgate: broken.key: ")
    assert result.stderr.count(b"\n") == 1


def test_cli_import_uses_cosigns_default_prefix(tmp_path: Path) -> None:
    pem = vector("import-keys", "ec-p256-pkcs8.pem")
    result = run_signgate("import-key-pair", "--key", str(pem), cwd=tmp_path, password="pw")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["import-cosign.key", "import-cosign.pub"]
    assert (tmp_path / "import-cosign.pub").read_bytes() == vector(
        "import-keys", "ec-p256-pkcs8.pub"
    ).read_bytes()


class Terminal:
    """signgate on a pseudo-terminal that is its controlling tty, as when a person types."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.master, slave = os.openpty()
        env = {k: v for k, v in os.environ.items() if not k.startswith("COSIGN_")}
        self.process = subprocess.Popen(
            [str(SIGNGATE), *args],
            cwd=cwd,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            # Make the pty the controlling terminal, so getpass's /dev/tty is this pty.
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.output = b""

    def expect(self, text: bytes) -> None:
        while text not in self.output:
            # A generous guard so a broken prompt fails the test instead of hanging it.
            ready, _, _ = select.select([self.master], [], [], 60)
            assert ready, f"no {text!r} on the terminal; got {self.output!r}"
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            assert chunk, f"terminal closed before {text!r}; got {self.output!r}"
            self.output += chunk

    def type(self, line: bytes) -> None:
        os.write(self.master, line + b"\n")

    def finish(self) -> int:
        try:
            while True:
                chunk = os.read(self.master, 4096)
                if not chunk:
                    break
                self.output += chunk
        except OSError:
            pass
        os.close(self.master)
        return self.process.wait(timeout=60)


def test_terminal_prompt_asks_twice_when_creating(tmp_path: Path) -> None:
    terminal = Terminal(["generate-key-pair"], tmp_path)
    terminal.expect(b"Enter password for private key: ")
    terminal.type(b"typed pw")
    terminal.expect(b"Enter password for private key again: ")
    terminal.type(b"typed pw")
    assert terminal.finish() == 0, terminal.output
    assert b"typed pw" not in terminal.output  # no echo
    files.read_private_key(tmp_path / "cosign.key", fixed_password(b"typed pw"))


def test_terminal_prompt_mismatch_writes_nothing(tmp_path: Path) -> None:
    terminal = Terminal(["generate-key-pair"], tmp_path)
    terminal.expect(b"Enter password for private key: ")
    terminal.type(b"one")
    terminal.expect(b"again: ")
    terminal.type(b"two")
    assert terminal.finish() == 1
    assert b"signgate: passwords do not match" in terminal.output
    assert list(tmp_path.iterdir()) == []
