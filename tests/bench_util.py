"""Helpers of the benchmark tests: run ``python -m b2fast.bench`` in-process, read its tables,
load a ``benchmarks/`` script as a module."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

from b2fast.bench import cli as bench


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = bench.main(argv)
    return code, out.getvalue(), err.getvalue()


def table_rows(report: str, first_header: str = "op") -> list[list[str]]:
    """The body rows of the Markdown table, as lists of stripped cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in report.splitlines() if line.startswith("| ")]
    assert rows and rows[0][0] == first_header, report
    return rows[1:]


def run_quick(folder, suite: str, *extra: str) -> tuple[str, str, dict]:
    """``python -m b2fast.bench SUITE --quick --device cpu --json`` (+ ``extra``): stdout, stderr
    and the JSON document of a run that must succeed."""
    path = folder / f"{suite}.json"
    code, out, err = run_main([suite, "--quick", "--device", "cpu", *extra, "--json", str(path)])
    assert code == 0, err
    return out, err, json.loads(path.read_text(encoding="utf-8"))


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (``benchmarks/`` is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
