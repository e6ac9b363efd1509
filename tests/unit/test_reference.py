"""Image reference grammar and normalisation, against tables taken from distribution/reference
(normalize_test.go, reference_test.go) and cross-checked with cosign's own parser."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from signgate.errors import Error, InvalidReference
from signgate.reference import ImageReference, Repository, signature_tag

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA384 = "sha384:" + "ab" * 48
SHA512 = "sha512:" + "cd" * 64
IMAGE_ID = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"
COSIGN2 = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "cosign2"

# fmt: off
VALID = [
    # (input, registry, path, tag, digest, str())
    ("ubuntu", "index.docker.io", "library/ubuntu", None, None, "index.docker.io/library/ubuntu"),
    ("ubuntu:22.04", "index.docker.io", "library/ubuntu", "22.04", None,
     "index.docker.io/library/ubuntu:22.04"),
    ("docker/docker", "index.docker.io", "docker/docker", None, None,
     "index.docker.io/docker/docker"),
    ("library/debian", "index.docker.io", "library/debian", None, None,
     "index.docker.io/library/debian"),
    ("library/foo/bar", "index.docker.io", "library/foo/bar", None, None,
     "index.docker.io/library/foo/bar"),
    ("other/library", "index.docker.io", "other/library", None, None,
     "index.docker.io/other/library"),
    ("docker.io/ubuntu", "index.docker.io", "library/ubuntu", None, None,
     "index.docker.io/library/ubuntu"),
    ("docker.io/library/ubuntu:latest", "index.docker.io", "library/ubuntu", "latest", None,
     "index.docker.io/library/ubuntu:latest"),
    ("index.docker.io/debian", "index.docker.io", "library/debian", None, None,
     "index.docker.io/library/debian"),
    ("index.docker.io/docker/docker", "index.docker.io", "docker/docker", None, None,
     "index.docker.io/docker/docker"),
    # registry-1.docker.io is an ordinary host to distribution and go-containerregistry alike.
    ("registry-1.docker.io/nginx", "registry-1.docker.io", "nginx", None, None,
     "registry-1.docker.io/nginx"),
    ("docker.io/" + IMAGE_ID, "index.docker.io", "library/" + IMAGE_ID, None, None,
     "index.docker.io/library/" + IMAGE_ID),
    # Only a bare 64-hex string is taken for an image ID; with a tag it is a name.
    (IMAGE_ID + ":tag", "index.docker.io", "library/" + IMAGE_ID, "tag", None,
     "index.docker.io/library/" + IMAGE_ID + ":tag"),
    ("localhost/debian", "localhost", "debian", None, None, "localhost/debian"),
    ("localhost/library/debian", "localhost", "library/debian", None, None,
     "localhost/library/debian"),
    ("localhost:5000/test", "localhost:5000", "test", None, None, "localhost:5000/test"),
    ("localhost:5000/a/b/c:v1", "localhost:5000", "a/b/c", "v1", None,
     "localhost:5000/a/b/c:v1"),
    # Single components are Docker Hub names even when they look like hosts (distribution's FIXME).
    ("localhost", "index.docker.io", "library/localhost", None, None,
     "index.docker.io/library/localhost"),
    ("localhost:5000", "index.docker.io", "library/localhost", "5000", None,
     "index.docker.io/library/localhost:5000"),
    ("192.168.0.1", "index.docker.io", "library/192.168.0.1", None, None,
     "index.docker.io/library/192.168.0.1"),
    ("192.168.0.1:80", "index.docker.io", "library/192.168.0.1", "80", None,
     "index.docker.io/library/192.168.0.1:80"),
    ("192.168.0.1:8/debian", "192.168.0.1:8", "debian", None, None, "192.168.0.1:8/debian"),
    ("127.0.0.1:5000/docker/docker", "127.0.0.1:5000", "docker/docker", None, None,
     "127.0.0.1:5000/docker/docker"),
    ("10.202.250.215/library/hello-world", "10.202.250.215", "library/hello-world", None, None,
     "10.202.250.215/library/hello-world"),
    ("example.com/privatebase", "example.com", "privatebase", None, None,
     "example.com/privatebase"),
    ("example.com:8000/private/moonbase", "example.com:8000", "private/moonbase", None, None,
     "example.com:8000/private/moonbase"),
    ("my-registry.example.com/team/app:1.2.3", "my-registry.example.com", "team/app", "1.2.3",
     None, "my-registry.example.com/team/app:1.2.3"),
    ("xn--7o8h.com/myimage:xn--7o8h.com", "xn--7o8h.com", "myimage", "xn--7o8h.com", None,
     "xn--7o8h.com/myimage:xn--7o8h.com"),
    # A first component with upper case cannot be a path, so distribution takes it for a host.
    ("LOCALDOMAIN/debian", "LOCALDOMAIN", "debian", None, None, "LOCALDOMAIN/debian"),
    ("Docker/docker", "Docker", "docker", None, None, "Docker/docker"),
    ("[::1]:5000/foo", "[::1]:5000", "foo", None, None, "[::1]:5000/foo"),
    ("[::1]/foo:bar", "[::1]", "foo", "bar", None, "[::1]/foo:bar"),
    ("[fc00::1]:5000/docker/docker", "[fc00::1]:5000", "docker/docker", None, None,
     "[fc00::1]:5000/docker/docker"),
    ("[fc00:1:2:3:4:5:6:7]:5000/library/debian", "[fc00:1:2:3:4:5:6:7]:5000", "library/debian",
     None, None, "[fc00:1:2:3:4:5:6:7]:5000/library/debian"),
    ("[2001:db8::1]:5000/repo@" + SHA256, "[2001:db8::1]:5000", "repo", None, SHA256,
     "[2001:db8::1]:5000/repo@" + SHA256),
    # Separators: one period, one or two underscores, any number of dashes.
    ("docker-rules/docker", "index.docker.io", "docker-rules/docker", None, None,
     "index.docker.io/docker-rules/docker"),
    ("docker---rules/docker", "index.docker.io", "docker---rules/docker", None, None,
     "index.docker.io/docker---rules/docker"),
    ("dock__er/docker", "index.docker.io", "dock__er/docker", None, None,
     "index.docker.io/dock__er/docker"),
    ("ab_c-d/e.f", "index.docker.io", "ab_c-d/e.f", None, None, "index.docker.io/ab_c-d/e.f"),
    ("d/docker", "index.docker.io", "d/docker", None, None, "index.docker.io/d/docker"),
    ("jess/t", "index.docker.io", "jess/t", None, None, "index.docker.io/jess/t"),
    ("thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev", "index.docker.io",
     "library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev", None, None,
     "index.docker.io/library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev"),
    # Tags.
    ("foo:UPPER_case.tag-1", "index.docker.io", "library/foo", "UPPER_case.tag-1", None,
     "index.docker.io/library/foo:UPPER_case.tag-1"),
    ("foo:_", "index.docker.io", "library/foo", "_", None, "index.docker.io/library/foo:_"),
    ("foo:" + "t" * 128, "index.docker.io", "library/foo", "t" * 128, None,
     "index.docker.io/library/foo:" + "t" * 128),
    # Digests, alone and with a tag (both kept).
    ("ubuntu@" + SHA256, "index.docker.io", "library/ubuntu", None, SHA256,
     "index.docker.io/library/ubuntu@" + SHA256),
    ("docker.io/library/busybox:latest@" + SHA256, "index.docker.io", "library/busybox", "latest",
     SHA256, "index.docker.io/library/busybox:latest@" + SHA256),
    ("localhost:5000/x/y:tag@" + SHA256, "localhost:5000", "x/y", "tag", SHA256,
     "localhost:5000/x/y:tag@" + SHA256),
    ("example.com/foo@" + SHA384, "example.com", "foo", None, SHA384,
     "example.com/foo@" + SHA384),
    ("example.com/foo@" + SHA512, "example.com", "foo", None, SHA512,
     "example.com/foo@" + SHA512),
    # Length limit applies to the normalised path: 255 is fine.
    ("example.com/" + "a" * 255, "example.com", "a" * 255, None, None,
     "example.com/" + "a" * 255),
    ("a" * 247, "index.docker.io", "library/" + "a" * 247, None, None,
     "index.docker.io/library/" + "a" * 247),
]
# fmt: on


@pytest.mark.parametrize(
    ("text", "registry", "path", "tag", "digest", "canonical"),
    VALID,
    ids=[case[0][:60] for case in VALID],
)
def test_valid_reference(
    text: str, registry: str, path: str, tag: str | None, digest: str | None, canonical: str
) -> None:
    reference = ImageReference.parse(text)
    assert reference.repository == Repository(registry, path)
    assert reference.registry == registry
    assert (reference.tag, reference.digest) == (tag, digest)
    assert str(reference) == canonical


@pytest.mark.parametrize("case", VALID, ids=[case[0][:60] for case in VALID])
def test_canonical_form_parses_to_itself(case: tuple[str, ...]) -> None:
    reference = ImageReference.parse(case[0])
    assert ImageReference.parse(str(reference)) == reference


INVALID = [
    # (input, substring of the error message)
    ("", "empty"),
    (IMAGE_ID, "image ID"),
    ("https://github.com/docker/docker", "invalid registry host"),
    ("docker/Docker", "must be lowercase"),
    ("docker.io/docker/Docker", "must be lowercase"),
    ("example.com/Foo/bar:tag", "must be lowercase"),
    ("UPPER", "must be lowercase"),
    ("-docker", "invalid repository name"),
    ("-docker/docker", "invalid repository name"),
    ("docker-/docker", "invalid repository name"),
    ("-docker-/docker", "invalid repository name"),
    ("-docker.io/docker/docker", "invalid registry host"),
    ("docker///docker", "invalid repository name"),
    ("docker.io/docker///docker", "invalid repository name"),
    ("____/____", "invalid repository name"),
    ("_docker/_docker", "invalid repository name"),
    # A first component with a "." is a host, and these are not valid hosts.
    ("dock..er/docker", "invalid registry host"),
    ("dock_.er/docker", "invalid registry host"),
    ("dock-.er/docker", "invalid registry host"),
    ("docker/dock..er", "invalid repository name"),
    ("docker/dock_.er", "invalid repository name"),
    ("docker/dock-.er", "invalid repository name"),
    ("dock___er/docker", "invalid repository name"),
    ("docker/", "invalid repository name"),
    ("example.com/", "repository name is empty"),
    ("/foo", "invalid repository name"),
    (":tag", "repository name is empty"),
    ("@" + SHA256, "repository name is empty"),
    ("foo bar", "invalid repository name"),
    (" ubuntu", "invalid repository name"),
    ("ubuntu\n", "invalid repository name"),
    ("ubuntu:latest\n", "invalid tag"),
    ("föö", "invalid repository name"),
    ("[fc00::1]", "invalid"),
    ("[fc00::1]:5000", "invalid"),
    ("fc00::1:5000/debian", "invalid registry host"),
    ("[fe80::1%eth0]:5000/debian", "invalid registry host"),
    ("[2001:db8:3:4::192.0.2.33]:5000/debian", "invalid registry host"),
    ("example.com:port/foo", "invalid registry host"),
    ("exa_mple.com/foo", "invalid registry host"),
    ("example-.com/foo", "invalid registry host"),
    ("example.com:5000:6000/foo", "invalid registry host"),
    # Too long: the limit applies to the normalised path ("library/" counts).
    ("example.com/" + "a" * 256, "more than 255"),
    ("a" * 248, "more than 255"),
    ("a/" * 127 + "bc", "more than 255"),
    # Tags.
    ("foo:", "invalid tag"),
    ("foo:.tag", "invalid tag"),
    ("foo:-tag", "invalid tag"),
    ("foo:t@g", "invalid digest"),
    ("foo:ta+g", "invalid tag"),
    ("foo:" + "t" * 129, "invalid tag"),
    ("foo:bar:baz", "invalid repository name 'library/foo:bar'"),
    ("foo:bar/baz", "invalid registry host"),
    # Digests.
    ("foo@", "invalid digest"),
    ("foo@sha256", "invalid digest"),
    ("foo@sha256:", "invalid digest"),
    ("foo@sha256:abc", "invalid digest"),
    ("foo@" + SHA256[:-1], "want 64 lowercase hex"),
    ("foo@" + SHA256 + "0", "want 64 lowercase hex"),
    ("foo@" + SHA256.upper().replace("SHA256", "sha256"), "want 64 lowercase hex"),
    ("foo@SHA256:" + "a" * 64, "unsupported digest algorithm"),
    ("foo@md5:" + "a" * 32, "unsupported digest algorithm"),
    ("foo@sha256+b64u:" + "a" * 64, "unsupported digest algorithm"),
    ("foo@sha384:" + "a" * 64, "want 96 lowercase hex"),
    ("foo@sha256:" + "g" * 64, "invalid digest"),
    ("foo@1sha:" + "a" * 64, "invalid digest"),
    ("foo@" + SHA256 + "@" + SHA256, "invalid digest"),
    ("foo@:" + "a" * 64, "invalid digest"),
]


@pytest.mark.parametrize(("text", "problem"), INVALID, ids=[case[0][:60] for case in INVALID])
def test_invalid_reference(text: str, problem: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        ImageReference.parse(text)
    message = caught.value.diagnostics()
    assert problem in message
    assert "\n" not in str(caught.value)
    # The input is quoted so that a person sees exactly what was refused.
    assert repr(text[:300]).rstrip("'\"") in message


def test_invalid_reference_is_a_signgate_error() -> None:
    with pytest.raises(Error):
        ImageReference.parse("Not/Valid")


def test_a_huge_input_is_not_repeated_in_full() -> None:
    with pytest.raises(InvalidReference) as caught:
        ImageReference.parse("example.com/" + "A" * 100_000)
    assert len(str(caught.value)) < 1000


def test_identifier_is_digest_then_tag_then_latest() -> None:
    assert ImageReference.parse("ubuntu").identifier == "latest"
    assert ImageReference.parse("ubuntu").tag is None
    assert ImageReference.parse("ubuntu:22.04").identifier == "22.04"
    assert ImageReference.parse("ubuntu:22.04@" + SHA256).identifier == SHA256
    assert ImageReference.parse("ubuntu@" + SHA256).identifier == SHA256


def test_with_digest_keeps_repository_and_tag() -> None:
    pinned = ImageReference.parse("docker.io/ubuntu:22.04").with_digest(SHA256)
    assert str(pinned) == "index.docker.io/library/ubuntu:22.04@" + SHA256
    assert pinned.identifier == SHA256


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("docker.io/ubuntu", Repository("index.docker.io", "library/ubuntu")),
        ("localhost:5000/signatures", Repository("localhost:5000", "signatures")),
        ("[::1]:5000/a/b", Repository("[::1]:5000", "a/b")),
    ],
)
def test_repository_parse(text: str, expected: Repository) -> None:
    assert Repository.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ubuntu:22.04", "takes no tag or digest"),
        ("ubuntu@" + SHA256, "takes no tag or digest"),
        ("Ubuntu", "must be lowercase"),
        ("", "empty"),
    ],
)
def test_repository_parse_refuses(text: str, problem: str) -> None:
    with pytest.raises(InvalidReference, match=problem):
        Repository.parse(text)


@pytest.mark.parametrize(
    ("digest", "suffix", "tag"),
    [
        (SHA256, "sig", "sha256-" + SHA256[7:] + ".sig"),
        (SHA256, "att", "sha256-" + SHA256[7:] + ".att"),
        (SHA256, "sbom", "sha256-" + SHA256[7:] + ".sbom"),
        (SHA256, "", "sha256-" + SHA256[7:]),
        (SHA384, "sig", "sha384-" + SHA384[7:] + ".sig"),
    ],
)
def test_signature_tag(digest: str, suffix: str, tag: str) -> None:
    assert signature_tag(digest, suffix) == tag


def test_signature_tag_defaults_to_sig() -> None:
    assert signature_tag(SHA256) == "sha256-" + SHA256[7:] + ".sig"


@pytest.mark.parametrize(
    ("digest", "suffix", "problem"),
    [
        ("latest", "sig", "invalid digest"),
        ("sha256:abc", "sig", "invalid digest"),
        ("md5:" + "a" * 32, "sig", "unsupported digest algorithm"),
        (SHA256, "s/g", "invalid signature tag suffix"),
        (SHA256, "sig:x", "invalid signature tag suffix"),
        # sha512 names cannot become tags: 7 + 128 characters is over the 128 limit.
        (SHA512, "sig", "not a valid tag"),
    ],
)
def test_signature_tag_refuses(digest: str, suffix: str, problem: str) -> None:
    with pytest.raises(InvalidReference, match=problem):
        signature_tag(digest, suffix)


COSIGN_CROSS_CHECK = [
    "ubuntu",
    "docker.io/ubuntu:22.04",
    "index.docker.io/foo/bar",
    "registry-1.docker.io/nginx",
    "localhost:5000/x/y:tag",
    "127.0.0.1:5000/a/b",
    "[::1]:5000/foo",
    "example.com:8000/private/moonbase",
]


@pytest.mark.integration
@pytest.mark.parametrize("text", COSIGN_CROSS_CHECK)
@pytest.mark.parametrize(("kind", "suffix"), [("signature", "sig"), ("attestation", "att")])
def test_signature_reference_matches_cosign(text: str, kind: str, suffix: str) -> None:
    """cosign (go-containerregistry) and signgate agree on where signatures live.

    They differ only where go-containerregistry departs from distribution ("localhost/x" and
    upper-case hosts), which this list leaves out.
    """
    reference = ImageReference.parse(f"{text}@{SHA256}")
    completed = subprocess.run(
        [str(COSIGN2), "triangulate", "--type", kind, f"{text}@{SHA256}"],
        capture_output=True,
        text=True,
        check=True,
    )
    expected = f"{reference.repository}:{signature_tag(SHA256, suffix)}"
    assert completed.stdout.strip() == expected
