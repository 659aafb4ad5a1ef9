"""The MICE release-format loader: the real format loads unchanged; bad lines fail with file, line and field."""

import json
from pathlib import Path

import pytest

from editr2.bench.mice import (
    ALL_TASK_TYPES,
    TASK_TYPES,
    MiceFormatError,
    MiceSession,
    iter_session_lines,
    load_sessions,
    read_results,
    write_sessions,
)
from editr2.bench.resume import append_result

FIXTURE = Path(__file__).parent / "fixtures" / "mice_cm_sample.jsonl"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mice" / "cm_train.jsonl"


def fixture_records() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


def write_lines(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records), encoding="utf-8")
    return path


def test_fixture_loads_unchanged():
    raw = FIXTURE.read_bytes()
    assert not raw.endswith(b"\n"), "the fixture keeps the release's missing final newline"
    sessions = load_sessions(FIXTURE)
    records = fixture_records()
    assert len(sessions) == len(records) == 49
    for session, record in zip(sessions, records):
        assert session.to_dict() == record  # nothing lost, nothing added, release field order
        assert list(session.to_dict()) == list(record)
        assert session.num_turns == record["turns"] == 3
        assert set(session.task_type) <= set(TASK_TYPES)
    assert sessions[0].line == 1 and sessions[-1].line == 49
    assert sessions[0].session_id == "00001_056257b296835f65"
    assert len({s.session_id for s in sessions}) == len(sessions)
    assert sessions[0].unchanged_objects[0] == ("plastic silver robot figurine",)


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/mice/cm_train.jsonl is not present on this machine")
def test_full_release_file_loads():
    sessions = load_sessions(SHARED)
    assert len(sessions) == 1850
    assert all(s.num_turns == 3 for s in sessions)
    counts = {t: 0 for t in TASK_TYPES}
    for s in sessions:
        for t in s.task_type:
            counts[t] += 1
    assert counts["subject_add"] == 861 and counts["material_alter"] == 282  # the counts documented for the release


def test_limit_and_roundtrip_write(tmp_path):
    sessions = load_sessions(FIXTURE, limit=5)
    assert len(sessions) == 5
    extra = MiceSession.from_dict({**sessions[0].to_dict(), "scenes": [[1, 2]], "family": "cm"})
    out = write_sessions(tmp_path / "sub" / "out.jsonl", sessions + [extra])
    again = load_sessions(out)
    assert again[:5] == sessions
    assert again[5].extra == {"scenes": [[1, 2]], "family": "cm"}
    assert again[5].to_dict()["family"] == "cm"
    assert not list(out.parent.glob(".*.tmp")), "atomic write leaves no temporary file"


def test_optional_object_fields_default_per_turn():
    record = fixture_records()[0]
    del record["available_objects"], record["all_objects"], record["turns"]
    session = MiceSession.from_dict(record)
    assert session.all_objects == ((), (), ())
    assert session.to_dict()["turns"] == 3


def test_size_change_is_shapes_only():
    record = fixture_records()[0]
    record["task_type"][1] = "size_change"
    assert MiceSession.from_dict(record).task_type[1] == "size_change"
    assert "size_change" in ALL_TASK_TYPES
    with pytest.raises(MiceFormatError, match="unknown task type 'size_change' at turn 2"):
        MiceSession.from_dict(record, task_types=TASK_TYPES)


@pytest.mark.parametrize(
    "mutate, field, message",
    [
        (lambda r: r.pop("instruction"), None, "missing required field"),
        (lambda r: r.pop("bg_consistency"), None, "missing required field"),
        (lambda r: r["task_type"].pop(), "task_type", "has 2 entries but 'instruction' has 3"),
        (lambda r: r["unchanged_objects"].append([]), "unchanged_objects", "has 4 entries"),
        (lambda r: r["all_objects"].pop(), "all_objects", "has 2 entries"),
        (lambda r: r["task_type"].__setitem__(0, "make_it_pretty"), "task_type", "unknown task type 'make_it_pretty'"),
        (lambda r: r.__setitem__("turns", 4), "turns", "is 4 but the per-turn lists have 3"),
        (lambda r: r["bg_consistency"].__setitem__(0, "yes"), "bg_consistency", "true/false"),
        (lambda r: r["unchanged_objects"].__setitem__(0, "dog"), "unchanged_objects", "lists of object names"),
        (lambda r: r.__setitem__("instruction", "one string"), "instruction", "list of strings"),
        (lambda r: r.__setitem__("image", ""), "image", "non-empty string"),
    ],
)
def test_bad_sessions_name_file_line_and_field(tmp_path, mutate, field, message):
    records = fixture_records()[:3]
    mutate(records[1])
    path = write_lines(tmp_path / "bad.jsonl", records)
    with pytest.raises(MiceFormatError, match=message) as info:
        load_sessions(path)
    err = info.value
    assert err.source == str(path) and err.line == 2 and err.field == field
    assert f"{path}:2:" in str(err)


def test_bad_json_and_non_object_lines(tmp_path):
    records = fixture_records()[:2]
    path = write_lines(tmp_path / "bad.jsonl", [records[0], '{"image": "a.jpg", "instruction": [', records[1]])
    with pytest.raises(MiceFormatError, match=r"bad\.jsonl:2: is not valid JSON"):
        load_sessions(path)
    path = write_lines(tmp_path / "list.jsonl", ["[1, 2, 3]"])
    with pytest.raises(MiceFormatError, match="expected a JSON object per line, got list"):
        load_sessions(path)


def test_iter_session_lines_carries_on_after_bad_lines(tmp_path):
    records = fixture_records()[:3]
    bad = dict(records[1], task_type=records[1]["task_type"][:2])
    path = write_lines(tmp_path / "mixed.jsonl", [records[0], "not json", bad, "", records[2]])
    items = list(iter_session_lines(path))
    assert [line for line, _ in items] == [1, 2, 3, 5]  # blank line 4 skipped
    kinds = [type(item).__name__ for _, item in items]
    assert kinds == ["MiceSession", "MiceFormatError", "MiceFormatError", "MiceSession"]


def test_results_append_and_repair_of_a_cut_line(tmp_path):
    path = tmp_path / "results.jsonl"
    assert read_results(path) == []
    append_result(path, {"session_id": "a", "x": 1})
    append_result(path, {"session_id": "b", "x": 2})
    with open(path, "a") as handle:
        handle.write('{"session_id": "c", "x"')  # a run killed mid-write
    assert [r["session_id"] for r in read_results(path)] == ["a", "b"]
    assert path.read_text().endswith("}\n")  # the cut line was dropped from the file
    append_result(path, {"session_id": "c", "x": 3})
    assert [r["session_id"] for r in read_results(path)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="session_id"):
        append_result(path, {"x": 1})
    path.write_text('{"session_id": "a"}\nnot json\n{"session_id": "b"}\n')
    with pytest.raises(MiceFormatError, match="results.jsonl:2"):
        read_results(path)
