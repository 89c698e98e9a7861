"""Prompt sets: built-in sizes and splits, file formats, and one-line errors."""
import json

import pytest

from b2fast.prompts import ACTIVITIES, ANIMALS, available_prompt_sets, load_prompts


@pytest.mark.parametrize("name, n_train, n_test", [
    ("animal_activity", 45, 90), ("color_fruit", 40, 40), ("spatial", 405, 135)])
def test_builtin_sizes_and_disjoint_splits(name, n_train, n_test):
    train, test = load_prompts(name, "train"), load_prompts(name, "test")
    assert (len(train), len(test)) == (n_train, n_test)
    assert len(set(train)) == n_train and len(set(test)) == n_test
    assert not set(train) & set(test)
    assert load_prompts(name, "all") == train + test
    assert load_prompts(name, "train") == train  # deterministic


def test_animal_activity_has_one_train_activity_per_animal():
    assert len(ANIMALS) == len(set(ANIMALS)) == 45
    train, test = load_prompts("animal_activity", "train"), load_prompts("animal_activity", "test")
    for animal in ANIMALS:
        mine = [p for p in train if p.split(" ", 2)[1] == animal]
        held = [p for p in test if p.split(" ", 2)[1] == animal]
        assert len(mine) == 1 and len(held) == 2
        assert {p.split(" ", 2)[2] for p in mine + held} == set(ACTIVITIES)
    # rotation: every activity is trained on by a third of the animals
    assert all(sum(p.endswith(a) for p in train) == 15 for a in ACTIVITIES)
    assert "an owl playing chess" in train + test


def test_available_prompt_sets():
    assert available_prompt_sets() == sorted(["animal_activity", "color_fruit", "spatial", "toy",
                                              "toy_attribute", "toy_two_object", "toy_spatial"])


def test_toy_sets_are_the_grammar_splits():
    from b2fast.toy.grammar import prompts as toy_prompts
    for template in ("attribute", "two_object", "spatial"):
        for split in ("train", "test"):
            assert load_prompts(f"toy_{template}", split) == toy_prompts(template, split)
    train, test = load_prompts("toy", "train"), load_prompts("toy", "test")
    assert len(train) == sum(len(toy_prompts(t, "train")) for t in ("attribute", "two_object", "spatial"))
    assert not set(train) & set(test)


def test_text_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na red cube\n\n  a blue ball  \n# end\n")
    assert load_prompts(str(path), "train") == ["a red cube", "a blue ball"]
    assert load_prompts(str(path), "test") == ["a red cube", "a blue ball"]


def test_json_list_and_split_object(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(["a", "b"]))
    assert load_prompts(str(flat), "test") == ["a", "b"]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a"], "test": ["b", "c"]}))
    assert load_prompts(str(split), "train") == ["a"]
    assert load_prompts(str(split), "all") == ["a", "b", "c"]
    only_train = tmp_path / "train_only.json"
    only_train.write_text(json.dumps({"train": ["a"]}))
    with pytest.raises(ValueError, match="no 'test' list"):
        load_prompts(str(only_train), "test")


@pytest.mark.parametrize("filename, content, match", [
    ("empty.txt", "# nothing\n\n", "holds no prompts"),
    ("empty.json", "[]", "holds no prompts"),
    ("bad.json", "[\"a\",", "not valid JSON"),
    ("numbers.json", "[1, 2]", "JSON list of non-empty strings"),
    ("blank.json", "[\"a\", \" \"]", "JSON list of non-empty strings"),
])
def test_bad_files_give_one_line_errors(tmp_path, filename, content, match):
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_prompts(str(path), "train")
    assert "\n" not in str(info.value)


def test_unknown_name_missing_file_and_bad_split(tmp_path):
    with pytest.raises(ValueError, match=r"prompts\.source: .* is neither a built-in prompt set"):
        load_prompts("no_such_set", "train")
    with pytest.raises(ValueError, match=r"prompts\.source: .* is neither a built-in prompt set"):
        load_prompts(str(tmp_path / "missing.txt"), "train")
    with pytest.raises(ValueError, match=r"prompts\.split: expected one of"):
        load_prompts("spatial", "validation")
    with pytest.raises(ValueError, match=r"eval_prompts\.source: 'x' is neither"):
        load_prompts("x", "test", section="eval_prompts")


@pytest.mark.parametrize("filename", ["latin1.txt", "latin1.json"])
def test_non_utf8_file_names_the_file_and_the_fix(tmp_path, filename):
    path = tmp_path / filename
    path.write_bytes("a caf\u00e9 on a hill\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        load_prompts(str(path), "train")
    message = str(info.value)
    assert type(info.value) is ValueError  # not the bare UnicodeDecodeError, which names no file
    assert message.startswith(f"prompts.source: {path} is not UTF-8 text") and "save the prompt file as UTF-8" in message
    assert "\n" not in message


def test_field_names_the_source_in_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^--prompts: 'x' is neither"):
        load_prompts("x", "test", field="--prompts")
