"""cosign 3's bundle format: PAE, parsing, statement checks and building (pure, tables of cases)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signgate.errors import VerificationError
from signgate.keys import PrivateKeySigner, PublicKey
from signgate.signatures.bundle import (
    BUNDLE_MEDIA_TYPE,
    IN_TOTO_PAYLOAD_TYPE,
    Descriptor,
    build_bundle,
    build_statement,
    bundle_manifest,
    check_bundle,
    index_with,
    index_without,
    key_hint,
    pae,
    parse_bundle,
)

# Made by the real cosign 3.1: `cosign sign --key cosign.key --signing-config sc.json` with a
# signing config without transparency log, for an image of digest COSIGN_IMAGE_DIGEST.
COSIGN_PUBLIC_KEY = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEgshJgfVbXYIC8hnQHIbJJYncDniY
rgqRTzJHoP4MuC5Tg0P9xROLnRtkIYt8jydfEoVlk9pDX1H7HWDkdP+Ybw==
-----END PUBLIC KEY-----
"""
COSIGN_BUNDLE = (
    b'{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"pu'
    b'blicKey":{"hint":"oP4Ioi82owyzOY960rFRyCQOj0IR+StTgjYv4781WJ4="}},"dsseEnvelope":{"paylo'
    b'ad":"eyJfdHlwZSI6Imh0dHBzOi8vaW4tdG90by5pby9TdGF0ZW1lbnQvdjEiLCJzdWJqZWN0IjpbeyJkaWdlc3Q'
    b'iOnsic2hhMjU2IjoiZGNiYTBkYzI5YzgzMmRiNDQ4YWJlNTQzN2VmZTA1MzhhMGVmN2NhNjAxMGFjY2QwMThmMmI'
    b'3MmMyMGFmNzUwMiJ9LCJhbm5vdGF0aW9ucyI6e319XSwicHJlZGljYXRlVHlwZSI6Imh0dHBzOi8vc2lnc3RvcmU'
    b'uZGV2L2Nvc2lnbi9zaWduL3YxIiwicHJlZGljYXRlIjp7fX0=","payloadType":"application/vnd.in-tot'
    b'o+json","signatures":[{"sig":"MEUCIQDyr4aolU7o7eFzWPXNnacDxdH2CB6PDhyUJRYu/GgFXgIgYfz3Ab'
    b'yxuUibbWMvN+dF9BR+HpPJ/Ra8uwrs0jyJHY4="}]}}'
)
COSIGN_IMAGE_DIGEST = "sha256:dcba0dc29c832db448abe5437efe0538a0ef7ca6010accd018f2b72c20af7502"
OTHER_DIGEST = "sha256:" + "0" * 64


def test_pae_is_dsse_v1_encoding() -> None:
    # The example of https://github.com/secure-systems-lab/dsse/blob/master/protocol.md
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_cosign_bundle_verifies_and_statement_is_what_signgate_builds() -> None:
    key = PublicKey.from_pem(COSIGN_PUBLIC_KEY)
    bundle = parse_bundle(COSIGN_BUNDLE)
    assert bundle.key_hint == key_hint(key)
    assert bundle.envelope.payload == build_statement(COSIGN_IMAGE_DIGEST)
    check = check_bundle("sha256:b", COSIGN_BUNDLE, [key], COSIGN_IMAGE_DIGEST, {})
    assert check.verified, check.reason
    assert check.key is key


def _signer() -> PrivateKeySigner:
    return PrivateKeySigner(ec.generate_private_key(ec.SECP256R1()))


SIGNER = _signer()
OTHER_SIGNER = _signer()


def _bundle(statement: bytes, signer: PrivateKeySigner = SIGNER,
            payload_type: str = IN_TOTO_PAYLOAD_TYPE) -> bytes:
    signature = signer.sign(pae(payload_type, statement))
    document = json.loads(build_bundle(statement, signature, signer.public_key()))
    document["dsseEnvelope"]["payloadType"] = payload_type
    return json.dumps(document).encode()


def _edit(data: bytes, **changes: Any) -> bytes:
    document = json.loads(data)
    document.update(changes)
    return json.dumps(document).encode()


DIGEST = "sha256:" + "ab" * 32
GOOD = _bundle(build_statement(DIGEST, {"env": "prod"}))
STATEMENT = json.loads(build_statement(DIGEST))


def _statement(**changes: Any) -> bytes:
    return json.dumps({**STATEMENT, **changes}).encode()


@pytest.mark.parametrize(
    ("data", "required", "reason"),
    [
        (GOOD, {}, None),
        (GOOD, {"env": "prod"}, None),
        (GOOD, {"env": "dev"}, "annotation mismatch: env=dev required, found 'prod'"),
        (_bundle(build_statement(OTHER_DIGEST)), {}, f"digest claim mismatch: bundle is for "
         f"{OTHER_DIGEST}"),
        (_bundle(build_statement(DIGEST), OTHER_SIGNER), {},
         "bundle signature does not verify with the given keys"),
        (_edit(GOOD, dsseEnvelope=None, messageSignature={"signature": "AA=="}), {},
         "not a signature: bundle content is not a DSSE envelope (it holds a message signature)"),
        (_bundle(build_statement(DIGEST), payload_type="text/plain"), {},
         "not a signature: DSSE payloadType is 'text/plain'"),
        (_bundle(_statement(predicateType="https://slsa.dev/provenance/v1")), {},
         "payload invalid: in-toto statement has predicateType 'https://slsa.dev/provenance/v1'"
         ", not https://sigstore.dev/cosign/sign/v1"),
        (_bundle(_statement(_type="https://example.com/other")), {},
         "payload invalid: in-toto statement has unknown _type 'https://example.com/other'"),
        (_bundle(_statement(subject=[])), {},
         "payload invalid: in-toto statement names no subject"),
        (_edit(GOOD, mediaType="application/json"), {},
         "not a signature: bundle has unknown media type 'application/json'"),
        (b"not json", {}, "not a signature: bundle is not JSON"),
    ],
)
def test_check_bundle(data: bytes, required: dict[str, str], reason: str | None) -> None:
    check = check_bundle("sha256:b", data, [SIGNER.public_key()], DIGEST, required)
    assert check.reason == reason
    assert check.verified is (reason is None)


def test_key_hint_is_not_trusted() -> None:
    document = json.loads(GOOD)
    document["verificationMaterial"]["publicKey"]["hint"] = key_hint(OTHER_SIGNER.public_key())
    data = json.dumps(document).encode()
    keys = [OTHER_SIGNER.public_key(), SIGNER.public_key()]
    check = check_bundle("sha256:b", data, keys, DIGEST, {})
    assert check.verified
    assert check.key is keys[1]


def test_bad_base64_is_refused() -> None:
    document = json.loads(GOOD)
    document["dsseEnvelope"]["signatures"][0]["sig"] = "not base64!"
    with pytest.raises(VerificationError, match="DSSE signature is not valid base64"):
        parse_bundle(json.dumps(document).encode())


def test_statement_escapes_as_go_does() -> None:
    statement = build_statement(DIGEST, {"b": "<x&y>", "a": "1"})
    assert b'"annotations":{"a":"1","b":"\\u003cx\\u0026y\\u003e"}' in statement


def test_bundle_manifest_is_what_cosign_pushes() -> None:
    subject = Descriptor("application/vnd.oci.image.manifest.v1+json", DIGEST, 400)
    manifest = json.loads(bundle_manifest(GOOD, subject, "2026-01-01T00:00:00Z"))
    assert manifest["artifactType"] == BUNDLE_MEDIA_TYPE
    assert manifest["config"]["digest"] == (
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )
    assert manifest["subject"] == {"mediaType": subject.media_type, "size": 400, "digest": DIGEST}
    assert manifest["annotations"] == {
        "dev.sigstore.bundle.content": "dsse-envelope",
        "dev.sigstore.bundle.predicateType": "https://sigstore.dev/cosign/sign/v1",
        "org.opencontainers.image.created": "2026-01-01T00:00:00Z",
    }
    assert [layer["mediaType"] for layer in manifest["layers"]] == [BUNDLE_MEDIA_TYPE]


def test_index_with_keeps_other_entries_once() -> None:
    first = Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + "1" * 64, 10)
    second = Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + "2" * 64, 20)
    index = json.loads(index_with(None, first))
    index = json.loads(index_with(index, second))
    again = json.loads(index_with(index, second))
    assert [m["digest"] for m in again["manifests"]] == [second.digest, first.digest]


def test_index_without_keeps_every_other_entry_and_field() -> None:
    entries: list[dict[str, Any]] = [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": n,
         "digest": "sha256:" + str(n) * 64, "annotations": {"n": str(n)}}
        for n in (1, 2, 3)
    ]
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": entries, "annotations": {"kept": "yes"}}
    without = index_without(index, {entries[1]["digest"], "sha256:" + "9" * 64})
    assert without is not None
    assert json.loads(without) == {**index, "manifests": [entries[0], entries[2]]}
    assert index_without(index, set()) is not None
    assert json.loads(index_without(index, set()) or b"") == index
    assert index_without(index, {e["digest"] for e in entries}) is None
    assert index_without({"manifests": []}, {"sha256:" + "1" * 64}) is None


def test_signature_base64_in_bundle() -> None:
    document = json.loads(GOOD)
    assert base64.b64decode(document["dsseEnvelope"]["payload"]) == build_statement(
        DIGEST, {"env": "prod"}
    )
