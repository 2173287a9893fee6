"""A VM-lab wait that times out says what the guests looked like (no guests needed: the channel is down)."""

from __future__ import annotations

import pytest

from hastore.lab.vm.lab import VmLab, VmLabError, wait_until


def test_a_timed_out_wait_carries_the_explanation():
    with pytest.raises(VmLabError, match=r"(?s)timed out after 0.05 s waiting for x\nwhat the guests said"):
        wait_until("x", lambda: False, 0.05, step=0.01, explain=lambda: "what the guests said")


def test_explain_reports_a_dead_command_channel_and_the_console_tail(tmp_path):
    lab = VmLab(tmp_path)
    (tmp_path / "alpha.console.log").write_text("".join(f"line {i}\n" for i in range(40)))
    text = lab.explain("alpha", "bravo")
    assert "--- alpha: hastore status\nthe command channel failed:" in text
    assert "line 39" in text and "line 24" not in text, "the last 15 lines"
    assert "--- bravo: console tail\n(" in text  # no console log: says why
