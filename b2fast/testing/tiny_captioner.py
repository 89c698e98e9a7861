"""Tiny random-weight BLIP captioner and BERT scorer, so the ``bertscore`` reward can be tested offline.

Both are built from small configs and saved with ``save_pretrained`` in the Hugging Face folder
layout, so the reward loads them through the same ``from_pretrained`` path as
``Salesforce/blip-image-captioning-large`` and ``roberta-large``. The tokenizers are WordPiece
(BERT) tokenizers over a small vocabulary written here: a few whole words, the letters and their
``##`` continuations, so any lower-case text tokenizes without a vocabulary download.
:func:`save_blip` also builds full-size BLIP architectures, for ``python -m b2fast.bench rewards``.
"""
from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path
from typing import Sequence

import torch

TINY_WORDS = ("a", "an", "the", "of", "on", "with", "in", "and", "cat", "dog", "red", "blue", "green",
              "apple", "bike", "riding", "table", "cup", "chess", "playing", "photo", "man", "woman")
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0-4, as BERT orders them


def build_bert_tokenizer(words: Sequence[str] = TINY_WORDS):
    """A BertTokenizer over specials, ``words``, letters/digits, their ``##`` forms and punctuation.

    The ``vocab.txt`` is written to a temporary folder and loaded with
    ``BertTokenizer.from_pretrained`` rather than the constructor, whose arguments differ between
    transformers 4 (``vocab_file``) and 5 (``vocab``); save the result where it is needed.
    """
    from transformers import BertTokenizer

    letters = list(string.ascii_lowercase + string.digits)
    vocab = _SPECIAL + list(dict.fromkeys(w.lower() for w in words if w.lower() not in letters)) + letters \
        + ["##" + c for c in letters] + list(string.punctuation)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8")
        return BertTokenizer.from_pretrained(tmp, do_lower_case=True)


def save_tiny_blip(folder: str | os.PathLike, seed: int = 0, image_size: int = 32,
                   words: Sequence[str] = TINY_WORDS) -> Path:
    """Save a 2-layer BLIP captioning model + ``BlipProcessor`` (images ``image_size``²) to ``folder``."""
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    # Vision init 0.5 (default 0.02): with 0.02, 8 random images all got the same caption.
    return save_blip(folder, dict(small, max_position_embeddings=64),
                     dict(small, image_size=image_size, patch_size=8, initializer_range=0.5),
                     projection_dim=32, seed=seed, words=words)


def save_blip(folder: str | os.PathLike, text: dict, vision: dict, projection_dim: int, seed: int = 0,
              words: Sequence[str] = TINY_WORDS, end_captions: bool = True) -> Path:
    """Save a random-weight BLIP captioning model (``text``/``vision`` config fields) + its
    ``BlipProcessor`` (images ``vision["image_size"]``²) to ``folder``.

    Like the real BLIP tokenizer, ``[DEC]`` is the decoder's bos token and ``[SEP]`` ends a
    caption. Random weights mostly predict special tokens, which ``skip_special_tokens`` would
    turn into empty captions; their output biases are lowered so captions have words in them.
    With ``end_captions=False`` ``[SEP]`` is lowered too, so every caption runs to
    ``max_new_tokens`` (benchmarks: a fixed, worst-case caption length).
    """
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder = Path(folder)
    tokenizer = build_bert_tokenizer(words)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    sep = tokenizer.sep_token_id
    config = BlipConfig(
        text_config=dict(text, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id, sep_token_id=sep, eos_token_id=sep),
        vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        special = [i for i in tokenizer.all_special_ids if i != sep or not end_captions]
        model.text_decoder.cls.predictions.bias[special] = -100.0
    size = vision["image_size"]
    image_processor = BlipImageProcessor(size={"height": size, "width": size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_bert(folder: str | os.PathLike, seed: int = 0, num_layers: int = 3,
                   words: Sequence[str] = TINY_WORDS) -> Path:
    """Save a ``num_layers``-layer BERT encoder + its tokenizer to ``folder`` (a BERTScore scorer)."""
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    tokenizer = build_bert_tokenizer(words)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                        num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=128)
    tokenizer.model_max_length = config.max_position_embeddings
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
