"""The admission controller against a real docker-registry, with images signed by signgate and
by the real cosign 2 CLI (classic signatures)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signgate.keys.model import PrivateKeySigner
from signgate.policy import parse_policy
from signgate.reference import ImageReference, Repository, signature_tag
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image, push_index
from signgate.signatures.sign import sign_digest
from signgate.webhook.controller import AdmissionController, ControllerSettings
from signgate.webhook.decision import AdmissionDecision, Verdict
from signgate.webhook.metrics import WebhookMetrics
from signgate.webhook.review import AdmissionReview, parse_review
from tests.integration.registry_servers import RunningRegistry, running_registry
from tests.integration.tools import run, tool_env
from tests.unit.test_review import admission_review

pytestmark = pytest.mark.integration

COSIGN_PASSWORD = "controller test"


@dataclass(frozen=True)
class Keys:
    """Public key files: two signgate keys (with their signers) and one made by cosign."""

    first: Path
    second: Path
    cosign: Path
    first_signer: PrivateKeySigner
    second_signer: PrivateKeySigner
    cosign_private: Path
    cosign_env: dict[str, str]
    cosign_bin: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory, cosign_binaries: dict[str, Path]) -> Keys:
    home = tmp_path_factory.mktemp("controller-keys")
    env = tool_env(home, COSIGN_PASSWORD=COSIGN_PASSWORD)
    run([str(cosign_binaries["cosign2"]), "generate-key-pair"], env, cwd=home)
    signers = []
    for name in ("first", "second"):
        signer = PrivateKeySigner(ec.generate_private_key(ec.SECP256R1()))
        (home / f"{name}.pub").write_bytes(signer.public_key().pem())
        signers.append(signer)
    return Keys(
        home / "first.pub",
        home / "second.pub",
        home / "cosign.pub",
        signers[0],
        signers[1],
        home / "cosign.key",
        env,
        cosign_binaries["cosign2"],
    )


@dataclass
class Images:
    """Pushing and signing images in one registry, under a repository prefix of the test's."""

    registry: RunningRegistry
    prefix: str
    keys: Keys

    def repository(self, name: str) -> Repository:
        return self.registry.repository(f"{self.prefix}/{name}")

    def image(self, name: str, tag: str = "v1") -> str:
        return f"{self.repository(name)}:{tag}"

    async def push(self, name: str, content: bytes | None = None, tag: str = "v1") -> str:
        async with RegistryClient(self.registry.options()) as client:
            return await push_image(
                client, self.repository(name), tag, content=content or name.encode()
            )

    async def push_index(self, name: str) -> tuple[str, list[str]]:
        async with RegistryClient(self.registry.options()) as client:
            return await push_index(
                client,
                self.repository(name),
                "v1",
                content=name.encode(),
                platforms=[("linux", "amd64"), ("linux", "arm64")],
            )

    async def sign(
        self,
        name: str,
        digest: str,
        signer: str = "signgate",
        annotations: dict[str, str] | None = None,
        key: PrivateKeySigner | None = None,
    ) -> None:
        """Sign ``name@digest`` with signgate (``key``, default the first key) or cosign 2."""
        if signer == "cosign2":
            extra = [arg for k, v in (annotations or {}).items() for arg in ("-a", f"{k}={v}")]
            run(
                [
                    str(self.keys.cosign_bin), "sign", "--key", str(self.keys.cosign_private),
                    "--tlog-upload=false", "--yes", "--allow-insecure-registry", *extra,
                    f"{self.repository(name)}@{digest}",
                ],
                self.keys.cosign_env,
            )
            return
        async with RegistryClient(self.registry.options()) as client:
            await sign_digest(
                client,
                key or self.keys.first_signer,
                ImageReference(self.repository(name)),
                digest,
                annotations,
            )

    def key_for(self, signer: str) -> Path:
        return self.keys.cosign if signer == "cosign2" else self.keys.first


@pytest.fixture
def images(registry: RunningRegistry, keys: Keys, tmp_path: Path) -> Images:
    return Images(registry, tmp_path.name.lower().replace("_", "-"), keys)


def pod(*image_names: str, namespace: str = "shop") -> dict[str, Any]:
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(image_names)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"containers": containers},
    }


def review_of(obj: dict[str, Any], operation: str = "CREATE", old: Any = None) -> AdmissionReview:
    return parse_review(admission_review(obj, operation=operation, old=old))


class Controllers:
    """Makes started controllers (each with its own metrics) and closes them at the end."""

    def __init__(self) -> None:
        self.started: list[AdmissionController] = []
        self.metrics: dict[int, WebhookMetrics] = {}

    async def __call__(
        self,
        policy: str,
        options: RegistryOptions | None = None,
        *,
        clock: Any = None,
        **settings: Any,
    ) -> AdmissionController:
        metrics = WebhookMetrics()
        controller = AdmissionController(
            parse_policy(policy),
            options or RegistryOptions(),
            ControllerSettings(**settings),
            metrics=metrics,
            **({"clock": clock} if clock is not None else {}),
        )
        self.started.append(controller)
        self.metrics[id(controller)] = metrics
        await controller.start()
        assert controller.ready, controller.readiness_problems()
        return controller

    def registry_requests(self, controller: AdmissionController) -> int:
        """Registry responses and transport failures the controller has seen."""
        return self.metrics[id(controller)].registry_requests()


@pytest.fixture
async def controllers() -> AsyncIterator[Controllers]:
    made = Controllers()
    yield made
    for controller in made.started:
        await controller.aclose()


def policy_for(images: Images, *keys: Path, extra: str = "", unmatched: str = "deny") -> str:
    key_list = ", ".join(str(k) for k in keys)
    return f"""\
unmatched: {unmatched}
rules:
  - name: ours
    images: ["{images.registry.host}/{images.prefix}/**"]
    keys: [{key_list}]
{extra}"""


async def decide(controller: AdmissionController, *image_names: str, **pod_args: Any
                 ) -> AdmissionDecision:
    return await controller.review(review_of(pod(*image_names, **pod_args)))


SIGNERS = ["signgate", "cosign2"]


@pytest.mark.anyio
@pytest.mark.parametrize("signer", SIGNERS)
async def test_signed_image_is_allowed_and_pinned(
    images: Images, controllers: Controllers, signer: str
) -> None:
    digest = await images.push("web")
    await images.sign("web", digest, signer)
    controller = await controllers(policy_for(images, images.key_for(signer)))
    decision = await decide(controller, images.image("web"))
    assert decision.allowed, decision.message
    assert decision.patch == (
        {
            "op": "replace",
            "path": "/spec/containers/0/image",
            "value": f"{images.image('web')}@{digest}",
        },
    )
    (outcome,) = decision.outcomes
    assert (outcome.verdict, outcome.rule, outcome.digest) == (Verdict.ALLOWED, "ours", digest)


@pytest.mark.anyio
@pytest.mark.parametrize("signer", SIGNERS)
async def test_refusals(images: Images, controllers: Controllers, signer: str) -> None:
    key = images.key_for(signer)
    await images.push("unsigned")
    other_key = await images.push("other-key")
    await images.sign("other-key", other_key, "signgate", key=images.keys.second_signer)
    # A valid signature by our key, for another image's digest, copied to this one's tag.
    signed = await images.push("signed")
    await images.sign("signed", signed, signer)
    copied = await images.push("signed", b"another image", tag="copied")
    async with RegistryClient(images.registry.options()) as client:
        repo = images.repository("signed")
        manifest = await client.get_manifest(repo, signature_tag(signed))
        await client.put_manifest(repo, signature_tag(copied), manifest.raw, manifest.media_type)

    controller = await controllers(policy_for(images, key))
    expectations = {
        images.image("unsigned"): f"no signatures found for {images.repository('unsigned')}",
        images.image("other-key"): "signature does not verify with the given keys",
        images.image("signed", "copied"): f"digest claim mismatch: signature is for {signed}",
    }
    for image, reason in expectations.items():
        decision = await decide(controller, image)
        assert not decision.allowed, image
        assert reason in decision.message
        assert decision.message.startswith(f"image {image!r} of container 'c0': rule 'ours' ")
    assert (await decide(controller, images.image("signed"))).allowed


@pytest.mark.anyio
async def test_a_tampered_manifest_is_refused(
    images: Images, controllers: Controllers, registry: RunningRegistry
) -> None:
    digest = await images.push("tampered")
    await images.sign("tampered", digest)
    algorithm, hex_digest = digest.split(":")
    blobs = registry.storage / "docker/registry/v2/blobs"
    data = blobs / algorithm / hex_digest[:2] / hex_digest / "data"
    stored = data.read_bytes()
    # Same length, one byte changed: the registry serves it under the old digest.
    position = stored.index(b'"digest":"sha256:') + len(b'"digest":"sha256:')
    changed = b"0" if stored[position : position + 1] != b"0" else b"1"
    data.write_bytes(stored[:position] + changed + stored[position + 1 :])
    controller = await controllers(policy_for(images, images.keys.first))
    decision = await decide(controller, images.image("tampered"))
    assert not decision.allowed
    assert "the registry served a manifest whose digest is" in decision.message


@pytest.mark.anyio
@pytest.mark.parametrize("signer", SIGNERS)
async def test_annotations_are_required(
    images: Images, controllers: Controllers, signer: str
) -> None:
    prod = await images.push("prod")
    await images.sign("prod", prod, signer, {"env": "prod", "team": "web"})
    dev = await images.push("dev")
    await images.sign("dev", dev, signer, {"env": "dev"})
    plain = await images.push("plain")
    await images.sign("plain", plain, signer)
    policy = policy_for(images, images.key_for(signer), extra="    annotations: {env: prod}\n")
    controller = await controllers(policy)
    assert (await decide(controller, images.image("prod"))).allowed
    for name, found in (("dev", "'dev'"), ("plain", "None")):
        decision = await decide(controller, images.image(name))
        assert not decision.allowed
        assert f"annotation mismatch: env=prod required, found {found}" in decision.message


@pytest.mark.anyio
async def test_two_of_three_keys(images: Images, controllers: Controllers) -> None:
    both = await images.push("both")
    await images.sign("both", both, "signgate")
    await images.sign("both", both, "cosign2")
    once = await images.push("once")
    await images.sign("once", once, "cosign2")
    keys = images.keys
    policy = policy_for(images, keys.first, keys.cosign, keys.second, extra="    threshold: 2\n")
    controller = await controllers(policy)
    assert (await decide(controller, images.image("both"))).allowed
    decision = await decide(controller, images.image("once"))
    assert not decision.allowed
    assert "only 1 distinct key signed" in decision.message
    assert "2 required" in decision.message


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["warn", "audit"])
async def test_warn_and_audit_modes_admit_what_enforce_refuses(
    images: Images, controllers: Controllers, mode: str
) -> None:
    await images.push("unsigned")
    policy = policy_for(images, images.keys.first, extra=f"    mode: {mode}\n")
    controller = await controllers(policy)
    decision = await decide(controller, images.image("unsigned"))
    assert decision.allowed
    assert decision.patch == ()
    if mode == "warn":
        (warning,) = decision.warnings
        assert "would be refused" in warning
        assert "no signatures found" in warning
        assert decision.audit == ()
    else:
        assert decision.warnings == ()
        (audit,) = decision.audit
        assert "no signatures found" in audit


@pytest.mark.anyio
@pytest.mark.parametrize("unmatched", ["allow", "deny"])
async def test_unmatched_images_and_static_rules_never_ask_the_registry(
    images: Images, controllers: Controllers, unmatched: str
) -> None:
    host = images.registry.host
    extra = f"""\
  - name: platform
    images: ["{host}/platform/**"]
    action: allow
  - name: blocked
    images: ["{host}/blocked/**"]
    action: deny
"""
    controller = await controllers(
        policy_for(images, images.keys.first, extra=extra, unmatched=unmatched)
    )
    assert (await decide(controller, f"{host}/platform/tool:1")).allowed
    blocked = await decide(controller, f"{host}/blocked/tool:1")
    assert not blocked.allowed
    assert "denied by rule 'blocked'" in blocked.message
    elsewhere = await decide(controller, f"{host}/elsewhere/tool:1")
    assert elsewhere.allowed is (unmatched == "allow")
    verb = {"allow": "allows", "deny": "denies"}[unmatched]
    assert f"matches no policy rule, and the policy {verb} unmatched images" in (
        elsewhere.outcomes[0].reason
    )
    assert controllers.registry_requests(controller) == 0


@pytest.mark.anyio
async def test_namespace_exclusion_passes_the_image_to_the_next_rule(
    images: Images, controllers: Controllers
) -> None:
    await images.push("web")
    extra = """\
    namespaces: {exclude: [dev-*]}
  - name: dev
    images: ["**"]
    action: allow
    namespaces: {include: [dev-*]}
"""
    controller = await controllers(policy_for(images, images.keys.first, extra=extra))
    assert not (await decide(controller, images.image("web"), namespace="shop")).allowed
    decision = await decide(controller, images.image("web"), namespace="dev-alice")
    assert decision.allowed
    assert decision.outcomes[0].rule == "dev"


@pytest.mark.anyio
async def test_index_signatures_with_cosign_recursive(
    images: Images, controllers: Controllers
) -> None:
    index, children = await images.push_index("multi")
    await images.sign("multi", index, "cosign2")
    policy = policy_for(images, images.keys.cosign)
    strict = policy + "    require_child_signature: true\n"
    assert (await decide(await controllers(policy), images.image("multi"))).allowed
    decision = await decide(await controllers(strict), images.image("multi"))
    assert not decision.allowed
    assert f"the linux/amd64 image {children[0]} of the index" in decision.message
    run(
        [
            str(images.keys.cosign_bin), "sign", "--key", str(images.keys.cosign_private),
            "--tlog-upload=false", "--yes", "--allow-insecure-registry", "--recursive",
            images.image("multi"),
        ],
        images.keys.cosign_env,
    )
    assert (await decide(await controllers(strict), images.image("multi"))).allowed


@pytest.fixture
def stoppable_registry(tmp_path: Path) -> Iterator[tuple[RunningRegistry, Any]]:
    """A registry of this test's own and a function that stops it."""
    context = running_registry(tmp_path / "stoppable")
    running = context.__enter__()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            context.__exit__(None, None, None)

    try:
        yield running, stop
    finally:
        stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_a_stopped_registry(
    stoppable_registry: tuple[RunningRegistry, Any], keys: Keys, controllers: Controllers
) -> None:
    running, stop = stoppable_registry
    images = Images(running, "stopped", keys)
    digest = await images.push("web")
    await images.sign("web", digest)
    policy = policy_for(images, keys.first)
    clock = FakeClock()
    warm = await controllers(policy, clock=clock, stale_if_error_seconds=3600)
    assert (await decide(warm, images.image("web"))).allowed
    stop()

    controller = await controllers(policy, deadline_seconds=2)
    # UPDATE that changes no image (a scale-down, a label): answered without the registry.
    before = pod(images.image("web"))
    after = {**before, "metadata": {**before["metadata"], "labels": {"replicas": "0"}}}
    decision = await controller.review(review_of(after, "UPDATE", old=before))
    assert decision.allowed
    assert controllers.registry_requests(controller) == 0
    # A new image is refused, saying why.
    decision = await decide(controller, images.image("web"))
    assert not decision.allowed
    assert f"cannot connect to registry {running.host}: connection refused" in decision.message
    # The warm controller, past its TTLs, keeps the digest it verified (stale-if-error).
    clock.now += 600
    decision = await decide(warm, images.image("web"))
    assert decision.allowed, decision.message
    assert decision.patch[0]["value"] == f"{images.image('web')}@{digest}"
    assert any("stale-if-error" in w for w in decision.warnings)


@pytest.fixture
def hanging_registry() -> Iterator[str]:
    """A loopback listener whose connections are accepted by the kernel and never answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.anyio
async def test_a_hanging_registry_is_a_denial_within_the_deadline(
    hanging_registry: str, keys: Keys, controllers: Controllers
) -> None:
    policy = f"""\
rules:
  - name: ours
    images: ["{hanging_registry}/**"]
    keys: [{keys.first}]
"""
    controller = await controllers(policy, deadline_seconds=0.5)
    image = f"{hanging_registry}/team/web:v1"
    decision = await decide(controller, image)
    assert not decision.allowed
    assert (
        f"the registry {hanging_registry} did not answer within the 0.5 s deadline"
        in decision.message
    )


@pytest.mark.anyio
async def test_concurrent_reviews_of_one_image_make_one_verifications_requests(
    images: Images, controllers: Controllers
) -> None:
    digest = await images.push("scaled")
    await images.sign("scaled", digest)
    policy = policy_for(images, images.keys.first)
    single = await controllers(policy)
    assert (await decide(single, images.image("scaled"))).allowed
    one_verification = controllers.registry_requests(single)
    assert one_verification > 0

    controller = await controllers(policy)
    decisions = await asyncio.gather(
        *(decide(controller, images.image("scaled")) for _ in range(200))
    )
    assert all(d.allowed for d in decisions)
    assert controllers.registry_requests(controller) == one_verification
