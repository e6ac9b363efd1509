"""Key files shared both ways with the real cosign CLIs (2.x and 3.x).

The password always travels in COSIGN_PASSWORD or on stdin, never in argv.
"""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signgate.keys import files
from signgate.keys.model import PublicKey
from signgate.keys.password import fixed_password
from signgate.keys.refs import load_signer
from tests.integration.tools import SIGNGATE, run, tool_env
from tests.vectors import vector

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
ACCEPTED = [
    "ec-p256-pkcs8",
    "ec-p256-sec1",
    "ec-p384-sec1",
    "ed25519-pkcs8",
    "rsa2048-pkcs1",
    "rsa2048-pkcs8",
]
REFUSED = ["reject-ec-p224-sec1", "reject-ec-secp256k1-sec1", "reject-rsa1024-pkcs1"]


@dataclass
class Tools:
    """One cosign binary and signgate, run in a scratch HOME with the password in the env."""

    cosign_name: str
    cosign_bin: Path
    home: Path
    env: dict[str, str]

    def cosign(self, *args: str, check: bool = True, stdin: str | None = None) -> Any:
        return self._run([str(self.cosign_bin), *args], check, stdin)

    def signgate(self, *args: str, check: bool = True, stdin: str | None = None) -> Any:
        return self._run([str(SIGNGATE), *args], check, stdin)

    def _run(self, argv: list[str], check: bool, stdin: str | None) -> Any:
        if stdin is None:
            return run(argv, self.env, self.home, check)
        # The password comes from stdin only when COSIGN_PASSWORD is unset.
        env = {k: v for k, v in self.env.items() if k != "COSIGN_PASSWORD"}
        result = subprocess.run(
            argv, env=env, cwd=self.home, input=stdin, capture_output=True, text=True, timeout=300
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} exited {result.returncode}: {result.stderr}")
        return result

    def cosign_sign_blob(self, key: str, blob: str, signature: str) -> None:
        classic = (
            ["--new-bundle-format=false", "--use-signing-config=false"]
            if self.cosign_name == "cosign3"
            else []
        )
        self.cosign(
            "sign-blob",
            "--key",
            key,
            "--tlog-upload=false",
            "--output-signature",
            signature,
            *classic,
            blob,
        )


@pytest.fixture(params=["cosign2", "cosign3"])
def tools(
    request: pytest.FixtureRequest, cosign_binaries: dict[str, Path], tmp_path: Path
) -> Tools:
    name: str = request.param
    return Tools(
        name, cosign_binaries[name], tmp_path, tool_env(tmp_path, COSIGN_PASSWORD=PASSWORD)
    )


def test_cosign_reads_a_key_signgate_generated(tools: Tools) -> None:
    tools.signgate("generate-key-pair", "--output-key-prefix", "sg")
    shown = tools.cosign("public-key", "--key", "sg.key")
    assert shown.stdout == (tools.home / "sg.pub").read_text()


def test_signgate_reads_a_key_cosign_generated(tools: Tools) -> None:
    tools.cosign("generate-key-pair", "--output-key-prefix", "cs")
    shown = tools.signgate("public-key", "--key", "cs.key")
    assert shown.stdout == (tools.home / "cs.pub").read_text()
    assert (
        (tools.home / "cs.key")
        .read_text()
        .startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    )


def test_signatures_made_with_a_cosign_key_verify_in_cosign(tools: Tools) -> None:
    tools.cosign("generate-key-pair", "--output-key-prefix", "cs")
    blob = tools.home / "blob"
    blob.write_bytes(b"payload bytes")
    signer = load_signer(str(tools.home / "cs.key"), fixed_password(PASSWORD.encode()))
    (tools.home / "blob.sig").write_bytes(base64.b64encode(signer.sign(blob.read_bytes())))

    tools.cosign(
        "verify-blob",
        "--key",
        "cs.pub",
        "--signature",
        "blob.sig",
        "--insecure-ignore-tlog",
        "blob",
    )


@pytest.mark.parametrize("name", ACCEPTED)
def test_signgate_verifies_what_cosign_signs_with_an_imported_key(tools: Tools, name: str) -> None:
    # P-384: cosign 2 hashes with SHA-256, cosign 3 with SHA-384; both must verify.
    pem = vector("import-keys", f"{name}.pem")
    tools.signgate("import-key-pair", "--key", str(pem), "--output-key-prefix", "sg")
    (tools.home / "blob").write_bytes(b"payload bytes")
    tools.cosign_sign_blob("sg.key", "blob", "blob.sig")

    signature = base64.b64decode((tools.home / "blob.sig").read_text())
    public = PublicKey.from_pem(vector("import-keys", f"{name}.pub").read_bytes())
    assert public.verify(signature, b"payload bytes")
    assert not public.verify(signature, b"payload bytes!")


def test_piped_passwords_mean_the_same_bytes_in_both_tools(tools: Tools) -> None:
    # Neither tool strips the newline of a piped password.
    tools.cosign("generate-key-pair", "--output-key-prefix", "cs", stdin="piped\n")
    shown = tools.signgate("public-key", "--key", "cs.key", stdin="piped\n")
    assert shown.stdout == (tools.home / "cs.pub").read_text()
    wrong = tools.signgate("public-key", "--key", "cs.key", stdin="piped", check=False)
    assert wrong.returncode == 1
    assert wrong.stderr == "signgate: wrong password for cs.key\n"

    tools.signgate("generate-key-pair", "--output-key-prefix", "sg", stdin="piped\n")
    shown = tools.cosign("public-key", "--key", "sg.key", stdin="piped\n")
    assert shown.stdout == (tools.home / "sg.pub").read_text()


@pytest.mark.parametrize("name", ACCEPTED)
def test_cosign_reads_keys_signgate_imported(tools: Tools, name: str) -> None:
    pem = vector("import-keys", f"{name}.pem")
    tools.signgate("import-key-pair", "--key", str(pem), "--output-key-prefix", "sg")
    expected = vector("import-keys", f"{name}.pub").read_text()
    assert (tools.home / "sg.pub").read_text() == expected
    assert tools.cosign("public-key", "--key", "sg.key").stdout == expected


def cosign_import_cases() -> list[Any]:
    cases = []
    for cosign_name in ("cosign2", "cosign3"):
        for name in ACCEPTED:
            marks = []
            if cosign_name == "cosign2" and name != "ed25519-pkcs8":
                # Debian's cosign 2.5 refuses every EC and RSA key here with "error validating
                # ecdsa/rsa key: unsupported public key type" (its goodkey check); cosign 3
                # imports them. Strict: this fails loudly once the packaged cosign 2 is fixed.
                marks.append(
                    pytest.mark.xfail(raises=AssertionError, reason="cosign 2.5 import bug")
                )
            cases.append(pytest.param(cosign_name, name, marks=marks, id=f"{cosign_name}-{name}"))
    return cases


@pytest.mark.parametrize(("cosign_name", "name"), cosign_import_cases())
def test_signgate_reads_keys_cosign_imported(
    cosign_binaries: dict[str, Path], tmp_path: Path, cosign_name: str, name: str
) -> None:
    tools = Tools(
        cosign_name,
        cosign_binaries[cosign_name],
        tmp_path,
        tool_env(tmp_path, COSIGN_PASSWORD=PASSWORD),
    )
    pem = vector("import-keys", f"{name}.pem")
    tools.cosign("import-key-pair", "--key", str(pem), "--output-key-prefix", "cs")
    tools.signgate("import-key-pair", "--key", str(pem), "--output-key-prefix", "sg")

    cosign_public = (tmp_path / "cs.pub").read_text()
    assert cosign_public == (tmp_path / "sg.pub").read_text()
    assert tools.signgate("public-key", "--key", "cs.key").stdout == cosign_public
    key = files.read_private_key(tmp_path / "cs.key", fixed_password(PASSWORD.encode()))
    assert PublicKey(key.public_key()) == PublicKey.from_pem(cosign_public.encode())


@pytest.mark.parametrize("name", REFUSED)
def test_both_refuse_weak_or_unsupported_keys(tools: Tools, name: str) -> None:
    pem = vector("import-keys", f"{name}.pem")
    by_cosign = tools.cosign(
        "import-key-pair", "--key", str(pem), "--output-key-prefix", "cs", check=False
    )
    by_signgate = tools.signgate(
        "import-key-pair", "--key", str(pem), "--output-key-prefix", "sg", check=False
    )
    assert by_cosign.returncode != 0
    assert by_signgate.returncode == 1
    assert by_signgate.stderr.startswith(f"signgate: {pem}: ")
    assert by_signgate.stderr.count("\n") == 1
    assert "Traceback" not in by_signgate.stderr
    assert sorted(p.name for p in tools.home.iterdir() if p.suffix in {".key", ".pub"}) == []
