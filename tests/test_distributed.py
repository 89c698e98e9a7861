"""Several ranks (CPU, gloo) give the results of one process; a failed rank stops the job."""
import json
import shutil
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from b2fast.distributed import World, resolve_device
from b2fast.run.stage_table import gather_stage_table
from b2fast.config import presets_dir

# One stage of 4 batches (2 per rank); a fixed interval so the schedule ignores num_stages.
# adam_eps 1 makes the first AdamW steps linear in the gradient (update ≈ lr·g), so the weights
# compare the gradients themselves; with eps 1e-8 the update is ≈ lr·sign(g) and hides both a
# wrong gradient scale and, for near-zero entries, magnifies float rounding.
ARGS = ["--config", str(presets_dir() / "tiny_sd_jpeg.yaml"), "--sampling.num_steps", "6",
        "--sampling.branches", "3", "--sampling.prompts_per_batch", "2", "--sampling.batches_per_stage", "4",
        "--schedule.min_interval", "3", "--schedule.max_interval", "3", "--train.micro_batch", "8",
        "--train.trajectories_per_step", "4", "--train.lr", "1e-2", "--train.adam_eps", "1",
        "--device", "cpu", "--log.progress", "false", "--log.grid_every", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in extra:
            env.pop(key, None)
    return env


def _train(*args, ranks: int = 1) -> subprocess.CompletedProcess:
    # --standalone: torchrun binds a free port itself (no window for another process to take it)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
                if ranks > 1 else [sys.executable])
    done = subprocess.run([*launcher, "-m", "b2fast.train", *ARGS, *args], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lora(run):
    return load_file(run / "lora" / "pytorch_lora_weights.safetensors")


def _assert_same_run(a, b, stats=("loss", "approx_kl", "grad_norm", "clipfrac")):
    """Identical rewards table and selection; update statistics and LoRA weights equal up to
    float rounding (the ranks sum the gradient in another order than one process does)."""
    assert _lines(a / "samples.jsonl") == _lines(b / "samples.jsonl")
    for ra, rb in zip(_lines(a / "metrics.jsonl"), _lines(b / "metrics.jsonl"), strict=True):
        for key in ("n_images", "n_selected", "n_positive", "n_negative", "n_pairs", "optimizer_steps",
                    "reward_mean"):
            assert ra[key] == rb[key], key
        for key in stats:
            assert ra[key] is not None and rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-5), key
    wa, wb = _lora(a), _lora(b)
    assert wa.keys() == wb.keys()
    moved = max(float(w.abs().max()) for k, w in wa.items() if "lora.up" in k)
    assert moved > 1e-4  # training changed the weights, so the comparison means something
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6)


def test_two_ranks_match_one_process_and_resume_on_another_world_size(tiny_sd_path, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _train("--model.path", tiny_sd_path, "--out", str(one), "--schedule.num_stages", "2")
    # two ranks run stage 0, then one process resumes the run for stage 1
    started = _train("--model.path", tiny_sd_path, "--out", str(two), "--schedule.num_stages", "1", ranks=2)
    assert started.stdout.count("done:") == 1  # only rank 0 reports and writes
    assert [r["stage"] for r in _lines(two / "metrics.jsonl")] == [0]
    _train("--resume", str(two), "--model.path", tiny_sd_path, "--out", str(two), "--schedule.num_stages", "2")
    _assert_same_run(one, two)
    # and the other way round: the one-process run cut back to its stage-0 checkpoint, resumed on two ranks
    cut = tmp_path / "cut"
    shutil.copytree(one, cut)
    (cut / "checkpoints" / "latest").write_text("stage-000000\n")
    _train("--resume", str(cut), "--model.path", tiny_sd_path, "--out", str(cut), "--schedule.num_stages", "2",
           ranks=2)
    _assert_same_run(one, cut)


def test_two_ranks_match_one_process_for_a_pair_objective_with_a_reference(tiny_sd_path, tmp_path):
    """Diffusion-DPO: pairs, the stage's noises and the base model's errors (computed per rank for
    its own pairs) give the one-process update."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--model.path", tiny_sd_path, "--schedule.num_stages", "1", "--train.objective", "diffusion_dpo",
            "--selection.pair_mode", "always", "--train.dpo_beta", "50")
    _train(*args, "--out", str(one))
    _train(*args, "--out", str(two), ranks=2)
    assert _lines(one / "metrics.jsonl")[0]["n_pairs"] > 0
    _assert_same_run(one, two, stats=("loss", "grad_norm", "accuracy", "logit", "error_winner", "error_loser"))


FAILING_REWARD = '''
import os, time
import torch

def reward(images, prompts):
    if os.environ.get("RANK") == "1":
        if os.environ["FAIL"] == "crash":
            raise RuntimeError("the reward model ran out of memory on rank 1")
        time.sleep(120)  # a stalled rank
    return images.mean(dim=(1, 2, 3))
'''


@pytest.mark.parametrize("failure", ["crash", "stall"])
def test_a_failed_rank_stops_the_other_with_a_clear_error(tiny_sd_path, tmp_path, failure):
    (tmp_path / "failing_reward.py").write_text(FAILING_REWARD)
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "b2fast.train", *ARGS, "--model.path", tiny_sd_path, "--out", str(tmp_path / "run"),
         "--schedule.num_stages", "1", "--reward.name", "failing_reward:reward", "--distributed.timeout_s", "10"],
        env=_env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                 FAIL=failure, PYTHONPATH=tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    started = time.monotonic()
    try:
        _, err0 = procs[0].communicate(timeout=300)
        waited = time.monotonic() - started
    finally:
        for p in procs:
            p.kill()
        _, err1 = procs[1].communicate()
    assert procs[0].returncode == 1, err0[-2000:]
    last = err0.strip().splitlines()[-1]
    assert last.startswith("error: rank 0/2: ") and "another rank" in last, err0[-2000:]
    if failure == "stall":
        assert waited >= 10  # rank 0 waited for the timeout, then gave up instead of hanging
    else:  # the failing rank says why in one line, naming itself and the reward
        assert "Traceback" not in err1
        assert err1.strip().splitlines()[-1].startswith(
            "error: rank 1/2: reward 'failing_reward:reward' failed on "), err1[-2000:]


def test_joining_failures_and_backend_messages_are_one_clean_line(monkeypatch):
    from b2fast import distributed

    def refuse(*args, **kwargs):
        raise RuntimeError("[/build/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:5306\nmore")

    monkeypatch.setattr(distributed.dist, "init_process_group", refuse)
    with pytest.raises(distributed.CollectiveError,
                       match=r"^rank 1/2: joining the process group failed \(Connection closed by peer "):
        distributed.init(torch.device("cpu"), "gloo", 5.0, World(rank=1, size=2))
    assert distributed._first_words("word " * 100, limit=20) == "word word word word …"


def test_resolve_device_gives_each_rank_its_own_gpu_or_refuses():
    assert resolve_device("cpu", World(rank=1, size=2, local_rank=1)) == torch.device("cpu")
    assert resolve_device("auto", World(rank=1, size=2)).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="every rank on one GPU"):
            resolve_device("cuda:0", World(rank=1, size=2, local_rank=1))


def test_resolve_device_refuses_a_gpu_that_is_not_there(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^--device: got 'cuda:0' but no CUDA device is visible; use "):
            resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"got 'cuda:2' but only 2 CUDA device\(s\) are visible \(numbered from 0\)"):
        resolve_device("cuda:2")


def test_world_shards_batches_round_robin():
    assert World(rank=0, size=3).shard(7) == [0, 3, 6]
    assert World(rank=2, size=3).shard(7) == [2, 5]
    assert sorted(b for r in range(3) for b in World(rank=r, size=3).shard(7)) == list(range(7))


def test_stage_table_of_one_process_is_its_batch():
    """A single rank's table is its own batch: global row = local row, groups as in cat."""
    from b2fast.core.sampling import TrajectoryBatch

    def fake_batch(prompts, n_groups):
        n = len(prompts)
        return TrajectoryBatch(fork_latents=torch.zeros(n_groups, 1, 1, 1), latents=torch.zeros(n, 1, 1, 1, 1),
                               log_probs=torch.zeros(n, 1), step_indices=torch.zeros(1, dtype=torch.long),
                               group_ids=torch.arange(n_groups).repeat_interleave(n // n_groups),
                               prompt_ids=torch.zeros(n, dtype=torch.long), prompts=prompts,
                               images=torch.zeros(n, 3, 1, 1))
    batch = TrajectoryBatch.cat([fake_batch(["a", "a", "b", "b"], 2), fake_batch(["c", "c", "d", "d"], 2)])
    rewards = torch.arange(8.0)
    table = gather_stage_table(World(), [0, 1], batch, rewards, [f"cap{i}" for i in range(8)])
    assert table.prompts == batch.prompts and torch.equal(table.rewards, rewards)
    assert torch.equal(table.group_ids, batch.group_ids) and torch.equal(table.local_rows, torch.arange(8))
    assert table.captions == [f"cap{i}" for i in range(8)]


COLLECTIVES = textwrap.dedent('''
    import sys, torch
    from b2fast import distributed
    world = distributed.init(torch.device("cpu"), "gloo", 30.0)
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)                      # same init on both ranks
    x = torch.randn(2, 5, 4)[world.rank]                # different data per rank
    layer(x).square().sum().backward()
    distributed.sum_gradients(world, list(layer.parameters()))
    torch.save([p.grad for p in layer.parameters()], sys.argv[1] + f"/grad{world.rank}.pt")
    distributed.check_in_sync(world, list(layer.parameters()), "equal weights")
    if world.rank == 1:
        with torch.no_grad():
            layer.bias[0] += 1e-6
    try:
        distributed.check_in_sync(world, list(layer.parameters()), "after a one-rank change")
    except distributed.CollectiveError as exc:
        print("DIVERGED", exc)
    distributed.shutdown()
''')


def test_gradients_are_summed_and_identical_on_every_rank(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", COLLECTIVES, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port)) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    g0, g1 = torch.load(tmp_path / "grad0.pt"), torch.load(tmp_path / "grad1.pt")
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    layer(torch.randn(2, 5, 4)).square().sum().backward()   # both ranks' data in one process
    for a, b, p in zip(g0, g1, layer.parameters()):
        assert torch.equal(a, b)                             # bitwise the same on every rank
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-6)
    assert all("DIVERGED" in out and "differ between ranks" in out for out, _ in outputs)
