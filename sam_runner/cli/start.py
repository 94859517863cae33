"""`sam-run`'s entry point: the stop signals are handled before the seconds of imports (Hydra, torch) that start-up
takes, so a Ctrl-C or a SIGTERM then is one line and exit 130 or 75, like one a moment later (cli/run.py)."""

from __future__ import annotations

import sys

from sam_runner.run.stopping import RunStopped, stop_at_once


def main() -> None:
    stop_at_once()
    try:
        from sam_runner.cli.run import main as run  # Hydra, the configs, the pre-flight's imports
    except RunStopped as stopped:
        print(f"sam-run: error: {stopped.status}: {stopped}", file=sys.stderr)
        sys.exit(stopped.exit_code)
    run()
