"""The Triton kernels compile for the GPUs they are written for, on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs the kernels as Python and checks their results, but it
accepts what the GPU compiler may reject (types, layouts, unsupported ops). Triton compiles for
an explicit target without a GPU, down to the cubin through the ptxas it ships, so every kernel,
for every dtype combination the ops pass it and every block config the autotuner tries, is built
here for the H100 (sm_90), plus the first case of each for the A100 (sm_80) and the B200
(sm_100). The PTX is read for two promises of ``b2fast/kernels/_common.py`` that make the DDIM
kernels' bits equal the reference's: IEEE-rounded division and no FMA contraction.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # torch depends on triton on Linux; the Triton backend is optional elsewhere

HERE = Path(__file__).parent
DDIM_KERNELS = {"step", "logprob_fwd", "logprob_bwd"}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(HERE / "triton_targets.py")], capture_output=True, text=True,
                          env=env, timeout=900)
    if done.returncode == 3:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    header, *rows = [json.loads(line) for line in done.stdout.splitlines()]
    return header["kernels"], rows


def test_every_kernel_compiles_for_sm90_in_every_case_the_ops_launch(compiled):
    kernels, rows = compiled
    failed = [f"{r['kernel']} ({r['case']}) sm_{r['arch']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "\n".join(failed[:10])
    assert sorted({r["qualified"] for r in rows}) == kernels  # no kernel left out
    assert all(r["cubin"] for r in rows)
    for arch in (80, 90, 100):
        assert {r["kernel"] for r in rows if r["arch"] == arch} == {r["kernel"] for r in rows}


def test_ddim_kernels_divide_with_ieee_rounding_and_fuse_no_multiply_add(compiled):
    _, rows = compiled
    ddim = [r for r in rows if r["kernel"] in DDIM_KERNELS]
    assert len(ddim) >= 3 * 5 * 2 * 4  # kernels × dtype cases × flag settings × block configs
    assert all(r["div_rn"] for r in ddim), [r["case"] for r in ddim if not r["div_rn"]][:5]
    assert not any(r["fma"] for r in ddim), [r["case"] for r in ddim if r["fma"]][:5]
