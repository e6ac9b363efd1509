import json

from signgate.digests import compute_digest as sha256_digest
from signgate.signatures.layout import (
    SIGNATURE_ANNOTATION,
    SIMPLE_SIGNING_MEDIA_TYPE,
    SignatureLayer,
    config_blob,
    manifest_bytes,
    parse_layers,
)
from tests.vectors import vector

HARBOR = ("sigimage", "harbor-proposal")


def harbor_layers() -> list[SignatureLayer]:
    manifest = json.loads(vector(*HARBOR, "manifest-2layer.reserialized.json").read_bytes())
    return parse_layers(manifest)


def test_config_blob_matches_cosign_for_one_and_two_layers() -> None:
    layers = harbor_layers()
    assert config_blob(layers[:1]) == vector(*HARBOR, "config-1layer.json").read_bytes()
    assert config_blob(layers) == vector(*HARBOR, "config-2layer.json").read_bytes()


def test_manifest_names_the_config_by_digest_and_keeps_layer_descriptors() -> None:
    layers = harbor_layers()
    config = config_blob(layers)
    manifest = json.loads(manifest_bytes(layers, config))
    assert manifest["config"]["digest"] == sha256_digest(config)
    assert manifest["config"]["size"] == len(config)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    reference = json.loads(vector(*HARBOR, "manifest-2layer.reserialized.json").read_bytes())
    assert manifest["layers"] == reference["layers"]
    assert manifest["config"] == reference["config"]


def test_layer_for_signature_describes_the_payload() -> None:
    payload = vector(*HARBOR, "payload.json").read_bytes()
    layer = SignatureLayer.for_signature(payload, b"\x30\x01")
    assert layer.digest == harbor_layers()[0].digest
    assert layer.size == 250
    assert layer.media_type == SIMPLE_SIGNING_MEDIA_TYPE
    assert layer.annotations == {SIGNATURE_ANNOTATION: "MAE="}
    assert layer.signature() == b"\x30\x01"


def test_signature_that_is_not_base64_is_none() -> None:
    layer = SignatureLayer(SIMPLE_SIGNING_MEDIA_TYPE, "sha256:00", 1, {SIGNATURE_ANNOTATION: "%%"})
    assert layer.signature() is None


def test_parse_layers_skips_malformed_entries() -> None:
    manifest = {"layers": ["x", {"digest": 1}, {"digest": "sha256:aa", "size": 3}]}
    assert parse_layers(manifest) == [SignatureLayer("", "sha256:aa", 3, {})]
    assert parse_layers({"layers": None}) == []
