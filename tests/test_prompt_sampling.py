"""Stage prompt sampling: several sources, uniform vs balanced draws, determinism, errors."""
import pytest
import torch

from b2fast.config import Config, ConfigError, apply_dict, apply_overrides, load_yaml, validate
from b2fast.prompts import TOY_SETS, load_prompts, prompt_pool, split_sources
from b2fast.run.trainer import stage_generator

DRAWS = 60_000


def _template_shares(pool, seed=0):
    picks = pool.draw(DRAWS, torch.Generator().manual_seed(seed))
    counts = {}
    for g in pool.groups:
        counts[g.name] = int(((picks >= g.start) & (picks < g.stop)).sum()) / DRAWS
    return picks, counts


def test_balanced_toy_gives_each_template_a_third():
    pool = prompt_pool("toy", "train", "balanced")
    assert [g.name for g in pool.groups] == list(TOY_SETS)
    assert pool.prompts == load_prompts("toy", "train")  # the same list, split into templates
    picks, shares = _template_shares(pool)
    assert all(abs(share - 1 / 3) < 0.01 for share in shares.values()), shares
    assert 0 <= int(picks.min()) and int(picks.max()) < len(pool.prompts)
    # within a template, uniform: every one of the 15 attribute prompts is drawn about equally
    attribute = pool.groups[0]
    per_prompt = torch.bincount(picks[picks < attribute.stop], minlength=len(attribute)).float()
    assert len(attribute) == 15
    assert float(per_prompt.min() / per_prompt.max()) > 0.85


def test_uniform_shares_follow_the_list_sizes():
    pool = prompt_pool("toy_attribute,toy_two_object,toy_spatial", "train", "uniform")
    sizes = {name: len(load_prompts(name, "train")) for name in TOY_SETS}
    total = sum(sizes.values())
    _, shares = _template_shares(pool)
    for name, share in shares.items():
        assert abs(share - sizes[name] / total) < 0.01, (name, share)
    assert shares["toy_spatial"] > 0.75 and shares["toy_attribute"] < 0.03  # why the default is balanced
    assert pool.shares()["toy_spatial"] == sizes["toy_spatial"] / total


def test_uniform_draws_exactly_what_runs_always_drew():
    pool = prompt_pool("toy", "train", "uniform")
    assert len(pool.groups) == 1 and pool.prompts == load_prompts("toy", "train")
    for stage, b in [(0, 0), (3, 2)]:
        old = torch.randint(len(pool.prompts), (8,), generator=stage_generator(0, stage, "prompts", b))
        assert torch.equal(pool.draw(8, stage_generator(0, stage, "prompts", b)), old)
    # a single set drawn 'balanced' is uniform too, draw for draw
    one = prompt_pool("toy_attribute", "train", "balanced")
    assert torch.equal(one.draw(8, stage_generator(1, 0, "prompts", 0)),
                       prompt_pool("toy_attribute", "train").draw(8, stage_generator(1, 0, "prompts", 0)))


def test_balanced_is_deterministic_per_seed_stage_and_batch():
    pool = prompt_pool("toy", "train", "balanced")
    a = pool.draw(16, stage_generator(7, 2, "prompts", 1))
    assert torch.equal(a, pool.draw(16, stage_generator(7, 2, "prompts", 1)))
    assert not torch.equal(a, pool.draw(16, stage_generator(7, 2, "prompts", 2)))
    assert not torch.equal(a, pool.draw(16, stage_generator(8, 2, "prompts", 1)))


def test_sources_split_on_commas_only_when_every_part_is_known(tmp_path):
    assert split_sources("toy") == ["toy"]
    assert split_sources("toy_attribute, toy_spatial") == ["toy_attribute", "toy_spatial"]
    odd = tmp_path / "a,b.txt"  # a file whose name holds a comma is one source
    odd.write_text("a red cube\n")
    assert split_sources(str(odd)) == [str(odd)]
    assert load_prompts(str(odd)) == ["a red cube"]
    mine = tmp_path / "mine.txt"
    mine.write_text("x\ny\n")
    assert split_sources(f"toy_attribute,{mine}") == ["toy_attribute", str(mine)]
    assert load_prompts(f"toy_attribute,{mine}") == load_prompts("toy_attribute") + ["x", "y"]
    pool = prompt_pool(f"toy_attribute,{mine}", "train", "balanced")
    assert [len(g) for g in pool.groups] == [15, 2]
    # balanced over [toy, file]: toy's three templates and the file, a quarter each
    _, shares = _template_shares(prompt_pool(f"toy,{mine}", "train", "balanced"))
    assert list(shares) == [*TOY_SETS, str(mine)] and all(abs(s - 0.25) < 0.01 for s in shares.values())
    with pytest.raises(ValueError, match=r"prompts.source: 'nope' \(in 'toy,nope'\) is neither"):
        split_sources("toy,nope")
    with pytest.raises(ValueError, match="prompts.source: 'nope' is neither"):
        load_prompts("nope")
    with pytest.raises(ValueError, match="prompts.sampling"):
        prompt_pool("toy", "train", "stratified")


def test_config_takes_a_yaml_list_or_a_comma_string(tmp_path):
    cfg = apply_dict(Config(), {"prompts": {"source": ["toy_attribute", "toy_spatial"], "sampling": "balanced"}})
    assert validate(cfg).prompts.source == "toy_attribute,toy_spatial"
    cli = apply_overrides(Config(), ["--prompts.source", "toy_attribute,toy_spatial"])
    assert cli.prompts.source == cfg.prompts.source
    path = tmp_path / "c.yaml"
    path.write_text("prompts:\n  source: [toy_attribute, toy_two_object, toy_spatial]\n  sampling: balanced\n")
    assert load_yaml(path).prompts.source == "toy_attribute,toy_two_object,toy_spatial"


@pytest.mark.parametrize("tree, field", [
    ({"prompts": {"sampling": "stratified"}}, "prompts.sampling"),
    ({"prompts": {"source": "toy,,toy_spatial"}}, "prompts.source"),
    ({"prompts": {"source": []}}, "prompts.source"),
    ({"prompts": {"source": ["toy", 3]}}, "prompts.source"),
    ({"prompts": {"source": ["a,b"]}}, "prompts.source"),
])
def test_invalid_prompt_settings_name_the_field(tree, field):
    with pytest.raises(ConfigError, match=rf"^{field}: ") as info:
        validate(apply_dict(Config(), tree))
    assert "\n" not in str(info.value)


def test_default_run_balances_the_toy_templates():
    cfg = validate(load_yaml("default"))
    assert (cfg.prompts.source, cfg.prompts.sampling) == ("toy", "balanced")
    assert Config().prompts.sampling == "uniform"  # the paper's / the library default
