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


@pytest.mark.parametrize("summary", ['{"status": "compl', None])
def test_sam_measure_refuses_a_torn_or_missing_summary_instead_of_replacing_it(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, summary: str | None) -> None:
    """The measurement is added to summary.json; written alone in its place, it would lose the run's results."""
    from sam_runner.report.remeasure import measure_checkpoint
    from sam_runner.run.rundir import UnreadableRecord

    run_dir = run_in_process(workdir, monkeypatch, *TINY, "sharpness.measures=[]")
    if summary is None:
        (run_dir / "summary.json").unlink()
    else:
        (run_dir / "summary.json").write_text(summary)
    before = checksums(run_dir)
    fix = r"re-run the run's own command \(it rewrites summary.json from its checkpoint\), then measure"
    with pytest.raises(UnreadableRecord, match=r"summary.json (is missing|cannot be read: .*): " + fix):
        measure_checkpoint(run_dir, measures="ascent")
    assert checksums(run_dir) == before
