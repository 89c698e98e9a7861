"""The stage loop end to end on a tiny model: CLI, outputs, resume, one-line errors."""
import json
import os
import subprocess
import sys
import shutil

import pytest
import torch

from b2fast.config import ConfigError, apply_overrides, load_yaml, presets_dir
from b2fast.train import main, parse_config
from b2fast.run.trainer import Trainer

TINY = ["--config", str(presets_dir() / "tiny_sd_jpeg.yaml"), "--sampling.num_steps", "6", "--sampling.branches", "3", "--sampling.prompts_per_batch", "2",
        "--sampling.batches_per_stage", "2", "--schedule.num_stages", "3", "--schedule.min_interval", "2",
        "--schedule.max_interval", "4", "--train.micro_batch", "16", "--train.trajectories_per_step", "4",
        "--train.lr", "1e-2", "--device", "cpu", "--log.progress", "false", "--log.grid_every", "1"]


def _cfg(tiny_sd_path, out, *extra):
    cfg = load_yaml(presets_dir() / "tiny_sd_jpeg.yaml")
    return apply_overrides(cfg, [*TINY[2:], "--model.path", tiny_sd_path, "--out", str(out), *extra])


def test_cli_runs_three_stages_and_writes_outputs(tiny_sd_path, tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--model.path", tiny_sd_path, "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert [r["interval_len"] for r in records] == [2, 3, 4]
    for key in ("reward_mean", "reward_std", "n_selected", "loss", "clipfrac", "approx_kl",
                "grad_norm", "seconds", "seconds_sampling", "seconds_training", "ranks"):
        assert key in records[0]
    assert any(r["n_selected"] > 0 and r["loss"] is not None for r in records)
    assert all(r["ranks"] == 1 and 0 < r["seconds_sampling"] < r["seconds"] for r in records)
    assert len(list((out / "images").glob("stage-*.png"))) == 3
    assert (out / "reward_curve.png").stat().st_size > 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "stage-000002"
    assert (out / "config.yaml").is_file() and json.loads((out / "final.json").read_text()) == {"stages": 3}
    assert not list(out.rglob(".*.tmp")) and not list((out / "checkpoints").glob(".stage-*"))


def _lora(trainer):
    return {k: v.clone() for k, v in trainer.policy.lora_state_dict().items()}


def test_resume_after_interruption_gives_identical_weights(tiny_sd_path, tmp_path):
    # the uninterrupted run also scores in the overlap worker: the results must not change; the
    # cosine learning rate (behind a one-stage warm-up) must continue where the interrupted run left it
    cosine = ("--train.lr_schedule", "cosine", "--train.lr_warmup_stages", "1")
    full = Trainer(_cfg(tiny_sd_path, tmp_path / "full", "--sampling.overlap_reward", "on", *cosine))
    full.run()
    interrupted = Trainer(_cfg(tiny_sd_path, tmp_path / "cut", *cosine))
    for stage in range(2):          # the process dies after stage 1's checkpoint
        interrupted.run_stage(stage)
    (tmp_path / "cut" / "metrics.jsonl").open("a").write('{"stage": 2, "partial": true}\n')
    resumed = Trainer(_cfg(tiny_sd_path, tmp_path / "cut", *cosine), resume=str(tmp_path / "cut"))
    assert resumed.start_stage == 2
    resumed.run()
    a, b = _lora(full), _lora(resumed)
    assert a.keys() == b.keys()
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # training moved the weights
    for key in a:
        assert torch.equal(a[key], b[key]), key
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert [r["lr"] for r in records] == pytest.approx([1e-2 * 0.5, 1e-2 * 0.75, 1e-2 * 0.25])  # warm-up 1/2, cosine
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    samples = [json.loads(line) for line in (tmp_path / "cut" / "samples.jsonl").read_text().splitlines()]
    full_samples = (tmp_path / "full" / "samples.jsonl").read_text().splitlines()
    assert [s["stage"] for s in samples] == [0] * 12 + [1] * 12 + [2] * 12
    assert [json.loads(line) for line in full_samples] == samples


@pytest.mark.parametrize("objective", ["d3po", "dro"])
def test_a_pair_objective_resumes_to_identical_weights(tiny_sd_path, tmp_path, objective):
    """The base model's terms and the denoising noises are remade per stage from the stage's
    generators, so a resumed pair-objective run repeats the uninterrupted one."""
    extra = ("--train.objective", objective, "--selection.pair_mode", "always", "--schedule.num_stages", "2")
    full = Trainer(_cfg(tiny_sd_path, tmp_path / "full", *extra))
    records = full.run()
    assert all(r["n_pairs"] > 0 for r in records)
    cut = Trainer(_cfg(tiny_sd_path, tmp_path / "cut", *extra))
    cut.run_stage(0)
    resumed = Trainer(_cfg(tiny_sd_path, tmp_path / "cut", *extra), resume=str(tmp_path / "cut"))
    assert resumed.start_stage == 1
    resumed.run()
    a, b = _lora(full), _lora(resumed)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_evaluation_before_is_of_the_starting_weights_and_reused_only_for_same_settings(
        tiny_sd_path, tmp_path, capsys):
    eval_args = ["--eval.enabled", "true", "--eval.prompt_sets", "[animal_activity]", "--eval.splits", "[train]",
                 "--eval.prompts_per_set", "2", "--eval.images_per_prompt", "2"]
    trainer = Trainer(_cfg(tiny_sd_path, tmp_path, *eval_args))
    before = [r.as_dict() for r in trainer._evaluation_before()]
    stored = json.loads((tmp_path / "eval_before.json").read_text())
    assert stored["rows"] == before and stored["settings"]["eval"]["images_per_prompt"] == 2
    assert (tmp_path / "images" / "before.png").is_file()

    # a trained (here: perturbed) LoRA changes the images, but "before" still means the base model
    with torch.no_grad():
        for p in trainer.policy.lora_parameters():
            p.add_(torch.randn_like(p))
    assert [r.as_dict() for r in trainer.evaluate("x")] != before
    (tmp_path / "eval_before.json").unlink()
    assert [r.as_dict() for r in trainer._evaluation_before()] == before
    assert [r.as_dict() for r in trainer.evaluate("x")] != before  # LoRA back on afterwards

    # the stored table is reused when the settings match, recomputed when they do not
    stored["rows"][0]["score"] = -123.0
    (tmp_path / "eval_before.json").write_text(json.dumps(stored))
    assert trainer._evaluation_before()[0].score == -123.0
    trainer.cfg.eval.images_per_prompt = 3
    assert trainer._evaluation_before()[0].n_images == 6

    # resuming with other algorithm settings says so; output-only settings do not count
    trainer.run_stage(0)
    capsys.readouterr()
    Trainer(_cfg(tiny_sd_path, tmp_path, "--train.lr", "5e-3", "--log.grid_every", "0"), resume=str(tmp_path))
    out = capsys.readouterr().out
    assert "warning: resuming with settings that differ" in out and "train.lr: 0.01 -> 0.005" in out
    assert "log.grid_every" not in out


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "b2fast.train", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, fragment", [
    (["--train.lr", "-3"], "train.lr"),
    (["--sampling.branchez", "3"], "sampling.branchez"),
    (["--config", "no-such-file.yaml"], "no such file"),
    (["--model.path", "./no/such/model"], "model.path"),
    (["--reward.name", "no_such_reward"], "reward.name"),
    (["--prompts.source", "no_such_set"], "prompts"),
    (["--backend", "fast"], "backend"),
    pytest.param(["--backend", "cuda"], "backend 'cuda' is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU makes it valid")),
])
def test_bad_input_gives_one_line_error(args, fragment, tmp_path):
    result = _run_cli(*args, "--out", str(tmp_path / "x"), "--device", "cpu")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_config_errors_are_printed_once_under_torchrun():
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}
    other = subprocess.run([sys.executable, "-m", "b2fast.train", "--train.lr", "-1"], capture_output=True,
                           text=True, timeout=300, env=env)
    assert other.returncode == 2 and other.stderr == ""  # rank 0 says it
    first = subprocess.run([sys.executable, "-m", "b2fast.train", "--train.lr", "-1"], capture_output=True,
                           text=True, timeout=300, env={**env, "RANK": "0"})
    assert first.returncode == 2 and first.stderr.strip() == "error: train.lr: got -1.0, expected a number > 0"


def test_corrupt_checkpoint_gives_one_line_error(tiny_sd_path, tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--schedule.num_stages", "1", "--model.path", tiny_sd_path, "--out", str(out)]) == 0
    (out / "checkpoints" / "stage-000000" / "trainer_state.pt").write_bytes(b"garbage")
    result = _run_cli("--resume", str(out))
    assert result.returncode == 2 and "corrupt" in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_folder_resume_new_run_over_old_and_lora_mismatch(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--schedule.num_stages", "1", "--model.path", tiny_sd_path, "--out", str(out)]) == 0
    metrics = (out / "metrics.jsonl").read_text()

    # a new run into a folder that holds one is refused before anything is written
    result = _run_cli(*TINY, "--model.path", tiny_sd_path, "--out", str(out), "--seed", "5")
    assert result.returncode == 2 and "already holds a run" in result.stderr and "--resume" in result.stderr
    assert (out / "metrics.jsonl").read_text() == metrics

    # resuming from a checkpoint folder continues the run it belongs to (its config and folder)
    cfg, resume = parse_config(["--resume", str(out / "checkpoints" / "stage-000000"), "--schedule.num_stages", "2"])
    assert cfg.out == str(out) and cfg.model.path == tiny_sd_path and cfg.sampling.num_steps == 6
    # ... also with another config file, whose own `out` names some other folder
    cfg, _ = parse_config(["--config", str(presets_dir() / "tiny_sd_jpeg.yaml"), "--resume", str(out)])
    assert cfg.out == str(out) and cfg.model.path == "b2fast:tiny-sd"

    # resuming one run into another run's folder is refused too
    other = tmp_path / "other"
    assert main([*TINY, "--schedule.num_stages", "1", "--model.path", tiny_sd_path, "--out", str(other)]) == 0
    result = _run_cli("--resume", str(out), "--out", str(other), "--schedule.num_stages", "2")
    assert result.returncode == 2 and "already holds a run" in result.stderr

    # a finished run resumed as it is: nothing to do, said so
    result = _run_cli("--resume", str(out))
    assert result.returncode == 0 and "nothing to do: the run has all 1 stages" in result.stdout
    assert (out / "metrics.jsonl").read_text() == metrics
    # ... but a stop during its final outputs (final.json comes last) gets them written, not "nothing to do"
    shutil.rmtree(out / "lora")
    (out / "final.json").unlink()
    capsys.readouterr()
    assert main(["--resume", str(out)]) == 0
    assert "interrupted its final outputs: writing them now" in capsys.readouterr().out
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "final.json").read_text()) == {"stages": 1}
    assert (out / "metrics.jsonl").read_text() == metrics

    # a damaged config.yaml of the run: named as the run's, not as a --config the user never gave
    saved = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^--resume: the run's .*config.yaml is not valid YAML.*give --config"):
        parse_config(["--resume", str(out)])
    (out / "config.yaml").write_text(saved)

    # other LoRA shape than the checkpoint's: says which setting, not "corrupt"
    result = _run_cli("--resume", str(out), "--model.lora_rank", "8")
    assert result.returncode == 2 and "model.lora_rank=4" in result.stderr and "corrupt" not in result.stderr
    with pytest.raises(ConfigError, match="--out: empty"):
        parse_config(["--out", ""])


def test_problems_found_at_start_up_before_models_load(tiny_sd_path, tmp_path, monkeypatch):
    (tmp_path / "bad_schedule.py").write_text("def grow(stage, n, lo, hi):\n    return 0 if stage == 2 else lo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="schedule.kind: 'bad_schedule:grow' gives 0 for stage 2"):
        Trainer(_cfg(tiny_sd_path, tmp_path / "a", "--schedule.kind", "bad_schedule:grow"))
    (tmp_path / "bad_signature.py").write_text("def grow(stage):\n    return 2\n")
    with pytest.raises(ValueError, match=r"schedule.kind: 'bad_signature:grow' failed for stage 0 \(TypeError: .*"
                                         r"it must be f\(stage, num_stages, min_interval, max_interval\) -> int"):
        Trainer(_cfg(tiny_sd_path, tmp_path / "a", "--schedule.kind", "bad_signature:grow"))
    with pytest.raises(ValueError, match="eval.prompt_sets: 'no_such_set'"):
        Trainer(_cfg(tiny_sd_path, tmp_path / "b", "--eval.enabled", "true", "--eval.prompt_sets", "[no_such_set]"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="out: cannot create the folder"):
        Trainer(_cfg(tiny_sd_path, tmp_path / "file" / "run"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_diverged_weights_stop_the_run_before_their_checkpoint(tiny_sd_path, tmp_path, monkeypatch):
    import b2fast.run.trainer

    def diverging_update(policy, *args, **kwargs):
        stats = real_update(policy, *args, **kwargs)
        with torch.no_grad():
            policy.lora_parameters()[0].fill_(float("nan"))
        return stats

    real_update = b2fast.run.trainer.policy_update
    monkeypatch.setattr(b2fast.run.trainer, "policy_update", diverging_update)
    trainer = Trainer(_cfg(tiny_sd_path, tmp_path))
    with pytest.raises(ValueError, match="stage 0: the LoRA weights are no longer finite"):
        trainer.run_stage(0)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_from_an_older_checkpoint_abandons_the_later_ones(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--model.path", tiny_sd_path, "--out", str(out), "--keep_checkpoints", "3"]) == 0
    capsys.readouterr()
    Trainer(_cfg(tiny_sd_path, out, "--keep_checkpoints", "3"), resume=str(out / "checkpoints" / "stage-000000"))
    assert "abandons: stage-000001, stage-000002" in capsys.readouterr().out
    # a kill before the next checkpoint now resumes where the metrics end, not at the abandoned stage 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "stage-000000"
    assert sorted(p.name for p in (out / "checkpoints").glob("stage-*")) == ["stage-000000"]
    assert [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0]


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    from b2fast.run.checkpoint import TrainerState, save_checkpoint

    class Policy:
        def save_lora(self, folder):
            (folder / "lora.bin").write_bytes(b"x")

    def state(stage):
        return TrainerState(stage=stage, optimizer={}, history={}, rng={}, config={})

    for stage in (4, 5):
        save_checkpoint(tmp_path, Policy(), state(stage), keep=2)
    save_checkpoint(tmp_path, Policy(), state(0), keep=2)  # an older stage written last (resume)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("stage-*"))
    assert names == ["stage-000000", "stage-000005"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "stage-000000"


def test_a_reward_with_no_finite_score_stops_the_run_in_one_line(tiny_sd_path, tmp_path):
    (tmp_path / "nan_reward_mod.py").write_text("import torch\n\ndef all_nan(images, prompts):\n"
                                                "    return torch.full((images.shape[0],), float('nan'))\n")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "b2fast.train", *TINY, "--model.path", tiny_sd_path,
                             "--out", str(out), "--reward.name", "nan_reward_mod:all_nan"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert errors[0] == ("error: stage 0: reward 'nan_reward_mod:all_nan' gave no finite score for any of the 12 "
                         "images; fix the reward; no checkpoint was written yet: start again with the same command")
    assert not (out / "checkpoints").exists() and not (out / "lora").exists()


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_mid_run_keeps_a_resumable_checkpoint(tiny_sd_path, tmp_path, stop):
    """Ctrl-C, or SIGTERM (what schedulers and `timeout` send), stops with the resume line."""
    import signal
    import time

    out = tmp_path / "run"
    # A shell that starts the test runner in the background (``cmd &``) ignores SIGINT in it, and
    # the child would inherit that; a user's Ctrl-C reaches a process with the default handling.
    run = subprocess.Popen([sys.executable, "-m", "b2fast.train", *TINY, "--model.path", tiny_sd_path,
                            "--out", str(out), "--schedule.num_stages", "40"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "latest").is_file() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "checkpoints" / "latest").is_file(), f"no checkpoint within 240 s (exit code {run.poll()})"
    run.send_signal(getattr(signal, stop))
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert "interrupted" in stderr and f"--resume {out}" in stderr and "Traceback" not in stderr
    assert not list(out.rglob(".*.tmp")) and not list((out / "checkpoints").glob(".stage-*"))
    last = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("stage-"))
    assert last < 39
    assert main(["--resume", str(out), "--schedule.num_stages", str(last + 2)]) == 0
    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages == list(range(last + 2))


def test_help_lists_config_fields():
    result = _run_cli("--help")
    assert result.returncode == 0
    assert "--train.lr" in result.stdout and "--sampling.cache_dtype" in result.stdout


def test_tensorboard_logging_or_a_clear_error(tmp_path):
    from b2fast.run.outputs import TensorBoardLogger
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="log.tensorboard"):
            TensorBoardLogger(tmp_path)
        return
    logger = TensorBoardLogger(tmp_path)
    logger.log({"stage": 0, "reward_mean": 0.5, "loss": None})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_logger_writes_each_number_at_its_stage(tmp_path, monkeypatch):
    """What the logger hands to SummaryWriter (a recording stand-in: tensorboard is optional)."""
    import types

    from b2fast.run.outputs import TensorBoardLogger

    calls = []

    class SummaryWriter:
        def __init__(self, folder):
            calls.append(("open", folder))

        def add_scalar(self, key, value, step):
            calls.append((key, value, step))

        def flush(self):
            calls.append(("flush",))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    logger = TensorBoardLogger(tmp_path)
    logger.log({"stage": 3, "reward_mean": 0.5, "loss": None, "n_selected": 7, "note": "text"})
    logger.close()
    assert calls == [("open", str(tmp_path / "tensorboard")), ("reward_mean", 0.5, 3), ("n_selected", 7, 3),
                     ("flush",), ("close",)]


CAPTIONING_REWARD = '''
import torch

class Captioner:
    """Scores branch k of each 3-branch group k, and 'reads' a caption per image like bertscore."""
    last_captions = None

    def __call__(self, images, prompts):
        self.last_captions = [f"caption of {p}" for p in prompts]
        return torch.arange(len(prompts)).remainder(3).float()

reward = Captioner()
'''


def test_samples_log_has_rewards_selection_and_captions(tiny_sd_path, tmp_path, monkeypatch):
    (tmp_path / "captioning_reward.py").write_text(CAPTIONING_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _cfg(tiny_sd_path, tmp_path / "run", "--schedule.num_stages", "1",
               "--reward.name", "captioning_reward:reward")
    Trainer(cfg).run()
    items = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(items) == 2 * 2 * 3  # batches × prompts × branches
    assert [i["index"] for i in items] == list(range(12)) and {i["stage"] for i in items} == {0}
    for i in items:
        branch = i["index"] % 3
        assert i["group"] == i["index"] // 3 and i["reward"] == branch
        assert i["caption"] == f"caption of {i['prompt']}"
        # per prompt the rewards are 0, 1, 2 (repeated): best branch z > 0.5, worst z < -0.5
        assert i["kept"] == {0: "negative", 1: None, 2: "positive"}[branch]
        assert (i["z"] > 0.5) if branch == 2 else (i["z"] < -0.5) if branch == 0 else abs(i["z"]) < 1e-6


def test_resume_with_a_smaller_history_window_keeps_only_the_last_stored_stages(tiny_sd_path, tmp_path, capsys):
    first = Trainer(_cfg(tiny_sd_path, tmp_path, "--selection.history_stages", "2"))
    for stage in range(2):
        first.run_stage(stage)
    stored = first.history.state_dict()["stages"]
    assert len(stored) == 2 and stored[0] != stored[1]
    capsys.readouterr()
    resumed = Trainer(_cfg(tiny_sd_path, tmp_path, "--selection.history_stages", "1"), resume=str(tmp_path))
    out = capsys.readouterr().out
    assert "selection.history_stages changed 2 -> 1: keeping the last 1 stored stages" in out
    assert "(the new values apply): selection.history_stages: 2 -> 1" in out
    assert resumed.history.history_stages == 1 and resumed.history.state_dict()["stages"] == stored[1:]
    resumed.run_stage(2)  # pools stage 2 with stage 1 only: the window is H + 1 = 2 stages
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    pooled = {}
    for s in samples:
        if s["stage"] >= 1:
            pooled.setdefault(s["prompt"], []).append(s["reward"])
    for s in samples:
        if s["stage"] == 2:
            assert resumed.history.rewards(s["prompt"]) == pooled[s["prompt"]]
            r = torch.tensor(pooled[s["prompt"]], dtype=torch.float64)
            assert s["z"] == pytest.approx(float((s["reward"] - r.mean()) / (r.std() + 1e-8)), rel=1e-5, abs=1e-5)


def test_automatic_micro_batch_is_stored_and_reused_on_resume(tiny_sd_path, tmp_path, monkeypatch, capsys):
    import b2fast.run.trainer

    used = []

    def spy_update(policy, optimizer, batch, selection, tcfg, *args, **kwargs):
        used.append(tcfg.micro_batch)
        return real_update(policy, optimizer, batch, selection, tcfg, *args, **kwargs)

    real_update = b2fast.run.trainer.policy_update
    monkeypatch.setattr(b2fast.run.trainer, "policy_update", spy_update)
    Trainer(_cfg(tiny_sd_path, tmp_path, "--train.micro_batch", "0")).run_stage(0)
    state = torch.load(tmp_path / "checkpoints" / "stage-000000" / "trainer_state.pt", weights_only=False)
    assert used == [8] and state["micro_batch"] == 8  # measured (8 on a CPU) and stored

    monkeypatch.setattr(b2fast.run.trainer, "auto_micro_batch", lambda *args: 3)  # a GPU would measure anew
    capsys.readouterr()
    Trainer(_cfg(tiny_sd_path, tmp_path, "--train.micro_batch", "0"), resume=str(tmp_path)).run_stage(1)
    assert "train.micro_batch = 8 (automatic" in capsys.readouterr().out
    state = torch.load(tmp_path / "checkpoints" / "stage-000001" / "trainer_state.pt", weights_only=False)
    assert used == [8, 8] and state["micro_batch"] == 8
    # an explicit micro-batch on resume wins
    Trainer(_cfg(tiny_sd_path, tmp_path, "--train.micro_batch", "5"), resume=str(tmp_path)).run_stage(2)
    assert used == [8, 8, 5]


def test_run_stopped_before_its_first_checkpoint_is_started_again_not_resumed(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(_cfg(tiny_sd_path, out, "--schedule.num_stages", "2", "--checkpoint_every", "2")).run_stage(0)
    assert (out / "metrics.jsonl").is_file() and not (out / "checkpoints").exists()  # killed here
    capsys.readouterr()
    assert main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was stopped before its first checkpoint" in err
    assert "neither a checkpoint folder" not in err
    command = err.split("e.g. python -m b2fast.train ")[1].removesuffix(" (its saved config)").split()
    assert command == ["--config", str(out / "config.yaml"), "--out", str(out)]
    assert main(command) == 0  # the suggested command starts the run over, in the same folder
    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages == [0, 1] and (out / "checkpoints" / "latest").read_text().strip() == "stage-000001"

