"""Real cosign signatures (from containers/image's fixtures) checked as cosign would."""

from pathlib import Path

import pytest
from cryptography import x509

from signgate.digests import compute_digest as sha256_digest
from signgate.keys.model import PublicKey
from signgate.signatures.layout import SIGNATURE_ANNOTATION, SignatureLayer
from signgate.signatures.verify import check_signature
from tests.vectors import vector

KEY_A = PublicKey.from_pem(vector("signatures", "keys", "ci-cosign.pub").read_bytes())
KEY_B = PublicKey.from_pem(vector("signatures", "keys", "ci-cosign2.pub").read_bytes())
VALID_DIGEST = sha256_digest(vector("signatures", "ci-valid", "image-manifest.json").read_bytes())


def certificate_key(case: str) -> PublicKey:
    pem = vector("signatures", case, "certificate.pem").read_bytes()
    return PublicKey(x509.load_pem_x509_certificate(pem).public_key())


def load_case(case: str) -> tuple[SignatureLayer, bytes, str]:
    directory = vector("signatures", case)
    payload = (directory / "payload.json").read_bytes()
    media_type_file = directory / "mediatype.txt"
    media_type = (
        media_type_file.read_text().strip()
        if media_type_file.exists()
        else "application/vnd.dev.cosign.simplesigning.v1+json"
    )
    signature = (directory / "signature.b64").read_text().strip()
    layer = SignatureLayer(
        media_type, sha256_digest(payload), len(payload), {SIGNATURE_ANNOTATION: signature}
    )
    manifest = directory / "image-manifest.json"
    digest = sha256_digest(manifest.read_bytes()) if manifest.exists() else VALID_DIGEST
    return layer, payload, digest


def image_digest(case: str) -> str:
    return sha256_digest(Path(vector("signatures", case, "image-manifest.json")).read_bytes())


@pytest.mark.parametrize(
    ("case", "keys"),
    [
        ("ci-valid", [KEY_A]),
        ("ci-valid-2nd", [KEY_A]),
        ("ci-valid-with-tag", [KEY_A]),
        ("ci-valid", [KEY_B, KEY_A]),
        ("ci-key-rekor", [KEY_B]),
        ("ci-fulcio-rekor", [certificate_key("ci-fulcio-rekor")]),
        ("ci-pki-rsa4096", [certificate_key("ci-pki-rsa4096")]),
    ],
)
def test_real_cosign_signatures_verify(case: str, keys: list[PublicKey]) -> None:
    layer, payload, digest = load_case(case)
    check = check_signature(layer, payload, keys, digest, {})
    assert check.verified, check.reason
    assert check.key in keys


def test_signature_made_with_tag_reference_carries_its_annotations() -> None:
    layer, payload, digest = load_case("ci-valid-with-tag")
    creator = "containers/image 5.21.2-dev"
    assert check_signature(layer, payload, [KEY_A], digest, {"creator": creator}).verified
    check = check_signature(layer, payload, [KEY_A], digest, {"creator": "someone else"})
    assert not check.verified
    assert check.reason is not None
    assert "annotation mismatch" in check.reason


@pytest.mark.parametrize(
    ("case", "keys", "reason"),
    [
        ("reject-ci-unknown-key", [KEY_A, KEY_B], "does not verify"),
        ("ci-valid", [KEY_B], "does not verify"),
        ("ci-key-rekor", [KEY_A], "does not verify"),
        ("reject-ci-other-attachment", [KEY_A], "not a signature"),
        ("reject-ci-manifest-digest-mismatch", [KEY_A], "digest claim mismatch"),
        ("reject-ci-valid-sig-nonjson", [KEY_A], "not JSON"),
        ("reject-ci-valid-sig-emptyobj", [KEY_A], "no 'critical'"),
    ],
)
def test_bad_signatures_are_refused_with_a_reason(
    case: str, keys: list[PublicKey], reason: str
) -> None:
    layer, payload, digest = load_case(case)
    check = check_signature(layer, payload, keys, digest, {})
    assert not check.verified
    assert check.reason is not None
    assert reason in check.reason


def test_signature_for_another_digest_is_refused() -> None:
    layer, payload, _ = load_case("ci-valid")
    check = check_signature(layer, payload, [KEY_A], "sha256:" + "0" * 64, {})
    assert check.reason is not None
    assert "digest claim mismatch" in check.reason


def test_raw_r_s_signature_is_accepted_as_cosign_does() -> None:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    layer, payload, digest = load_case("ci-valid")
    der = layer.signature()
    assert der is not None
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    raw_layer = SignatureLayer.for_signature(payload, raw)
    assert check_signature(raw_layer, payload, [KEY_A], digest, {}).verified


def test_predictable_payloads_are_the_bytes_signers_write() -> None:
    from signgate.reference import Repository
    from signgate.signatures.payload import build_payload
    from signgate.signatures.verify import predictable_payloads

    repository = Repository("reg.example", "team/app")
    digest = "sha256:" + "ab" * 32
    plain = build_payload("reg.example/team/app", digest)
    annotated = build_payload("reg.example/team/app", digest, {"env": "prod"})
    assert predictable_payloads(repository, digest, {}) == {sha256_digest(plain): plain}
    assert predictable_payloads(repository, digest, {"env": "prod"}) == {
        sha256_digest(plain): plain,
        sha256_digest(annotated): annotated,
    }
