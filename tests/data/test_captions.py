"""Captions: the template, and model captions from a real (tiny, random) transformers BLIP, offline."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.data import captions
from finetune.data.captions import Captioner, compose, fill
from finetune.data.prepare import prepare
from finetune.errors import FinetuneError
from photo_helpers import config

WORD = "smiling"


def test_fill_template():
    assert fill("a photo of [trigger] [class]", "ohwx", "man") == "a photo of ohwx man"
    assert fill("[trigger]  [class],  studio light", "sks", "dog") == "sks dog, studio light"
    assert compose("a photo of ohwx man", "wearing a hat") == "a photo of ohwx man, wearing a hat"
    assert compose("a photo of ohwx man", "") == "a photo of ohwx man"


def test_captioner_not_available_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(FinetuneError, match=r"data.captioner = 'Salesforce/blip-image-captioning-base' is not "
                                            r"available offline .*hf download Salesforce/blip-image-captioning-base"):
        Captioner("Salesforce/blip-image-captioning-base")
    with pytest.raises(FinetuneError, match="no such folder"):
        Captioner(str(tmp_path / "models" / "my-blip"))


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A BLIP captioner built from config with random weights, biased to always say WORD."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny-blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "person", WORD, "hat"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[CLS]", eos_token="[SEP]")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    cfg = BlipConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=2,
                                      eos_token_id=3, pad_token_id=0, sep_token_id=3, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=32)
    model = BlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[vocab.index(WORD)] = 100.0
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


def test_model_captions_are_appended_and_cached(tiny_blip, example_photos, tmp_path, monkeypatch):
    monkeypatch.setattr(captions, "MAX_NEW_TOKENS", 3)
    out = tmp_path / "ds"
    prepare(example_photos, out, config(captioner=str(tiny_blip)), progress=False)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    expected = f"a photo of ohwx person, {WORD} {WORD} {WORD}"
    assert [r["caption"] for r in rows] == [expected] * 6
    assert (out / "images" / "0001.txt").read_text() == expected

    def no_model(*args, **kwargs):
        raise AssertionError("the captioner was loaded although every caption was cached")

    monkeypatch.setattr(captions, "Captioner", no_model)
    again = prepare(example_photos, out, config(captioner=str(tiny_blip), caption_template="[trigger] [class]"),
                    progress=False)
    assert again.processed == 0
    assert (out / "images" / "0001.txt").read_text() == f"ohwx person, {WORD} {WORD} {WORD}"
