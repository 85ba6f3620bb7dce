"""The torchrun entry point of ``sparseforge train``: one rank of a recipe's run.

``sparseforge train RECIPE --nproc N`` (N > 1) runs torchrun (``--print-command`` prints it)::

    python -m torch.distributed.run --standalone --nproc_per_node N \\
        -m sparseforge.distributed.launch RECIPE --out DIR [--no-resume] [--quiet]

(through :mod:`sparseforge.distributed.torchrun`, with the same arguments)
and every process it starts calls :func:`sparseforge.distributed.train.run`,
which joins the group from torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Run it yourself under any torchrun setup (several
nodes, another rendezvous) with the same arguments.

Bad input exits with status 2 and one ``sparseforge: error: ...`` line (from
every rank: each checks the recipe before joining the group). ``sparseforge
train`` runs torchrun through :mod:`sparseforge.distributed.torchrun`, which
prints the first failing rank's line once instead of torchrun's report.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from sparseforge.distributed.torchrun import report_error
from sparseforge.distributed.train import default_out_dir, load_recipe, run
from sparseforge.errors import SparseforgeError
from sparseforge.oserrors import check_writable
from sparseforge.registry import import_plugins
from sparseforge.threads import worker_env


def watch_parent(interval_s: float = 0.2) -> None:
    """End this process (exit status 1) as soon as its parent process is gone.

    torchrun starts each worker in a session of its own, so when torchrun dies
    without cleaning up (SIGKILL, a crashed node agent) its workers would go on
    training, and writing checkpoints into the run folder, with nobody waiting
    for them. A daemon thread polls the parent's pid every ``interval_s``.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="sparseforge-parent-watch", daemon=True).start()


def torchrun_command(recipe_path: str | os.PathLike[str], nproc: int, out: str | os.PathLike[str],
                     resume: bool = True, quiet: bool = False, plugins: Sequence[str] = ()) -> list[str]:
    """The command that runs ``recipe_path`` on ``nproc`` local processes under torchrun.

    ``--standalone`` rendezvouses on localhost at a free port: no network needed. Every
    worker imports the ``plugins`` (``sparseforge --plugin``) before it reads the recipe.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "sparseforge.distributed.launch", str(recipe_path), "--out", str(out)]
    for module in plugins:
        cmd += ["--plugin", module]
    if not resume:
        cmd.append("--no-resume")
    if quiet:
        cmd.append("--quiet")
    return cmd


def launch(recipe_path: str | os.PathLike[str], nproc: int = 1, out: str | os.PathLike[str] | None = None,
           resume: bool = True, quiet: bool = False, print_command: bool = False,
           plugins: Sequence[str] = ()) -> int:
    """What ``sparseforge train`` does: validate, then train in-process (``nproc`` 1) or under torchrun.

    The recipe is checked against ``nproc`` here, before any process starts. With
    ``nproc`` > 1 torchrun runs as a child process and its exit status is returned;
    ``print_command`` only prints the command. ``plugins``: modules this process has
    imported (``sparseforge --plugin``), which the workers import too. Returns the exit status.
    """
    recipe = load_recipe(recipe_path)
    recipe.check_launch(nproc)
    run_dir = out if out is not None else default_out_dir(recipe, recipe_path)
    if not print_command:  # a read-only --out fails now, not at the first checkpoint
        check_writable(run_dir, "folder", f"the run folder {run_dir}")
    if nproc == 1 and not print_command:
        run(recipe, run_dir, resume=resume, quiet=quiet)
        return 0
    if nproc == 1:
        print(shlex.join([sys.executable, "-m", "sparseforge", *(a for m in plugins for a in ("--plugin", m)),
                          "train", str(recipe_path), "--out", str(run_dir)]
                         + ([] if resume else ["--no-resume"]) + (["--quiet"] if quiet else [])))
        return 0
    cmd = torchrun_command(recipe_path, nproc, run_dir, resume=resume, quiet=quiet, plugins=plugins)
    if print_command:
        print(shlex.join(cmd))
        return 0

    # The same torchrun, through sparseforge's wrapper: a worker's bad input ends in its own one line
    # (sparseforge.distributed.torchrun), not in torchrun's ChildFailedError report. Threads: the
    # user's OMP_NUM_THREADS as it is; else the idle cores shared among the workers.
    cmd = [sys.executable, "-m", "sparseforge.distributed.torchrun", *cmd[3:]]
    proc = subprocess.Popen(cmd, env=worker_env(nproc))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # torchrun stops its workers on SIGTERM/SIGINT; a bare kill would orphan them.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparseforge.distributed.launch",
                                description="One rank of `sparseforge train` (start it with torchrun).")
    p.add_argument("recipe", help="the YAML training recipe")
    p.add_argument("--out", default=None, help="the run folder (default: the recipe's out, else runs/RECIPE-NAME)")
    p.add_argument("--no-resume", action="store_true", help="delete the folder's checkpoints and start over")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (a plug-in registering the recipe's model or method); repeatable")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one rank; returns the exit status."""
    args = build_parser().parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's agent: do not outlive it
        watch_parent()

    try:
        import_plugins(args.plugin)
        recipe = load_recipe(args.recipe)
        out = args.out if args.out is not None else default_out_dir(recipe, args.recipe)
        run(recipe, out, resume=not args.no_resume, quiet=args.quiet)
    except SparseforgeError as e:
        report_error(f"sparseforge: error: {e}")  # under sparseforge train: to the agent, which prints it once
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
