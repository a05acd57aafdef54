"""Prior preservation: class images generated once by the base model, reused, and trained beside the instances."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from finetune.config import load_config
from finetune.provenance import read_provenance
from finetune.train.lora import batch_inputs, setup, train
from finetune.train.prior import class_buckets, class_image_folder

from train_helpers import tiny_config, write_dataset

PRIOR = ("train.prior_preservation=true", "train.num_class_images=3", "sample.steps=2", "train.max_steps=2")


def class_files(dataset):
    folders = list((dataset / "class-images").iterdir())
    assert len(folders) == 1
    return sorted(folders[0].glob("*.png"))


def test_class_images_are_generated_once_and_reused(dataset, tmp_path, monkeypatch):
    cfg = tiny_config(*PRIOR)
    calls = []
    real = StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__",
                        lambda self, prompt, **kw: calls.append((prompt, kw["generator"])) or real(self, prompt, **kw))
    train(cfg, dataset, tmp_path / "a")
    files = class_files(dataset)
    assert [f.name for f in files] == ["0000-64x64.png", "0001-64x64.png", "0002-64x64.png"]
    assert sum(len(p) for p, _ in calls) == 3 and all(p == "a photo of person" for p, _ in calls for p in p)
    prov = read_provenance(files[0])
    assert prov["ai_label"] and prov["parameters"].startswith("a photo of person")
    stamps = [f.stat().st_mtime_ns for f in files]

    def refuse(self, *args, **kwargs):
        raise AssertionError("class images generated again")

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", refuse)
    train(cfg, dataset, tmp_path / "b")
    assert class_files(dataset) == files and [f.stat().st_mtime_ns for f in files] == stamps

    # asking for more generates only the missing ones
    calls.clear()
    monkeypatch.setattr(StableDiffusionPipeline, "__call__",
                        lambda self, prompt, **kw: calls.append(prompt) or real(self, prompt, **kw))
    train(tiny_config(*PRIOR, "train.num_class_images=4"), dataset, tmp_path / "c")
    assert calls == [["a photo of person"]] and len(class_files(dataset)) == 4


def test_class_image_folder_is_keyed_by_base_prompt_and_settings(tmp_path):
    cfg = load_config("tiny-demo")
    a = class_image_folder(tmp_path, base_hash="h1", prompt="a photo of person", cfg=cfg)
    assert a.parent == tmp_path / "class-images"
    assert a != class_image_folder(tmp_path, base_hash="h2", prompt="a photo of person", cfg=cfg)
    assert a != class_image_folder(tmp_path, base_hash="h1", prompt="a photo of dog", cfg=cfg)
    cfg.sample.steps += 1
    assert a != class_image_folder(tmp_path, base_hash="h1", prompt="a photo of person", cfg=cfg)
    cfg.train.seed += 1  # the training seed is not part of it: class images survive seed changes
    cfg.sample.steps -= 1
    assert a == class_image_folder(tmp_path, base_hash="h1", prompt="a photo of person", cfg=cfg)


def test_batches_pair_instances_with_class_images_of_their_bucket(example_photos, tmp_path):
    dataset = write_dataset(example_photos, tmp_path / "datasets" / "mixed",
                            buckets={"IMG_0002.jpg": (48, 64), "IMG_0006.jpg": (48, 64)})
    cfg = tiny_config(*PRIOR, "train.num_class_images=4", "train.batch_size=2")
    run = setup(cfg, dataset, tmp_path / "run")
    assert class_buckets(4, [(64, 64), (48, 64)]) == [(48, 64), (64, 64), (48, 64), (64, 64)]
    for f in class_files(dataset):
        w, h = map(int, f.stem.split("-")[1].split("x"))
        assert Image.open(f).size == (w, h)
    class_hidden = run.text["a photo of person"]["hidden"]
    for _ in range(6):
        batch = run.sampler.next()
        latents, hidden, n = batch_inputs(run, batch)
        assert n == len(batch.instance) == len(batch.prior) and latents.shape[0] == 2 * n
        (w, h) = run.examples[batch.instance[0]].bucket
        assert latents.shape[-2:] == (h // 8, w // 8)  # instance and class images share the bucket
        assert all(torch.equal(x, class_hidden) for x in hidden[n:])
        assert not torch.equal(hidden[0], class_hidden)
