"""`sam-run`'s entry point: the stop signals are handled before the seconds of imports (Hydra, torch) that start-up
takes, so a Ctrl-C or a SIGTERM then is one line and exit 130 or 75, like one a moment later (cli/run.py)."""

from __future__ import annotations

from sam_runner.run.stopping import stop_at_once


def main() -> None:
    stop_at_once()  # ends the process from the handler: nothing raised into the imports below
    from sam_runner.cli.run import main as run  # Hydra, the configs, the pre-flight's imports

    run()
