from __future__ import annotations

from pathlib import Path

import pytest

from signgate.errors import UsageError
from signgate.rotation.journal import Journal


def test_records_survive_reopening_and_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "rotation.journal"
    with Journal(path) as journal:
        assert journal.records == []
        journal.append({"type": "start", "old": "o"})
        journal.append({"type": "end", "phase": "trust"})
    with path.open("ab") as file:
        file.write(b'{"type":"item","pha')  # a crash in the middle of a write
    with Journal(path) as journal:
        assert [r["type"] for r in journal.records] == ["start", "end"]
        journal.append({"type": "end", "phase": "resign"})
    with Journal(path) as journal:
        assert [r.get("phase") for r in journal.records] == [None, "trust", "resign"]
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_second_rotation_on_the_same_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rotation.journal"
    with Journal(path), pytest.raises(UsageError, match="another rotation"):
        Journal(path).__enter__()
    with Journal(path) as journal:  # released once the first run ends
        journal.append({"type": "start"})


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules: []\n")
    with pytest.raises(UsageError, match="not a rotation journal"):
        Journal(path).__enter__()
