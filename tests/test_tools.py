"""The after-the-fact tools' command lines (cli/tools.py): a Ctrl-C is one line and exit 130, never a traceback, and
leaves the runs as they were."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, TINY, run_in_process
from test_rundir import checksums


@pytest.mark.parametrize(("tool", "args", "line"), [
    ("sam-report", ["run", "--out", "report"], "the runs are as they were; the report is not finished"),
    ("sam-landscape", ["run", "--points", "401", "--out", "pictures"],
     "the runs are as they were; the pictures are not finished")])
def test_ctrl_c_in_a_tool_is_one_line_and_exit_130(workdir: Path, monkeypatch: pytest.MonkeyPatch, tool: str,
                                                   args: list[str], line: str) -> None:
    run_dir = run_in_process(workdir, monkeypatch, *TINY, "sharpness.measures=[]")
    before = checksums(run_dir)
    process = subprocess.Popen([str(BIN / tool), *args], cwd=workdir, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # in its imports (seconds: torch, matplotlib) or its work
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip().splitlines() == [f"{tool}: error: interrupted (Ctrl-C): {line}"]
    assert checksums(run_dir) == before
