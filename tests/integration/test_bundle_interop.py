"""cosign 3's bundle format against the real cosign 3 CLI and a real registry (distribution 2.8,
which has no referrers API: the fallback index at tag ``sha256-HEX`` is used)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signgate.digests import compute_digest
from signgate.keys import PrivateKeySigner, PublicKey
from signgate.reference import ImageReference, Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image
from signgate.registry.mediatypes import OCI_INDEX, OCI_MANIFEST
from signgate.signatures.attachments import clean
from signgate.signatures.bundle import (
    BUNDLE_MEDIA_TYPE,
    EMPTY_CONFIG,
    IN_TOTO_PAYLOAD_TYPE,
    Descriptor,
    build_bundle,
    build_statement,
    bundle_manifest,
    index_with,
    pae,
)
from signgate.signatures.formats import SignatureFormat
from signgate.signatures.referrers import read_bundles, sign_digest_bundle, write_bundle
from signgate.signatures.sign import sign_image, sign_images
from signgate.signatures.verify import ImageVerification, verify_image
from tests.integration.registry_servers import RunningRegistry
from tests.integration.tools import SIGNGATE, run, signgate, tool_env

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"


class Workspace:
    def __init__(
        self, cosign3: Path, registry: RunningRegistry, home: Path, cosign2: Path
    ) -> None:
        self.cosign3 = cosign3
        self.cosign2 = cosign2
        self.host = registry.host
        self.home = home
        self.env = tool_env(home, COSIGN_PASSWORD=PASSWORD)

    def cosign(self, *args: str, check: bool = True) -> Any:
        return run([str(self.cosign3), *args], self.env, self.home, check)

    def signgate(self, *args: str, check: bool = True) -> Any:
        return signgate(*args, env=self.env, cwd=self.home, check=check)

    def cosign_sign_bundle(self, key: str, image: str, *extra: str) -> None:
        config = self.home / "signing-config.json"
        if not config.exists():
            self.cosign(
                "signing-config", "create", "--no-default-fulcio", "--no-default-oidc",
                "--no-default-rekor", "--no-default-tsa", "--out", str(config),
            )
        self.cosign(
            "sign", "--key", key, "--signing-config", str(config), "--yes",
            "--allow-insecure-registry", *extra, image,
        )

    def cosign_verify(self, key: str, image: str, *extra: str, check: bool = True) -> Any:
        return self.cosign(
            "verify", "--key", key, "--insecure-ignore-tlog", "--allow-insecure-registry",
            *extra, image, check=check,
        )

    def push(self, repository: str, content: bytes) -> str:
        async def push() -> str:
            async with RegistryClient(RegistryOptions()) as client:
                return await push_image(
                    client, Repository(self.host, repository), "v1", content=content
                )

        return anyio.run(push)

    def cosign2_verify(self, key: str, image: str, check: bool = True) -> Any:
        return run(
            [str(self.cosign2), "verify", "--key", key, "--insecure-ignore-tlog",
             "--allow-insecure-registry", image],
            self.env, self.home, check,
        )

    def fallback_index(self, repository: str, digest: str) -> dict[str, Any]:
        async def get() -> dict[str, Any]:
            async with RegistryClient(RegistryOptions()) as client:
                tag = digest.replace(":", "-")
                return (await client.get_manifest(Repository(self.host, repository), tag)).json()

        return anyio.run(get)

    def tags(self, repository: str) -> list[str]:
        async def get() -> list[str]:
            async with RegistryClient(RegistryOptions()) as client:
                return await client.list_tags(Repository(self.host, repository))

        return anyio.run(get)

    def key_id(self, public_key: str) -> str:
        return PublicKey.from_pem((self.home / public_key).read_bytes()).key_id


@pytest.fixture
def ws(cosign_binaries: dict[str, Path], registry: RunningRegistry, tmp_path: Path) -> Workspace:
    return Workspace(cosign_binaries["cosign3"], registry, tmp_path, cosign_binaries["cosign2"])


def unique(ws: Workspace, name: str) -> str:
    return f"bundle/{name}-{ws.home.name}".lower()


def test_signgate_verifies_what_cosign3_signs_as_a_bundle(ws: Workspace) -> None:
    ws.cosign("generate-key-pair", "--output-key-prefix", "co")
    ws.signgate("generate-key-pair", "--output-key-prefix", "other")
    repo = unique(ws, "cosign-bundle")
    digest = ws.push(repo, b"cosign3 bundle")
    image = f"{ws.host}/{repo}:v1"
    ws.cosign_sign_bundle("co.key", image, "-a", "env=prod")
    # A bundle, not a classic signature: only the fallback index exists.
    assert ws.fallback_index(repo, digest)["manifests"]
    result = ws.signgate("verify", "--key", "co.pub", "-a", "env=prod", image)
    # What cosign 3 prints for a bundle: a simple-signing claim, as for a classic signature.
    (claim,) = json.loads(result.stdout)
    assert claim == {
        "critical": {
            "identity": {"docker-reference": image},
            "image": {"docker-manifest-digest": digest},
            "type": "https://sigstore.dev/cosign/sign/v1",
        },
        "optional": {"env": "prod"},
    }
    assert [claim] == json.loads(ws.cosign_verify("co.pub", image).stdout)
    refused = ws.signgate("verify", "--key", "co.pub", "-a", "env=dev", image, check=False)
    assert refused.returncode == 1
    assert "annotation mismatch" in refused.stderr
    other = ws.signgate("verify", "--key", "other.pub", image, check=False)
    assert other.returncode == 1
    assert "bundle signature does not verify with the given keys" in other.stderr


def test_cosign3_verifies_what_signgate_signs_as_a_bundle(ws: Workspace) -> None:
    ws.signgate("generate-key-pair")
    repo = unique(ws, "signgate-bundle")
    digest = ws.push(repo, b"signgate bundle")
    image = f"{ws.host}/{repo}:v1"
    ws.signgate("sign", "--format", "bundle", "--key", "cosign.key", "-a", "env=prod", image)
    again = ws.signgate("sign", "--format", "bundle", "--key", "cosign.key", "-a", "env=prod",
                        image)
    assert "Already signed" in again.stderr
    (entry,) = ws.fallback_index(repo, digest)["manifests"]
    assert entry["artifactType"] == BUNDLE_MEDIA_TYPE
    ws.cosign_verify("cosign.pub", image, "-a", "env=prod")
    ws.cosign_verify("cosign.pub", f"{ws.host}/{repo}@{digest}")
    assert ws.cosign_verify("cosign.pub", image, "-a", "env=dev", check=False).returncode != 0
    ws.signgate("verify", "--key", "cosign.pub", "-a", "env=prod", image)
    # No classic signature was written.
    assert ws.signgate("triangulate", image).returncode == 0
    assert ws.cosign("verify", "--key", "cosign.pub", "--insecure-ignore-tlog",
                     "--allow-insecure-registry", "--new-bundle-format=false", image,
                     check=False).returncode != 0


def test_fallback_index_keeps_cosign3_entries_when_signgate_adds_one(ws: Workspace) -> None:
    ws.cosign("generate-key-pair", "--output-key-prefix", "co")
    ws.signgate("generate-key-pair", "--output-key-prefix", "sg")
    repo = unique(ws, "shared-index")
    digest = ws.push(repo, b"shared index")
    image = f"{ws.host}/{repo}:v1"
    ws.cosign_sign_bundle("co.key", image)
    ws.signgate("sign", "--format", "bundle", "--key", "sg.key", image)
    ws.cosign_sign_bundle("co.key", image, "-a", "after=signgate")
    assert len(ws.fallback_index(repo, digest)["manifests"]) == 3
    ws.cosign_verify("sg.pub", image)
    ws.cosign_verify("co.pub", image, "-a", "after=signgate")
    ws.signgate("verify", "--key", "sg.pub", image)
    ws.signgate("verify", "--key", "co.pub", "-a", "after=signgate", image)


def _key_ids(result: ImageVerification) -> set[str]:
    return {c.key.key_id for c in result.verified if c.key is not None}


def test_threshold_of_two_across_formats(ws: Workspace) -> None:
    ws.cosign("generate-key-pair", "--output-key-prefix", "co")
    repo = unique(ws, "both-formats")
    ws.push(repo, b"both formats")
    image = f"{ws.host}/{repo}:v1"
    ws.cosign_sign_bundle("co.key", image)
    classic = PrivateKeySigner(ec.generate_private_key(ec.SECP256R1()))
    bundle_key = PublicKey.from_pem((ws.home / "co.pub").read_bytes())
    reference = ImageReference.parse(image)

    async def check() -> None:
        async with RegistryClient(RegistryOptions()) as client:
            await sign_image(client, classic, reference, signature_format=SignatureFormat.CLASSIC)
            keys = [classic.public_key(), bundle_key]
            both = await verify_image(client, reference, keys)
            assert both.ok, both.reason()
            assert _key_ids(both) == {k.key_id for k in keys}
            only_classic = await verify_image(client, reference, keys, formats=("classic",))
            assert _key_ids(only_classic) == {classic.public_key().key_id}
            only_bundle = await verify_image(client, reference, keys, formats=("bundle",))
            assert _key_ids(only_bundle) == {bundle_key.key_id}

    anyio.run(check)


@pytest.mark.parametrize(
    "case",
    ["statement-for-another-digest", "another-key", "missing-manifest", "not-dsse"],
)
def test_bad_bundles_are_refused_with_a_reason(
    registry: RunningRegistry, tmp_path: Path, case: str
) -> None:
    signer = PrivateKeySigner(ec.generate_private_key(ec.SECP256R1()))
    stranger = PrivateKeySigner(ec.generate_private_key(ec.SECP256R1()))
    repository = registry.repository(f"bundle/bad-{case}-{tmp_path.name}".lower())
    expected = {
        "statement-for-another-digest": "digest claim mismatch: bundle is for sha256:"
                                        + "0" * 64,
        "another-key": "bundle signature does not verify with the given keys",
        "missing-manifest": "is missing",
        "not-dsse": "bundle content is not a DSSE envelope",
    }[case]

    async def check() -> None:
        async with RegistryClient(RegistryOptions()) as client:
            digest = await push_image(client, repository, "v1", content=case.encode())
            subject = await client.get_manifest(repository, digest)
            if case == "missing-manifest":
                # distribution refuses an index naming an unknown manifest: list a real bundle,
                # then delete its manifest.
                statement = build_statement(digest)
                signature = signer.sign(pae(IN_TOTO_PAYLOAD_TYPE, statement))
                listed = await write_bundle(
                    client, repository, subject,
                    build_bundle(statement, signature, signer.public_key()),
                )
                await client.delete_manifest(repository, listed)
            elif case == "not-dsse":
                bundle = json.dumps({
                    "mediaType": BUNDLE_MEDIA_TYPE,
                    "verificationMaterial": {"publicKey": {"hint": ""}},
                    "messageSignature": {"messageDigest": {"algorithm": "SHA2_256",
                                                           "digest": ""}, "signature": ""},
                }).encode()
                await write_bundle(client, repository, subject, bundle)
            else:
                named = "sha256:" + "0" * 64 if case.startswith("statement") else digest
                by = stranger if case == "another-key" else signer
                statement = build_statement(named)
                signature = by.sign(pae(IN_TOTO_PAYLOAD_TYPE, statement))
                await write_bundle(
                    client, repository, subject, build_bundle(statement, signature,
                                                              by.public_key())
                )
            result = await verify_image(
                client, ImageReference(repository, None, digest), [signer.public_key()]
            )
            assert not result.ok
            assert expected in result.reason()

    anyio.run(check)


class CompetingWriter(httpx.AsyncBaseTransport):
    """The real transport; right after our first write of the fallback index, a concurrent
    signer that read the index before us writes its own version (without our entry)."""

    def __init__(self, index_path: str, competitor_index: bytes) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.index_path = index_path
        self.competitor_index = competitor_index
        self.index_writes = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "PUT" and request.url.path == self.index_path:
            self.index_writes += 1
            if self.index_writes == 1:
                await response.aread()
                competing = httpx.Request(
                    "PUT", request.url, content=self.competitor_index,
                    headers={"Content-Type": OCI_INDEX},
                )
                answer = await self.inner.handle_async_request(competing)
                await answer.aread()
                assert answer.status_code == 201
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_fallback_index_write_overwritten_by_a_concurrent_signer_keeps_both(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    ours, theirs = (PrivateKeySigner(ec.generate_private_key(ec.SECP256R1())) for _ in range(2))
    repository = registry.repository(f"bundle/concurrent-{tmp_path.name}".lower())

    async def check() -> None:
        async with RegistryClient(RegistryOptions()) as client:
            digest = await push_image(client, repository, "v1", content=b"concurrent")
            subject = await client.get_manifest(repository, digest)
            # The competitor's bundle manifest exists; only its index entry is still to come.
            statement = build_statement(digest)
            bundle = build_bundle(
                statement, theirs.sign(pae(IN_TOTO_PAYLOAD_TYPE, statement)), theirs.public_key()
            )
            await client.push_blob(repository, EMPTY_CONFIG)
            await client.push_blob(repository, bundle)
            raw = bundle_manifest(
                bundle, Descriptor(subject.media_type, digest, len(subject.raw)),
                "2026-01-01T00:00:00Z",
            )
            theirs_digest = await client.put_manifest(
                repository, compute_digest(raw), raw, OCI_MANIFEST
            )
        competitor_index = index_with(
            None, Descriptor(OCI_MANIFEST, theirs_digest, len(raw), BUNDLE_MEDIA_TYPE)
        )
        transport = CompetingWriter(
            f"/v2/{repository.path}/manifests/{digest.replace(':', '-')}", competitor_index
        )
        async with RegistryClient(RegistryOptions(transport=transport)) as client:
            await sign_digest_bundle(client, ours, repository, digest)
            assert transport.index_writes == 2  # ours was dropped once, and written again
            found = await read_bundles(client, repository, digest)
            assert len(found.artifacts) == 2
            keys = [ours.public_key(), theirs.public_key()]
            result = await verify_image(client, ImageReference(repository, None, digest), keys)
            assert _key_ids(result) == {k.key_id for k in keys}

    anyio.run(check)


class ReferrersApiDouble(httpx.AsyncBaseTransport):
    """A test double of a registry with the OCI 1.1 referrers API: the real registry behind
    the real transport, plus ``GET /v2/<name>/referrers/<digest>`` answered from the manifests
    with a ``subject`` pushed through it. Records the paths of manifests written by tag."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.referrers: dict[str, list[dict[str, Any]]] = {}
        self.tag_writes: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and "/referrers/" in path:
            subject = path.rsplit("/", 1)[1]
            wanted = request.url.params.get("artifactType")
            entries = [
                e for e in self.referrers.get(subject, [])
                if wanted is None or e.get("artifactType") == wanted
            ]
            body = json.dumps(
                {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
            ).encode()
            return httpx.Response(200, headers={"Content-Type": OCI_INDEX}, content=body)
        if request.method == "PUT" and "/manifests/" in path:
            body = await request.aread()
            reference = path.rsplit("/", 1)[1]
            if not reference.startswith("sha256:"):
                self.tag_writes.append(path)
            document = json.loads(body)
            if isinstance(document.get("subject"), dict):
                self.referrers.setdefault(document["subject"]["digest"], []).append({
                    "mediaType": document["mediaType"], "digest": compute_digest(body),
                    "size": len(body), "artifactType": document.get("artifactType"),
                })
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_referrers_api_is_used_where_the_registry_offers_it(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    signer = PrivateKeySigner(ec.generate_private_key(ec.SECP256R1()))
    repository = registry.repository(f"bundle/api-{tmp_path.name}".lower())
    double = ReferrersApiDouble()

    async def check() -> None:
        async with RegistryClient(RegistryOptions(transport=double)) as client:
            digest = await push_image(client, repository, "v1", content=b"api")
            double.tag_writes.clear()
            await sign_digest_bundle(client, signer, repository, digest, {"env": "prod"})
            assert double.tag_writes == []  # no fallback index where the API exists
            reference = ImageReference(repository, None, digest)
            result = await verify_image(client, reference, [signer.public_key()], {"env": "prod"})
            assert result.ok, result.reason()
            assert result.signature_location == f"{repository} referrers API"
            again = await sign_digest_bundle(client, signer, repository, digest, {"env": "prod"})
            assert again.already_signed
        # The same registry without the API (and so without a fallback index): nothing found.
        async with RegistryClient(RegistryOptions()) as client:
            result = await verify_image(client, reference, [signer.public_key()])
            assert not result.ok
            assert "no signatures found" in result.reason()

    anyio.run(check)


def tree_sections(out: str) -> dict[str, list[str | None]]:
    """``signgate tree``'s output: each heading (``signatures (bundles): LOCATION``) with the key
    id of each of its entries (None when no key named it)."""
    sections: dict[str, list[str | None]] = {}
    heading = ""
    for line in out.splitlines()[1:]:
        if line.startswith(("├── ", "└── ")):
            heading = line[4:]
            sections[heading] = []
        elif line.startswith(("│   ", "    ")):
            key_id = line.rsplit("(key ", 1)[1].rstrip(")") if "(key " in line else None
            sections[heading].append(key_id)
    return sections


def test_signgate_signs_bundles_by_default(ws: Workspace) -> None:
    ws.signgate("generate-key-pair")
    repo = unique(ws, "default-format")
    digest = ws.push(repo, b"default format")
    image = f"{ws.host}/{repo}:v1"
    signed = ws.signgate("sign", "--key", "cosign.key", image)
    (entry,) = ws.fallback_index(repo, digest)["manifests"]
    assert f"-> {ws.host}/{repo}@{entry['digest']}" in signed.stderr
    assert sorted(ws.tags(repo)) == ["sha256-" + digest.removeprefix("sha256:"), "v1"]
    ws.cosign_verify("cosign.pub", image)
    assert ws.cosign2_verify("cosign.pub", image, check=False).returncode != 0  # no bundles
    ws.signgate("sign", "--format", "classic", "--key", "cosign.key", image)
    ws.cosign2_verify("cosign.pub", image)


def test_tree_and_clean_by_key_handle_cosign3_bundles(ws: Workspace) -> None:
    ws.cosign("generate-key-pair", "--output-key-prefix", "co")
    ws.signgate("generate-key-pair", "--output-key-prefix", "sg")
    co, sg = ws.key_id("co.pub"), ws.key_id("sg.pub")
    repo = unique(ws, "clean-by-key")
    digest = ws.push(repo, b"clean by key")
    image = f"{ws.host}/{repo}:v1"
    ws.cosign_sign_bundle("co.key", image)
    ws.signgate("sign", "--format", "classic", "--key", "sg.key", image)
    ws.signgate("sign", "--key", "sg.key", image)  # a bundle
    classic = f"signatures: {ws.host}/{repo}:{digest.replace(':', '-')}.sig"
    bundles = f"signatures (bundles): {ws.host}/{repo}:{digest.replace(':', '-')}"
    tree = ws.signgate("tree", "--key", "co.pub", "--key", "sg.pub", image).stdout
    sections = tree_sections(tree)
    assert sections == {classic: [sg], bundles: sections[bundles]}
    assert sorted(sections[bundles], key=str) == sorted([co, sg])
    listed = {m["digest"] for m in ws.fallback_index(repo, digest)["manifests"]}
    assert len(listed) == 2
    assert all(d in tree for d in listed)
    assert tree_sections(ws.signgate("tree", image).stdout) == {
        classic: [None], bundles: [None, None]
    }

    cleaned = ws.signgate("clean", "--key", "co.pub", "-f", image)
    assert "Removed 1 signature bundle(s) listed in" in cleaned.stderr
    assert "kept 1" in cleaned.stderr
    assert tree_sections(ws.signgate("tree", "--key", "co.pub", "--key", "sg.pub", image).stdout
                         ) == {classic: [sg], bundles: [sg]}
    assert ws.cosign_verify("co.pub", image, check=False).returncode != 0
    ws.cosign_verify("sg.pub", image)
    ws.cosign2_verify("sg.pub", image)
    refused = ws.signgate("verify", "--key", "co.pub", image, check=False)
    assert refused.returncode == 1
    assert "does not verify with the given keys" in refused.stderr
    ws.signgate("verify", "--format", "classic", "--key", "sg.pub", image)
    ws.signgate("verify", "--format", "bundle", "--key", "sg.pub", image)

    # A key with signatures in both formats loses both; the emptied index goes too.
    cleaned = ws.signgate("clean", "--key", "sg.pub", "-f", image)
    assert f"Removed {ws.host}/{repo}:{digest.replace(':', '-')}.sig" in cleaned.stderr
    assert "Removed 1 signature bundle(s) listed in" in cleaned.stderr
    assert ws.tags(repo) == ["v1"]
    gone = ws.signgate("verify", "--key", "sg.pub", image, check=False)
    assert "no signatures found" in gone.stderr
    assert ws.cosign_verify("sg.pub", image, check=False).returncode != 0


def test_clean_removes_signatures_in_both_formats_and_keeps_other_referrers(
    ws: Workspace,
) -> None:
    ws.cosign("generate-key-pair", "--output-key-prefix", "co")
    ws.signgate("generate-key-pair", "--output-key-prefix", "sg")
    co = ws.key_id("co.pub")
    repo = unique(ws, "clean-all")
    digest = ws.push(repo, b"clean all")
    image = f"{ws.host}/{repo}:v1"
    ws.cosign_sign_bundle("co.key", image)
    (ws.home / "predicate.json").write_text('{"built": "here"}')
    ws.cosign(
        "attest", "--key", "co.key", "--signing-config", str(ws.home / "signing-config.json"),
        "--yes", "--allow-insecure-registry", "--predicate", "predicate.json", "--type",
        "custom", image,
    )
    ws.signgate("sign", "--key", "sg.key", image)
    ws.signgate("sign", "--format", "classic", "--key", "sg.key", image)
    location = f"{ws.host}/{repo}:{digest.replace(':', '-')}"
    tree = tree_sections(ws.signgate("tree", "--key", "co.pub", image).stdout)
    assert tree[f"attestations (bundles): {location}"] == [co]
    assert sorted(tree[f"signatures (bundles): {location}"], key=str) == sorted([co, None],
                                                                                key=str)

    cleaned = ws.signgate("clean", "--type", "signature", "-f", image)
    assert "Removed 2 signature bundle(s) listed in" in cleaned.stderr
    (attestation,) = ws.fallback_index(repo, digest)["manifests"]  # the index keeps the rest
    assert tree_sections(ws.signgate("tree", image).stdout) == {
        f"attestations (bundles): {location}": [None]
    }
    for key in ("co.pub", "sg.pub"):
        refused = ws.signgate("verify", "--key", key, image, check=False)
        assert refused.returncode == 1
    ws.cosign("verify-attestation", "--key", "co.pub", "--insecure-ignore-tlog",
              "--allow-insecure-registry", "--type", "custom", image)

    cleaned = ws.signgate("clean", "-f", image)
    assert "Removed 1 attestation bundle(s) listed in" in cleaned.stderr
    assert ws.tags(repo) == ["v1"]
    assert "(none)" in ws.signgate("tree", image).stdout
    assert attestation["digest"] not in ws.signgate("tree", image).stdout


def test_concurrent_bundle_signings_of_the_same_digests_all_survive(ws: Workspace) -> None:
    ws.signgate("generate-key-pair", "--output-key-prefix", "a")
    ws.signgate("generate-key-pair", "--output-key-prefix", "b")
    repos = [unique(ws, f"race-{n}") for n in range(6)]
    digests = [ws.push(repo, f"race {n}".encode()) for n, repo in enumerate(repos)]
    images = [f"{ws.host}/{repo}@{digest}" for repo, digest in zip(repos, digests, strict=True)]
    # Two pipelines sign the same digests at once, each a command signing them concurrently.
    signers = [
        subprocess.Popen(
            [str(SIGNGATE), "sign", "--key", f"{name}.key", *images], env=ws.env, cwd=ws.home,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in ("a", "b")
    ]
    for signer in signers:
        _, stderr = signer.communicate(timeout=300)
        assert signer.returncode == 0, stderr
    for repo, digest in zip(repos, digests, strict=True):
        assert len(ws.fallback_index(repo, digest)["manifests"]) == 2
    for key in ("a.pub", "b.pub"):
        ws.signgate("verify", "--format", "bundle", "--key", key, *images)
        ws.cosign_verify(key, images[0])


def test_clean_by_key_prunes_index_entries_whose_manifest_is_gone(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    ours, theirs, gone = (PrivateKeySigner(ec.generate_private_key(ec.SECP256R1()))
                          for _ in range(3))
    repository = registry.repository(f"bundle/dangling-{tmp_path.name}".lower())

    async def check() -> None:
        async with RegistryClient(RegistryOptions()) as client:
            digest = await push_image(client, repository, "v1", content=b"dangling")
            for signer in (ours, theirs, gone):
                signed = await sign_digest_bundle(client, signer, repository, digest)
            await client.delete_manifest(repository, signed.manifest_digest)  # gone's
            reference = ImageReference(repository, None, digest)
            (outcome,) = await clean(client, reference, ["signature"], key=ours.public_key())
            assert (outcome.format, outcome.removed, outcome.kept) == ("bundle", 1, 1)
            (left,) = (await read_bundles(client, repository, digest)).artifacts
            assert left.problem is None
            result = await verify_image(client, reference, [ours.public_key(),
                                                            theirs.public_key()])
            assert _key_ids(result) == {theirs.public_key().key_id}

    anyio.run(check)


class ImagesInFlight(httpx.AsyncBaseTransport):
    """The real transport, counting the images being signed at once (from the read of an
    image's tag to the write of its fallback index). The first ``gate`` images wait until all
    of them have started, so that signing one at a time never gets past the gate."""

    def __init__(self, gate: int) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.gate = gate
        self.started = 0
        self.in_flight = 0
        self.most = 0
        self.all_started = anyio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path.endswith("/manifests/v1"):
            self.started += 1
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            if self.started == self.gate:
                self.all_started.set()
            if self.started <= self.gate:
                await self.all_started.wait()
        response = await self.inner.handle_async_request(request)
        if request.method == "PUT" and "/manifests/sha256-" in path:
            self.in_flight -= 1
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_bundle_signing_of_many_images_is_concurrent_and_bounded(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    signers = [PrivateKeySigner(ec.generate_private_key(ec.SECP256R1())) for _ in range(3)]
    repositories = [
        registry.repository(f"bundle/many-{n}-{tmp_path.name}".lower()) for n in range(8)
    ]
    transport = ImagesInFlight(gate=3)

    async def check() -> None:
        async with RegistryClient(RegistryOptions()) as client:
            digests = [
                await push_image(client, repository, "v1", content=f"many {n}".encode())
                for n, repository in enumerate(repositories)
            ]
        references = [ImageReference(repository, tag="v1") for repository in repositories]
        async with RegistryClient(RegistryOptions(transport=transport)) as client:
            with anyio.fail_after(120):  # signing one image at a time would wait at the gate
                outcomes = await sign_images(client, signers[0], references, concurrency=3)
            assert [o.error for o in outcomes] == [None] * len(references)
            assert transport.most == 3
            # Two more signers at once over one client: every fallback index keeps every entry.
            again = await asyncio.gather(
                *(sign_images(client, signer, references) for signer in signers[1:])
            )
            assert [o.error for outcomes in again for o in outcomes] == [None] * 16
            keys = [s.public_key() for s in signers]
            for reference, digest in zip(references, digests, strict=True):
                found = await read_bundles(client, reference.repository, digest)
                assert len(found.artifacts) == 3
                result = await verify_image(client, reference, keys, formats=("bundle",))
                assert _key_ids(result) == {k.key_id for k in keys}

    anyio.run(check)


@pytest.mark.parametrize(
    ("formats", "reason"),
    [
        ("[classic]", "the signature exists only in the bundle format; the classic format is "
                      "required"),
        ("[bundle]", None),
        (None, None),
    ],
)
def test_policy_formats_refuse_a_signature_only_in_the_other_format(
    ws: Workspace, formats: str | None, reason: str | None
) -> None:
    ws.signgate("generate-key-pair")
    repo = unique(ws, "policy-formats")
    ws.push(repo, b"policy formats")
    image = f"{ws.host}/{repo}:v1"
    ws.signgate("sign", "--key", "cosign.key", image)
    rule_formats = f"    formats: {formats}\n" if formats else ""
    (ws.home / "policy.yaml").write_text(
        f'rules:\n  - name: ours\n    images: ["{ws.host}/bundle/**"]\n'
        f"    keys: [cosign.pub]\n{rule_formats}"
    )
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"},
           "spec": {"containers": [{"name": "main", "image": image}]}}
    (ws.home / "pod.json").write_text(json.dumps(pod))
    checked = ws.signgate("check", "--policy", "policy.yaml", "-o", "json", "pod.json",
                          check=False)
    verify = ws.signgate("verify", "--key", "cosign.pub", "--format",
                         "classic" if formats == "[classic]" else "any", image, check=False)
    if reason is None:
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert verify.returncode == 0, verify.stderr
        return
    assert checked.returncode == 1
    assert reason in checked.stdout
    assert verify.returncode == 1
    assert f"signgate: {image}: {reason}\n" in verify.stderr
