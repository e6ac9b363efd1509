"""The answer to an admission request: the policy applied to its images' verdicts (pure).

The caller asks :func:`images_to_verify` which images need which rule's keys, verifies them
with the registry, and hands the verdicts to :func:`decide`. The webhook sends
:meth:`AdmissionDecision.to_response`; ``signgate check`` prints the outcomes.

https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/#response
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any

from signgate.policy import Action, Mode, Policy, Rule
from signgate.reference import ImageReference
from signgate.webhook.review import (
    API_VERSION,
    REVIEW_KIND,
    AdmissionReview,
    ContainerImage,
    pin_patch,
    request_images,
)

if TYPE_CHECKING:
    from signgate.signatures.verify import ImageVerification

SHORT_KEY_ID_LENGTH = 12
_UID_PLACEHOLDER = "\x00uid"


@dataclass(frozen=True)
class ImageVerdict:
    """What verifying one image under its rule found; the caller computes it with the registry.

    ``ok`` means the image resolved and signatures verified with the rule's keys and
    annotations; ``key_ids`` are the distinct keys (:attr:`PublicKey.key_id`) whose signatures
    verified, which :func:`decide` counts against the rule's threshold. ``reason`` says why
    verification failed. ``warning`` is passed on to the person (a verdict kept from before a
    registry failure, say).
    """

    digest: str | None
    ok: bool
    reason: str = ""
    key_ids: frozenset[str] = frozenset()
    warning: str | None = None

    @classmethod
    def from_verification(
        cls, verification: ImageVerification, warning: str | None = None
    ) -> ImageVerdict:
        return cls(
            digest=verification.digest,
            ok=verification.ok,
            reason=verification.reason(),
            key_ids=frozenset(c.key.key_id for c in verification.verified if c.key is not None),
            warning=warning,
        )


class Verdict(StrEnum):
    """What happened to one image."""

    ALLOWED = "allowed"
    DENIED = "denied"
    WARNED = "warned"  # refused by a rule in warn mode: admitted with a warning
    AUDITED = "audited"  # refused by a rule in audit mode: admitted, logged
    UNCHANGED = "unchanged"  # UPDATE: the stored object runs it already


@dataclass(frozen=True)
class ImageOutcome:
    """One image of the request: its verdict, the rule that decided it, and why. ``verified``
    is True when signatures vouched for ``digest`` (not for static or unmatched allows)."""

    image: ContainerImage
    verdict: Verdict
    rule: str | None
    digest: str | None
    reason: str
    verified: bool = False


@dataclass(frozen=True)
class AdmissionDecision:
    """The answer to one request.

    ``patch`` pins every verified tag to its digest (only for an allowed request); ``audit``
    holds what audit-mode rules would have refused, for the log only.
    """

    allowed: bool
    message: str = ""
    warnings: tuple[str, ...] = ()
    patch: tuple[dict[str, str], ...] = field(default=(), hash=False)
    outcomes: tuple[ImageOutcome, ...] = ()
    audit: tuple[str, ...] = ()

    @classmethod
    def denial(cls, message: str) -> AdmissionDecision:
        """A denial without image outcomes: failing closed (deadline, unexpected error)."""
        return cls(allowed=False, message=message)

    @property
    def rule_by_image(self) -> dict[str, str | None]:
        """The rule that decided each image (as written); None for unmatched or unchanged."""
        return {o.image.image: o.rule for o in self.outcomes}

    def to_response(self, uid: str, *, with_patch: bool = True) -> dict[str, Any]:
        """The AdmissionReview v1 response for the request ``uid``; ``with_patch`` is False for
        a validating webhook, which may not patch."""
        response: dict[str, Any] = {"uid": uid, "allowed": self.allowed}
        if not self.allowed:
            response["status"] = {"code": 403, "message": self.message}
        if self.warnings:
            response["warnings"] = list(self.warnings)
        if with_patch and self.allowed and self.patch:
            patch = json.dumps(list(self.patch), separators=(",", ":")).encode()
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(patch).decode("ascii")
        return {"apiVersion": API_VERSION, "kind": REVIEW_KIND, "response": response}

    @cached_property
    def log_fields(self) -> dict[str, Any]:
        """The fields of the decision log line that depend on the decision alone (the request's
        are added per request). Messages name key ids, never key references with secrets in
        them (the policy shows those through ``display_key_ref``)."""
        return {
            "verdict": "allowed" if self.allowed else "denied",
            "rules": sorted({o.rule for o in self.outcomes if o.rule is not None}),
            "reason": self.message,
            "images": [
                {
                    "image": o.image.image,
                    "container": o.image.container,
                    "digest": o.digest,
                    "verdict": o.verdict.value,
                    "rule": o.rule,
                    "reason": o.reason,
                }
                for o in self.outcomes
            ],
            "warnings": list(self.warnings),
            "audit": list(self.audit),
        }

    @cached_property
    def log_fields_json(self) -> str:
        """:attr:`log_fields` as the members of a JSON object (``"a":1,"b":2``), serialised once
        for all the reviews this (cached) decision answers."""
        return json.dumps(self.log_fields, separators=(",", ":"))[1:-1]

    def response_body(self, uid: str, *, with_patch: bool = True) -> bytes:
        """:meth:`to_response` as compact JSON. The webhook answers the same decision many times
        (it is cached), so everything but the uid is serialised once."""
        before, after = self._response_halves[with_patch]
        return before + json.dumps(uid).encode() + after

    @cached_property
    def _response_halves(self) -> dict[bool, tuple[bytes, bytes]]:
        halves = {}
        for with_patch in (False, True):
            body = json.dumps(
                self.to_response(_UID_PLACEHOLDER, with_patch=with_patch), separators=(",", ":")
            ).encode()
            # The uid is the first field of the response, after constant fields.
            before, _, after = body.partition(json.dumps(_UID_PLACEHOLDER).encode())
            halves[with_patch] = (before, after)
        return halves


def images_to_verify(review: AdmissionReview, policy: Policy) -> list[tuple[ImageReference, Rule]]:
    """Each distinct new image whose rule has keys, with that rule, in the request's order:
    what the caller verifies before calling :func:`decide`."""
    request = review.request
    namespace = request.workload_namespace
    wanted: dict[ImageReference, Rule] = {}
    for image in request_images(request):
        reference = image.reference
        if not image.changed or reference is None or reference in wanted:
            continue
        rule = policy.rule_for(reference, namespace)
        if rule is not None and rule.verifies:
            wanted[reference] = rule
    return list(wanted.items())


def decide(
    review: AdmissionReview, policy: Policy, verdicts: Mapping[ImageReference, ImageVerdict]
) -> AdmissionDecision:
    """Apply the policy to each image of the request; a verifying rule's image without a
    verdict in ``verdicts`` counts as failed (fail closed)."""
    namespace = review.request.workload_namespace
    outcomes = [
        _outcome(image, policy, namespace, verdicts) for image in request_images(review.request)
    ]
    refusals = [_clause(o) for o in outcomes if o.verdict is Verdict.DENIED]
    warnings = [_clause(o, "would be refused") for o in outcomes if o.verdict is Verdict.WARNED]
    for outcome in outcomes:
        verdict = verdicts.get(outcome.image.reference) if outcome.image.reference else None
        if outcome.rule is not None and verdict is not None and verdict.warning:
            warnings.append(f"{_described(outcome.image)}: {verdict.warning}")
    audit = [_clause(o, "would be refused") for o in outcomes if o.verdict is Verdict.AUDITED]
    pinned = [o for o in outcomes if o.verified]
    digests = {o.image.reference: o.digest for o in pinned if o.image.reference and o.digest}
    allowed = not refusals
    return AdmissionDecision(
        allowed=allowed,
        message="; ".join(refusals),
        warnings=tuple(dict.fromkeys(warnings)),
        patch=tuple(pin_patch((o.image for o in pinned), digests)) if allowed else (),
        outcomes=tuple(outcomes),
        audit=tuple(audit),
    )


def _outcome(
    image: ContainerImage,
    policy: Policy,
    namespace: str,
    verdicts: Mapping[ImageReference, ImageVerdict],
) -> ImageOutcome:
    reference = image.reference
    if not image.changed:
        return ImageOutcome(
            image, Verdict.UNCHANGED, None, None, "unchanged from the stored object"
        )
    if reference is None:
        return ImageOutcome(image, Verdict.DENIED, None, None, image.problem or "invalid image")
    rule = policy.rule_for(reference, namespace)
    if rule is None:
        if policy.unmatched is Action.ALLOW:
            reason = "matches no policy rule, and the policy allows unmatched images"
            return ImageOutcome(image, Verdict.ALLOWED, None, reference.digest, reason)
        reason = "matches no policy rule, and the policy denies unmatched images"
        return ImageOutcome(image, Verdict.DENIED, None, reference.digest, reason)
    if rule.action is Action.ALLOW:
        reason = f"allowed by rule {rule.name!r} without verification"
        return ImageOutcome(image, Verdict.ALLOWED, rule.name, reference.digest, reason)
    if rule.action is Action.DENY:
        return _refused(image, rule, reference.digest, f"denied by rule {rule.name!r}")
    verdict = verdicts.get(reference)
    if verdict is None:
        return _refused(
            image, rule, None, f"rule {rule.name!r}: not verified (no verdict; internal error)"
        )
    verified_by = sorted(verdict.key_ids)
    if verdict.ok and len(verified_by) >= rule.threshold:
        reason = f"verified by rule {rule.name!r} with {_keys(verified_by)}"
        return ImageOutcome(image, Verdict.ALLOWED, rule.name, verdict.digest, reason, True)
    if verdict.ok:
        signed = f" signed {verdict.digest}" if verdict.digest else ""
        problem = (
            f"only {len(verified_by)} distinct key{_plural(verified_by)}{signed} "
            f"({_keys(verified_by)}), {rule.threshold} required"
        )
    else:
        problem = verdict.reason or "verification failed"
    reason = f"rule {rule.name!r} requires {rule.requirement()}: {problem}"
    return _refused(image, rule, verdict.digest, reason)


def _refused(image: ContainerImage, rule: Rule, digest: str | None, reason: str) -> ImageOutcome:
    verdict = {
        Mode.ENFORCE: Verdict.DENIED,
        Mode.WARN: Verdict.WARNED,
        Mode.AUDIT: Verdict.AUDITED,
    }[rule.mode]
    return ImageOutcome(image, verdict, rule.name, digest, reason)


_CONTAINER_LIST_WORDS = {
    "containers": "container",
    "initContainers": "init container",
    "ephemeralContainers": "ephemeral container",
}


def _described(image: ContainerImage) -> str:
    container = _CONTAINER_LIST_WORDS.get(image.container_list, "container")
    return f"image {image.image!r} of {container} {image.container!r}"


def _clause(outcome: ImageOutcome, verb: str = "") -> str:
    described = _described(outcome.image)
    if verb:
        described += f" {verb}"
    return f"{described}: {outcome.reason}"


def _plural(items: list[str]) -> str:
    return "" if len(items) == 1 else "s"


def _keys(key_ids: list[str]) -> str:
    """Key ids shortened for people, as ``key abc...`` or ``keys abc..., def...``."""
    if not key_ids:
        return "no key"
    return f"key{_plural(key_ids)} " + ", ".join(k[:SHORT_KEY_ID_LENGTH] for k in key_ids)
