"""Config tree: defaults, YAML presets, CLI overrides, one-line validation errors."""
import pytest

from b2fast.config import (Config, ConfigError, apply_overrides, dump_yaml, iter_fields, load_yaml, presets_dir,
                           validate)


def test_defaults_are_the_reference_settings():
    cfg = validate(Config())
    assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.sampling.eta) == (20, 5.0, 1.0)
    assert (cfg.sampling.branches, cfg.sampling.prompts_per_batch, cfg.sampling.batches_per_stage) == (5, 8, 32)
    assert (cfg.schedule.min_interval, cfg.schedule.max_interval, cfg.schedule.num_stages) == (14, 20, 100)
    assert (cfg.selection.history_stages, cfg.selection.pos_threshold, cfg.selection.neg_threshold) == (8, 0.5, -0.5)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.clip_range) == (1e-4, 1e-4, 0.1)
    assert (cfg.train.trajectories_per_step, cfg.train.epochs, cfg.model.lora_rank) == (128, 2, 4)
    assert cfg.model.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.sampling.cache_dtype == "float32"


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = apply_overrides(Config(), ["--train.lr", "3e-4", "--sampling.branches=3",
                                     "--reward.options", "{model_name: ViT-B-32}", "--model.revision", "null"])
    assert cfg.train.lr == 3e-4 and cfg.sampling.branches == 3
    assert cfg.reward.options == {"model_name": "ViT-B-32"} and cfg.model.revision is None
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_yaml(path) == cfg


@pytest.mark.parametrize("args, field", [
    (["--train.lr", "abc"], "train.lr"),
    (["--train.lr", "-1"], "train.lr"),
    (["--train.lr", "inf"], "train.lr"),
    (["--train.clip_range", "0"], "train.clip_range"),
    (["--train.adv_clip", "0"], "train.adv_clip"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2 ** 64)], "seed"),
    (["--train.nope", "1"], "train.nope"),
    (["--sampling.eta", "1.5"], "sampling.eta"),
    (["--sampling.branches", "2.5"], "sampling.branches"),
    (["--sampling.cache_dtype", "int8"], "sampling.cache_dtype"),
    (["--model.attention", "flash"], "model.attention"),
    (["--model.compile_mode", "fast"], "model.compile_mode"),
    (["--sampling.overlap_reward", "yes"], "sampling.overlap_reward"),
    (["--sampling.cuda_graphs", "true", "--model.compile", "true", "--model.compile_mode", "reduce-overhead"],
     "sampling.cuda_graphs"),
    (["--distributed.backend", "mpi"], "distributed.backend"),
    (["--distributed.timeout_s", "0"], "distributed.timeout_s"),
    (["--device", "cudaX"], "device"),
    (["--device", "gpu"], "device"),
    (["--train.micro_batch", "-2"], "train.micro_batch"),
    (["--train.lr_warmup_stages", "-1"], "train.lr_warmup_stages"),
    (["--train.lr_warmup_stages", "100"], "train.lr_warmup_stages"),  # not below schedule.num_stages (100)
    (["--train.momentum", "1"], "train.momentum"),
    (["--schedule.max_interval", "30"], "schedule.max_interval"),
    (["--selection.neg_threshold", "0.7"], "selection.neg_threshold"),
    (["--train.lr"], "train.lr"),
    (["stray"], "stray"),
])
def test_invalid_values_name_the_field(args, field):
    with pytest.raises(ConfigError) as info:
        validate(apply_overrides(Config(), args))
    message = str(info.value)
    assert field in message and "\n" not in message


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(bad)
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in presets_dir().glob("*.yaml")))
def test_shipped_presets_validate(name):
    validate(load_yaml(presets_dir() / name))


def test_every_field_is_documented():
    for name, _, help_text in iter_fields():
        assert help_text, f"{name} has no help text"


def test_differences_name_every_changed_leaf():
    from b2fast.config import differences, to_dict
    old = to_dict(Config())
    new = to_dict(apply_overrides(Config(), ["--train.lr", "3e-4", "--reward.options", "{quality: 50}"]))
    assert differences(old, new) == ["reward.options.quality: None -> 50", "train.lr: 0.0001 -> 0.0003"]
    assert differences(old, to_dict(Config())) == []


def test_config_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train:\n  lr: 1e-4  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_yaml(bad)


def test_config_takes_a_shipped_preset_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name, by_file = load_yaml("tiny_sd_jpeg"), load_yaml(presets_dir() / "tiny_sd_jpeg.yaml")
    assert by_name == by_file and by_name.model.path == "b2fast:tiny-sd"
    assert load_yaml("tiny_sd_jpeg.yaml") == by_file
    presets = r"\(default, .*tiny_sd_jpeg, toy_ddim, toy_ddpo\)"
    with pytest.raises(ConfigError, match=r"no such file 'nope'; .* shipped preset " + presets):
        load_yaml("nope")
    (tmp_path / "tiny_sd_jpeg.yaml").write_text("seed: 7\n")  # a file of that name wins
    assert load_yaml("tiny_sd_jpeg.yaml").seed == 7


def test_readme_configuration_reference_lists_every_field_with_its_default():
    """README's table is the config as it is: a field added or a default changed shows up there."""
    import json
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| `") and line.count("|") >= 4]
    table = {row.split("|")[1].strip().strip("`"): row.split("|")[2].strip().strip("`") for row in rows}
    for name, default, _ in iter_fields():
        assert name in table, f"README's configuration reference lacks {name}"
        assert json.loads(table[name]) == default, f"README says {name} = {table[name]}, config {default!r}"


def test_objective_is_validated_against_the_registry():
    from b2fast.config import OBJECTIVES
    from b2fast.core.objectives import OBJECTIVES as REGISTERED

    assert set(OBJECTIVES) == set(REGISTERED)
    cfg = Config()
    cfg.train.objective = "dpo-typo"
    with pytest.raises(ConfigError, match=r"train\.objective: got 'dpo-typo'.*ppo"):
        validate(cfg)
