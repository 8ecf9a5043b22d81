"""Run the `archiver` command line in a child process, for tests that send it real signals.

    python -m tests.service_runner [--pause-at-files READY_FILE] -- run --yes ...

With ``--pause-at-files`` the first batch, once its files are written (before it
verifies or deletes anything), touches READY_FILE and pauses for a second, so the
test can signal the process while a batch is in hand. The pause is the only
change to the real code path: it is the step hook that ``archiver.cli.app.main``
takes for this purpose.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from archiver.cli import app as cli
from archiver.engine.commit import StepHook


def pause_at_files(ready: Path) -> StepHook:
    paused = False

    def hook(step: str, batch_id: str) -> None:
        nonlocal paused
        if step == "files" and not paused:
            paused = True
            ready.touch()
            time.sleep(1.0)  # the signal arrives now; its handler runs when the batch awaits

    return hook


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    options, command = args[:split], args[split + 1 :]
    hook = pause_at_files(Path(options[1])) if options[:1] == ["--pause-at-files"] else None
    sys.argv = ["archiver", *command]
    cli.main(hook=hook)


if __name__ == "__main__":
    main()
