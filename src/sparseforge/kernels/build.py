"""``python -m sparseforge.kernels.build``: compile the native sparse kernels now and say what this CPU runs.

The README's set-up runs this once, so that no later process waits for the
compiler. Without a compiler it prints why and exits 0: sparseforge then
runs the packed formats on its plain PyTorch fallback (same results, not
faster), and :func:`sparseforge.kernels.native.native` warns once per
process.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from sparseforge.kernels import native as native_module


def main(argv: list[str] | None = None) -> int:
    """Build (or find) the kernels, print their status; exit 1 only with ``--strict`` and no kernels."""
    parser = argparse.ArgumentParser(prog="python -m sparseforge.kernels.build", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the kernels cannot be built")
    args = parser.parse_args(argv)
    print(f"sparseforge kernels: building in {native_module.build_directory()} (once, about a minute) ...",
          flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the status line below says the same
        native_module.native(build=True, verbose=args.verbose)
    status = native_module.native_status()
    if status["native"]:
        print(f"sparseforge kernels: ready, using {status['isa']} (best this CPU supports: {status['best_isa']})")
        return 0
    print(f"sparseforge kernels: NOT built ({status['reason']}); packed layers will use the PyTorch fallback "
          "(same results, not faster). Install g++ and `pip install ninja`, then rerun this command.",
          file=sys.stderr)
    return 1 if args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
