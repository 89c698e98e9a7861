"""``python -m b2fast.eval`` on the tiny SD model and the toy world: outputs, same-seed base/trained
columns, several rewards on one sampling, diversity, errors."""
import csv
import json
import math
import os
import stat
import textwrap
from pathlib import Path

import pytest
import torch

import b2fast.eval.cli
import b2fast.eval.evaluator
import b2fast.rewards
from b2fast.eval.cli import main, parse_reward_options
from b2fast.eval.evaluator import EvalRow, image_diversity, mean_pairwise_distance
from b2fast.prompts import TOY_SETS
from b2fast.utils import atomic_write_text, current_umask

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
    from b2fast.core.policy import Policy

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


def _csv(out):
    with (out / "eval.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture()
def sampled(monkeypatch):
    """Every batch of images the evaluator samples, in order (it must sample each set once)."""
    calls = []

    def generate(policy, prompts, cfg, generator):
        calls.append((list(prompts), real(policy, prompts, cfg, generator)))
        return calls[-1][1]

    real = b2fast.eval.evaluator.generate
    monkeypatch.setattr(b2fast.eval.evaluator, "generate", generate)
    return calls


@pytest.fixture()
def built(monkeypatch):
    """The names of the rewards built, in order (each must be built once)."""
    names = []

    def build_reward(name, options=None, device="cpu"):
        names.append(name)
        return real(name, options, device)

    real = b2fast.rewards.build_reward
    monkeypatch.setattr(b2fast.rewards, "build_reward", build_reward)
    return names


@pytest.fixture(scope="module")
def two_reward_options(tmp_path_factory):
    """--reward-options for clipscore on a tiny random CLIP and bertscore on a tiny BLIP + BERT."""
    from b2fast.testing.tiny_captioner import save_tiny_bert, save_tiny_blip
    from b2fast.testing.tiny_clip import register_tiny_clip

    root = tmp_path_factory.mktemp("reward-models")
    return json.dumps({
        "clipscore": {"model_name": register_tiny_clip(), "pretrained": None},
        "bertscore": {"captioner": str(save_tiny_blip(root / "blip")), "scorer": str(save_tiny_bert(root / "bert")),
                      "num_layers": 2, "max_new_tokens": 6}})


def test_untrained_lora_matches_base_and_outputs_are_written(tiny_sd_path, prompt_file, loras, tmp_path):
    out = tmp_path / "eval"
    assert main(_args(tiny_sd_path, prompt_file, "--lora", str(loras / "untrained"), "--out", str(out))) == 0
    record = json.loads((out / "eval.json").read_text())
    base, trained = record["columns"]["base"], record["columns"]["trained"]
    assert [r["n_images"] for r in base] == [4] and record["prompts"][0]["prompts"] == ["a red square", "a blue circle"]
    assert record["arguments"]["images_per_prompt"] == 2
    for key in ROWS:
        assert base[0][key] == trained[0][key], key     # B = 0: identical images, identical numbers
    lines = _csv(out)
    assert [(r["prompt_set"], r["split"], r["column"]) for r in lines] == [("two", "train", "base"),
                                                                         ("two", "train", "trained")]
    for column in ("base", "trained"):
        assert (out / f"grid_two_train_{column}.png").stat().st_size > 0
    assert not list(out.glob(".*.tmp"))
    mode = 0o666 & ~current_umask()  # the usual permissions of a new file, not mkstemp's 0o600
    for name in ("eval.json", "eval.csv", "grid_two_train_base.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name


def test_perturbed_lora_changes_the_numbers(tiny_sd_path, prompt_file, loras, tmp_path):
    out = tmp_path / "eval"
    assert main(_args(tiny_sd_path, prompt_file, "--lora", str(loras / "perturbed"), "--out", str(out))) == 0
    columns = _columns(out)
    base, trained = columns["base"][0], columns["trained"][0]
    assert any(base[key] != trained[key] for key in ROWS)


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


def test_prompts_and_reward_default_to_the_runs(tiny_sd_path, loras, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes((loras / "untrained" /
                                                                     "pytorch_lora_weights.safetensors").read_bytes())
    config = (f"model:\n  path: {tiny_sd_path}\nprompts:\n  source: color_fruit\n"
              "reward:\n  name: jpeg_compressibility\n  options: {quality: 70}\n")
    (run / "config.yaml").write_text(config)
    common = ["--lora", str(run), "--splits", "train", "--prompts-per-set", "1", "--images-per-prompt", "1",
              "--num-steps", "2", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "eval")]) == 0
    arguments = json.loads((tmp_path / "eval" / "eval.json").read_text())["arguments"]
    assert arguments["prompts"] == ["color_fruit"] and arguments["reward"] == ["jpeg_compressibility"]
    # the run's reward options come along (an invalid one shows they are used); --reward overrides
    (run / "config.yaml").write_text(config.replace("70", "0"))
    assert main(common) == 2
    assert "quality: expected an integer in [1, 100], got 0" in _error_line(capsys)
    assert main([*common, "--reward", "jpeg_incompressibility"]) == 0


def test_default_eval_sets_follow_every_source_of_the_run(tmp_path):
    from b2fast.eval.evaluator import default_eval_sets

    assert default_eval_sets("toy") == default_eval_sets("toy_attribute,toy_spatial") == list(TOY_SETS)
    assert default_eval_sets("animal_activity,color_fruit") == ["animal_activity", "color_fruit"]
    mine = tmp_path / "toy_prompts.txt"  # a file whose name starts with "toy" is not the toy world
    mine.write_text("a cat\n")
    assert default_eval_sets(str(mine)) == [str(mine)]
    assert default_eval_sets(f"toy_attribute,{mine}") == ["toy_attribute", str(mine)]


@pytest.mark.parametrize("extra, fragment", [
    (["--images-per-prompt", "0"], "error: --images-per-prompt: got 0, expected an integer >= 1"),
    (["--lora", "no/such/lora"], "error: --lora: no such folder"),
    (["--prompts", "no_such_set"], "error: --prompts: got 'no_such_set'"),
    (["--reward", "no_such_reward"], "error: --reward: unknown reward 'no_such_reward'"),
    (["--reward", "jpeg_compressibility", "no_such_reward"], "error: --reward: unknown reward 'no_such_reward'"),
    (["--reward", "jpeg_compressibility", "--reward-options", "{quality: 0}"],
     "error: --reward-options quality: expected an integer in [1, 100], got 0"),
    (["--reward", "jpeg_compressibility", "--reward-options", "{qualty: 80}"],
     "error: --reward-options: invalid options {'qualty': 80} for reward 'jpeg_compressibility'"),
    (["--model", "./no/such/model"], "error: --model: no such folder"),
    (["--reward-options", "[1, 2]"], "error: --reward-options:"),
    (["--eta", "2"], "error: --eta: got 2.0"),
    (["--reward", "jpeg_compressibility", "jpeg_compressibility"],
     "error: --reward: got ['jpeg_compressibility', 'jpeg_compressibility'], expected distinct reward names"),
    (["--reward", "jpeg_compressibility", "jpeg_incompressibility", "--reward-options", "{quality: 80}"],
     "error: --reward-options: got 'quality', expected one of the --reward names"),
    (["--reward", "jpeg_compressibility", "jpeg_incompressibility", "--reward-options", "[1]"],
     "error: --reward-options: got '[1]', expected a YAML/JSON mapping keyed by reward name"),
    (["--reward", "jpeg_compressibility", "jpeg_incompressibility", "--reward-options", "{jpeg_compressibility: 80}"],
     "error: --reward-options jpeg_compressibility: got 80, expected a mapping"),
    (["--reward", "jpeg_compressibility", "jpeg_incompressibility", "--reward-options",
      "{jpeg_incompressibility: {quality: 0}}"],
     "error: --reward-options jpeg_incompressibility.quality: expected an integer in [1, 100]"),
])
def test_bad_input_gives_one_line_error(tiny_sd_path, prompt_file, extra, fragment, capsys):
    assert main([*_args(tiny_sd_path, prompt_file), *extra]) == 2
    assert _error_line(capsys).startswith(fragment)


@pytest.fixture()
def no_models(monkeypatch):
    """Fails the test if eval gets as far as loading a model (a check came too late)."""
    def load_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the argument check")
    monkeypatch.setattr(b2fast.eval.cli, "load_models", load_models)


def test_bad_out_fails_before_any_model_loads(tiny_sd_path, prompt_file, tmp_path, capsys, no_models):
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me\n")
    for out, fragment in [(a_file, f"error: --out: {str(a_file)!r} is an existing file; give a folder"),
                          (a_file / "eval", f"error: --out: cannot create the folder {str(a_file / 'eval')!r}: "
                                            f"{str(a_file)!r} is a file")]:
        assert main(_args(tiny_sd_path, prompt_file, "--out", str(out))) == 2
        assert _error_line(capsys).startswith(fragment)
    assert a_file.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


def test_out_in_a_read_only_folder_fails_before_any_model_loads(tiny_sd_path, prompt_file, tmp_path, capsys,
                                                                  no_models, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write in any folder: the permission check is what is tested
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    try:
        assert main(_args(tiny_sd_path, prompt_file, "--out", str(locked / "eval"))) == 2
        assert "no write permission in" in _error_line(capsys)
    finally:
        locked.chmod(0o700)
    assert not (locked / "eval").exists()


@pytest.mark.parametrize("content, suffix, fragment", [
    ("[1, 2]", ".json", "must hold a JSON list of non-empty strings"),
    (b"caf\xe9\n", ".txt", "is not UTF-8 text"),
])
def test_bad_prompt_file_names_the_prompts_flag(tiny_sd_path, tmp_path, capsys, content, suffix, fragment,
                                                no_models):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(_args(tiny_sd_path, path)) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: --prompts: {path}") and fragment in line


def test_all_nan_reward_writes_strict_json_and_an_evaluation_warning(tiny_sd_path, prompt_file, tmp_path,
                                                                     monkeypatch):
    """A reward that returns only NaN: the means are NaN, written as null (never a bare NaN token,
    which is not JSON); the warning says the scores are ignored, not 'dropped from selection'."""
    (tmp_path / "nan_reward_mod.py").write_text(textwrap.dedent("""
        import torch

        def all_nan(images, prompts):
            return torch.full((images.shape[0],), float("nan"))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "eval"
    args = [a if a != "jpeg_compressibility" else "nan_reward_mod:all_nan" for a in _args(tiny_sd_path, prompt_file)]
    with pytest.warns(RuntimeWarning) as record:
        assert main([*args, "--out", str(out)]) == 0
    messages = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert messages == ["4 non-finite score(s) out of 4 from reward 'nan_reward_mod:all_nan' are ignored"]

    def no_bare_constants(token):
        raise AssertionError(f"eval.json holds {token}, which is not JSON")

    record = json.loads((out / "eval.json").read_text(), parse_constant=no_bare_constants)
    (row,) = record["columns"]["base"]
    assert row["score"] is None and row["success"] is None and row["scores"] == {"nan_reward_mod:all_nan": None}
    assert math.isfinite(row["diversity"])


def test_atomic_write_and_write_folder_give_the_usual_permissions(tmp_path):
    """mkstemp / mkdtemp make 0o600 / 0o700 (unreadable by the group on a shared cluster); the
    final file / folder gets 0o666 / 0o777 minus the umask, as open() / mkdir() would give."""
    from b2fast.run.checkpoint import save_lora_folder

    class Policy:
        def save_lora(self, folder):
            atomic_write_text(folder / "weights.txt", "w\n")
            os.close(os.open(folder / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors does

    previous = os.umask(0o027)  # not the usual 0o022: the result must follow the umask
    try:
        assert current_umask() == 0o027
        atomic_write_text(tmp_path / "sub" / "a.txt", "x")
        save_lora_folder(Policy(), tmp_path / "lora")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "sub" / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "lora").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "lora" / "weights.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "lora" / "private.bin").stat().st_mode) == 0o640
    assert current_umask() == previous


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--images-per-prompt" in capsys.readouterr().out


def test_vendi_score_counts_distinct_samples():
    from b2fast.eval.evaluator import mean_vendi, vendi_score

    same = torch.randn(1, 16).repeat(5, 1)
    assert vendi_score(same) == pytest.approx(1.0, abs=1e-9)          # five copies: one sample
    assert vendi_score(torch.eye(4)) == pytest.approx(4.0, abs=1e-9)   # orthogonal: four
    mixed = torch.cat([torch.eye(3), torch.eye(3)])                     # three pairs of copies
    assert vendi_score(mixed) == pytest.approx(3.0, abs=1e-9)
    features = torch.randn(12, 8)
    assert 1.0 <= vendi_score(features) <= 12.0
    groups = torch.cat([same[:4], torch.eye(4, 16)])                    # prompt 1: 1, prompt 2: 4
    assert mean_vendi(groups, 4) == pytest.approx(2.5, abs=1e-9)


# ---- several rewards, one sampling -------------------------------------------------------------

def test_two_rewards_on_tiny_sd_sample_once_with_the_same_seeds(tiny_sd_path, prompt_file, loras,
                                                                two_reward_options, sampled, built,
                                                                tmp_path, capsys):
    """clipscore + bertscore side by side: each reward built once, each column sampled once
    (4 images) and scored by both; a zero LoRA gives the base column's images and numbers."""
    out = tmp_path / "eval"
    assert main(_args(tiny_sd_path, prompt_file, "--reward", "clipscore", "bertscore", "--reward-options",
                      two_reward_options, "--lora", str(loras / "untrained"), "--out", str(out))) == 0
    assert built == ["clipscore", "bertscore"]
    assert [len(prompts) for prompts, _ in sampled] == [4, 4]          # base, trained: once each
    assert torch.equal(sampled[0][1], sampled[1][1])                   # same seeds, B = 0
    columns = _columns(out)
    base, trained = columns["base"][0], columns["trained"][0]
    assert list(base["scores"]) == ["clipscore", "bertscore"] and base["successes"] == {}
    assert base["score"] == base["scores"]["clipscore"] and base == trained
    assert 0 <= base["diversity"] <= 2                                 # cosine distance of CLIP embeddings
    lines = _csv(out)
    assert list(lines[0]) == ["prompt_set", "split", "column", "n_prompts", "n_images", "clipscore",
                              "bertscore", "diversity", "vendi"]
    assert [r["column"] for r in lines] == ["base", "trained"]
    assert float(lines[0]["bertscore"]) == pytest.approx(base["scores"]["bertscore"])
    assert "base clipscore" in capsys.readouterr().out


def test_toy_world_end_to_end_keeps_success_and_pixel_diversity(sampled, tmp_path):
    """The default model and reward (b2fast:toy, toy_align): a success column, and diversity on
    8×8-pooled pixels, since toy_align has no image embeddings."""
    out = tmp_path / "eval"
    assert main(["--prompts", "toy_attribute", "--splits", "test", "--prompts-per-set", "2",
                 "--images-per-prompt", "3", "--num-steps", "4", "--device", "cpu", "--out", str(out)]) == 0
    (row,) = _columns(out)["base"]
    assert row["n_images"] == 6 and list(row["successes"]) == ["toy_align"] == list(row["scores"])
    assert row["success"] == row["successes"]["toy_align"] and 0 <= row["success"] <= 1
    (images,) = [images for _, images in sampled]
    # by hand: 8×8 means of pixel blocks, then L2 over the 6 ordered pairs of each prompt's 3 images
    n, c, h, w = images.shape
    pooled = images.double().reshape(n, c, 8, h // 8, 8, w // 8).mean(dim=(3, 5)).flatten(1)
    pairs = [(3 * p + i, 3 * p + j) for p in range(2) for i in range(3) for j in range(3) if i != j]
    assert row["diversity"] == pytest.approx(sum(float((pooled[a] - pooled[b]).norm()) for a, b in pairs)
                                             / len(pairs), rel=1e-5)
    # vendi by another route: the eigenvalues of K/n = X·Xᵀ/n are the squared singular values of X/√n
    vendis = []
    for group in torch.nn.functional.normalize(pooled, dim=1).view(2, 3, -1):
        lam = [float(s) ** 2 / 3 for s in torch.linalg.svdvals(group) if float(s) ** 2 / 3 > 1e-12]
        vendis.append(math.exp(-sum(x * math.log(x) for x in lam)))
    assert row["vendi"] == pytest.approx(sum(vendis) / 2, rel=1e-5)
    assert list(_csv(out)[0])[5:] == ["toy_align", "toy_align_success", "diversity", "vendi"]
    assert (out / "grid_toy_attribute_test_base.png").stat().st_size > 0


def test_reward_options_one_mapping_or_keyed_by_reward():
    one = {"jpeg_compressibility": {"quality": 80}}
    assert parse_reward_options("{quality: 80}", ["jpeg_compressibility"]) == one
    assert parse_reward_options("{jpeg_compressibility: {quality: 80}}", ["jpeg_compressibility"]) == one
    assert parse_reward_options("", ["a", "b"]) == {"a": {}, "b": {}}
    assert parse_reward_options('{"b": {"k": 1}}', ["a", "b"]) == {"a": {}, "b": {"k": 1}}


def test_rows_without_reward_names_read_as_score_and_success():
    """The trainer passes one unnamed reward and reloads stored rows with EvalRow(**row)."""
    legacy = EvalRow("s", "train", 1, 4, score=0.5, success=0.25, diversity=1.0, vendi=2.0)
    assert legacy.reward_cells() == [("score", 0.5), ("success", 0.25)]
    named = EvalRow("s", "train", 1, 4, 0.5, 0.25, 1.0, 2.0, scores={"toy_align": 0.5, "jpeg": -3.0},
                    successes={"toy_align": 0.25})
    assert named.reward_cells() == [("toy_align", 0.5), ("toy_align_success", 0.25), ("jpeg", -3.0)]
    assert EvalRow(**named.as_dict()) == named
    text = b2fast.eval.evaluator.format_rows({"before": [legacy], "after": [legacy]})
    assert text.splitlines()[0].split()[3:] == ["before", "score", "success", "divers.", "vendi",
                                                "after", "score", "success", "divers.", "vendi"]


# ---- diversity ---------------------------------------------------------------------------------

def test_cosine_distance_of_identical_orthogonal_and_opposite_embeddings():
    x = torch.randn(1, 8, dtype=torch.float64)
    assert 0.0 <= mean_pairwise_distance(x.repeat(4, 1), 4, "cosine") <= 1e-12  # identical: 0, never below
    assert mean_pairwise_distance(torch.eye(5), 5, "cosine") == pytest.approx(1.0, abs=1e-12)
    assert mean_pairwise_distance(torch.cat([x, -3 * x]), 2, "cosine") == pytest.approx(2.0, abs=1e-12)
    groups = torch.cat([x.repeat(3, 1), torch.eye(3, 8)])                       # prompt 1: 0, prompt 2: 1
    assert mean_pairwise_distance(groups, 3, "cosine") == pytest.approx(0.5, abs=1e-12)
    assert mean_pairwise_distance(torch.eye(3), 1, "cosine") == 0.0             # one image: no pairs


def test_diversity_and_vendi_of_three_explicit_embeddings():
    """a = (1, 0), b = (0, 2), c = (3, 3), written out: cosine distances 1 (a, b) and 1 − 1/√2
    (a, c and b, c); L2 distances √5, √13, √10; cosine similarities K = [[1, 0, s], [0, 1, s],
    [s, s, 1]] with s = 1/√2, whose eigenvalues are 1 (vector (1, −1, 0)) and 1 ± √2·s = 2, 0."""
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    cosine = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3                       # each pair counted twice
    vendi = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))  # eigenvalues of K/3
    assert mean_pairwise_distance(features, 3, "cosine") == pytest.approx(cosine, abs=1e-12)
    assert mean_pairwise_distance(features, 3, "l2") == pytest.approx(
        (math.sqrt(5) + math.sqrt(13) + math.sqrt(10)) / 3, rel=1e-6)
    from b2fast.eval.evaluator import vendi_score
    assert vendi_score(features) == pytest.approx(vendi, abs=1e-12) == pytest.approx(3 / 2 ** (2 / 3))

    class Fixed:  # a reward with embeddings; a second prompt of three copies of a: distance 0, vendi 1
        def __call__(self, images, prompts):
            return torch.zeros(images.shape[0])

        def image_embeddings(self, images):
            return torch.cat([features, features[:1].repeat(3, 1)])

    got = image_diversity(Fixed(), torch.zeros(6, 3, 8, 8), 3)
    assert got == {"diversity": pytest.approx(cosine / 2, abs=1e-12), "vendi": pytest.approx((vendi + 1) / 2)}


def test_l2_distance_is_the_mean_over_ordered_pairs():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])    # prompt 1: 5, prompt 2: 10
    assert mean_pairwise_distance(points, 2, "l2") == pytest.approx(7.5)


class _Embedder:
    """A reward with image embeddings: one-hot on the image's brightest channel."""

    def __call__(self, images, prompts):
        return torch.zeros(images.shape[0])

    def image_embeddings(self, images):
        return torch.nn.functional.one_hot(images.mean(dim=(2, 3)).argmax(dim=1), 3).float()


def test_diversity_uses_the_first_reward_with_embeddings_else_pooled_pixels():
    images = torch.zeros(4, 3, 16, 16)
    images[0, 0], images[1, 1], images[2, 2], images[3, 2] = 1, 1, 1, 1        # prompt 1: R, G; prompt 2: B, B
    no_embeddings = lambda images, prompts: torch.zeros(images.shape[0])      # noqa: E731  (like toy_align)
    semantic = image_diversity({"toy": no_embeddings, "clip": _Embedder()}, images, 2)
    assert semantic == {"diversity": pytest.approx(0.5), "vendi": pytest.approx(1.5)}  # (1 + 0) / 2, (2 + 1) / 2
    pixels = image_diversity(no_embeddings, images, 2)
    assert pixels["diversity"] == pytest.approx(128 ** 0.5 / 2)  # R vs G: 64 pooled pixels each differ by 1
