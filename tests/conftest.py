"""Shared fixtures: tiny random-weight SD-layout models, built once per session from configs."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter; it must be
# switched on before triton is first imported (b2fast.ops imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep ``b2fast:tiny-sd`` and other cached builds out of the user's home during tests."""
    os.environ.setdefault("B2FAST_CACHE", str(tmp_path_factory.mktemp("b2fast-cache")))


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from b2fast.testing.tiny_sd import save_tiny_sd
    return str(save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"), seed=0))


@pytest.fixture()
def tiny_policy(tiny_sd_path):
    from b2fast.config import ModelConfig
    from b2fast.core.policy import Policy

    torch.manual_seed(0)
    cfg = ModelConfig(path=tiny_sd_path, dtype="float32")
    return Policy(cfg, torch.device("cpu"), num_steps=10, eta=1.0)
