import pytest

from signgate.errors import VerificationError
from signgate.signatures.payload import build_payload, go_json, parse_payload
from tests.vectors import vector

DIGEST = "sha256:" + "d34db33f" * 8


@pytest.mark.parametrize(
    ("name", "reference", "annotations"),
    [
        ("no-claims.json", "example.com/test/image", None),
        (
            "standard-atomic.json",
            "example.com/atomic/test/image",
            {"creator": "atomic", "timestamp": 1458239713},
        ),
        (
            "arbitrary-claims.json",
            "example.com/cosign/test/image",
            {
                "creator": "anyone",
                "some_struct": {"foo": "bar", "false": True, "nothing": None},
                "CamelCase WithSpace": 8.314,
            },
        ),
        ("custom-identity.json", "docker.io/library/test:1.2.3", None),
    ],
)
def test_payload_bytes_match_cosign(
    name: str, reference: str, annotations: dict[str, object]
) -> None:
    assert build_payload(reference, DIGEST, annotations) == vector("payloads", name).read_bytes()


def test_empty_annotations_are_null_as_in_cosign() -> None:
    assert build_payload("r/x", DIGEST, {}).endswith(b',"optional":null}')


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": "1", "a": "2", "B": "3"}, b'{"B":"3","a":"2","b":"1"}'),
        ({"k": "<script>&</script>"}, b'{"k":"\\u003cscript\\u003e\\u0026\\u003c/script\\u003e"}'),
        ({"k": "line\u2028sep\u2029"}, b'{"k":"line\\u2028sep\\u2029"}'),
        ({"k": "caf\u00e9 \"q\" \\"}, '{"k":"caf\u00e9 \\"q\\" \\\\"}'.encode()),
        ({"k": "\n\t\x01"}, b'{"k":"\\n\\t\\u0001"}'),
    ],
)
def test_go_json_escaping(value: dict[str, str], expected: bytes) -> None:
    assert go_json(value) == expected


def test_parse_round_trip() -> None:
    payload = parse_payload(build_payload("reg/x", DIGEST, {"env": "prod"}))
    assert payload.manifest_digest == DIGEST
    assert payload.docker_reference == "reg/x"
    assert payload.annotations == {"env": "prod"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (vector("payloads", "reject-unknown-type.json").read_bytes(), "unknown type"),
        (b"&", "not JSON"),
        (b"{}", "no 'critical'"),
        (b"[]", "not a JSON object"),
        (b"\xff\xfe", "not JSON"),
        (b'{"critical":{"type":"cosign container image signature"}}', "no image digest"),
        (
            b'{"critical":{"type":"cosign container image signature","image":'
            b'{"docker-manifest-digest":"sha256:00"}},"optional":"x"}',
            "'optional'",
        ),
    ],
)
def test_parse_refuses_bad_payloads(data: bytes, reason: str) -> None:
    with pytest.raises(VerificationError, match=reason):
        parse_payload(data)
