"""A signal that arrives while a checkpoint is written is delivered after the write, once: a
handler raising inside torch.save made the interruption look like a failed write."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tetherfed.worker._checkpoint import load, save, signals_deferred


@pytest.fixture
def seen() -> Iterator[list[int]]:
    """SIGUSR1 recorded by a handler of the test's own (the previous one restored after)."""
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: got.append(signum))
    yield got
    signal.signal(signal.SIGUSR1, previous)


def test_a_signal_inside_the_block_is_delivered_after_it_once(seen: list[int]) -> None:
    with signals_deferred():
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR1)
        assert seen == [], "delivered inside the block"
    assert seen == [signal.SIGUSR1]
    signal.raise_signal(signal.SIGUSR1)  # the test's handler is back
    assert seen == [signal.SIGUSR1] * 2


def test_a_checkpoint_interrupted_by_a_raising_handler_is_written_whole(tmp_path: Path) -> None:
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)
    path = tmp_path / "latest.pt"
    state = {k: {"x": torch.arange(4)} for k in ("model", "optimizer", "scheduler")}
    state |= {"config": {}, "step": 3, "federation": None}
    try:
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            signal.raise_signal(signal.SIGUSR1)  # arrives "during" the write below
            save(path, state)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert load(path, torch.device("cpu"))["step"] == 3
    assert not (tmp_path / "latest.pt.tmp").exists()
