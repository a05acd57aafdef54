"""The recipe on the tiny SDXL: both text encoders, pooled embeddings and micro-conditioning from the manifest."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from finetune.models import load_base
from finetune.provenance import read_provenance
from finetune.train.adapters import read_lora_metadata
from finetune.train.data import micro_conditioning, read_dataset
from finetune.train.lora import finish, fit, setup, trainable
from finetune import runs

from train_helpers import tiny_sdxl_config, write_dataset

PROMPT = "a photo of ohwx person"


def image(pipe, seed: int = 3) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def test_sdxl_lora_trains_and_loads_in_diffusers_to_the_same_image(dataset, tmp_path):
    cfg = tiny_sdxl_config("lora.train_text_encoder=true", "lora.text_encoder_rank=2", "lora.text_encoder_alpha=4",
                           "train.lr=1e-2", "train.text_encoder_lr=1e-2",
                           "sample.prompts=['a photo of [trigger] [class]']")
    run = setup(cfg, dataset, tmp_path / "run")
    assert run.family.name == "sdxl" and run.text is None
    before = {n: p.detach().clone() for n, p in trainable(run).items()}
    assert {n.split(".")[0] for n in before} == {"unet", "text_encoder", "text_encoder_2"}
    fit(run)
    after = trainable(run)
    for prefix in ("unet", "text_encoder", "text_encoder_2"):
        assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix + ".")), prefix
    losses = [json.loads(line)["loss"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))

    for m in (run.denoiser, run.encoders["text_encoder"], run.encoders["text_encoder_2"]):
        m.eval()
    with run.parked.back():  # the VAE left the device once the latents were cached
        in_memory = image(run.base.pipe)
    finish(run)
    out = tmp_path / "run"
    assert json.loads((out / "run.json").read_text())["arch"] == "sdxl"
    meta = read_lora_metadata(out / "lora")
    assert meta["finetune.arch"] == "sdxl" and meta["finetune.te_rank"] == "2"
    keys = load_file(str(out / "lora" / runs.WEIGHT_NAME)).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    # samples at the end, through the SDXL pipeline, with provenance
    prov = read_provenance(out / "samples" / "step-000003" / "0-1.png")
    assert prov["parameters"].startswith(PROMPT) and "Training step: 3" in prov["parameters"]

    fresh = load_base("tiny-sdxl").pipe
    baseline = image(fresh)
    fresh.load_lora_weights(out / "lora")
    np.testing.assert_array_equal(image(fresh), in_memory)
    assert np.abs(in_memory - baseline).max() > 1e-4  # the adapter really changes the image


def test_micro_conditioning_passed_to_the_unet_is_the_manifests(example_photos, tmp_path):
    # Non-square buckets: a centre crop of each photo, so the crop's top-left is not (0, 0).
    names = sorted(p.name for p in example_photos.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    buckets = {n: (64, 48) if i % 2 else (48, 64) for i, n in enumerate(names)}
    dataset = write_dataset(example_photos, tmp_path / "datasets" / "me", buckets=buckets)
    rows = [json.loads(line) for line in (dataset / "manifest.jsonl").read_text().splitlines()]

    def expected(row) -> tuple:  # independently of micro_conditioning: SDXL's convention, from the manifest
        w, h = row["bucket"]
        left, top, right, bottom = row["crop_box"]
        ow, oh = row["original_size"]
        return (oh, ow, round(top * h / (bottom - top)), round(left * w / (right - left)), h, w)

    assert any(expected(r)[2:4] != (0, 0) for r in rows)  # some crops really are offset
    examples = read_dataset(dataset, "ohwx", "person")
    assert [micro_conditioning(ex) for ex in examples] == [expected(r) for r in rows]

    run = setup(tiny_sdxl_config("train.max_steps=4", "train.cache_text=true"), dataset, tmp_path / "run")
    seen = []

    def hook(module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        seen.append((added["time_ids"].detach().clone(), added["text_embeds"].detach().clone(), args[0].shape))

    handle = run.accelerator.unwrap_model(run.denoiser).register_forward_pre_hook(hook, with_kwargs=True)
    batches = []
    next_batch = run.sampler.next

    def recording_next():
        b = next_batch()
        batches.append(b)
        return b

    run.sampler.next = recording_next
    try:
        fit(run)
    finally:
        handle.remove()
    assert len(seen) == len(batches) == 4
    pooled = {c: run.text[c]["pooled"] for c in run.text}
    for batch, (ids, text_embeds, shape) in zip(batches, seen):
        want = torch.tensor([expected(rows[i]) for i in batch.instance], dtype=ids.dtype)
        torch.testing.assert_close(ids.cpu(), want, rtol=0, atol=0)
        h, w = rows[batch.instance[0]]["bucket"][1], rows[batch.instance[0]]["bucket"][0]
        assert tuple(shape[-2:]) == (h // 8, w // 8)
        torch.testing.assert_close(text_embeds.cpu(), pooled[PROMPT][None].cpu().expand_as(text_embeds))


def test_text_conditioning_is_the_pipelines_and_the_cache_returns_it(tmp_path):
    from finetune.train import caching

    base = load_base("tiny-sdxl")
    pipe, family = base.pipe, base.family
    components = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    captions = [PROMPT, ""]
    with torch.no_grad():
        out = family.encode_text(components, captions)
        hidden, pooled = out["hidden"], out["pooled"]
        want_hidden, _, want_pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, want_hidden, rtol=0, atol=0)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=0)

    args = (captions, tmp_path, family.encode_text, components, "id")
    first = caching.cached_text(*args)
    again = caching.cached_text(*args)  # read back from the files
    assert len(list((tmp_path / caching.CACHE_DIR / "text").rglob("*.safetensors"))) == 2
    for i, c in enumerate(captions):
        # the cache encodes one caption at a time: equal to the batch of two up to float rounding
        torch.testing.assert_close(first[c]["hidden"], hidden[i])
        torch.testing.assert_close(first[c]["pooled"], pooled[i])
        torch.testing.assert_close(again[c]["hidden"], first[c]["hidden"], rtol=0, atol=0)
        torch.testing.assert_close(again[c]["pooled"], first[c]["pooled"], rtol=0, atol=0)
