"""The package imports without its extension, reports its backends, and refuses unusable ones."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import b2fast
from b2fast import ops


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    """These tests start with no backend forced, whatever B2FAST_BACKEND the shell sets."""
    monkeypatch.setattr(ops, "_forced", None)


def test_import_and_version():
    assert isinstance(b2fast.__version__, str) and b2fast.__version__.count(".") == 2


def test_backends_report_every_op():
    report = b2fast.backends()
    assert isinstance(report, dict)
    assert set(report) == {"cfg_combine", "ddim_step_with_logprob", "ddim_logprob", "branch_fork",
                           "fork_index"}
    for op, line in report.items():
        assert line.split()[0] in ops.KNOWN_BACKENDS, (op, line)


def test_extension_matches_package_when_built(skip_backend):
    if ops._C is None:
        skip_backend("cpp", "cpu", f"extension not built: {ops._C_ERROR}")
    import torch
    assert ops._C.__version__ == b2fast.__version__
    assert ops._C.torch_version == torch.__version__.split("+")[0]
    assert isinstance(ops._C.has_cuda(), bool)


def test_forcing_an_unknown_backend_is_a_clear_error():
    allowed = "allowed: cuda, triton, cpp, torch, auto"
    with pytest.raises(ValueError, match=f"backend: unknown name 'fast'; {allowed}"):
        ops.set_backend("fast")


def test_every_kernel_op_is_built_on_the_cpu(skip_backend):
    """A built extension serves every fused op on the CPU, so no backend test skips silently.
    Under B2FAST_REQUIRE=cpp a missing extension fails here whatever other tests do."""
    if ops._C is None:
        skip_backend("cpp", "cpu", f"extension not built: {ops._C_ERROR}")
    report = ops.backends("cpu")
    for op in ("ddim_step_with_logprob", "ddim_logprob", "branch_fork", "fork_index"):
        assert report[op] == "cpp", report[op]
        assert "cpp" in ops.available_backends(op, "cpu")


def test_forcing_an_unavailable_backend_is_a_clear_error():
    import torch
    if ops._C is not None and ops._C.has_cuda() and torch.cuda.is_available():
        pytest.skip("the CUDA backend is available here")
    why = "(b2fast._C was built without CUDA|no CUDA device is visible|b2fast._C not loaded)"
    with pytest.raises(RuntimeError, match=f"backend 'cuda' is not available: {why}"):
        ops.set_backend("cuda")
    assert ops.get_backend() is None


def test_forcing_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    """Refused when chosen, like cuda, not at the first op (where it used to raise mid-run)."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("the Triton backend can run on this GPU")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"^backend 'triton' is not available: no CUDA device is visible .*"
                                           r"set TRITON_INTERPRET=1"):
        ops.set_backend("triton")
    assert ops.get_backend() is None
    assert "triton" not in ops.available_backends("ddim_step_with_logprob", "cpu")


def test_forcing_a_backend_for_a_device_it_cannot_serve_is_a_clear_error():
    with pytest.raises(RuntimeError, match="^backend 'cpp' is not available: "):
        ops.set_backend("cpp", device="cuda")  # the C++ kernels serve CPU tensors only
    assert ops.get_backend() is None
    with ops.use_backend("torch", device="cuda"):  # the reference serves any device
        assert ops.get_backend() == "torch"


def test_triton_on_the_cpu_under_the_interpreter_can_still_be_forced(monkeypatch, skip_backend):
    """Also the check that B2FAST_REQUIRE=triton-interpret cannot pass with Triton missing."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if ops._backend_unavailable("triton"):
        skip_backend("triton", "cpu", f"triton not usable here: {ops._backend_unavailable('triton')}")
    with ops.use_backend("triton", device="cpu"):
        for op in ("ddim_step_with_logprob", "ddim_logprob", "branch_fork", "fork_index"):
            assert ops.backend_for(op, "cpu") == "triton"
            assert "triton" in ops.available_backends(op, "cpu")


def test_train_cli_refuses_triton_on_the_cpu_in_one_line(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("the Triton backend can run on this GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "b2fast.train", "--backend", "triton", "--device", "cpu",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "backend 'triton' is not available: no CUDA device is visible" in errors[0]
    assert not (tmp_path / "run").exists()


def test_triton_on_the_cpu_is_for_forced_use_only():
    """The Triton interpreter is never the automatic choice on the CPU, even when it is on."""
    assert ops.backend_for("ddim_step_with_logprob", "cpu") != "triton"


def test_use_backend_restores_the_previous_choice():
    with ops.use_backend("torch"):
        assert ops.backend_for("ddim_step_with_logprob") == "torch"
    assert ops.get_backend() is None


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_env_forced_backend_fails_at_first_call_not_at_import():
    code = ("import torch, b2fast.ops as o\n"
            "x = torch.zeros(1, 4)\n"
            "o.branch_fork(x, 2, torch.float32)\n")
    proc = _run_python(code, B2FAST_BACKEND="cuda")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "backend 'cuda' (forced by B2FAST_BACKEND) is not available" in last, proc.stderr


def test_import_survives_a_broken_extension():
    """A b2fast._C that raises on import (e.g. built against another torch) only warns."""
    code = ("import sys, warnings, importlib.abc\n"
            "class Broken(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'b2fast._C': raise ImportError('undefined symbol: _ZN3c10')\n"
            "sys.meta_path.insert(0, Broken())\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import b2fast, b2fast.ops\n"
            "print(b2fast.backends()['ddim_step_with_logprob'])\n"
            "print(sum('b2fast._C not loaded' in str(x.message) for x in w))\n"
            "try:\n"
            "    b2fast.ops.set_backend('cpp')\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    backend_line, warnings_count, error = proc.stdout.strip().splitlines()[-3:]
    assert backend_line.startswith("torch (cpp: b2fast._C not loaded (ImportError: undefined")
    assert warnings_count == "1"
    assert error.startswith("backend 'cpp' is not available: b2fast._C not loaded")


CONFTEST = Path(__file__).with_name("conftest.py")
REQUIRE_PROBE = '''
import pytest

def test_cpp_missing(skip_backend):
    skip_backend("cpp", "cpu", "extension not built: pretend")

def test_triton_missing(skip_backend):
    skip_backend("triton", "cpu", "triton not usable here: pretend")

@pytest.mark.gpu
def test_gpu_only(skip_backend):
    skip_backend("cpp", "cpu", "pretend this needs a GPU")

def test_unrelated_skip():
    pytest.skip("nothing to do with backends")
'''


@pytest.mark.parametrize("require, failed", [
    (None, []),
    ("cpp", ["test_cpp_missing"]),
    ("cpp, triton-interpret", ["test_cpp_missing", "test_triton_missing"]),
])
def test_b2fast_require_turns_backend_skips_into_failures(tmp_path, require, failed):
    """The conftest's skip_backend: a skip for want of a backend named by B2FAST_REQUIRE fails
    with one line; skips for other backends, gpu-marked tests and other reasons still skip."""
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (tmp_path / "test_probe.py").write_text(REQUIRE_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "B2FAST_REQUIRE"}
    if require is not None:
        env["B2FAST_REQUIRE"] = require
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == (1 if failed else 0), proc.stdout + proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{len(failed)} failed, " if failed else "4 skipped"), summary
    assert f"{4 - len(failed)} skipped" in summary, summary
    names = {"test_cpp_missing": "cpp but extension not built: pretend",
             "test_triton_missing": "triton-interpret but triton not usable here: pretend"}
    lines = proc.stdout.splitlines()
    for test in failed:  # the failure's whole report is one line
        assert f"B2FAST_REQUIRE names {names[test]}" in lines and f"FAILED test_probe.py::{test}" in proc.stdout


def test_b2fast_require_refuses_an_unknown_name(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_probe.py").write_text("def test_nothing():\n    assert True\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tmp_path, timeout=300,
                          capture_output=True, text=True, env={**os.environ, "B2FAST_REQUIRE": "cpp,cuda"})
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "B2FAST_REQUIRE: unknown name(s) cuda; allowed: cpp, triton-interpret" in proc.stderr
