"""Command-line runner for the benchmarks."""

from __future__ import annotations

import argparse
import os
import sys

from sparseforge.bench import benchmarks
from sparseforge.errors import SparseforgeError
from sparseforge.extras import EXTRAS
from sparseforge.files import write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparseforge.bench",
        description="Run a sparseforge benchmark; prints a table and writes JSON.",
    )
    sub = parser.add_subparsers(dest="name", required=True, metavar="NAME")
    modules = benchmarks()
    for name, module in modules.items():
        summary = (module.__doc__ or "").strip().splitlines()[0]
        # argparse %-formats help strings ("50% of the channels" would crash --help); descriptions it does not
        p = sub.add_parser(name, help=summary.replace("%", "%%"), description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--json", metavar="PATH", help="where to write the results (default: bench/results/NAME.json)")
        p.add_argument("--quick", action="store_true", help="a short run, for CI: checks it works, not the claim")
        module.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        result = modules[args.name].run(args)
    except SparseforgeError as e:
        print(f"sparseforge.bench: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        package, extras = EXTRAS[top]
        print(f"sparseforge.bench: error: the {args.name} benchmark needs {package}, which is not installed: "
              f"pip install 'sparseforge[{extras[-1]}]'", file=sys.stderr)
        return 2
    out = args.json or os.path.join("bench", "results", f"{args.name}{'-quick' if args.quick else ''}.json")
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
