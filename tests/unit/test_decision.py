"""Admission decisions: the policy applied to each image's verdict, and the response JSON."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest

from signgate.keys.model import PublicKey
from signgate.policy import parse_policy
from signgate.reference import ImageReference
from signgate.signatures.layout import SIMPLE_SIGNING_MEDIA_TYPE, SignatureLayer
from signgate.signatures.verify import ImageVerification, SignatureCheck
from signgate.webhook.decision import (
    AdmissionDecision,
    ImageVerdict,
    Verdict,
    decide,
    images_to_verify,
)
from signgate.webhook.review import AdmissionReview, parse_review, request_images
from tests.unit.test_review import (
    DIGEST_A,
    DIGEST_B,
    POD,
    WORKLOADS,
    admission_review,
    apply_replace_patch,
    manifest,
)
from tests.vectors import vector

UID = "705ab4f5-6393-11e8-b7cc-42010a800002"
KEY_RELEASE = "1a" * 32
KEY_VAULT = "2b" * 32
KEY_AWS = "3c" * 32
KEY_CI = "4d" * 32

POLICY = """\
unmatched: deny
rules:
  - name: platform
    images: ["registry.k8s.io/**"]
    action: allow
  - name: blocked
    images: [busybox]
    action: deny
  - name: sandbox
    images: ["**"]
    action: allow
    namespaces: {include: [sandbox-*]}
  - name: release
    images: ["registry.example.com/team/**"]
    keys: [/etc/signgate/release.pub, hashivault://release, awskms:///alias/release]
    threshold: 2
    annotations: {env: prod}
    namespaces: {exclude: [dev-*]}
  - name: dev
    images: ["registry.example.com/team/**"]
    keys: [/etc/signgate/ci.pub]
    mode: warn
  - name: third-party
    images: ["quay.io/**", nginx]
    keys: [/etc/signgate/vendor.pub]
    mode: audit
  - name: legacy
    images: [localhost:5000/legacy]
    action: deny
    mode: warn
"""

WEB = "registry.example.com/team/web:1.4.0"
REQUIREMENT = (
    "rule 'release' requires signatures by 2 of the keys /etc/signgate/release.pub, "
    "hashivault://release, awskms:///alias/release with annotations env=prod"
)


def pod_review(images: list[str], namespace: str = "shop", **review: Any) -> AdmissionReview:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
        },
    }
    return parse_review(admission_review(pod, **review))


def ref(text: str) -> ImageReference:
    return ImageReference.parse(text)


def good(digest: str = DIGEST_A, *keys: str) -> ImageVerdict:
    return ImageVerdict(digest, True, key_ids=frozenset(keys or (KEY_RELEASE, KEY_VAULT)))


# fmt: off
CASES = [
    # (name, images, namespace, verdicts, allowed, [(verdict, rule)], message, warnings)
    ("two of three keys", [WEB], "shop", {WEB: good(DIGEST_A, KEY_RELEASE, KEY_AWS)},
     True, [(Verdict.ALLOWED, "release")], "", []),
    ("three of three keys", [WEB], "shop", {WEB: good(DIGEST_A, KEY_RELEASE, KEY_AWS, KEY_VAULT)},
     True, [(Verdict.ALLOWED, "release")], "", []),
    ("one of three keys, threshold two", [WEB], "shop", {WEB: good(DIGEST_A, KEY_VAULT)},
     False, [(Verdict.DENIED, "release")],
     f"image '{WEB}' of container 'c0': {REQUIREMENT}: only 1 distinct key signed {DIGEST_A} "
     "(key 2b2b2b2b2b2b), 2 required", []),
    ("no signature", [WEB], "shop",
     {WEB: ImageVerdict(
         DIGEST_A, False, f"no signatures found for registry.example.com/team/web@{DIGEST_A}"
     )},
     False, [(Verdict.DENIED, "release")],
     f"image '{WEB}' of container 'c0': {REQUIREMENT}: no signatures found for "
     f"registry.example.com/team/web@{DIGEST_A}", []),
    ("signed by another key", [WEB], "shop",
     {WEB: ImageVerdict(DIGEST_A, False, "signature does not verify with the given keys")},
     False, [(Verdict.DENIED, "release")],
     f"image '{WEB}' of container 'c0': {REQUIREMENT}: signature does not verify with the "
     "given keys",
     []),
    ("registry down", [WEB], "shop",
     {WEB: ImageVerdict(None, False, "cannot connect to registry.example.com: connection refused")},
     False, [(Verdict.DENIED, "release")],
     f"image '{WEB}' of container 'c0': {REQUIREMENT}: cannot connect to registry.example.com: "
     "connection refused", []),
    ("no verdict fails closed", [WEB], "shop", {},
     False, [(Verdict.DENIED, "release")],
     f"image '{WEB}' of container 'c0': rule 'release': not verified (no verdict; internal error)",
     []),
    ("verdict without reason", [WEB], "shop", {WEB: ImageVerdict(DIGEST_A, False)},
     False, [(Verdict.DENIED, "release")],
     f"image '{WEB}' of container 'c0': {REQUIREMENT}: verification failed", []),
    ("excluded namespace falls to the warn rule", [WEB], "dev-anna",
     {WEB: ImageVerdict(DIGEST_A, False, "signature does not verify with the given keys")},
     True, [(Verdict.WARNED, "dev")], "",
     [f"image '{WEB}' of container 'c0' would be refused: rule 'dev' requires a signature by key "
      "/etc/signgate/ci.pub: signature does not verify with the given keys"]),
    ("warn rule verified", [WEB], "dev-anna", {WEB: good(DIGEST_A, KEY_CI)},
     True, [(Verdict.ALLOWED, "dev")], "", []),
    ("audit rule refusal is only logged", ["nginx:1.25"], "shop",
     {"nginx:1.25": ImageVerdict(
         DIGEST_B, False, f"no signatures found for index.docker.io/library/nginx@{DIGEST_B}"
     )},
     True, [(Verdict.AUDITED, "third-party")], "", []),
    ("static allow", ["registry.k8s.io/pause:3.9"], "shop", {},
     True, [(Verdict.ALLOWED, "platform")], "", []),
    ("static deny", ["busybox:1.36"], "shop", {},
     False, [(Verdict.DENIED, "blocked")],
     "image 'busybox:1.36' of container 'c0': denied by rule 'blocked'", []),
    ("static deny in warn mode", ["localhost:5000/legacy:7"], "shop", {},
     True, [(Verdict.WARNED, "legacy")], "",
     ["image 'localhost:5000/legacy:7' of container 'c0' would be refused: denied by rule "
      "'legacy'"]),
    ("unmatched deny", ["ghcr.io/someone/miner:latest"], "shop", {},
     False, [(Verdict.DENIED, None)],
     "image 'ghcr.io/someone/miner:latest' of container 'c0': matches no policy rule, and the "
     "policy denies unmatched images", []),
    ("namespace included by a static allow", ["ghcr.io/someone/miner:latest", WEB], "sandbox-1", {},
     True, [(Verdict.ALLOWED, "sandbox"), (Verdict.ALLOWED, "sandbox")], "", []),
    ("invalid image", ["Registry.example.com/Team/web"], "shop", {},
     False, [(Verdict.DENIED, None)],
     "image 'Registry.example.com/Team/web' of container 'c0': invalid image reference "
     "'Registry.example.com/Team/web': repository name 'Team/web' must be lowercase", []),
    ("every refusal is named, in order",
     [WEB, "busybox:1.36", "registry.k8s.io/pause:3.9", "ghcr.io/x/y"], "shop",
     {WEB: good(DIGEST_A, KEY_AWS)},
     False,
     [(Verdict.DENIED, "release"), (Verdict.DENIED, "blocked"), (Verdict.ALLOWED, "platform"),
      (Verdict.DENIED, None)],
     f"image '{WEB}' of container 'c0': {REQUIREMENT}: only 1 distinct key signed {DIGEST_A} "
     "(key 3c3c3c3c3c3c), 2 required; image 'busybox:1.36' of container 'c1': denied by rule "
     "'blocked'; image 'ghcr.io/x/y' of container 'c3': matches no policy rule, and the policy "
     "denies unmatched images", []),
    ("a warning does not hide a denial", ["localhost:5000/legacy", "busybox"], "shop", {},
     False, [(Verdict.WARNED, "legacy"), (Verdict.DENIED, "blocked")],
     "image 'busybox' of container 'c1': denied by rule 'blocked'",
     ["image 'localhost:5000/legacy' of container 'c0' would be refused: denied by rule 'legacy'"]),
]
# fmt: on


@pytest.mark.parametrize(
    ("images", "namespace", "verdicts", "allowed", "outcomes", "message", "warnings"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decisions(
    images: list[str],
    namespace: str,
    verdicts: dict[str, ImageVerdict],
    allowed: bool,
    outcomes: list[tuple[Verdict, str | None]],
    message: str,
    warnings: list[str],
) -> None:
    policy = parse_policy(POLICY)
    decision = decide(
        pod_review(images, namespace), policy, {ref(k): v for k, v in verdicts.items()}
    )
    assert decision.allowed is allowed
    assert [(o.verdict, o.rule) for o in decision.outcomes] == outcomes
    assert decision.message == message
    assert list(decision.warnings) == warnings
    response = decision.to_response(UID)["response"]
    assert response["allowed"] is allowed
    assert response.get("status") == (None if allowed else {"code": 403, "message": message})
    assert response.get("warnings", []) == warnings


def test_audit_refusals_are_recorded_for_the_log() -> None:
    verdict = ImageVerdict(DIGEST_B, False, "signature does not verify with the given keys")
    decision = decide(
        pod_review(["nginx:1.25"]), parse_policy(POLICY), {ref("nginx:1.25"): verdict}
    )
    assert decision.allowed
    assert not decision.warnings
    assert not decision.patch
    assert decision.audit == (
        "image 'nginx:1.25' of container 'c0' would be refused: rule 'third-party' requires a "
        "signature by key /etc/signgate/vendor.pub: signature does not verify with the given keys",
    )
    assert decision.outcomes[0].digest == DIGEST_B


def test_unmatched_allow() -> None:
    policy = parse_policy(POLICY.replace("unmatched: deny", "unmatched: allow"))
    decision = decide(pod_review(["ghcr.io/x/y:1"]), policy, {})
    assert decision.allowed
    assert [(o.verdict, o.rule, o.reason) for o in decision.outcomes] == [
        (Verdict.ALLOWED, None, "matches no policy rule, and the policy allows unmatched images")
    ]
    # An invalid image is refused whatever unmatched says: no rule can vouch for it.
    assert not decide(pod_review(["ghcr.io/X/y"]), policy, {}).allowed


def test_verified_tags_are_pinned_and_the_patch_applies() -> None:
    pod = manifest(POD)
    pod["spec"]["containers"][1]["image"] = "registry.example.com/team/proxy@" + DIGEST_B
    pod["spec"]["initContainers"][0]["image"] = "registry.k8s.io/pause:3.9"
    review = parse_review(admission_review(pod))
    policy = parse_policy(
        POLICY.replace("images: [busybox]", "images: [alpine]").replace(
            'images: ["quay.io/**", nginx]', 'images: ["quay.io/**", busybox]'
        )
    )
    verdicts = {
        ref(WEB): good(DIGEST_A, KEY_RELEASE, KEY_AWS),
        ref("registry.example.com/team/proxy@" + DIGEST_B): good(DIGEST_B),
        ref("busybox:1.36"): ImageVerdict("sha256:" + "e5" * 32, False, "no signatures found"),
    }
    decision = decide(review, policy, verdicts)
    assert decision.allowed, decision.message
    assert [(o.verdict, o.rule) for o in decision.outcomes] == [
        (Verdict.ALLOWED, "release"),
        (Verdict.ALLOWED, "release"),
        (Verdict.ALLOWED, "platform"),
        (Verdict.AUDITED, "third-party"),
    ]
    assert [o.verified for o in decision.outcomes] == [True, True, False, False]
    # Only the verified tag is pinned: not the digest, not the static allow, not the audited one.
    assert list(decision.patch) == [
        {"op": "replace", "path": "/spec/containers/0/image", "value": f"{WEB}@{DIGEST_A}"}
    ]
    response = decision.to_response(UID)
    assert response["apiVersion"] == "admission.k8s.io/v1"
    assert response["kind"] == "AdmissionReview"
    assert response["response"]["uid"] == UID
    assert response["response"]["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["response"]["patch"]))
    assert patch == list(decision.patch)
    patched = apply_replace_patch(pod, patch)
    assert [c["image"] for c in patched["spec"]["containers"]] == [
        f"{WEB}@{DIGEST_A}",
        "registry.example.com/team/proxy@" + DIGEST_B,
    ]
    assert patched["spec"]["initContainers"] == pod["spec"]["initContainers"]
    assert patched["spec"]["ephemeralContainers"] == pod["spec"]["ephemeralContainers"]
    validating = decision.to_response(UID, with_patch=False)["response"]
    assert "patch" not in validating
    assert "patchType" not in validating


@pytest.mark.parametrize("kind", WORKLOADS)
def test_each_workload_kind_is_verified_and_pinned(kind: str) -> None:
    text, expected = WORKLOADS[kind]
    obj = manifest(text)
    review = parse_review(admission_review(obj))
    policy = parse_policy("rules: [{name: all, images: ['**'], keys: [k.pub]}]")
    wanted = images_to_verify(review, policy)
    assert [r for r, _ in wanted] == list(dict.fromkeys(ref(image) for _, _, image in expected))
    assert {rule.name for _, rule in wanted} == {"all"}
    verdicts = {r: good(r.digest or DIGEST_A, KEY_CI) for r, _ in wanted}
    decision = decide(review, policy, verdicts)
    assert decision.allowed
    response = decision.to_response(UID)["response"]
    patch = json.loads(base64.b64decode(response["patch"])) if "patch" in response else []
    assert patch == list(decision.patch)
    patched = apply_replace_patch(obj, patch)
    images = request_images(parse_review(admission_review(patched)).request)
    assert [(i.path, i.image) for i in images] == [
        (path, image if "@" in image else f"{image}@{DIGEST_A}") for path, _, image in expected
    ]
    # What the API server stores next time round is admitted without a registry in sight.
    update = parse_review(admission_review(patched, operation="UPDATE", old=patched))
    assert images_to_verify(update, policy) == []
    assert decide(update, policy, {}).allowed


def test_each_workload_kind_is_denied_with_every_image_named() -> None:
    policy = parse_policy("rules: [{name: all, images: ['**'], keys: [k.pub]}]")
    for kind, (text, expected) in WORKLOADS.items():
        review = parse_review(admission_review(manifest(text)))
        decision = decide(review, policy, {})
        assert not decision.allowed, kind
        assert decision.message.count("not verified") == len(expected), kind
        for _, container, image in expected:
            assert f"image {image!r} of " in decision.message
            assert f" container {container!r}: rule 'all'" in decision.message
        assert "patch" not in decision.to_response(UID)["response"]


def test_update_with_unchanged_images_needs_no_verdict() -> None:
    old = manifest(WORKLOADS["Deployment"][0])
    new = copy.deepcopy(old)
    new["spec"]["replicas"] = 0
    review = parse_review(admission_review(new, operation="UPDATE", old=old))
    policy = parse_policy(POLICY)
    assert images_to_verify(review, policy) == []
    decision = decide(review, policy, {})
    assert decision.allowed
    assert not decision.patch
    assert not decision.warnings
    assert {o.verdict for o in decision.outcomes} == {Verdict.UNCHANGED}
    assert decision.to_response(UID) == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": UID, "allowed": True},
    }


def test_update_verifies_only_the_changed_image() -> None:
    old = manifest(WORKLOADS["Deployment"][0])
    new = copy.deepcopy(old)
    new["spec"]["template"]["spec"]["containers"][0]["image"] = (
        "registry.example.com/team/web:1.5.0"
    )
    review = parse_review(admission_review(new, operation="UPDATE", old=old))
    policy = parse_policy(POLICY)
    wanted = images_to_verify(review, policy)
    assert [(str(r), rule.name) for r, rule in wanted] == [
        ("registry.example.com/team/web:1.5.0", "release")
    ]
    decision = decide(review, policy, {wanted[0][0]: good(DIGEST_B)})
    assert decision.allowed
    assert list(decision.patch) == [
        {
            "op": "replace",
            "path": "/spec/template/spec/containers/0/image",
            "value": f"registry.example.com/team/web:1.5.0@{DIGEST_B}",
        }
    ]


def test_ephemeral_container_added_by_kubectl_debug() -> None:
    old = manifest(POD)
    del old["spec"]["ephemeralContainers"]
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"] = [
        {
            "name": "debugger-x7k2p",
            "image": "registry.example.com/team/toolbox:2",
            "targetContainerName": "web",
        }
    ]
    review = parse_review(
        admission_review(new, operation="UPDATE", old=old, sub_resource="ephemeralcontainers")
    )
    policy = parse_policy(POLICY)
    toolbox = ref("registry.example.com/team/toolbox:2")
    assert [(r, rule.name) for r, rule in images_to_verify(review, policy)] == [
        (toolbox, "release")
    ]
    denied = decide(review, policy, {toolbox: ImageVerdict(DIGEST_A, False, "no signatures found")})
    assert denied.message == (
        "image 'registry.example.com/team/toolbox:2' of ephemeral container 'debugger-x7k2p': "
        f"{REQUIREMENT}: no signatures found"
    )
    allowed = decide(review, policy, {toolbox: good(DIGEST_A)})
    assert allowed.allowed
    assert list(allowed.patch) == [
        {
            "op": "replace",
            "path": "/spec/ephemeralContainers/0/image",
            "value": f"registry.example.com/team/toolbox:2@{DIGEST_A}",
        }
    ]


def test_init_container_is_named_as_such() -> None:
    policy = parse_policy(POLICY)
    decision = decide(parse_review(admission_review(manifest(POD))), policy, {})
    assert "image 'registry.example.com/team/migrate:2.3.1' of init container 'migrate'" in (
        decision.message
    )


@pytest.mark.parametrize("operation", ["DELETE", "CONNECT"])
def test_delete_and_connect_are_allowed(operation: str) -> None:
    review = parse_review(admission_review(None, operation=operation, old=manifest(POD)))
    policy = parse_policy(POLICY)
    assert images_to_verify(review, policy) == []
    assert decide(review, policy, {}).to_response(UID) == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": UID, "allowed": True},
    }


def test_dry_run_gets_the_same_answer() -> None:
    policy = parse_policy(POLICY)
    document = admission_review(manifest(POD))
    dry = copy.deepcopy(document)
    dry["request"]["dryRun"] = True
    verdicts = {ref(WEB): good()}
    assert decide(parse_review(dry), policy, verdicts) == decide(
        parse_review(document), policy, verdicts
    )


def test_images_to_verify_lists_each_image_once_with_its_rule() -> None:
    review = pod_review(
        [
            WEB,
            "registry.k8s.io/pause:3.9",
            "nginx:1.25",
            "registry.example.com/team/web:1.4.0",
            "docker.io/library/nginx:1.25",
            "ghcr.io/x/y",
            "Bad/Image",
            "busybox",
        ]
    )
    wanted = images_to_verify(review, parse_policy(POLICY))
    assert [(str(r), rule.name, rule.threshold) for r, rule in wanted] == [
        (WEB, "release", 2),
        ("index.docker.io/library/nginx:1.25", "third-party", 1),
    ]


def test_verdict_warnings_reach_the_person() -> None:
    stale = ImageVerdict(
        DIGEST_A,
        True,
        key_ids=frozenset({KEY_RELEASE, KEY_AWS}),
        warning="registry.example.com is failing; allowed on a verdict from 2 minutes ago",
    )
    decision = decide(pod_review([WEB, WEB]), parse_policy(POLICY), {ref(WEB): stale})
    assert decision.allowed
    assert decision.warnings == (
        f"image '{WEB}' of container 'c0': registry.example.com is failing; allowed on a verdict "
        "from 2 minutes ago",
        f"image '{WEB}' of container 'c1': registry.example.com is failing; allowed on a verdict "
        "from 2 minutes ago",
    )
    assert [op["path"] for op in decision.patch] == [
        "/spec/containers/0/image",
        "/spec/containers/1/image",
    ]


def test_rule_by_image() -> None:
    decision = decide(
        pod_review([WEB, "registry.k8s.io/pause:3.9", "ghcr.io/x/y"]),
        parse_policy(POLICY),
        {ref(WEB): good()},
    )
    assert decision.rule_by_image == {
        WEB: "release",
        "registry.k8s.io/pause:3.9": "platform",
        "ghcr.io/x/y": None,
    }


def test_failing_closed() -> None:
    decision = AdmissionDecision.denial("signgate could not decide within 8s: registry too slow")
    assert decision.to_response(UID) == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": UID,
            "allowed": False,
            "status": {
                "code": 403,
                "message": "signgate could not decide within 8s: registry too slow",
            },
        },
    }


def test_a_denied_request_carries_no_patch() -> None:
    decision = decide(pod_review([WEB, "busybox"]), parse_policy(POLICY), {ref(WEB): good()})
    assert not decision.allowed
    assert decision.patch == ()
    assert "patch" not in decision.to_response(UID)["response"]


def test_verdict_from_a_verification() -> None:
    key = PublicKey.from_pem(vector("signatures", "keys", "ci-cosign.pub").read_bytes())
    other = PublicKey.from_pem(vector("signatures", "keys", "ci-cosign2.pub").read_bytes())
    layers = [SignatureLayer(SIMPLE_SIGNING_MEDIA_TYPE, "sha256:" + c * 64, 10, {}) for c in "abc"]
    verification = ImageVerification(
        ref(WEB),
        DIGEST_A,
        (
            SignatureCheck(layers[0], key=key),
            SignatureCheck(layers[1], key=key),
            SignatureCheck(layers[2], reason="signature does not verify with the given keys"),
        ),
    )
    verdict = ImageVerdict.from_verification(verification)
    assert verdict == ImageVerdict(DIGEST_A, True, "", frozenset({key.key_id}))
    failed = ImageVerdict.from_verification(
        ImageVerification(ref(WEB), None, error="registry.example.com: connection refused"),
        warning="w",
    )
    assert failed == ImageVerdict(
        None, False, "registry.example.com: connection refused", frozenset(), "w"
    )
    both = ImageVerification(
        ref(WEB),
        DIGEST_A,
        (SignatureCheck(layers[0], key=key), SignatureCheck(layers[1], key=other)),
    )
    assert ImageVerdict.from_verification(both).key_ids == {key.key_id, other.key_id}
