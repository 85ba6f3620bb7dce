"""torchrun that reports a failed worker's own one-line error, as ``sparseforge train --nproc N`` runs it.

``python -m sparseforge.distributed.torchrun ARGS`` takes torchrun's arguments
(``python -m torch.distributed.run ARGS``) and runs the same elastic agent.
What differs is a failure: torchrun ends with its ``ChildFailedError``
traceback and a report table (34 lines for two workers) that says which
rank exited with which status, but not why. Here every worker gets a folder
in the environment (:data:`ERROR_DIR_ENV`); a worker of
:mod:`sparseforge.distributed.launch` that stops on bad input writes its
``sparseforge: error: ...`` line there (:func:`report_error`) instead of
printing it, and the agent prints the line of the first rank that wrote one
and exits with status 2. A worker that failed otherwise (a bug, a signal)
has printed its own traceback; the agent then adds one line naming the rank
and its exit status and exits with status 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ERROR_DIR_ENV", "first_error", "main", "report_error"]

ERROR_DIR_ENV = "SPARSEFORGE_ERROR_DIR"
"""Environment variable: the folder where workers leave their one-line error, one file per rank."""


def report_error(line: str) -> None:
    """Hand a worker's one-line error to the agent (file ``rank-R.txt`` in ``$SPARSEFORGE_ERROR_DIR``).

    Without that variable (a worker started by plain torchrun), or when the
    file cannot be written, the line goes to stderr as usual.
    """
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder:
        try:
            path = Path(folder) / f"rank-{int(os.environ.get('RANK', '0')):05d}.txt"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(line.rstrip("\n") + "\n", encoding="utf-8")
            os.replace(tmp, path)  # the agent reads a whole line or none
            return
        except (OSError, ValueError):
            pass
    print(line, file=sys.stderr)


def first_error(folder: str | os.PathLike[str]) -> str | None:
    """The line of the rank that reported first (ties: the lowest rank), or None when no worker reported."""
    files = sorted(Path(folder).glob("rank-*.txt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    for path in files:
        line = path.read_text(encoding="utf-8", errors="replace").strip()
        if line:
            return line.splitlines()[0]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with ``argv`` (its own arguments); returns the exit status (see the module docstring)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent logs each failed worker ("failed (exitcode: 2) local_rank: 0 ...") and the
    # SIGTERMs it sends the others; the one line below replaces all of that.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    errors = tempfile.mkdtemp(prefix="sparseforge-errors-")
    os.environ[ERROR_DIR_ENV] = errors  # the workers inherit the agent's environment
    try:
        run(parse_args(list(argv) if argv is not None else None))
    except ChildFailedError as e:
        line = first_error(errors)
        if line is not None:
            print(line, file=sys.stderr)
            return 2
        rank, failure = e.get_first_failure()
        print(f"sparseforge: worker rank {rank} failed with exit status {failure.exitcode} "
              "(its own output above says why)", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(errors, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
