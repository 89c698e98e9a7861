"""``python -m b2fast.eval`` on the tiny SD model: outputs, same-seed base/trained columns, errors."""
import csv
import json

import pytest
import torch

from b2fast.eval import main, resolve_lora

ROWS = ("score", "success", "diversity", "vendi")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on this tiny UNet, OpenMP threads spin-waiting on cores shared with
    another job made sampling ~50x slower (23 s vs 0.45 s per eval run, 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loras(tiny_sd_path, tmp_path_factory):
    """An untrained LoRA (B = 0) and one with noise added to every LoRA weight."""
    from b2fast.config import ModelConfig
    from b2fast.policy import Policy

    root = tmp_path_factory.mktemp("loras")
    torch.manual_seed(1)
    policy = Policy(ModelConfig(path=tiny_sd_path, dtype="float32"), torch.device("cpu"), num_steps=4, eta=1.0)
    policy.save_lora(root / "untrained")
    with torch.no_grad():
        for p in policy.lora_parameters():
            p.add_(0.5 * torch.randn_like(p))
    policy.save_lora(root / "perturbed")
    return root


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "two.txt"
    path.write_text("# two prompts\na red square\na blue circle\n")
    return path


def _args(tiny_sd_path, prompt_file, *extra):
    return ["--model", tiny_sd_path, "--prompts", str(prompt_file), "--splits", "train",
            "--reward", "jpeg_compressibility", "--images-per-prompt", "2", "--num-steps", "4",
            "--device", "cpu", *extra]


def _error_line(capsys) -> str:
    """The one 'error:' line on stderr (transformers may also print loading progress there)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, lines
    return lines[0]


def _columns(out):
    return json.loads((out / "eval.json").read_text())["columns"]


def test_untrained_lora_matches_base_and_outputs_are_written(tiny_sd_path, prompt_file, loras, tmp_path):
    out = tmp_path / "eval"
    assert main(_args(tiny_sd_path, prompt_file, "--lora", str(loras / "untrained"), "--out", str(out))) == 0
    record = json.loads((out / "eval.json").read_text())
    base, trained = record["columns"]["base"], record["columns"]["trained"]
    assert [r["n_images"] for r in base] == [4] and record["prompts"][0]["prompts"] == ["a red square", "a blue circle"]
    assert record["arguments"]["images_per_prompt"] == 2
    for key in ROWS:
        assert base[0][key] == trained[0][key], key     # B = 0: identical images, identical numbers
    lines = list(csv.DictReader((out / "eval.csv").open()))
    assert [(r["prompt_set"], r["split"], r["column"]) for r in lines] == [("two", "train", "base"),
                                                                         ("two", "train", "trained")]
    for column in ("base", "trained"):
        assert (out / f"grid_two_train_{column}.png").stat().st_size > 0
    assert not list(out.glob(".*.tmp"))


def test_perturbed_lora_changes_the_numbers(tiny_sd_path, prompt_file, loras, tmp_path):
    out = tmp_path / "eval"
    assert main(_args(tiny_sd_path, prompt_file, "--lora", str(loras / "perturbed"), "--out", str(out))) == 0
    columns = _columns(out)
    base, trained = columns["base"][0], columns["trained"][0]
    assert any(base[key] != trained[key] for key in ROWS)


def test_resolve_lora_accepts_run_and_checkpoint_folders(loras, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "stage-000001"
    ckpt.mkdir()
    (ckpt / "pytorch_lora_weights.safetensors").write_bytes((loras / "untrained" /
                                                             "pytorch_lora_weights.safetensors").read_bytes())
    (run / "checkpoints" / "latest").write_text("stage-000001\n")
    assert resolve_lora(str(run)) == ckpt                 # no lora/ yet: the latest checkpoint
    (run / "lora").mkdir()
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert resolve_lora(str(run)) == run / "lora"         # a finished run: its final LoRA
    assert resolve_lora(str(ckpt)) == ckpt


def test_lora_shape_and_model_come_from_its_run(tiny_sd_path, prompt_file, loras, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes((loras / "untrained" /
                                                                     "pytorch_lora_weights.safetensors").read_bytes())
    (run / "config.yaml").write_text(f"model:\n  path: {tiny_sd_path}\n  lora_rank: 2\n")  # weights are rank 4
    args = [a for a in _args(tiny_sd_path, prompt_file, "--lora", str(run)) if a != tiny_sd_path]
    args.remove("--model")
    assert main(args) == 2
    assert _error_line(capsys).startswith(f"error: --lora: cannot load {str(run / 'lora')!r} into {tiny_sd_path!r}")


@pytest.mark.parametrize("extra, fragment", [
    (["--images-per-prompt", "0"], "error: --images-per-prompt: got 0, expected an integer >= 1"),
    (["--lora", "no/such/lora"], "error: --lora: no such folder"),
    (["--prompts", "no_such_set"], "error: --prompts: got 'no_such_set'"),
    (["--reward", "no_such_reward"], "error: reward.name: unknown reward 'no_such_reward'"),
    (["--model", "./no/such/model"], "error: model.path: no such folder"),
    (["--reward-options", "[1, 2]"], "error: --reward-options:"),
    (["--eta", "2"], "error: --eta: got 2.0"),
])
def test_bad_input_gives_one_line_error(tiny_sd_path, prompt_file, extra, fragment, capsys):
    assert main([*_args(tiny_sd_path, prompt_file), *extra]) == 2
    assert _error_line(capsys).startswith(fragment)


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--images-per-prompt" in capsys.readouterr().out


def test_vendi_score_counts_distinct_samples():
    from b2fast.evaluation import mean_vendi, vendi_score

    same = torch.randn(1, 16).repeat(5, 1)
    assert vendi_score(same) == pytest.approx(1.0, abs=1e-9)          # five copies: one sample
    assert vendi_score(torch.eye(4)) == pytest.approx(4.0, abs=1e-9)   # orthogonal: four
    mixed = torch.cat([torch.eye(3), torch.eye(3)])                     # three pairs of copies
    assert vendi_score(mixed) == pytest.approx(3.0, abs=1e-9)
    features = torch.randn(12, 8)
    assert 1.0 <= vendi_score(features) <= 12.0
    groups = torch.cat([same[:4], torch.eye(4, 16)])                    # prompt 1: 1, prompt 2: 4
    assert mean_vendi(groups, 4) == pytest.approx(2.5, abs=1e-9)
