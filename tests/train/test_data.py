"""Reading a prepared dataset, and the resumable per-bucket batch order."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from finetune.train.data import BucketBatchSampler, dataset_hash, read_dataset, tag_frequency

BUCKETS = [(64, 64)] * 5 + [(48, 64)] * 3 + [(64, 48)] * 2


def take(sampler, n):
    return [sampler.next() for _ in range(n)]


def test_order_is_a_pure_function_of_seed_and_epoch():
    a, b = BucketBatchSampler(BUCKETS, 2, seed=1), BucketBatchSampler(BUCKETS, 2, seed=1)
    assert take(a, 20) == take(b, 20)
    assert a.epoch_batches(3) == BucketBatchSampler(BUCKETS, 2, seed=1).epoch_batches(3)
    assert a.epoch_batches(0) != a.epoch_batches(1)  # reshuffled every epoch
    assert BucketBatchSampler(BUCKETS, 2, seed=2).epoch_batches(0) != a.epoch_batches(0)


def test_every_epoch_covers_every_example_repeats_times_in_single_bucket_batches():
    s = BucketBatchSampler(BUCKETS, 2, seed=0, repeats=3)
    for epoch in range(3):
        batches = s.epoch_batches(epoch)
        assert Counter(i for b in batches for i in b.instance) == {i: 3 for i in range(len(BUCKETS))}
        assert all(len({BUCKETS[i] for i in b.instance}) == 1 for b in batches)
        assert all(1 <= len(b.instance) <= 2 for b in batches)


def test_resumes_mid_epoch_from_its_state():
    straight = BucketBatchSampler(BUCKETS, 2, seed=5)
    expected = take(straight, 17)
    first = BucketBatchSampler(BUCKETS, 2, seed=5)
    head = take(first, 7)  # mid-epoch: 6 batches per epoch
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 1 and state["position"] == 1
    resumed = BucketBatchSampler(BUCKETS, 2, seed=5)
    resumed.load_state_dict(state)
    assert head + take(resumed, 10) == expected
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(BUCKETS, 2, seed=6).load_state_dict(state)


def test_data_parallel_ranks_split_each_epoch_evenly():
    ranks = [BucketBatchSampler(BUCKETS, 2, seed=0, num_replicas=4, rank=r) for r in range(4)]
    per_rank = [r.epoch_batches(0) for r in ranks]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every process
    seen = Counter(i for batches in per_rank for b in batches for i in b.instance)
    assert set(seen) == set(range(len(BUCKETS)))  # all examples (padding repeats a few)
    single = BucketBatchSampler(BUCKETS, 2, seed=0).epoch_batches(0)
    assert [b for batches in zip(*per_rank) for b in batches][:len(single)] == single


def test_prior_batches_name_class_images_of_the_same_bucket():
    prior = [(64, 64), (48, 64), (64, 48)] * 3
    s = BucketBatchSampler(BUCKETS, 2, seed=0, prior_buckets=prior)
    used = Counter()
    for b in take(s, 12):
        assert len(b.prior) == len(b.instance)
        assert {prior[j] for j in b.prior} == {BUCKETS[i] for i in b.instance}
        used.update(b.prior)
    assert len(used) == 9  # drawn from all of them, not always the same
    with pytest.raises(ValueError, match="no class images"):
        BucketBatchSampler(BUCKETS, 2, seed=0, prior_buckets=[(64, 64)])


def test_read_dataset_takes_captions_from_the_editable_txt(dataset):
    examples = read_dataset(dataset, "ohwx", "man")
    assert len(examples) == 6 and all(ex.caption == "a photo of ohwx person" for ex in examples)
    before = dataset_hash(examples)
    (dataset / "images" / "0002.txt").write_text("[trigger] [class], smiling, red hat")
    examples = read_dataset(dataset, "ohwx", "man")
    assert examples[1].caption == "ohwx man, smiling, red hat"
    assert dataset_hash(examples) != before
    assert tag_frequency(examples) == {"a photo of ohwx person": 5, "ohwx man": 1, "smiling": 1, "red hat": 1}


def test_dataset_problems_are_named(dataset, tmp_path):
    with pytest.raises(FinetuneError, match=r"does not exist"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match=r"no manifest.jsonl.*finetune prepare"):
        read_dataset(tmp_path / "empty")
    (dataset / "images" / "0003.png").unlink()
    with pytest.raises(FinetuneError, match=r"manifest.jsonl:3: image .*0003.png is missing"):
        read_dataset(dataset)


def test_prepared_at_reads_dataset_json_else_equal_square_images(tmp_path):
    from finetune.train.data import prepared_at

    rows = [{"image": f"images/{i}.png", "bucket": b, "source": f"/photos/me/{sub}/{i}.jpg"}
            for i, (b, sub) in enumerate([([512, 512], "a"), ([512, 512], "b")])]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dataset.json").write_text(json.dumps({"settings": {"resolution": 768, "crop": "none"}}))
    assert prepared_at(tmp_path) == (768, Path("/photos/me"))  # what prepare said, whatever the buckets
    (tmp_path / "dataset.json").unlink()  # a dataset made by hand: its images' size, when that is one square
    assert prepared_at(tmp_path) == (512, Path("/photos/me"))
    rows[1]["bucket"] = [448, 576]
    del rows[1]["source"]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prepared_at(tmp_path) == (None, None)  # aspect-ratio buckets say no single resolution
