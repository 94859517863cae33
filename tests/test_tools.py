"""The after-the-fact tools' command lines (cli/tools.py): a Ctrl-C is one line and exit 130, never a traceback, and
leaves the runs as they were; a stop during their imports is not lost."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
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
    time.sleep(0.5)  # in its imports (torch, matplotlib: 1-1.4 s here), inside its stop handling (within 0.05 s)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip().splitlines() == [f"{tool}: error: interrupted (Ctrl-C): {line}"]
    assert checksums(run_dir) == before


# Loaded by the tool's Python at start-up (PYTHONPATH): the tool sends itself STOP_SIGNAL when its imports reach numpy,
# which torch imports from C++, clearing whatever that raised: a KeyboardInterrupt there was lost and the tool went on.
STOP_IN_NUMPY_IMPORT = textwrap.dedent("""
    import importlib.abc
    import os
    import signal
    import sys


    class StopThere(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "numpy":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), getattr(signal, os.environ["STOP_SIGNAL"]))
            return None


    sys.meta_path.insert(0, StopThere())
""")


@pytest.mark.parametrize(("tool", "args", "stop_signal", "line"), [
    ("sam-measure", ["run", "--measures", "average"], "SIGINT",
     "interrupted (Ctrl-C): nothing was added to the run's summary.json"),
    ("sam-landscape", ["run", "--out", "pictures"], "SIGTERM",
     "preempted (SIGTERM): the runs are as they were; the pictures are not finished"),
    ("sam-report", ["run", "--out", "report"], "SIGINT",
     "interrupted (Ctrl-C): the runs are as they were; the report is not finished")])
def test_a_stop_while_a_tool_imports_is_one_line_and_the_tool_does_nothing(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, tool: str, args: list[str], stop_signal: str,
        line: str) -> None:
    run_dir = run_in_process(workdir, monkeypatch, *TINY, "sharpness.measures=[]")
    before = checksums(run_dir)
    (workdir / "hook").mkdir()
    (workdir / "hook" / "sitecustomize.py").write_text(STOP_IN_NUMPY_IMPORT)
    env = {**os.environ, "PYTHONPATH": str(workdir / "hook"), "STOP_SIGNAL": stop_signal}
    result = subprocess.run([str(BIN / tool), *args], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=120)
    code = 130 if stop_signal == "SIGINT" else 75
    assert (result.returncode, result.stderr.strip().splitlines()) == (code, [f"{tool}: error: {line}"])
    assert checksums(run_dir) == before
    assert sorted(path.name for path in workdir.iterdir()) == ["data", "hook", "run"], "the tool wrote nothing"


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
