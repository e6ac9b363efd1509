"""The compatibility contract, against the real cosign CLI (2.x and 3.x) and a real registry.

cosign 3 is driven in its classic mode (``--new-bundle-format=false --use-signing-config=false
--tlog-upload=false``) and signgate signs with ``--format classic``: the bundle format is tested
in test_bundle_interop.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from signgate.keys import PublicKey
from signgate.reference import Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image, push_index
from signgate.signatures.layout import config_blob, parse_layers
from signgate.signatures.payload import build_payload
from tests.integration.tools import run, signgate, tool_env

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"
PLATFORMS = [("linux", "amd64"), ("linux", "arm64")]


@dataclass
class Workspace:
    """A cosign binary, a registry, a scratch HOME with key pairs, and helpers to run things."""

    cosign_name: str
    cosign_bin: Path
    host: str
    home: Path
    env: dict[str, str]

    def cosign(self, *args: str, check: bool = True) -> Any:
        return run([str(self.cosign_bin), *args], self.env, self.home, check)

    def cosign_sign(self, key: Path, image: str, *extra: str) -> None:
        classic = (
            ["--new-bundle-format=false", "--use-signing-config=false"]
            if self.cosign_name == "cosign3"
            else []
        )
        self.cosign(
            "sign", "--key", str(key), "--tlog-upload=false", "--yes",
            "--allow-insecure-registry", *classic, *extra, image,
        )

    def cosign_verify(self, key: Path, image: str, *extra: str, check: bool = True) -> Any:
        classic = ["--new-bundle-format=false"] if self.cosign_name == "cosign3" else []
        return self.cosign(
            "verify", "--key", str(key), "--insecure-ignore-tlog", "--allow-insecure-registry",
            *classic, *extra, image, check=check,
        )

    def signgate(self, *args: str, check: bool = True) -> Any:
        return signgate(*args, env=self.env, cwd=self.home, check=check)

    def push(self, repository: str, tag: str, content: bytes) -> str:
        async def push() -> str:
            async with RegistryClient(RegistryOptions()) as client:
                return await push_image(
                    client, Repository(self.host, repository), tag, content=content
                )

        return anyio.run(push)

    def push_index(self, repository: str, tag: str, content: bytes) -> tuple[str, list[str]]:
        async def push() -> tuple[str, list[str]]:
            async with RegistryClient(RegistryOptions()) as client:
                return await push_index(
                    client, Repository(self.host, repository), tag,
                    content=content, platforms=PLATFORMS,
                )

        return anyio.run(push)

    def signature_manifest(self, repository: str, digest: str) -> dict[str, Any]:
        async def get() -> dict[str, Any]:
            async with RegistryClient(RegistryOptions()) as client:
                tag = digest.replace(":", "-") + ".sig"
                return (await client.get_manifest(Repository(self.host, repository), tag)).json()

        return anyio.run(get)

    def blob(self, repository: str, digest: str) -> bytes:
        async def get() -> bytes:
            async with RegistryClient(RegistryOptions()) as client:
                return await client.get_blob(Repository(self.host, repository), digest)

        return anyio.run(get)


@pytest.fixture(params=["cosign2", "cosign3"])
def ws(
    request: pytest.FixtureRequest, cosign_binaries: dict[str, Path], registry: Any,
    tmp_path: Path,
) -> Workspace:
    name = request.param
    env = tool_env(tmp_path, COSIGN_PASSWORD=PASSWORD)
    return Workspace(name, cosign_binaries[name], registry.host, tmp_path, env)


def unique(ws: Workspace, name: str) -> str:
    return f"{ws.cosign_name}/{name}-{ws.home.name}".lower()


def test_cosign_verifies_what_signgate_signs(ws: Workspace) -> None:
    ws.signgate("generate-key-pair")
    repo = unique(ws, "sg-signed")
    digest = ws.push(repo, "v1", b"one")
    image = f"{ws.host}/{repo}:v1"
    ws.signgate("sign", "--format", "classic", "--key", "cosign.key", image)
    ws.cosign_verify(Path("cosign.pub"), image)
    ws.cosign_verify(Path("cosign.pub"), f"{ws.host}/{repo}@{digest}")
    # The payload is byte for byte what cosign would have built.
    manifest = ws.signature_manifest(repo, digest)
    (layer,) = parse_layers(manifest)
    assert ws.blob(repo, layer.digest) == build_payload(f"{ws.host}/{repo}", digest)


def test_annotations_signed_by_signgate_are_checked_by_cosign(ws: Workspace) -> None:
    ws.signgate("generate-key-pair")
    repo = unique(ws, "sg-annotated")
    ws.push(repo, "v1", b"annotated")
    image = f"{ws.host}/{repo}:v1"
    ws.signgate("sign", "--format", "classic", "--key", "cosign.key", "-a", "env=prod", "-a",
                "team=<a&b>", image)
    ws.cosign_verify(Path("cosign.pub"), image, "-a", "env=prod", "-a", "team=<a&b>")
    refused = ws.cosign_verify(Path("cosign.pub"), image, "-a", "env=dev", check=False)
    assert refused.returncode != 0


def test_signgate_verifies_what_cosign_signs(ws: Workspace) -> None:
    ws.cosign("generate-key-pair")
    repo = unique(ws, "cosign-signed")
    digest = ws.push(repo, "v1", b"two")
    image = f"{ws.host}/{repo}:v1"
    ws.cosign_sign(Path("cosign.key"), image, "-a", "env=prod")
    result = ws.signgate("verify", "--key", "cosign.pub", "-a", "env=prod", image)
    (document,) = json.loads(result.stdout)
    assert document["critical"]["image"]["docker-manifest-digest"] == digest
    # cosign's payload and signature image are what signgate would write for the same input.
    manifest = ws.signature_manifest(repo, digest)
    layers = parse_layers(manifest)
    assert ws.blob(repo, layers[0].digest) == build_payload(
        f"{ws.host}/{repo}", digest, {"env": "prod"}
    )
    assert ws.blob(repo, manifest["config"]["digest"]) == config_blob(layers)
    refused = ws.signgate("verify", "--key", "cosign.pub", "-a", "env=dev", image, check=False)
    assert refused.returncode == 1
    assert "annotation mismatch" in refused.stderr


def test_recursive_index_signing_both_directions(ws: Workspace) -> None:
    ws.signgate("generate-key-pair", "--output-key-prefix", "sg")
    ws.cosign("generate-key-pair", "--output-key-prefix", "co")
    repo = unique(ws, "multi")
    index, children = ws.push_index(repo, "v1", b"multi")
    image = f"{ws.host}/{repo}:v1"
    ws.signgate("sign", "--format", "classic", "--key", "sg.key", "--recursive", image)
    ws.cosign_sign(Path("co.key"), image, "--recursive")
    for digest in [index, *children]:
        ref = f"{ws.host}/{repo}@{digest}"
        ws.cosign_verify(Path("sg.pub"), ref)
        ws.signgate("verify", "--key", "co.pub", ref)
        ws.signgate("verify", "--key", "sg.pub", ref)


def test_signgate_signature_added_to_cosign_signed_image_keeps_both(ws: Workspace) -> None:
    ws.cosign("generate-key-pair", "--output-key-prefix", "co")
    ws.signgate("generate-key-pair", "--output-key-prefix", "sg")
    repo = unique(ws, "both")
    digest = ws.push(repo, "v1", b"both")
    image = f"{ws.host}/{repo}:v1"
    ws.cosign_sign(Path("co.key"), image)
    ws.signgate("sign", "--format", "classic", "--key", "sg.key", image)
    # An identical signature is not added twice.
    ws.signgate("sign", "--format", "classic", "--key", "sg.key", image)
    assert len(parse_layers(ws.signature_manifest(repo, digest))) == 2
    ws.cosign_verify(Path("co.pub"), image)
    ws.cosign_verify(Path("sg.pub"), image)
    ws.signgate("verify", "--key", "co.pub", image)
    ws.signgate("verify", "--key", "sg.pub", image)
    # Then cosign appends again on top of signgate's manifest, and all three still verify.
    ws.cosign_sign(Path("co.key"), image, "-a", "again=yes")
    assert len(parse_layers(ws.signature_manifest(repo, digest))) == 3
    ws.signgate("verify", "--key", "sg.pub", image)
    ws.cosign_verify(Path("sg.pub"), image)


def test_clean_by_key_keeps_other_signatures(ws: Workspace) -> None:
    ws.cosign("generate-key-pair", "--output-key-prefix", "co")
    ws.signgate("generate-key-pair", "--output-key-prefix", "sg")
    repo = unique(ws, "clean")
    ws.push(repo, "v1", b"clean")
    image = f"{ws.host}/{repo}:v1"
    ws.cosign_sign(Path("co.key"), image)
    ws.signgate("sign", "--format", "classic", "--key", "sg.key", image)
    ws.signgate("clean", "--key", "sg.pub", "-f", image)
    ws.cosign_verify(Path("co.pub"), image)
    assert ws.cosign_verify(Path("sg.pub"), image, check=False).returncode != 0
    assert ws.signgate("verify", "--key", "sg.pub", image, check=False).returncode == 1
    ws.signgate("clean", "-f", image)
    assert ws.cosign_verify(Path("co.pub"), image, check=False).returncode != 0
    gone = ws.signgate("verify", "--key", "co.pub", image, check=False)
    assert gone.returncode == 1
    assert "no signatures found" in gone.stderr


def test_triangulate_agrees_with_cosign(ws: Workspace) -> None:
    repo = unique(ws, "where")
    ws.push(repo, "v1", b"where")
    image = f"{ws.host}/{repo}:v1"
    ours = ws.signgate("triangulate", image).stdout.strip()
    theirs = ws.cosign("triangulate", "--allow-insecure-registry", image).stdout.strip()
    assert ours == theirs


def test_cosign_repository_is_honoured_both_ways(ws: Workspace) -> None:
    ws.signgate("generate-key-pair", "--output-key-prefix", "sg")
    ws.cosign("generate-key-pair", "--output-key-prefix", "co")
    repo = unique(ws, "app")
    signatures = unique(ws, "signatures")
    digest = ws.push(repo, "v1", b"elsewhere")
    image = f"{ws.host}/{repo}:v1"
    ws.env["COSIGN_REPOSITORY"] = f"{ws.host}/{signatures}"
    ws.signgate("sign", "--format", "classic", "--key", "sg.key", image)
    ws.cosign_sign(Path("co.key"), image)
    ws.cosign_verify(Path("sg.pub"), image)
    ws.signgate("verify", "--key", "co.pub", image)
    # Both signatures went to the other repository, none beside the image.
    assert len(parse_layers(ws.signature_manifest(signatures, digest))) == 2
    ours = ws.signgate("triangulate", image).stdout.strip()
    assert ours == ws.cosign("triangulate", "--allow-insecure-registry", image).stdout.strip()
    assert ours.startswith(f"{ws.host}/{signatures}:")
    del ws.env["COSIGN_REPOSITORY"]
    assert ws.signgate("verify", "--key", "sg.pub", image, check=False).returncode == 1


def test_tree_names_the_key_of_each_signature(ws: Workspace) -> None:
    ws.signgate("generate-key-pair", "--output-key-prefix", "sg")
    ws.cosign("generate-key-pair", "--output-key-prefix", "co")
    repo = unique(ws, "tree")
    digest = ws.push(repo, "v1", b"tree")
    image = f"{ws.host}/{repo}:v1"
    ws.cosign_sign(Path("co.key"), image)
    ws.signgate("sign", "--format", "classic", "--key", "sg.key", image)
    expected = {
        PublicKey.from_pem((ws.home / name).read_bytes()).key_id for name in ("sg.pub", "co.pub")
    }
    out = ws.signgate("tree", "--key", "sg.pub", "--key", "co.pub", image).stdout
    assert f"{ws.host}/{repo}@{digest}" in out
    assert f"{ws.host}/{repo}:{digest.replace(':', '-')}.sig" in out
    named = [line for line in out.splitlines() if "(key " in line]
    assert {line.rsplit("(key ", 1)[1].rstrip(")") for line in named} == expected
    plain = ws.signgate("tree", image).stdout
    assert "(key " not in plain
    assert plain.count("sha256:") == 3  # the image digest and two signature layers
