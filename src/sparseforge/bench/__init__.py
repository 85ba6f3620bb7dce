"""Benchmarks: ``python -m sparseforge.bench <name> [--quick] [--json out.json]``.

Each benchmark is a module here exposing ``add_arguments(parser)`` and
``run(args) -> dict``; the runner prints a table and writes the JSON. Speed
benchmarks interleave the configurations they compare within one run and
report medians and ratios, because this machine is shared and noisy.
"""

BENCHMARKS = {
    "overhead": "sparseforge.bench.overhead",
}
