"""The policy file: which images need which keys, how many, and what a refusal does (pure).

```yaml
unmatched: deny                 # deny | allow: images no rule matches (default deny)
rules:                          # first matching rule wins
  - name: ours
    images: ["registry.example.com/team/**", "localhost:5000/*"]
    keys: [/etc/signgate/cosign.pub, hashivault://release]
    threshold: 1                # distinct keys that must have signed (default 1)
    annotations: {env: prod}    # payload annotations every counted signature must carry
    mode: enforce               # enforce | warn | audit (default enforce)
    namespaces: {exclude: [dev-*]}
    require_child_signature: false
    formats: [classic, bundle]  # signature formats accepted (default both)
  - name: platform
    images: ["registry.k8s.io/**"]
    action: allow               # allow | deny, without verification
```

Image patterns name repositories, never tags or digests: a pattern is matched against
``registry/path`` of the normalised reference, so ``nginx:1.25``, ``nginx@sha256:...`` and
``docker.io/library/nginx`` all meet the pattern as ``index.docker.io/library/nginx``. In a
pattern ``*`` matches within one path segment, ``**`` across ``/``, ``?`` one character other
than ``/``; the registry host matches case-insensitively. A pattern's literal first segment is
normalised as a reference is: ``nginx`` means ``index.docker.io/library/nginx``, ``bitnami/*``
means ``index.docker.io/bitnami/*``, ``docker.io/...`` means ``index.docker.io/...``, and a
pattern without ``/`` (other than ``**``) names Docker Hub official images (``*`` is all of
them). A pattern whose first segment holds a glob (``**``, ``*.example.com/**``) is taken as
written.

A rule applies to an image when one of its patterns matches and its namespace selector selects
the namespace (names globbed with ``*`` and ``?``; no ``include`` means every namespace; an
``exclude`` wins). A rule that does not apply passes the image to the next rule, and an image
that no rule takes meets ``unmatched``: excluding a namespace from a rule does not exempt it
from the policy. To exempt namespaces, put an ``action: allow`` rule selecting them first.

For a multi-platform index, a signature on the index covers its children, as cosign signs them;
``require_child_signature: true`` requires the child the node pulls to be signed as well.

``formats`` limits the signature formats a rule accepts: ``classic`` (cosign 2's ``.sig``
image) and ``bundle`` (cosign 3's Sigstore bundle); a rule without it accepts either.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from signgate.errors import PolicyError
from signgate.keys.refs import display_key_ref
from signgate.reference import (
    DEFAULT_REGISTRY,
    DOCKER_HUB_ALIASES,
    OFFICIAL_REPOSITORY_PREFIX,
    ImageReference,
    Repository,
)
from signgate.signatures.formats import SIGNATURE_FORMATS, SignatureFormat, describe_formats


class Action(StrEnum):
    """What a static rule, or the policy for unmatched images, does without verification."""

    ALLOW = "allow"
    DENY = "deny"


class Mode(StrEnum):
    """What a refusal by a rule does: deny, allow with an admission warning, or only log."""

    ENFORCE = "enforce"
    WARN = "warn"
    AUDIT = "audit"


_IMAGE_PATTERN_RE = re.compile(r"[A-Za-z0-9._:\[\]/*?-]+")
_NAMESPACE_PATTERN_RE = re.compile(r"[a-z0-9*?-]+")
_GLOB_TOKEN_RE = re.compile(r"(\*\*|\*|\?)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for token in _GLOB_TOKEN_RE.split(pattern):
        if token == "**":
            parts.append(".*")
        elif token == "*":
            parts.append("[^/]*")
        elif token == "?":
            parts.append("[^/]")
        elif token:
            parts.append(re.escape(token))
    return re.compile("".join(parts), re.IGNORECASE)


def image_pattern_problem(pattern: str) -> str | None:
    """What is wrong with an image pattern, or None when it is usable."""
    if not pattern:
        return "an image pattern is empty"
    if "@" in pattern:
        return f"{pattern!r}: a pattern names repositories, without a digest"
    if not _IMAGE_PATTERN_RE.fullmatch(pattern):
        return (
            f"{pattern!r} has characters no image name has (want letters, digits, '.', '_', "
            "'-', ':' after a host, '/', and the globs '*', '**', '?')"
        )
    segments = pattern.split("/")
    if "" in segments:
        return f"{pattern!r} has an empty path segment"
    # Only a registry host may hold ':' (its port); a one-segment pattern is a Docker Hub name.
    path_segments = segments[1:] if len(segments) > 1 else segments
    if any(":" in segment for segment in path_segments):
        return f"{pattern!r}: a pattern names repositories, without a tag"
    return None


def normalise_image_pattern(pattern: str) -> str:
    """The pattern as it meets normalised repository names (see the module docstring)."""
    first, slash, rest = pattern.partition("/")
    if not slash:
        if pattern == "**":
            return pattern
        return f"{DEFAULT_REGISTRY}/{OFFICIAL_REPOSITORY_PREFIX}{pattern}"
    if "*" in first or "?" in first:
        return pattern
    if first == "localhost" or "." in first or ":" in first or first.lower() != first:
        if first.lower() not in DOCKER_HUB_ALIASES:
            return pattern
        if "/" not in rest and rest != "**":
            rest = OFFICIAL_REPOSITORY_PREFIX + rest
        return f"{DEFAULT_REGISTRY}/{rest}"
    return f"{DEFAULT_REGISTRY}/{pattern}"


@dataclass(frozen=True)
class NamespaceSelector:
    """Namespaces a rule applies to: any of ``include`` (all when empty) and none of ``exclude``."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    _include: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _exclude: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_include", tuple(_glob_regex(p) for p in self.include))
        object.__setattr__(self, "_exclude", tuple(_glob_regex(p) for p in self.exclude))

    def selects(self, namespace: str) -> bool:
        if self._include and not any(p.fullmatch(namespace) for p in self._include):
            return False
        return not any(p.fullmatch(namespace) for p in self._exclude)


@dataclass(frozen=True)
class Rule:
    """One rule: the images it takes and either the keys that must have signed them or a
    static ``action``. ``annotations`` is read-only."""

    name: str
    images: tuple[str, ...]
    keys: tuple[str, ...] = ()
    threshold: int = 1
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    mode: Mode = Mode.ENFORCE
    namespaces: NamespaceSelector = NamespaceSelector()
    action: Action | None = None
    require_child_signature: bool = False
    formats: tuple[SignatureFormat, ...] = SIGNATURE_FORMATS
    _matchers: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for pattern in self.images:
            if problem := image_pattern_problem(pattern):
                raise PolicyError(f"rule {self.name!r}: {problem}")
        if bool(self.keys) == (self.action is not None):
            raise PolicyError(f"rule {self.name!r}: needs either keys or an action")
        if self.keys and not 1 <= self.threshold <= len(self.keys):
            raise PolicyError(
                f"rule {self.name!r}: threshold {self.threshold} needs 1 to {len(self.keys)}"
            )
        if not self.formats:
            raise PolicyError(f"rule {self.name!r}: formats lists no signature format")
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))
        object.__setattr__(
            self,
            "_matchers",
            tuple(_glob_regex(normalise_image_pattern(p)) for p in self.images),
        )

    @property
    def verifies(self) -> bool:
        """True when the rule checks signatures (it has keys), False for a static action."""
        return bool(self.keys)

    def matches(self, image: ImageReference) -> bool:
        """Whether one of the image patterns matches the image's repository."""
        name = str(image.repository)
        return any(m.fullmatch(name) for m in self._matchers)

    def requirement(self) -> str:
        """What the rule requires, for a person: which keys, how many, which annotations."""
        keys = ", ".join(display_key_ref(k) for k in self.keys)
        if len(self.keys) == 1:
            text = f"a signature by key {keys}"
        elif self.threshold == 1:
            text = f"a signature by one of the keys {keys}"
        else:
            text = f"signatures by {self.threshold} of the keys {keys}"
        if self.annotations:
            wanted = ", ".join(f"{k}={v}" for k, v in sorted(self.annotations.items()))
            text += f" with annotations {wanted}"
        if self.require_child_signature:
            text += " on the index and the platform's image"
        if set(self.formats) != set(SIGNATURE_FORMATS):
            text += f" in the {describe_formats(self.formats)} format"
        return text


_RULE_MEMO_ENTRIES = 16384


@dataclass(frozen=True)
class Policy:
    """A validated policy; ``rules`` in the file's order (the first that applies wins)."""

    rules: tuple[Rule, ...]
    unmatched: Action = Action.DENY
    source: str = field(default="", compare=False)

    def rule_for(self, image: ImageReference, namespace: str) -> Rule | None:
        """The first rule that applies to ``image`` in ``namespace``, or None (``unmatched``)."""
        key = (image.repository, namespace)
        memo = self._rule_memo
        if key in memo:
            return memo[key]
        found = next(
            (r for r in self.rules if r.namespaces.selects(namespace) and r.matches(image)), None
        )
        if len(memo) >= _RULE_MEMO_ENTRIES:
            memo.clear()
        memo[key] = found
        return found

    @cached_property
    def _rule_memo(self) -> dict[tuple[Repository, str], Rule | None]:
        # Every review asks rule_for for each of its images, mostly the same few hundred: the
        # answer depends only on this (immutable) policy, the repository and the namespace.
        return {}

    def key_references(self) -> tuple[str, ...]:
        """Every key reference of every rule, once each, in the file's order (to load at start)."""
        return tuple(dict.fromkeys(k for rule in self.rules for k in rule.keys))


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; raise :class:`PolicyError` naming the line and field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"{path}: the policy is not UTF-8 text") from e
    except OSError as e:
        raise PolicyError(f"{path}: cannot read the policy: {e.strerror or e}") from e
    return parse_policy(text, str(path))


def parse_policy(text: str, source: str = "policy.yaml") -> Policy:
    """Validate a policy's YAML text; ``source`` names it in error messages."""
    loader = _PolicyLoader(text)
    try:
        root = loader.get_single_node()
        return _PolicyReader(source, loader).policy(root)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = e.problem or e.context or "syntax error"
        if e.context and problem.startswith("but "):
            problem = f"{e.context}, {problem}"
        problem = " ".join(problem.split())
        raise PolicyError(f"{source}:{line}: invalid YAML: {problem}") from e
    except yaml.YAMLError as e:
        raise PolicyError(f"{source}: invalid YAML: {' '.join(str(e).split())}") from e
    finally:
        loader.dispose()


class _PolicyLoader(yaml.SafeLoader):
    """Composes the policy into nodes, so that every value keeps the line it was written on."""


_TOP_FIELDS = ("unmatched", "rules")
_RULE_FIELDS = (
    "name",
    "images",
    "keys",
    "threshold",
    "annotations",
    "mode",
    "namespaces",
    "action",
    "require_child_signature",
    "formats",
)
_KEYED_ONLY = ("threshold", "annotations", "require_child_signature", "formats")
_MISSING = object()


class _PolicyReader:
    """Walks the composed nodes; the first problem raises, naming its line and field path."""

    def __init__(self, source: str, loader: _PolicyLoader) -> None:
        self.source = source
        self.loader = loader

    def error(self, node: yaml.Node, path: str, problem: str) -> PolicyError:
        return PolicyError(f"{self.source}:{node.start_mark.line + 1}: {path}: {problem}")

    def policy(self, root: yaml.Node | None) -> Policy:
        if root is None:
            raise PolicyError(f"{self.source}:1: document: empty; want a mapping with 'rules'")
        fields = self.fields(root, "", _TOP_FIELDS, "document")
        if "rules" not in fields:
            raise self.error(root, "document", "missing field 'rules'")
        unmatched = Action.DENY
        if "unmatched" in fields:
            unmatched = Action(self.choice(fields["unmatched"][1], "unmatched", Action))
        rules_node = fields["rules"][1]
        if not isinstance(rules_node, yaml.SequenceNode) or not rules_node.value:
            raise self.error(rules_node, "rules", "must be a list of at least one rule")
        rules: list[Rule] = []
        named: dict[str, int] = {}
        for index, rule_node in enumerate(rules_node.value):
            path = f"rules[{index}]"
            rule = self.rule(rule_node, path)
            if rule.name in named:
                name_node = self.fields(rule_node, path, _RULE_FIELDS)["name"][1]
                raise self.error(
                    name_node,
                    f"{path}.name",
                    f"{rule.name!r} is the name of rules[{named[rule.name]}] too",
                )
            named[rule.name] = index
            rules.append(rule)
        return Policy(tuple(rules), unmatched, self.source)

    def rule(self, node: yaml.Node, path: str) -> Rule:
        fields = self.fields(node, path, _RULE_FIELDS)
        readers: dict[str, Callable[[yaml.Node, str], Any]] = {
            "name": self.name,
            "images": self.images,
            "keys": self.keys,
            "threshold": self.threshold,
            "annotations": self.annotations,
            "mode": lambda n, p: Mode(self.choice(n, p, Mode)),
            "namespaces": self.namespaces,
            "action": lambda n, p: Action(self.choice(n, p, Action)),
            "require_child_signature": self.boolean,
            "formats": self.formats,
        }
        values = {key: readers[key](value, f"{path}.{key}") for key, (_, value) in fields.items()}
        for required in ("name", "images"):
            if required not in values:
                raise self.error(node, path, f"missing field {required!r}")
        if "keys" in values and "action" in values:
            raise self.error(
                fields["action"][0], f"{path}.action", "a rule has keys or an action, not both"
            )
        if "keys" not in values and "action" not in values:
            raise self.error(
                node,
                path,
                "needs keys (signatures to verify) or an action (allow or deny without "
                "verification)",
            )
        if "action" in values:
            for key in _KEYED_ONLY:
                if key in values:
                    raise self.error(
                        fields[key][0], f"{path}.{key}", "applies only to a rule with keys"
                    )
        if "threshold" in values and values["threshold"] > len(values["keys"]):
            raise self.error(
                fields["threshold"][1],
                f"{path}.threshold",
                f"{values['threshold']} is more than the {len(values['keys'])} keys listed",
            )
        return Rule(**values)

    def fields(
        self, node: yaml.Node, path: str, known: tuple[str, ...], name: str | None = None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, name or path, "must be a mapping")
        found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node)
            if not isinstance(key, str):
                raise self.error(key_node, name or path, "field names must be strings")
            field_path = f"{path}.{key}" if path else key
            if key in found:
                raise self.error(key_node, field_path, "given twice")
            if key not in known:
                raise self.error(key_node, field_path, f"unknown field (known: {', '.join(known)})")
            found[key] = (key_node, value_node)
        return found

    def scalar(self, node: yaml.Node) -> object:
        if not isinstance(node, yaml.ScalarNode):
            return _MISSING
        return self.loader.construct_object(node)

    def string(self, node: yaml.Node, path: str) -> str:
        value = self.scalar(node)
        if not isinstance(value, str):
            raise self.error(node, path, "must be a string (quote numbers and booleans)")
        if not value or value != value.strip() or _CONTROL_RE.search(value):
            raise self.error(
                node,
                path,
                "must be a non-empty string, without leading or trailing spaces or control "
                "characters",
            )
        return value

    def strings(self, node: yaml.Node, path: str) -> tuple[str, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, path, "must be a list of strings")
        return tuple(self.string(item, f"{path}[{i}]") for i, item in enumerate(node.value))

    def name(self, node: yaml.Node, path: str) -> str:
        return self.string(node, path)

    def images(self, node: yaml.Node, path: str) -> tuple[str, ...]:
        patterns = self.strings(node, path)
        if not patterns:
            raise self.error(node, path, "must list at least one image pattern")
        for index, pattern in enumerate(patterns):
            if problem := image_pattern_problem(pattern):
                raise self.error(node.value[index], f"{path}[{index}]", problem)
        return patterns

    def keys(self, node: yaml.Node, path: str) -> tuple[str, ...]:
        references = self.strings(node, path)
        if not references:
            raise self.error(node, path, "must list at least one key reference")
        for index, reference in enumerate(references):
            first = references.index(reference)
            if first != index:
                raise self.error(
                    node.value[index], f"{path}[{index}]", f"the same key as {path}[{first}]"
                )
        return references

    def formats(self, node: yaml.Node, path: str) -> tuple[SignatureFormat, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(
                node, path, f"must be a list of signature formats ({', '.join(SIGNATURE_FORMATS)})"
            )
        formats: list[SignatureFormat] = []
        for index, item in enumerate(node.value):
            item_path = f"{path}[{index}]"
            found = SignatureFormat(self.choice(item, item_path, SignatureFormat))
            if found in formats:
                raise self.error(item, item_path, f"{found} is listed twice")
            formats.append(found)
        return tuple(formats)

    def threshold(self, node: yaml.Node, path: str) -> int:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(node, path, "must be an integer >= 1")
        return value

    def annotations(self, node: yaml.Node, path: str) -> dict[str, str]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, path, "must be a mapping of strings to strings")
        annotations: dict[str, str] = {}
        for key_node, value_node in node.value:
            key = self.string(key_node, path)
            if key in annotations:
                raise self.error(key_node, f"{path}.{key}", "given twice")
            value = self.scalar(value_node)
            if not isinstance(value, str):
                raise self.error(
                    value_node, f"{path}.{key}", "must be a string (quote numbers and booleans)"
                )
            annotations[key] = value
        return annotations

    def namespaces(self, node: yaml.Node, path: str) -> NamespaceSelector:
        fields = self.fields(node, path, ("include", "exclude"))
        lists: dict[str, tuple[str, ...]] = {}
        for key, (_, value_node) in fields.items():
            patterns = self.strings(value_node, f"{path}.{key}")
            for index, pattern in enumerate(patterns):
                if not _NAMESPACE_PATTERN_RE.fullmatch(pattern):
                    raise self.error(
                        value_node.value[index],
                        f"{path}.{key}[{index}]",
                        f"{pattern!r} is not a namespace name or glob "
                        "(lowercase letters, digits, '-', '*', '?')",
                    )
            lists[key] = patterns
        return NamespaceSelector(**lists)

    def choice(self, node: yaml.Node, path: str, choices: type[StrEnum]) -> str:
        value = self.scalar(node)
        allowed = [c.value for c in choices]
        if not isinstance(value, str) or value not in allowed:
            raise self.error(node, path, f"must be one of {', '.join(allowed)}")
        return value

    def boolean(self, node: yaml.Node, path: str) -> bool:
        value = self.scalar(node)
        if not isinstance(value, bool):
            raise self.error(node, path, "must be true or false")
        return value
