"""Item sources, normalisation and the deterministic chunk plan."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.items import FileColumn, ItemsError, JsonlPrompts, KeyRanges, TextLines, Values, normalize
from pipeline.limits import Pacing
from pipeline.plan import chunk_count, iter_chunks, make_plan


def test_text_lines_are_stripped_deduplicated_and_keep_first_order(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("b\n  a  \n\n   \nb\nc\na\n")
    items, report = normalize(TextLines(str(path)).read())
    assert items["item_id"].to_pylist() == ["b", "a", "c"]
    assert (report.read, report.blanks_dropped, report.duplicates_dropped, report.kept) == (7, 2, 2, 3)


def test_undecodable_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_bytes(b"ok-1\nok-2\nbad-\xff\xfe\nok-4\n")
    with pytest.raises(ItemsError, match=r"ids.txt:3: not valid UTF-8"):
        TextLines(str(path)).read()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ItemsError, match="does not exist"):
        TextLines(str(tmp_path / "nope.txt")).read()


def test_parquet_and_csv_columns(tmp_path):
    pq.write_table(pa.table({"user_id": [3, 1, 2]}), tmp_path / "u.parquet")
    (tmp_path / "u.csv").write_text("user_id,name\n007,x\n8,y\n")
    assert FileColumn(str(tmp_path / "u.parquet"), "user_id").read()["item_id"].to_pylist() == ["3", "1", "2"]
    assert FileColumn(str(tmp_path / "u.csv"), "user_id").read()["item_id"].to_pylist() == ["007", "8"]
    with pytest.raises(ItemsError, match="no column 'id'. Its columns are: user_id, name"):
        FileColumn(str(tmp_path / "u.csv"), "id").read()


def test_key_ranges_cover_the_span_exactly():
    table = KeyRanges(0, 25, 10).read()
    assert table["item_id"].to_pylist() == ["0-10", "10-20", "20-25"]
    assert json.loads(table["payload"][2].as_py()) == {"lo": 20, "hi": 25}
    with pytest.raises(ItemsError, match="step must be positive"):
        KeyRanges(0, 10, 0)


def test_jsonl_prompts_keep_the_record_and_name_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "p1", "prompt": "hi"}\n\n{"id": "p2", "prompt": "yo"}\n')
    table = JsonlPrompts(str(path)).read()
    assert table["item_id"].to_pylist() == ["p1", "p2"]
    assert json.loads(table["payload"][1].as_py())["prompt"] == "yo"
    path.write_text('{"id": "p1"}\n{"prompt": "no id"}\n')
    with pytest.raises(ItemsError, match=r"p.jsonl:2: record has no 'id' field"):
        JsonlPrompts(str(path)).read()
    path.write_text('{"id": "p1"}\n{broken\n')
    with pytest.raises(ItemsError, match=r"p.jsonl:2: not valid JSON"):
        JsonlPrompts(str(path)).read()


def test_plan_is_deterministic_and_chunks_are_contiguous():
    items, _ = normalize(Values.of(range(10)).read())
    first, second = make_plan(items, 4), make_plan(items, 4)
    assert first.equals(second)
    assert first["chunk_id"].to_pylist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert chunk_count(first) == 3
    chunks = list(iter_chunks(first, backfill="b", attempt=0, run_id="r", pacing=Pacing(), skip={1}))
    assert [c.chunk_id for c in chunks] == [0, 2]
    assert chunks[1].item_ids == ["8", "9"]


def test_planning_a_million_ids_stays_columnar(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(str(i) for i in range(1_000_000)) + "\n")
    items, report = normalize(TextLines(str(path)).read())
    plan = make_plan(items, 1000)
    assert report.kept == 1_000_000 and chunk_count(plan) == 1000
    assert plan["item_id"][999_999].as_py() == "999999"


def test_grouped_chunk_ids_are_contiguous_and_capped_per_group():
    items = pa.table(
        {
            "item_id": [f"a{i}" for i in range(6)] + ["b0", "b1"],
            "payload": pa.nulls(8, pa.string()),
            "group": ["a"] * 6 + ["b"] * 2,
        }
    )
    plan = make_plan(items, chunk_size=1, max_chunks_per_group=4)
    ids = plan["chunk_id"].to_pylist()
    assert sorted(set(ids)) == list(range(chunk_count(plan)))  # no gaps: the count is the real count
    assert len(set(ids[:6])) <= 4 and len(set(ids[6:])) == 2
