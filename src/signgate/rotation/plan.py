"""The rotation's pure core: the work list, the journal's state machine, and policy edits.

The phases run in this order, and each starts only when the one before it is complete:

1. ``plan``: the signatures OLD made, in either format, become the work list (recorded, so a
   resumed run works on the same list even after OLD's signatures are gone).
2. ``trust``: NEW is added beside OLD in every policy rule that trusts OLD (unless the rule
   already trusts NEW: a KMS key reference that stands for all its versions, OLD's and NEW's);
   then ``trust-hook`` (``--policy-hook`` delivers the file) and ``confirm-new``
   (``--verifier``: every verifier reports that it trusts NEW).
3. ``resign``: every work item gets a signature by NEW next to OLD's, in OLD's formats.
4. ``shards`` (with ``--shard``): wait until every other shard has re-signed its share.
5. ``retire``: OLD is removed from the policy rules (never a reference that trusts NEW too);
   then ``retire-hook`` and ``confirm-old`` (no verifier trusts OLD any more; not waited for
   where the policy still trusts OLD's key version, until ``retire-key``).
6. ``clean``: OLD's signatures are removed, in both formats.
7. ``retire-key`` (with ``--disable-old-key``): OLD is disabled in its KMS.

At every moment each image OLD had signed carries a signature the policy in force accepts:
before ``trust`` ends only OLD's signatures exist; until ``retire`` both keys are trusted;
``retire`` waits until every image (of every shard) carries NEW's signature; ``clean`` starts
only once the verifiers trust NEW (confirmed, or after the propagation delay).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from signgate.errors import PolicyError
from signgate.policy import parse_policy
from signgate.rotation.inventory import DigestEntry, Inventory
from signgate.rotation.settings import parse_shard
from signgate.signatures.formats import SignatureFormat

PHASES = ("plan", "trust", "resign", "shards", "retire", "clean", "retire-key")


CLASSIC = SignatureFormat.CLASSIC.value


@dataclass(frozen=True, order=True)
class WorkItem:
    """One signature to re-sign: ``repository@digest`` with the annotations OLD signed, in the
    formats OLD signed them (classic, bundle or both): NEW signs in the same formats.

    A journal written before bundles were rotated has items without formats: classic.
    """

    repository: str
    digest: str
    annotations: tuple[tuple[str, str], ...] = ()
    formats: tuple[str, ...] = (CLASSIC,)

    @property
    def item_id(self) -> str:
        # Without the formats: the ids of journals written before them stay the same.
        return json.dumps([self.repository, self.digest, list(self.annotations)])

    def to_json(self) -> list[Any]:
        return [
            self.repository, self.digest, [list(pair) for pair in self.annotations],
            list(self.formats),
        ]

    @classmethod
    def from_json(cls, value: Any) -> WorkItem:
        repository, digest, annotations, *rest = value
        formats = tuple(str(f) for f in rest[0]) if rest else (CLASSIC,)
        return cls(
            str(repository), str(digest), tuple((str(k), str(v)) for k, v in annotations),
            formats,
        )


_Signed = tuple[str, str, tuple[tuple[str, str], ...]]  # repository, digest, annotations


def _signed(entries: Iterable[DigestEntry], key_id: str) -> dict[_Signed, set[str]]:
    """Per (repository, digest, sorted annotations) signed by ``key_id``: the formats."""
    found: dict[_Signed, set[str]] = {}
    for entry in entries:
        for signature in entry.signatures:
            if signature.key_id == key_id:
                annotations = tuple(sorted(signature.annotations.items()))
                place = (str(entry.repository), entry.digest, annotations)
                found.setdefault(place, set()).add(signature.format.value)
    return found


def _in_order(formats: Iterable[str]) -> tuple[str, ...]:
    given = set(formats)
    return tuple(f.value for f in SignatureFormat if f.value in given)


def work_list(inventory: Inventory, old_key_id: str) -> list[WorkItem]:
    """One item per distinct annotation set of OLD's signatures on each digest, with the
    formats OLD signed it in; sorted."""
    return sorted(
        WorkItem(repository, digest, annotations, _in_order(formats))
        for (repository, digest, annotations), formats in _signed(
            inventory.entries, old_key_id
        ).items()
    )


def unfinished_items(
    entries: Iterable[DigestEntry], old_key_id: str, new_key_id: str
) -> list[WorkItem]:
    """The signatures by OLD that lack a signature by NEW with the same annotations in one of
    OLD's formats: what a shard still has to re-sign."""
    listed = tuple(entries)
    done = _signed(listed, new_key_id)
    return [
        item for item in work_list(Inventory("", listed), old_key_id)
        if not set(item.formats)
        <= done.get((item.repository, item.digest, item.annotations), set())
    ]


@dataclass
class RotationState:
    """What the journal says has happened."""

    header: dict[str, Any] | None = None
    plan: tuple[WorkItem, ...] | None = None
    completed: set[str] = field(default_factory=set)
    resigned: set[str] = field(default_factory=set)
    cleaned: set[str] = field(default_factory=set)
    removed: int = 0
    new_key: dict[str, Any] | None = None
    new_key_creation_begun: bool = False
    disabled: str | None = None

    def phases(self) -> tuple[str, ...]:
        """The phases this rotation has: ``shards`` only with several shards, ``retire-key``
        only with ``--disable-old-key``."""
        header = self.header or {}
        sharded = bool(header.get("shard")) and parse_shard(str(header["shard"])).count > 1
        return tuple(
            p for p in PHASES
            if (p != "shards" or sharded) and (p != "retire-key" or header.get("disable_old_key"))
        )

    def next_phase(self) -> str | None:
        """The first phase not yet complete; None when the rotation is finished."""
        return next((p for p in self.phases() if p not in self.completed), None)

    @property
    def finished(self) -> bool:
        return self.next_phase() is None


def replay(records: Iterable[Mapping[str, Any]]) -> RotationState:
    """Fold the journal's records into the state they describe."""
    state = RotationState()
    for record in records:
        kind = record.get("type")
        if kind == "start":
            state.header = dict(record)
        elif kind == "plan":
            state.plan = tuple(WorkItem.from_json(v) for v in record["items"])
            state.completed.add("plan")
        elif kind == "begin" and record.get("phase") == "create-key":
            state.new_key_creation_begun = True
        elif kind == "new-key":
            state.new_key = dict(record)
        elif kind == "end":
            state.completed.add(str(record["phase"]))
            if record.get("phase") == "retire-key":
                state.disabled = str(record.get("disabled", ""))
        elif kind == "item" and record.get("phase") == "resign":
            state.resigned.add(str(record["id"]))
        elif kind == "item" and record.get("phase") == "clean":
            if str(record["id"]) not in state.cleaned:
                state.removed += int(record.get("removed", 0))
            state.cleaned.add(str(record["id"]))
    return state


def clean_targets(plan: Sequence[WorkItem]) -> list[tuple[str, str]]:
    """The (repository, digest) pairs whose signature images lose OLD's signatures."""
    return sorted({(item.repository, item.digest) for item in plan})


def clean_id(repository: str, digest: str) -> str:
    return f"{repository}@{digest}"


# -- policy edits ------------------------------------------------------------------------------

_PLAIN_SCALAR = re.compile(r"^[A-Za-z0-9_./~+-][A-Za-z0-9_./:@=%+~-]*$")


def _yaml_scalar(text: str) -> str:
    if _PLAIN_SCALAR.match(text) and ": " not in text and " #" not in text:
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def _key_sequences(text: str, source: str) -> list[tuple[str, yaml.SequenceNode]]:
    """(rule name, keys node) of every rule with keys, from the composed document."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise PolicyError(f"{source}: invalid YAML: {' '.join(str(e).split())}") from e
    found: list[tuple[str, yaml.SequenceNode]] = []
    if not isinstance(root, yaml.MappingNode):
        return found
    for key_node, rules in root.value:
        if key_node.value != "rules" or not isinstance(rules, yaml.SequenceNode):
            continue
        for rule in rules.value:
            if not isinstance(rule, yaml.MappingNode):
                continue
            fields = {k.value: v for k, v in rule.value}
            keys, name = fields.get("keys"), fields.get("name")
            if isinstance(keys, yaml.SequenceNode):
                found.append((str(getattr(name, "value", "")), keys))
    return found


def _line_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, start) + 1
    newline = text.find("\n", end)
    return line_start, len(text) if newline < 0 else newline + 1


def _block_item_prefix(text: str, node: yaml.Node, source: str) -> str:
    line_start, _ = _line_bounds(text, node.start_mark.index, node.end_mark.index)
    prefix = text[line_start : node.start_mark.index]
    if prefix.strip() != "-":
        raise PolicyError(
            f"{source}:{node.start_mark.line + 1}: cannot edit this key list; "
            "write each key as '- KEY' on its own line or as a [flow, list]"
        )
    return prefix


def _apply(text: str, edits: list[tuple[int, int, str]]) -> str:
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


KeyTest = Callable[[str], bool]


def add_key_to_rules(
    text: str,
    trusts_old: KeyTest,
    new_ref: str,
    source: str = "policy",
    trusts_new: KeyTest | None = None,
) -> tuple[str, list[str]]:
    """``text`` with ``new_ref`` listed after OLD in every rule that trusts OLD and not yet
    NEW; the names of the rules changed. Everything else (comments, order, quoting) is kept.

    ``trusts_new`` says whether a reference stands for NEW (by default: it is ``new_ref``); a
    KMS key reference without a version stands for OLD's version and NEW's at once, and a rule
    that lists it needs nothing added.
    """
    is_new = trusts_new or new_ref.__eq__
    edits: list[tuple[int, int, str]] = []
    changed: list[str] = []
    for name, keys in _key_sequences(text, source):
        refs = [str(item.value) for item in keys.value]
        old_items = [item for item in keys.value if trusts_old(str(item.value))]
        if not old_items or new_ref in refs or any(is_new(r) for r in refs):
            continue
        anchor = old_items[-1]
        if keys.flow_style:
            end = anchor.end_mark.index
            edits.append((end, end, f", {_yaml_scalar(new_ref)}"))
        else:
            prefix = _block_item_prefix(text, anchor, source)
            _, line_end = _line_bounds(text, anchor.start_mark.index, anchor.end_mark.index)
            lead = "" if text[:line_end].endswith("\n") else "\n"
            edits.append((line_end, line_end, f"{lead}{prefix}{_yaml_scalar(new_ref)}\n"))
        changed.append(name)
    result = _apply(text, edits)
    _check_edit(
        result, source,
        lambda keys: any(is_new(k) for k in keys) or not any(trusts_old(k) for k in keys),
    )
    return result, changed


def remove_key_from_rules(
    text: str,
    trusts_old: KeyTest,
    new_ref: str,
    source: str = "policy",
    trusts_new: KeyTest | None = None,
) -> tuple[str, list[str]]:
    """``text`` without OLD in the rules that also trust NEW; the rules changed.

    A rule that trusts OLD but not NEW keeps OLD: removing it could refuse an image. A
    reference that stands for NEW as well as OLD (a KMS key with both versions) is never
    removed: that would remove NEW too; OLD's version is retired in the KMS instead.
    """
    is_new = trusts_new or new_ref.__eq__

    def only_old(ref: str) -> bool:
        return trusts_old(ref) and not is_new(ref) and ref != new_ref

    edits: list[tuple[int, int, str]] = []
    changed: list[str] = []
    for name, keys in _key_sequences(text, source):
        refs = [str(item.value) for item in keys.value]
        if not any(is_new(r) for r in refs):
            continue
        removed = False
        for item in keys.value:
            if not only_old(str(item.value)):
                continue
            removed = True
            start, end = item.start_mark.index, item.end_mark.index
            if keys.flow_style:
                after = re.match(r"\s*,\s*", text[end:])
                if after:
                    edits.append((start, end + after.end(), ""))
                else:
                    before = re.search(r",\s*$", text[:start])
                    edits.append((before.start() if before else start, end, ""))
            else:
                _block_item_prefix(text, item, source)
                line_start, line_end = _line_bounds(text, start, end)
                rest = text[end:line_end].strip()
                if rest and not rest.startswith("#"):
                    raise PolicyError(f"{source}:{item.start_mark.line + 1}: cannot edit this key")
                edits.append((line_start, line_end, ""))
        if removed:
            changed.append(name)
    result = _apply(text, edits)
    _check_edit(
        result, source,
        lambda keys: not any(is_new(k) for k in keys) or not any(only_old(k) for k in keys),
    )
    return result, changed


def _check_edit(text: str, source: str, rule_ok: Callable[[tuple[str, ...]], bool]) -> None:
    policy = parse_policy(text, source)
    for rule in policy.rules:
        if rule.keys and not rule_ok(rule.keys):
            raise PolicyError(f"{source}: editing rule {rule.name!r} did not give the keys wanted")
