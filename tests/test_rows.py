"""The manifest row is declared once (``pipeline.rows``): the runner's rows, the Parquet table and the README follow."""

from pathlib import Path

import pyarrow as pa

from pipeline.chunks import ChunkResult
from pipeline.manifests import MANIFEST_SCHEMA, result_table
from pipeline.outcomes import Failure
from pipeline.rows import MANIFEST_COLUMNS, ROW_FIELDS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _readme_table() -> str:
    lines = ["| column | type | null | meaning |", "|---|---|---|---|"]
    for column in MANIFEST_COLUMNS:
        null = "yes" if column.nullable else "no"
        lines.append(f"| `{column.name}` | {column.type} | {null} | {column.description} |")
    return "\n".join(lines)


def test_the_readme_lists_the_manifest_columns_as_declared():
    expected = _readme_table()
    assert expected in README, (
        f"README.md's manifest columns differ from pipeline/rows.py; put this table there:\n{expected}"
    )


def _two_rows() -> ChunkResult:
    result = ChunkResult("b", 2, "run-1", 7)
    result.add_ok("a", started=10.0, finished=10.25, tries=1, payload='{"x": 1}', tokens=42.0)
    failure = Failure("http_429", True, "throttled", 429)
    result.add_failure("b", started=11.0, finished=11.5, tries=3, failure=failure, retry_after=2.0)
    return result


def test_the_runner_puts_each_value_under_its_name():
    columns = _two_rows().columns()
    assert tuple(columns) == ROW_FIELDS
    assert columns == {
        "item_id": ["a", "b"],
        "ok": [True, False],
        "retryable": [False, True],
        "status": ["ok", "http_429"],
        "http_status": [None, 429],
        "error": [None, "throttled"],
        "tries": [1, 3],
        "started_at": [10.0, 11.0],
        "finished_at": [10.25, 11.5],
        "tokens": [42.0, None],
        "retry_after_s": [None, 2.0],
        "payload": ['{"x": 1}', None],
    }


def test_the_written_table_has_every_declared_column_and_no_null_where_none_is_allowed():
    table = result_table(_two_rows())
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.column_names == [column.name for column in MANIFEST_COLUMNS]
    for column in MANIFEST_COLUMNS:
        assert column.nullable or table[column.name].null_count == 0, f"{column.name} is declared never null"
    assert table["chunk_id"].to_pylist() == [7, 7] and table["attempt"].type == pa.int32()
    assert table["latency_ms"].to_pylist() == [250.0, 500.0]


def test_an_empty_chunk_writes_an_empty_table_in_the_schema():
    assert result_table(ChunkResult("b", 0, "r", 0)).schema.equals(MANIFEST_SCHEMA)
