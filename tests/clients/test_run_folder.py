"""A run folder that already holds a run is set aside, never mixed with the next run."""

from __future__ import annotations

from pathlib import Path

from tetherfed.launch._launch import set_aside


def test_a_missing_or_empty_folder_is_used_as_it_is(tmp_path: Path) -> None:
    assert set_aside(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert set_aside(tmp_path / "empty") is None
    assert (tmp_path / "empty").is_dir()


def test_an_earlier_run_moves_to_the_first_free_numbered_sibling(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    (tmp_path / "demo.1").mkdir()  # taken by a run set aside before
    (out / "worker-0").mkdir(parents=True)
    (out / "worker-0" / "metrics.jsonl").write_text('{"event": "done"}\n')

    moved = set_aside(out)

    assert moved == tmp_path / "demo.2"
    assert not out.exists()
    assert (moved / "worker-0" / "metrics.jsonl").read_text() == '{"event": "done"}\n'
