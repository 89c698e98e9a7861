"""benchmarks/toy_relation_probe.py: on clean renders (a model that knows the relation) every offset
points the asked way; a model that ignores the relation word gives zero mean "along"; the CLI runs on
the shipped toy model and refuses a wrong path in one line and an off-grid timestep; per pair and
word order, a mirrored pair shows where the mean over pairs would cancel it."""
from __future__ import annotations

import pytest
import torch
from bench_util import load_benchmark

probe = load_benchmark("toy_relation_probe")


def test_centroids_of_a_painted_square_are_its_centre():
    images = torch.full((1, 3, 32, 32), -0.8)
    images[0, :, 4:10, 20:26] = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)   # red, centre x 23, y 7
    (x, y), = probe.colour_centroids(images, "red").tolist()
    assert x == pytest.approx(23.0, abs=0.02) and y == pytest.approx(7.0, abs=0.02)   # grey weighs ~1e-6


class Oracle:
    """x̂₀ = a clean render of the prompt (relation known), or of the prompt with 'left of' (ignored)."""

    def __init__(self, ignore_relation: bool):
        self.ignore = ignore_relation

    def __call__(self, prompt, noise, t, guidance_scale):
        from b2fast.toy.grammar import parse

        spec = parse(prompt)
        a, b = spec.objects
        relation = "left of" if self.ignore else spec.relation
        return probe.data_x0((a.colour, a.shape, b.colour, b.shape), relation, noise.shape[0], t)


def test_a_model_that_knows_relations_points_every_offset_the_asked_way():
    rows = probe.probe(Oracle(ignore_relation=False), [900], noises=16, guidance_scale=2.0, seed=0)
    assert len(rows) == 8 and all(r["along"] > 8 for r in rows)   # objects ≥ 10 px apart along the relation


def test_a_model_that_ignores_the_relation_word_cancels_in_pairs():
    rows = [r for r in probe.probe(Oracle(ignore_relation=True), [900], 16, 2.0, 0) if r["source"] == "model"]
    along = {r["relation"]: r["along"] for r in rows}
    assert along["left of"] > 8 and along["right of"] < -8
    assert along["left of"] + along["right of"] == pytest.approx(0.0, abs=1e-6)
    assert abs(along["above"]) < 3 and abs(along["below"]) < 3
    assert "| model, t = 900 |" in probe.table(rows)


def test_cli_on_the_shipped_model_and_a_wrong_path(capsys, tmp_path):
    assert probe.main(["--timesteps", "901", "--noises", "2"]) == 0
    out = capsys.readouterr().out
    assert "| clean renders (data) |" in out and "| model, t = 901 |" in out
    assert "per pair, in both word orders" in out and "| blue square red circle |" in out
    with pytest.raises(SystemExit) as stop:                       # off the 20-step grid
        probe.main(["--timesteps", "950", "--noises", "2"])
    assert stop.value.code == 2 and "--timesteps" in capsys.readouterr().err
    assert probe.main(["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and err.count("\n") == 1


class MirrorsOnePair(Oracle):
    """Knows the relations of every pair but draws the first listed pair's left/right mirrored."""

    def __call__(self, prompt, noise, t, guidance_scale):
        if prompt.startswith(f"a {probe.PAIRS[0][0]} {probe.PAIRS[0][1]} "):
            if "left of" in prompt:
                prompt = prompt.replace("left of", "right of")
            elif "right of" in prompt:
                prompt = prompt.replace("right of", "left of")
        return super().__call__(prompt, noise, t, guidance_scale)


def test_separations_per_pair_and_word_order():
    knows = probe.separations(Oracle(ignore_relation=False), [900], 8, 2.0, 0)
    assert len(knows) == 2 * len(probe.PAIRS)                       # each pair in both word orders
    assert {r["pair"] for r in knows} >= {"red circle blue square", "blue square red circle"}
    assert all(r["lr"] > 20 and r["ab"] > 20 for r in knows)
    ignores = probe.separations(Oracle(ignore_relation=True), [900], 8, 2.0, 0)
    assert all(r["lr"] == pytest.approx(0.0, abs=1e-6) for r in ignores)
    mirrored = {r["pair"]: r["lr"] for r in probe.separations(MirrorsOnePair(False), [900], 8, 2.0, 0)}
    first = " ".join(probe.PAIRS[0])
    assert mirrored[first] < -20 and mirrored[" ".join(probe.swapped(probe.PAIRS[0]))] > 20
    table = probe.separation_table(knows)
    assert f"| {first} |" in table and "t = 900" in table
