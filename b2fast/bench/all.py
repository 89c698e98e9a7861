"""``python -m b2fast.bench all``: every suite in turn, on one device, in one process.

kernels, rewards, sample, train, then stage, each with its own default options (``--quick``: each
suite's quick mode). ``--config`` and config overrides go to the SD suites. The stage suite
composes its stage from the rewards, sample and train documents measured just before instead of
measuring them again, and the random-weight SD model is built once for all of them.

JSON (``--json``): ``suite`` ("all") and ``suites``, each suite's own document by name.
"""
from __future__ import annotations

import argparse

ORDER = ("kernels", "rewards", "sample", "train", "stage")


def suite_argv(name: str, args: argparse.Namespace) -> list[str]:
    """The command line of one suite under ``all``."""
    argv = [name, "--device", args.device] + ["--quick"] * args.quick
    if name not in ("sample", "train", "stage"):
        return argv
    return argv + (["--config", args.config] if args.config else []) + list(args.overrides)


def run(args: argparse.Namespace) -> tuple[dict, str, int]:
    """(``{"suite": "all", "suites": {...}}``, the reports one after the other, the worst exit code)."""
    from b2fast.bench.cli import parse_args, run_suite

    docs, reports, code = {}, [], 0
    for name in ORDER:
        sub = parse_args(suite_argv(name, args))
        if name == "stage":
            sub.earlier = docs
        doc, report, rc = run_suite(name, sub)
        docs[name] = doc
        reports.append(report)
        code = max(code, rc)
    return {"suite": "all", "suites": docs}, "\n\n".join(reports), code
