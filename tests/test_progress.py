"""Progress bars of long operations: drawn on a terminal, nothing written otherwise."""

import io
import os
import sys

import pytest

from sglang_dsv4.progress import on_terminal, track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_track_draws_on_a_terminal_and_is_silent_elsewhere():
    tty, pipe = Terminal(), io.StringIO()
    assert list(track(range(3), "counting", "step", stream=tty)) == [0, 1, 2]
    assert list(track(iter("ab"), "letters", stream=pipe)) == ["a", "b"]
    assert "counting" in tty.getvalue() and "3/3" in tty.getvalue()
    assert pipe.getvalue() == ""
    closed = open(os.devnull)  # noqa: SIM115 - closed right away
    closed.close()  # its isatty() raises ValueError
    assert on_terminal(Terminal()) and not on_terminal(pipe) and not on_terminal(closed)


@pytest.mark.parametrize("terminal", [True, False])
def test_weight_stream_and_released_writer_report_on_a_terminal_only(
    tiny_cfg, tiny_weights, tmp_path, monkeypatch, terminal
):
    from sglang_dsv4.weights.loader import WeightStream
    from sglang_dsv4.weights.writer import write_released

    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    got = []
    stats = WeightStream(tiny_cfg, lambda name, w: got.append(name)).run(tiny_weights.items())
    write_released(sorted(tiny_weights.items()), {"vocab_size": 1024}, tmp_path / "released")
    shown = err.getvalue()
    if terminal:
        assert "DSV4 weights: 100%" in shown and f"{stats.delivered}/{stats.delivered}" in shown
        assert "writing released" in shown and f"{len(tiny_weights)}/{len(tiny_weights)}" in shown
    else:
        assert shown == ""
    assert len(got) == stats.delivered == len(tiny_weights)
