"""Ctrl-C always stops a command: even when something below swallows the first cancellation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rollout_plugin.cli.aio import Interrupted, run

SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from rollout_plugin.cli.aio import Interrupted, run

    async def stubborn():
        for _ in range(2):  # swallows the first cancellation, as a library might at the wrong moment
            try:
                print("ready", flush=True)
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                print("swallowed", flush=True)
        return "finished"

    try:
        print(run(stubborn()), flush=True)
    except Interrupted as exc:
        print("interrupted", exc.code, flush=True)
        sys.exit(exc.code)
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_a_job_that_swallows_the_first_cancellation(sig, code):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, sig)
        out = proc.communicate(timeout=30)[0]  # asyncio.run alone: 60 s more, then exit 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, out
    assert "swallowed" in out and f"interrupted {code}" in out and "finished" not in out


def test_without_a_signal_the_result_comes_back():
    async def answer():
        return 42

    assert run(answer()) == 42


def test_interrupted_is_a_keyboard_interrupt_with_the_exit_code():
    exc = Interrupted(signal.SIGINT)
    assert isinstance(exc, KeyboardInterrupt) and exc.code == 130
