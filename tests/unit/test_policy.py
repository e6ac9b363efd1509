"""The policy file: loading, validation errors with their line and field, and rule matching."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from signgate.errors import Error, PolicyError
from signgate.keys.refs import display_key_ref
from signgate.policy import (
    Action,
    Mode,
    NamespaceSelector,
    Policy,
    Rule,
    load_policy,
    normalise_image_pattern,
    parse_policy,
)
from signgate.reference import ImageReference
from signgate.signatures.formats import SignatureFormat

DIGEST = "sha256:" + "0123456789abcdef" * 4

ISSUE_EXAMPLE = """\
unmatched: deny                 # deny | allow: images no rule matches
rules:                          # first matching rule wins
  - name: ours
    images: ["registry.example.com/team/**", "localhost:5000/*"]   # glob; ** spans "/"
    keys: [/etc/signgate/cosign.pub, hashivault://release]          # any key reference
    threshold: 1                # how many distinct keys must have signed
    annotations: {env: prod}    # required payload annotations (optional)
    mode: enforce               # enforce | warn | audit
    namespaces: {exclude: [dev-*]}
  - name: platform
    images: ["registry.k8s.io/**"]
    action: allow               # allow | deny, without verification
"""


def policy(text: str) -> Policy:
    return parse_policy(textwrap.dedent(text), "policy.yaml")


def test_the_issue_example_loads() -> None:
    loaded = parse_policy(ISSUE_EXAMPLE, "policy.yaml")
    assert loaded.unmatched is Action.DENY
    assert loaded.rules == (
        Rule(
            name="ours",
            images=("registry.example.com/team/**", "localhost:5000/*"),
            keys=("/etc/signgate/cosign.pub", "hashivault://release"),
            threshold=1,
            annotations={"env": "prod"},
            mode=Mode.ENFORCE,
            namespaces=NamespaceSelector(exclude=("dev-*",)),
        ),
        Rule(name="platform", images=("registry.k8s.io/**",), action=Action.ALLOW),
    )
    assert loaded.key_references() == ("/etc/signgate/cosign.pub", "hashivault://release")
    assert loaded.rules[0].verifies
    assert not loaded.rules[1].verifies


def test_defaults() -> None:
    loaded = policy(
        """
        rules:
          - name: ours
            images: [ghcr.io/acme/**]
            keys: [cosign.pub]
        """
    )
    (rule,) = loaded.rules
    assert loaded.unmatched is Action.DENY  # fail closed
    assert (rule.threshold, rule.mode, rule.action) == (1, Mode.ENFORCE, None)
    assert (dict(rule.annotations), rule.namespaces, rule.require_child_signature) == (
        {},
        NamespaceSelector(),
        False,
    )
    assert rule.formats == (SignatureFormat.CLASSIC, SignatureFormat.BUNDLE)  # either accepted


def test_every_option_is_read() -> None:
    (rule,) = policy(
        """
        unmatched: allow
        rules:
          - name: release
            images: [ghcr.io/acme/**]
            keys: [a.pub, "awskms:///alias/release", "gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k"]
            threshold: 2
            annotations: {env: prod, "team": "payments"}
            mode: warn
            namespaces: {include: [prod-*, payments], exclude: [prod-sandbox]}
            require_child_signature: true
            formats: [bundle]
        """
    ).rules
    assert rule.formats == (SignatureFormat.BUNDLE,)
    assert rule.threshold == 2
    assert rule.mode is Mode.WARN
    assert dict(rule.annotations) == {"env": "prod", "team": "payments"}
    assert rule.namespaces == NamespaceSelector(("prod-*", "payments"), ("prod-sandbox",))
    assert rule.require_child_signature is True


def test_a_rule_is_immutable_and_hashable() -> None:
    rule = policy(ISSUE_EXAMPLE).rules[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.threshold = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        rule.annotations["env"] = "dev"  # type: ignore[index]
    assert {rule: 1}[rule] == 1


# fmt: off
MATCHES = [
    # (pattern, image, matches)
    ("registry.example.com/team/**", "registry.example.com/team/app:1.0", True),
    ("registry.example.com/team/**", "registry.example.com/team/a/b/c@" + DIGEST, True),
    ("registry.example.com/team/**", "registry.example.com/team", False),
    ("registry.example.com/team/**", "registry.example.com/teams/app", False),
    ("registry.example.com/team/**", "other.example.com/team/app", False),
    ("registry.example.com/team/*", "registry.example.com/team/app", True),
    ("registry.example.com/team/*", "registry.example.com/team/app/sub", False),
    ("registry.example.com/team/app", "registry.example.com/team/app", True),
    ("registry.example.com/team/app", "registry.example.com/team/app:1.0@" + DIGEST, True),
    ("registry.example.com/team/app", "registry.example.com/team/app-2", False),
    ("registry.example.com/a.b", "registry.example.com/axb", False),  # '.' is literal
    ("registry.example.com/app-?", "registry.example.com/app-1", True),
    ("registry.example.com/app-?", "registry.example.com/app-10", False),
    ("localhost:5000/*", "localhost:5000/app:dev", True),
    ("localhost:5000/*", "localhost:5000/app/sub", False),
    ("localhost:5000/*", "localhost:5001/app", False),
    ("localhost/*", "localhost/app", True),
    ("[::1]:5000/*", "[::1]:5000/app", True),
    # Docker Hub names are normalised on both sides.
    ("nginx", "nginx", True),
    ("nginx", "nginx:1.25", True),
    ("nginx", "docker.io/library/nginx@" + DIGEST, True),
    ("nginx", "index.docker.io/library/nginx:1.25", True),
    ("nginx", "nginx-unprivileged", False),
    ("nginx", "bitnami/nginx", False),
    ("library/nginx", "nginx", True),
    ("docker.io/nginx", "nginx", True),
    ("docker.io/library/nginx", "nginx:1.25", True),
    ("index.docker.io/library/nginx", "nginx", True),
    ("bitnami/*", "bitnami/redis:7.2", True),
    ("bitnami/*", "docker.io/bitnami/redis", True),
    ("bitnami/*", "ghcr.io/bitnami/redis", False),
    ("*", "busybox", True),  # every official image
    ("*", "bitnami/redis", False),
    ("docker.io/*", "alpine", True),
    ("docker.io/*", "bitnami/redis", False),
    ("docker.io/**", "bitnami/redis", True),
    ("docker.io/**", "quay.io/bitnami/redis", False),
    # A globbed first segment is taken as written.
    ("**", "ghcr.io/a/b/c:1", True),
    ("**", "nginx", True),
    ("**/nginx", "ghcr.io/acme/nginx", True),
    ("**/nginx", "nginx", True),
    ("*.example.com/**", "registry.example.com/app", True),
    ("*.example.com/**", "example.com/app", False),
    ("*.example.com/**", "a.b.example.com/app", True),
    # Host names compare without case.
    ("Registry.Example.com/app", "registry.example.com/app", True),
    ("registry.example.com/app", "REGISTRY.example.com/app", True),
]
# fmt: on


@pytest.mark.parametrize(("pattern", "image", "matches"), MATCHES)
def test_image_patterns(pattern: str, image: str, matches: bool) -> None:
    rule = Rule(name="r", images=(pattern,), action=Action.ALLOW)
    assert rule.matches(ImageReference.parse(image)) is matches


@pytest.mark.parametrize(
    ("pattern", "normalised"),
    [
        ("nginx", "index.docker.io/library/nginx"),
        ("*", "index.docker.io/library/*"),
        ("**", "**"),
        ("bitnami/*", "index.docker.io/bitnami/*"),
        ("docker.io/nginx", "index.docker.io/library/nginx"),
        ("docker.io/**", "index.docker.io/**"),
        ("docker.io/bitnami/**", "index.docker.io/bitnami/**"),
        ("index.docker.io/x/y", "index.docker.io/x/y"),
        ("localhost/x", "localhost/x"),
        ("ghcr.io/**", "ghcr.io/**"),
        ("*.example.com/**", "*.example.com/**"),
        ("**/nginx", "**/nginx"),
    ],
)
def test_pattern_normalisation(pattern: str, normalised: str) -> None:
    assert normalise_image_pattern(pattern) == normalised


NAMESPACED = """
rules:
  - name: prod-only
    images: [ghcr.io/acme/**]
    keys: [prod.pub]
    namespaces: {include: [prod-*, payments]}
  - name: everywhere-but-dev
    images: [ghcr.io/acme/**]
    keys: [ci.pub]
    namespaces: {exclude: [dev-*, "*-sandbox"]}
  - name: dev
    images: [ghcr.io/acme/**]
    action: allow
    namespaces: {include: ["dev-?"]}
"""


@pytest.mark.parametrize(
    ("namespace", "rule"),
    [
        ("prod-eu", "prod-only"),
        ("payments", "prod-only"),
        ("prod-sandbox", "prod-only"),  # included, nothing excludes it in this rule
        ("shop", "everywhere-but-dev"),
        ("payments-x", "everywhere-but-dev"),  # include globs match whole names
        ("default", "everywhere-but-dev"),
        ("team-sandbox", None),  # excluded by the second, not included by the third
        ("dev-1", "dev"),
        ("dev-12", None),
        ("", "everywhere-but-dev"),
    ],
)
def test_namespace_selectors_pass_the_image_to_the_next_rule(
    namespace: str, rule: str | None
) -> None:
    found = policy(NAMESPACED).rule_for(ImageReference.parse("ghcr.io/acme/app:1"), namespace)
    assert (found.name if found else None) == rule


def test_first_matching_rule_wins() -> None:
    loaded = policy(
        """
        rules:
          - name: blocked
            images: [ghcr.io/acme/legacy]
            action: deny
          - name: acme
            images: [ghcr.io/acme/**]
            keys: [acme.pub, shared.pub]
          - name: all
            images: ["**"]
            keys: [shared.pub, other.pub]
            mode: audit
        """
    )
    names = [
        r.name if r else None
        for r in (
            loaded.rule_for(ImageReference.parse(image), "default")
            for image in ("ghcr.io/acme/legacy:1", "ghcr.io/acme/legacy/x", "nginx")
        )
    ]
    assert names == ["blocked", "acme", "all"]
    assert loaded.key_references() == ("acme.pub", "shared.pub", "other.pub")


# fmt: off
ERRORS = [
    # (policy text, the one-line error)
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    threshold: 0
""", "policy.yaml:5: rules[0].threshold: must be an integer >= 1"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub, b.pub]
    threshold: "2"
""", "policy.yaml:5: rules[0].threshold: must be an integer >= 1"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    threshold: true
""", "policy.yaml:5: rules[0].threshold: must be an integer >= 1"),
    ("""\
unmatched: allow
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    threshold: 3
    keys:
      - a.pub
      - b.pub
""", "policy.yaml:5: rules[0].threshold: 3 is more than the 2 keys listed"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    treshold: 1
""", "policy.yaml:5: rules[0].treshold: unknown field (known: name, images, keys, threshold, "
     "annotations, mode, namespaces, action, require_child_signature, formats)"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
default: deny
""", "policy.yaml:5: default: unknown field (known: unmatched, rules)"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
  - name: theirs
    images: [ghcr.io/other/**]
    action: deny
  - name: ours
    images: [quay.io/**]
    action: allow
""", "policy.yaml:8: rules[2].name: 'ours' is the name of rules[0] too"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    action: allow
""", "policy.yaml:5: rules[0].action: a rule has keys or an action, not both"),
    ("""\
rules:
  - name: ok
    images: [quay.io/**]
    action: allow
  - name: ours
    images: [ghcr.io/acme/**]
    mode: warn
""", "policy.yaml:5: rules[1]: needs keys (signatures to verify) or an action (allow or deny "
     "without verification)"),
    ("""\
rules:
  - images: [ghcr.io/acme/**]
    keys: [a.pub]
""", "policy.yaml:2: rules[0]: missing field 'name'"),
    ("""\
rules:
  - name: ours
    keys: [a.pub]
""", "policy.yaml:2: rules[0]: missing field 'images'"),
    ("""\
rules:
  - name: ours
    images: []
    keys: [a.pub]
""", "policy.yaml:3: rules[0].images: must list at least one image pattern"),
    ("""\
rules:
  - name: ours
    images: ghcr.io/acme/**
    keys: [a.pub]
""", "policy.yaml:3: rules[0].images: must be a list of strings"),
    ("""\
rules:
  - name: ours
    images:
      - ghcr.io/acme/**
      - ghcr.io/acme/app:1.0
    keys: [a.pub]
""", "policy.yaml:5: rules[0].images[1]: 'ghcr.io/acme/app:1.0': a pattern names "
     "repositories, without a tag"),
    ("""\
rules:
  - name: ours
    images: ["nginx:latest"]
    action: deny
""", "policy.yaml:3: rules[0].images[0]: 'nginx:latest': a pattern names repositories, "
     "without a tag"),
    ("""\
rules:
  - name: ours
    images:
      - "ghcr.io/acme/app@sha256:0123"
    keys: [a.pub]
""", "policy.yaml:4: rules[0].images[0]: 'ghcr.io/acme/app@sha256:0123': a pattern names "
     "repositories, without a digest"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io//app]
    keys: [a.pub]
""", "policy.yaml:3: rules[0].images[0]: 'ghcr.io//app' has an empty path segment"),
    ("""\
rules:
  - name: ours
    images: ["ghcr.io/{a,b}/**"]
    keys: [a.pub]
""", "policy.yaml:3: rules[0].images[0]: 'ghcr.io/{a,b}/**' has characters no image name has "
     "(want letters, digits, '.', '_', '-', ':' after a host, '/', and the globs '*', '**', "
     "'?')"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub, b.pub, a.pub]
""", "policy.yaml:4: rules[0].keys[2]: the same key as rules[0].keys[0]"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: []
""", "policy.yaml:4: rules[0].keys: must list at least one key reference"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub, 7]
""", "policy.yaml:4: rules[0].keys[1]: must be a string (quote numbers and booleans)"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    mode: enforcing
""", "policy.yaml:5: rules[0].mode: must be one of enforce, warn, audit"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    action: permit
""", "policy.yaml:4: rules[0].action: must be one of allow, deny"),
    ("""\
unmatched: maybe
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    action: allow
""", "policy.yaml:1: unmatched: must be one of allow, deny"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    namespaces:
      include: [prod]
      exclude: [Dev]
""", "policy.yaml:7: rules[0].namespaces.exclude[0]: 'Dev' is not a namespace name or glob "
     "(lowercase letters, digits, '-', '*', '?')"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    namespaces:
      only: [prod]
""", "policy.yaml:6: rules[0].namespaces.only: unknown field (known: include, exclude)"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    namespaces: [prod]
""", "policy.yaml:5: rules[0].namespaces: must be a mapping"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    annotations:
      env: prod
      version: 2
""", "policy.yaml:7: rules[0].annotations.version: must be a string (quote numbers and "
     "booleans)"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    annotations:
      env: prod
      env: dev
""", "policy.yaml:7: rules[0].annotations.env: given twice"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    action: allow
    threshold: 1
""", "policy.yaml:5: rules[0].threshold: applies only to a rule with keys"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    action: allow
    annotations: {env: prod}
""", "policy.yaml:5: rules[0].annotations: applies only to a rule with keys"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    require_child_signature: sometimes
""", "policy.yaml:5: rules[0].require_child_signature: must be true or false"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    formats: [classic, sigstore]
""", "policy.yaml:5: rules[0].formats[1]: must be one of classic, bundle"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    formats:
      - bundle
      - bundle
""", "policy.yaml:7: rules[0].formats[1]: bundle is listed twice"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    formats: []
""", "policy.yaml:5: rules[0].formats: must be a list of signature formats (classic, bundle)"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    formats: classic
""", "policy.yaml:5: rules[0].formats: must be a list of signature formats (classic, bundle)"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    formats: [[classic]]
""", "policy.yaml:5: rules[0].formats[0]: must be one of classic, bundle"),
    ("""\
rules:
  - name: platform
    images: [ghcr.io/acme/**]
    action: allow
    formats: [classic]
""", "policy.yaml:5: rules[0].formats: applies only to a rule with keys"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    keys: [b.pub]
""", "policy.yaml:5: rules[0].keys: given twice"),
    ("""\
rules:
  - name: ""
    images: [ghcr.io/acme/**]
    keys: [a.pub]
""", "policy.yaml:2: rules[0].name: must be a non-empty string, without leading or trailing "
     "spaces or control characters"),
    ("""\
rules:
  - name: 2024
    images: [ghcr.io/acme/**]
    keys: [a.pub]
""", "policy.yaml:2: rules[0].name: must be a string (quote numbers and booleans)"),
    ("rules: []\n", "policy.yaml:1: rules: must be a list of at least one rule"),
    ("rules: {name: x}\n", "policy.yaml:1: rules: must be a list of at least one rule"),
    ("unmatched: deny\n", "policy.yaml:1: document: missing field 'rules'"),
    ("- name: x\n", "policy.yaml:1: document: must be a mapping"),
    ("", "policy.yaml:1: document: empty; want a mapping with 'rules'"),
    ("# only a comment\n", "policy.yaml:1: document: empty; want a mapping with 'rules'"),
    ("""\
rules:
  - ghcr.io/acme/**
""", "policy.yaml:2: rules[0]: must be a mapping"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**
    keys: [a.pub]
""", "policy.yaml:4: invalid YAML: expected ',' or ']', but got ':'"),
    ("""\
rules:
  - name: ours
\timages: []
""", "policy.yaml:3: invalid YAML: found character '\\t' that cannot start any token"),
    ("""\
rules: []
---
rules: []
""", "policy.yaml:2: invalid YAML: expected a single document in the stream, but found "
     "another document"),
    ("""\
rules:
  - name: ours
    images: [ghcr.io/acme/**]
    keys: [a.pub]
    threshold: *missing
""", "policy.yaml:5: invalid YAML: found undefined alias 'missing'"),
]
# fmt: on


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_errors_name_the_line_and_field(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "policy.yaml")
    assert caught.value.diagnostics() == message
    assert str(caught.value) == message  # one line already
    assert isinstance(caught.value, Error)


def test_load_policy_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(ISSUE_EXAMPLE)
    loaded = load_policy(path)
    assert loaded == parse_policy(ISSUE_EXAMPLE)
    assert loaded.source == str(path)
    path.write_text(ISSUE_EXAMPLE.replace("threshold: 1", "threshold: 3"))
    with pytest.raises(PolicyError) as caught:
        load_policy(str(path))
    assert caught.value.diagnostics() == (
        f"{path}:6: rules[0].threshold: 3 is more than the 2 keys listed"
    )


def test_load_policy_file_problems(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PolicyError) as caught:
        load_policy(missing)
    assert (
        caught.value.diagnostics()
        == f"{missing}: cannot read the policy: No such file or directory"
    )
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("rules: # caf\xe9\n".encode("latin-1"))
    with pytest.raises(PolicyError) as caught:
        load_policy(latin1)
    assert caught.value.diagnostics() == f"{latin1}: the policy is not UTF-8 text"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": ("ghcr.io/a/**",)}, "rule 'r': needs either keys or an action"),
        ({"images": ("ghcr.io/a/**",), "keys": ("a.pub",), "action": Action.DENY},
         "rule 'r': needs either keys or an action"),
        ({"images": ("ghcr.io/a/**",), "keys": ("a.pub",), "threshold": 2},
         "rule 'r': threshold 2 needs 1 to 1"),
        ({"images": ("ghcr.io/a/**",), "keys": ("a.pub",), "threshold": 0},
         "rule 'r': threshold 0 needs 1 to 1"),
        ({"images": ("ghcr.io/a:1",), "action": Action.ALLOW},
         "rule 'r': 'ghcr.io/a:1': a pattern names repositories, without a tag"),
        ({"images": ("",), "action": Action.ALLOW}, "rule 'r': an image pattern is empty"),
        ({"images": ("ghcr.io/a/**",), "keys": ("a.pub",), "formats": ()},
         "rule 'r': formats lists no signature format"),
    ],
)  # fmt: skip
def test_rules_built_in_code_keep_the_same_invariants(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        Rule(name="r", **kwargs)  # type: ignore[arg-type]
    assert caught.value.diagnostics() == message


@pytest.mark.parametrize(
    ("reference", "shown"),
    [
        ("/etc/signgate/cosign.pub", "/etc/signgate/cosign.pub"),
        ("hashivault://release", "hashivault://release"),
        ("awskms://localhost:4566/alias/release", "awskms://localhost:4566/alias/release"),
        ("pkcs11:token=signing;object=release?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234",
         "pkcs11:token=signing;object=release?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=***"),
        ("pkcs11:token=t;object=o;pin-value=secret?module-path=/m.so",
         "pkcs11:token=t;object=o;pin-value=***?module-path=/m.so"),
        ("awskms://user:hunter2@kms.example.com/alias/x", "awskms://user:***@kms.example.com/alias/x"),
    ],
)  # fmt: skip
def test_key_references_shown_without_secrets(reference: str, shown: str) -> None:
    assert display_key_ref(reference) == shown


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (Rule("r", ("**",), keys=("a.pub",)), "a signature by key a.pub"),
        (Rule("r", ("**",), keys=("a.pub", "b.pub")),
         "a signature by one of the keys a.pub, b.pub"),
        (Rule("r", ("**",), keys=("a.pub", "b.pub", "c.pub"), threshold=2,
              annotations={"env": "prod", "a": "b"}),
         "signatures by 2 of the keys a.pub, b.pub, c.pub with annotations a=b, env=prod"),
        (Rule("r", ("**",), keys=("a.pub",), require_child_signature=True),
         "a signature by key a.pub on the index and the platform's image"),
        (Rule("r", ("**",), keys=("a.pub",), formats=(SignatureFormat.CLASSIC,)),
         "a signature by key a.pub in the classic format"),
        (Rule("r", ("**",), keys=("a.pub",),
              formats=(SignatureFormat.BUNDLE, SignatureFormat.CLASSIC)),
         "a signature by key a.pub"),
    ],
)  # fmt: skip
def test_requirement_reads_as_a_sentence(rule: Rule, text: str) -> None:
    assert rule.requirement() == text
