from __future__ import annotations

import json

import pytest

from signgate.errors import PolicyError
from signgate.policy import parse_policy
from signgate.reference import Repository
from signgate.rotation.inventory import (
    DigestEntry,
    Inventory,
    SignatureEntry,
    select_repositories,
    split_target,
)
from signgate.rotation.plan import (
    WorkItem,
    add_key_to_rules,
    remove_key_from_rules,
    replay,
    unfinished_items,
    work_list,
)
from signgate.signatures.formats import SignatureFormat

BUNDLE = SignatureFormat.BUNDLE

POLICY = """\
# the production policy
unmatched: deny
rules:
  - name: ours   # our images
    images: ["reg.example/team/**"]
    keys:
      - old.pub   # rotated yearly
      - third.pub
  - name: flow
    images: ["reg.example/flow/**"]
    keys: [third.pub, old.pub]
  - name: others
    images: ["reg.example/other/**"]
    keys: [third.pub]
  - name: platform
    images: ["registry.k8s.io/**"]
    action: allow
"""


def is_old(ref: str) -> bool:
    return ref == "old.pub"


def keys_of(text: str) -> dict[str, tuple[str, ...]]:
    return {rule.name: rule.keys for rule in parse_policy(text).rules}


def test_trust_both_adds_new_after_old_and_keeps_everything_else() -> None:
    edited, changed = add_key_to_rules(POLICY, is_old, "keys/new key.pub")
    assert changed == ["ours", "flow"]
    assert keys_of(edited) == {
        "ours": ("old.pub", "keys/new key.pub", "third.pub"),
        "flow": ("third.pub", "old.pub", "keys/new key.pub"),
        "others": ("third.pub",),
        "platform": (),
    }
    assert "# the production policy" in edited
    assert "- old.pub   # rotated yearly" in edited
    assert "  - name: ours   # our images" in edited


def test_trust_both_is_idempotent() -> None:
    once, _ = add_key_to_rules(POLICY, is_old, "new.pub")
    twice, changed = add_key_to_rules(once, is_old, "new.pub")
    assert twice == once
    assert changed == []


def test_retire_removes_old_only_where_new_is_trusted() -> None:
    both, _ = add_key_to_rules(POLICY, is_old, "new.pub")
    # A rule that trusts OLD without NEW keeps OLD: removing it could refuse an image.
    both = both.replace("keys: [third.pub, old.pub, new.pub]", "keys: [third.pub, old.pub]")
    retired, changed = remove_key_from_rules(both, is_old, "new.pub")
    assert changed == ["ours"]
    assert keys_of(retired)["ours"] == ("new.pub", "third.pub")
    assert keys_of(retired)["flow"] == ("third.pub", "old.pub")
    assert "rotated yearly" not in retired
    assert "# the production policy" in retired
    again, changed = remove_key_from_rules(retired, is_old, "new.pub")
    assert (again, changed) == (retired, [])


def test_retire_in_a_flow_list() -> None:
    both, _ = add_key_to_rules(POLICY, is_old, "new.pub")
    retired, _ = remove_key_from_rules(both, is_old, "new.pub")
    assert keys_of(retired)["flow"] == ("third.pub", "new.pub")
    assert "keys: [third.pub, new.pub]" in retired


def test_a_flow_list_over_several_lines() -> None:
    text = POLICY.replace(
        "    keys:\n      - old.pub   # rotated yearly\n      - third.pub\n",
        "    keys: [\n      old.pub,\n      third.pub]\n",
    )
    both, _ = add_key_to_rules(text, is_old, "new.pub")
    assert keys_of(both)["ours"] == ("old.pub", "new.pub", "third.pub")
    retired, _ = remove_key_from_rules(both, is_old, "new.pub")
    assert keys_of(retired)["ours"] == ("new.pub", "third.pub")


def test_an_invalid_edit_result_is_refused() -> None:
    # A key list written as a YAML alias cannot be edited in place.
    text = POLICY.replace("    keys: [third.pub]", "    keys: *shared").replace(
        "    keys:\n      - old.pub", "    keys: &shared\n      - old.pub"
    )
    with pytest.raises(PolicyError):
        add_key_to_rules(text, is_old, "new.pub")


def entry(repo: str, digest: str, *signatures: SignatureEntry) -> DigestEntry:
    return DigestEntry(Repository("reg.example", repo), digest, signatures=signatures)


def test_work_list_is_every_signature_by_old_with_its_annotations() -> None:
    d1, d2, d3 = (f"sha256:{c * 64}" for c in "123")
    inventory = Inventory(
        "reg.example",
        (
            entry("a", d1, SignatureEntry("OLD"), SignatureEntry("OLD", {"env": "prod"})),
            entry("a", d2, SignatureEntry("THIRD"), SignatureEntry(None)),
            entry("b", d3, SignatureEntry("OLD"), SignatureEntry("THIRD")),
            entry("b", d1),
        ),
    )
    assert work_list(inventory, "OLD") == [
        WorkItem("reg.example/a", d1),
        WorkItem("reg.example/a", d1, (("env", "prod"),)),
        WorkItem("reg.example/b", d3),
    ]


def test_work_items_record_the_formats_old_signed_in() -> None:
    d1, d2, d3 = (f"sha256:{c * 64}" for c in "123")
    inventory = Inventory(
        "reg.example",
        (
            entry("a", d1, SignatureEntry("OLD", format=BUNDLE), SignatureEntry("OLD")),
            entry("a", d2, SignatureEntry("OLD", {"env": "prod"}, BUNDLE),
                  SignatureEntry("OLD", {"env": "dev"})),
            entry("a", d3, SignatureEntry("OLD", format=BUNDLE), SignatureEntry("THIRD")),
        ),
    )
    assert work_list(inventory, "OLD") == [
        WorkItem("reg.example/a", d1, (), ("classic", "bundle")),
        WorkItem("reg.example/a", d2, (("env", "dev"),), ("classic",)),
        WorkItem("reg.example/a", d2, (("env", "prod"),), ("bundle",)),
        WorkItem("reg.example/a", d3, (), ("bundle",)),
    ]


def test_a_journal_item_without_formats_is_classic() -> None:
    digest = "sha256:" + "1" * 64
    written_before_bundles = ["reg.example/a", digest, [["k", "v"]]]
    item = WorkItem.from_json(written_before_bundles)
    assert item == WorkItem("reg.example/a", digest, (("k", "v"),), ("classic",))
    both = WorkItem("reg.example/a", digest, (("k", "v"),), ("classic", "bundle"))
    assert WorkItem.from_json(json.loads(json.dumps(both.to_json()))) == both
    # The id a journal's item records: the same as before formats were recorded.
    assert both.item_id == item.item_id == json.dumps(written_before_bundles)


def test_replay_follows_the_journal() -> None:
    item = WorkItem("reg.example/a", "sha256:" + "1" * 64, (("k", "v"),))
    assert WorkItem.from_json(item.to_json()) == item
    state = replay([
        {"type": "start", "old": "o", "new": "n", "target": "reg.example"},
        {"type": "plan", "items": [item.to_json()]},
        {"type": "end", "phase": "trust"},
        {"type": "item", "phase": "resign", "id": item.item_id},
    ])
    assert state.plan == (item,)
    assert state.resigned == {item.item_id}
    assert state.next_phase() == "resign"
    state = replay([
        *([{"type": "end", "phase": p} for p in ("trust", "resign", "retire")]),
        {"type": "plan", "items": []},
        {"type": "item", "phase": "clean", "id": "x", "removed": 2},
        {"type": "item", "phase": "clean", "id": "x", "removed": 2},
    ])
    assert state.removed == 2
    assert state.next_phase() == "clean"
    assert not state.finished


def test_targets_and_repository_selection() -> None:
    assert split_target("Reg.Example:5000/team/") == ("reg.example:5000", "team")
    assert split_target("reg.example") == ("reg.example", "")
    names = ["team/a", "team/b/c", "teamx", "other/a"]
    assert select_repositories(names, "team", []) == ["team/a", "team/b/c"]
    assert select_repositories(names, "", ["*/a"]) == ["other/a", "team/a"]


def test_inventory_formats() -> None:
    from signgate.cli.rotation import format_inventory

    digest = "sha256:" + "1" * 64
    inventory = Inventory(
        "reg.example",
        (
            DigestEntry(Repository("reg.example", "a"), digest, ("v1",), (),
                        (SignatureEntry("k1"), SignatureEntry(None))),
            DigestEntry(Repository("reg.example", "a"), "sha256:" + "2" * 64),
        ),
        {"k1": "old.pub"},
    )
    table = format_inventory(inventory, "table").splitlines()
    assert table[0] == f"reg.example/a@{digest}\tv1\tsigned\told.pub [classic] (+1 by other keys)"
    assert table[1].endswith("\t(no tag)\tunsigned\t-")
    csv_lines = format_inventory(inventory, "csv").splitlines()
    assert csv_lines[0] == "repository,digest,tags,index,signed,keys,formats,unknown"
    assert csv_lines[1] == f"reg.example/a,{digest},v1,,yes,old.pub,old.pub=classic,1"
    rows = json.loads(format_inventory(inventory, "json"))
    assert rows[0]["keys"] == ["old.pub"]
    assert rows[0]["formats"] == {"old.pub": ["classic"]}
    assert rows[0]["unknown_formats"] == ["classic"]


def test_inventory_marks_the_formats_of_each_key() -> None:
    from signgate.cli.rotation import format_inventory

    digest = "sha256:" + "1" * 64
    signatures = (
        SignatureEntry("k2", format=BUNDLE), SignatureEntry("k1"),
        SignatureEntry("k1", format=BUNDLE), SignatureEntry(None, format=BUNDLE),
    )
    inventory = Inventory(
        "reg.example",
        (DigestEntry(Repository("reg.example", "a"), digest, (), (), signatures),),
        {"k1": "old.pub", "k2": "new.pub"},
    )
    (line,) = format_inventory(inventory, "table").splitlines()
    assert line.endswith(
        "\t(no tag)\tsigned\tnew.pub [bundle], old.pub [classic+bundle] (+1 by other keys)"
    )
    (row,) = json.loads(format_inventory(inventory, "json"))
    assert row["formats"] == {"new.pub": ["bundle"], "old.pub": ["classic", "bundle"]}
    assert row["unknown_formats"] == ["bundle"]
    csv_row = format_inventory(inventory, "csv").splitlines()[1]
    assert csv_row.endswith(",new.pub old.pub,new.pub=bundle old.pub=classic+bundle,1")


VERSIONED = """\
rules:
  - name: release
    images: ["reg.example/release/**"]
    keys: ["hashivault://release"]
  - name: pinned
    images: ["reg.example/pinned/**"]
    keys:
      - hashivault://release?version=1
"""


def test_a_kms_key_that_stands_for_both_versions_is_neither_added_nor_removed() -> None:
    # hashivault://release stands for every live version: OLD's (1) and NEW's (2).
    def trusts_old(ref: str) -> bool:
        return ref in ("hashivault://release", "hashivault://release?version=1")

    def trusts_new(ref: str) -> bool:
        return ref == "hashivault://release"

    both, added = add_key_to_rules(
        VERSIONED, trusts_old, "hashivault://release", trusts_new=trusts_new
    )
    assert added == ["pinned"]
    assert keys_of(both)["release"] == ("hashivault://release",)
    assert keys_of(both)["pinned"] == ("hashivault://release?version=1", "hashivault://release")
    retired, removed = remove_key_from_rules(
        both, trusts_old, "hashivault://release", trusts_new=trusts_new
    )
    assert removed == ["pinned"]
    assert keys_of(retired) == {
        "release": ("hashivault://release",), "pinned": ("hashivault://release",)
    }


def test_new_named_by_a_version_is_not_added_where_the_whole_key_is_trusted() -> None:
    # NEW given as ?version=2 while the policy names the key: nothing to add, nothing to remove.
    def trusts_old(ref: str) -> bool:
        return ref in ("hashivault://release", "hashivault://release?version=1")

    def trusts_new(ref: str) -> bool:
        return ref in ("hashivault://release", "hashivault://release?version=2")

    text = VERSIONED.split("  - name: pinned")[0]
    new_ref = "hashivault://release?version=2"
    assert add_key_to_rules(text, trusts_old, new_ref, trusts_new=trusts_new) == (text, [])
    assert remove_key_from_rules(text, trusts_old, new_ref, trusts_new=trusts_new) == (text, [])


def test_unfinished_items_are_old_signatures_without_new_beside_them() -> None:
    d1, d2, d3 = (f"sha256:{c * 64}" for c in "123")
    entries = [
        entry("a", d1, SignatureEntry("OLD", {"env": "prod"}), SignatureEntry("NEW")),
        entry("a", d2, SignatureEntry("OLD"), SignatureEntry("NEW")),
        entry("b", d3, SignatureEntry("THIRD")),
    ]
    assert unfinished_items(entries, "OLD", "NEW") == [
        WorkItem("reg.example/a", d1, (("env", "prod"),))
    ]
    assert unfinished_items(entries[1:], "OLD", "NEW") == []


def test_an_item_is_unfinished_until_new_signed_in_each_of_olds_formats() -> None:
    d1 = "sha256:" + "1" * 64
    old_both = (SignatureEntry("OLD"), SignatureEntry("OLD", format=BUNDLE))
    assert unfinished_items([entry("a", d1, *old_both, SignatureEntry("NEW"))], "OLD", "NEW") == [
        WorkItem("reg.example/a", d1, (), ("classic", "bundle"))
    ]
    assert unfinished_items(
        [entry("a", d1, *old_both, SignatureEntry("NEW", format=BUNDLE), SignatureEntry("NEW"))],
        "OLD", "NEW",
    ) == []
    # NEW in the other format only does not count.
    assert unfinished_items(
        [entry("a", d1, SignatureEntry("OLD", format=BUNDLE), SignatureEntry("NEW"))],
        "OLD", "NEW",
    ) == [WorkItem("reg.example/a", d1, (), ("bundle",))]


@pytest.mark.parametrize(
    ("header", "phases"),
    [
        ({}, ("plan", "trust", "resign", "retire", "clean")),
        ({"shard": "0/1"}, ("plan", "trust", "resign", "retire", "clean")),
        ({"shard": "2/3"}, ("plan", "trust", "resign", "shards", "retire", "clean")),
        ({"disable_old_key": True}, ("plan", "trust", "resign", "retire", "clean", "retire-key")),
    ],
)
def test_the_phases_a_rotation_has(header: dict[str, object], phases: tuple[str, ...]) -> None:
    state = replay([{"type": "start", **header}])
    assert state.phases() == phases
    finished = replay([
        {"type": "start", **header}, *({"type": "end", "phase": p} for p in phases[1:]),
        {"type": "plan", "items": []},
    ])
    assert finished.finished
    assert not replay([{"type": "start", **header}, {"type": "plan", "items": []}]).finished


def test_replay_records_the_new_key_and_its_creation() -> None:
    state = replay([
        {"type": "start"},
        {"type": "begin", "phase": "create-key"},
    ])
    assert state.new_key_creation_begun
    assert state.new_key is None
    state = replay([
        {"type": "start"},
        {"type": "begin", "phase": "create-key"},
        {"type": "new-key", "key_id": "K", "created": True},
        {"type": "end", "phase": "retire-key", "disabled": "hashivault://k?version=1"},
    ])
    assert state.new_key == {"type": "new-key", "key_id": "K", "created": True}
    assert state.disabled == "hashivault://k?version=1"
