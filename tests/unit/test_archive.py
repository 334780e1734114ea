"""The JSONL rollout archive: newest-first paging, filters, cursors, torn lines, big files."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.common.messages import FinishReason, Score, ScoredGroup, Variant
from services.rollout import archive as archive_module
from services.rollout.archive import ArchiveMoved, RolloutArchive, RolloutRecord
from tests.factories import group


def record(n: int, problem_id: str = "p1", variant: Variant = Variant.UNHINTED, version: int = 0) -> RolloutRecord:
    return RolloutRecord(
        group_id=f"g{n}",
        sample_index=0,
        problem_id=problem_id,
        variant=variant,
        prompt="What is 2+2?",
        text=f"completion {n}",
        reward=float(n % 2),
        extracted="4",
        timed_out=False,
        error=None,
        finish_reason=FinishReason.STOP,
        weight_version=version,
        step=n,
        completion_tokens=3,
        scored_at=datetime(2025, 1, 1, tzinfo=UTC),
    )


def all_pages(archive: RolloutArchive, limit: int, **filters: object) -> list[list[RolloutRecord]]:
    pages: list[list[RolloutRecord]] = []
    cursor: str | None = None
    while True:
        page, cursor = archive.page(limit, cursor, **filters)  # type: ignore[arg-type]
        pages.append(page)
        if cursor is None:
            return pages


def test_from_group_flattens_every_sample() -> None:
    raw = group("g1", "p9", Variant.HINTED, size=3, version=2, step=5)
    scored = ScoredGroup.from_raw(raw, [Score(reward=1.0, extracted="4"), Score(reward=0.0), Score(reward=0.0)])
    records = RolloutRecord.from_group(scored)
    assert [r.sample_index for r in records] == [0, 1, 2]
    first = records[0]
    assert (first.group_id, first.problem_id, first.variant, first.step) == ("g1", "p9", Variant.HINTED, 5)
    assert (first.reward, first.extracted, first.weight_version, first.completion_tokens) == (1.0, "4", 2, 3)
    assert first.scored_at == scored.scored_at


def test_append_then_page_newest_first(tmp_path: Path) -> None:
    archive = RolloutArchive(tmp_path / "deep" / "dir" / "rollouts.jsonl")
    assert archive.page(10, None) == ([], None)  # no file yet
    archive.append([record(0), record(1)])
    archive.append([record(2)])
    page, cursor = archive.page(10, None)
    assert [r.step for r in page] == [2, 1, 0]
    assert cursor is None
    assert page[0] == record(2)  # round-trips exactly


def test_filters_combine(tmp_path: Path) -> None:
    archive = RolloutArchive(tmp_path / "a.jsonl")
    archive.append(
        [
            record(0, "p1", Variant.HINTED, 0),
            record(1, "p2", Variant.HINTED, 0),
            record(2, "p1", Variant.UNHINTED, 1),
            record(3, "p1", Variant.HINTED, 1),
        ]
    )
    assert [r.step for r in archive.page(10, None, problem_id="p1")[0]] == [3, 2, 0]
    assert [r.step for r in archive.page(10, None, variant=Variant.HINTED)[0]] == [3, 1, 0]
    assert [r.step for r in archive.page(10, None, weight_version=1)[0]] == [3, 2]
    assert [r.step for r in archive.page(10, None, problem_id="p1", variant=Variant.HINTED, weight_version=0)[0]] == [0]
    assert archive.page(10, None, problem_id="nope") == ([], None)


def test_cursor_paging_visits_every_record_once(tmp_path: Path) -> None:
    archive = RolloutArchive(tmp_path / "a.jsonl")
    archive.append([record(n) for n in range(23)])
    pages = all_pages(archive, 5)
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert [r.step for p in pages for r in p] == list(range(22, -1, -1))
    # An exact multiple of the limit ends with a None cursor, not an empty extra page.
    pages = all_pages(archive, 23)
    assert [len(p) for p in pages] == [23]


def test_filtered_paging_returns_no_cursor_after_the_last_match(tmp_path: Path) -> None:
    archive = RolloutArchive(tmp_path / "a.jsonl")
    archive.append([record(n, variant=Variant.HINTED if n % 3 == 0 else Variant.UNHINTED) for n in range(30)])
    pages = all_pages(archive, 4, variant=Variant.HINTED)
    assert [r.step for p in pages for r in p] == list(range(27, -1, -3))
    assert all(p for p in pages)  # never an empty last page


def test_records_appended_after_a_page_do_not_shift_older_pages(tmp_path: Path) -> None:
    archive = RolloutArchive(tmp_path / "a.jsonl")
    archive.append([record(n) for n in range(6)])
    first, cursor = archive.page(3, None)
    archive.append([record(100)])
    second, _ = archive.page(3, cursor)
    assert [r.step for r in first + second] == [5, 4, 3, 2, 1, 0]


@pytest.mark.parametrize(
    "cursor",
    [
        "not base64 !!",
        base64.urlsafe_b64encode(b"hello").decode(),
        base64.urlsafe_b64encode(b"v1:-5").decode(),
        base64.urlsafe_b64encode(b"v1:007").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        "",
    ],
)
def test_malformed_cursor_is_a_value_error(tmp_path: Path, cursor: str) -> None:
    archive = RolloutArchive(tmp_path / "a.jsonl")
    archive.append([record(0)])
    with pytest.raises(ValueError, match="malformed cursor"):
        archive.page(10, cursor)


def test_cursor_off_a_record_boundary_or_past_the_end_is_a_value_error(tmp_path: Path) -> None:
    archive = RolloutArchive(tmp_path / "a.jsonl")
    archive.append([record(0), record(1)])
    with pytest.raises(ValueError, match="record boundary"):
        archive.page(10, archive_module.encode_cursor(3))
    with pytest.raises(ValueError, match="past the end"):
        archive.page(10, archive_module.encode_cursor(10**9))


def test_torn_last_line_is_skipped_and_cut_off_by_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    archive = RolloutArchive(path)
    archive.append([record(0), record(1)])
    whole = record(2).model_dump_json().encode()
    with open(path, "ab") as f:
        f.write(whole[: len(whole) // 2])  # a crash mid-write
    assert [r.step for r in archive.page(10, None)[0]] == [1, 0]
    archive.append([record(3)])
    assert [r.step for r in archive.page(10, None)[0]] == [3, 1, 0]
    assert path.read_bytes().count(b"\n") == 3  # the half record is gone, not glued on


def test_end_is_where_the_next_append_lands_and_append_at_checks_it(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    archive = RolloutArchive(path)
    assert archive.end() == 0  # no file yet
    archive.append([record(0)])
    end = archive.end()
    assert end == path.stat().st_size
    with open(path, "ab") as f:
        f.write(b'{"group_id": "torn')  # a crash mid-write: not part of the end
    assert archive.end() == end
    with pytest.raises(ArchiveMoved, match=f"expected to append at byte {end + 1}"):
        archive.append([record(1)], at=end + 1)
    assert path.stat().st_size == end + len(b'{"group_id": "torn')  # nothing written, nothing cut
    archive.append([record(1)], at=end)  # lands where end() said, the torn bytes cut
    assert [r.step for r in archive.page(10, None)[0]] == [1, 0]


def test_samples_at_reads_one_groups_run_of_lines_at_each_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.jsonl"
    archive = RolloutArchive(path)
    g = ScoredGroup.from_raw(group("g1", size=3), [Score(reward=1.0), Score(reward=0.0), Score(reward=0.0)])
    first, rest = RolloutRecord.from_group(g)[:2], RolloutRecord.from_group(g)[2:]
    archive.append([record(7)])
    at_first = archive.end()
    archive.append(first)
    archive.append([record(8)])  # another group's line ends the run
    at_rest = archive.end()
    archive.append(rest)
    at_end = archive.end()
    assert archive.samples_at([at_first], "g1") == {0, 1}
    assert archive.samples_at([at_first, at_rest], "g1") == {0, 1, 2}
    assert archive.samples_at([0], "g1") == set()  # another group's line first
    assert archive.samples_at([at_end, at_end + 100], "g1") == set()  # nothing there (yet)
    assert archive.samples_at([at_first + 1], "g1") == set()  # not a line start
    assert RolloutArchive(tmp_path / "missing.jsonl").samples_at([0], "g1") == set()
    monkeypatch.setattr(archive_module, "BLOCK_SIZE", 7)  # lines spanning many blocks
    assert archive.samples_at([at_first, at_rest], "g1") == {0, 1, 2}
    with open(path, "ab") as f:
        f.write(RolloutRecord.from_group(g)[0].model_dump_json().encode()[:-3])  # a torn line: not a sample
    assert archive.samples_at([at_end], "g1") == set()


def test_malformed_and_blank_lines_inside_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(
        record(0).model_dump_json().encode() + b"\n\n{not json}\n" + record(1).model_dump_json().encode() + b"\n"
    )
    assert [r.step for r in RolloutArchive(path).page(10, None)[0]] == [1, 0]


def test_a_file_much_larger_than_the_block_pages_correctly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = RolloutArchive(tmp_path / "a.jsonl")
    n = 3000
    archive.append([record(i, problem_id=f"p{i % 7}", version=i % 5) for i in range(n)])
    assert (tmp_path / "a.jsonl").stat().st_size > 10 * archive_module.BLOCK_SIZE
    pages = all_pages(archive, 97)
    assert [r.step for p in pages for r in p] == list(range(n - 1, -1, -1))
    filtered = [r.step for p in all_pages(archive, 50, problem_id="p3", weight_version=4) for r in p]
    assert filtered == [i for i in range(n - 1, -1, -1) if i % 7 == 3 and i % 5 == 4]
    # A block smaller than one line: every line spans several blocks.
    monkeypatch.setattr(archive_module, "BLOCK_SIZE", 7)
    pages = all_pages(archive, 500)
    assert [r.step for p in pages for r in p] == list(range(n - 1, -1, -1))


def test_limit_below_one_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="limit"):
        RolloutArchive(tmp_path / "a.jsonl").page(0, None)
