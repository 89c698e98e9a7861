"""Shared fixtures: tiny random-weight SD-layout models, built once per session from configs;
``B2FAST_REQUIRE``, which turns a skip for want of a kernel backend into a failure."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter; it must be
# switched on before triton is first imported (b2fast.ops imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# B2FAST_REQUIRE=cpp,triton-interpret (CI sets it: .ci/run): the backends that must be live
# here. Every test that skips because a backend cannot run goes through the `skip_backend`
# fixture, which fails instead when the backend is required; tests/test_build.py checks each
# required backend serves all its ops, so a skip that bypasses the fixture still fails a test.
REQUIRE_ENV = "B2FAST_REQUIRE"
REQUIREMENTS = {"cpp": ("cpp", "cpu"),                # the C++ kernels of b2fast._C
                "triton-interpret": ("triton", "cpu")}  # Triton kernels under TRITON_INTERPRET=1


def required_backends() -> set[str]:
    """The requirement names in B2FAST_REQUIRE (comma-separated); unknown names are an error."""
    names = {n.strip() for n in os.environ.get(REQUIRE_ENV, "").split(",") if n.strip()}
    unknown = sorted(names - set(REQUIREMENTS))
    if unknown:
        raise pytest.UsageError(f"{REQUIRE_ENV}: unknown name(s) {', '.join(unknown)}; "
                                f"allowed: {', '.join(REQUIREMENTS)}")
    return names


def requirement_for(backend: str, device: str) -> str | None:
    """The B2FAST_REQUIRE name that covers ``backend`` on ``device`` tensors, if any."""
    return next((name for name, bd in REQUIREMENTS.items() if bd == (backend, device)), None)


def pytest_configure(config):
    required_backends()  # a misspelt B2FAST_REQUIRE stops the run before any test


@pytest.fixture()
def skip_backend(request):
    """``skip_backend(backend, device, why)``: skip this test because ``backend`` cannot run on
    ``device`` tensors, or fail it (one line) when B2FAST_REQUIRE names that backend. Tests
    marked ``gpu`` always skip: they need hardware, not a build."""
    def skip(backend: str, device: str, why: str):
        name = requirement_for(backend, device)
        if name in required_backends() and request.node.get_closest_marker("gpu") is None:
            pytest.fail(f"{REQUIRE_ENV} names {name} but {why}", pytrace=False)
        pytest.skip(why)
    return skip


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep ``b2fast:tiny-sd`` and other cached builds out of the user's home during tests."""
    os.environ.setdefault("B2FAST_CACHE", str(tmp_path_factory.mktemp("b2fast-cache")))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the toy UNet is tiny, and CI's two cores run other work too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
