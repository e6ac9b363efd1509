"""cosign 3's bundle format against the real cosign 3 CLI and a real registry (distribution 2.8,
which has no referrers API: the fallback index at tag ``sha256-HEX`` is used)."""

from __future__ import annotations

import json
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
from signgate.signatures.referrers import read_bundles, sign_digest_bundle, write_bundle
from signgate.signatures.sign import sign_image
from signgate.signatures.verify import ImageVerification, verify_image
from tests.integration.registry_servers import RunningRegistry
from tests.integration.tools import run, signgate, tool_env

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"


class Workspace:
    def __init__(self, cosign3: Path, registry: RunningRegistry, home: Path) -> None:
        self.cosign3 = cosign3
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

    def fallback_index(self, repository: str, digest: str) -> dict[str, Any]:
        async def get() -> dict[str, Any]:
            async with RegistryClient(RegistryOptions()) as client:
                tag = digest.replace(":", "-")
                return (await client.get_manifest(Repository(self.host, repository), tag)).json()

        return anyio.run(get)


@pytest.fixture
def ws(cosign_binaries: dict[str, Path], registry: RunningRegistry, tmp_path: Path) -> Workspace:
    return Workspace(cosign_binaries["cosign3"], registry, tmp_path)


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
    (statement,) = json.loads(result.stdout)
    assert statement["subject"][0]["digest"] == {"sha256": digest.removeprefix("sha256:")}
    assert statement["predicateType"] == "https://sigstore.dev/cosign/sign/v1"
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
            await sign_image(client, classic, reference)
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
