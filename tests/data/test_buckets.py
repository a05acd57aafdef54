"""finetune.data.buckets: aspect-ratio buckets as kohya / OneTrainer make them."""

from __future__ import annotations

import pytest

from finetune.data.buckets import bucket_crop, buckets, nearest_bucket


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024])
def test_buckets_are_multiples_of_64_near_the_area(resolution):
    found = buckets(resolution)
    assert (resolution, resolution) in found
    for w, h in found:
        assert w % 64 == 0 and h % 64 == 0
        assert resolution // 2 <= min(w, h) and max(w, h) <= 2 * resolution
        assert w * h <= resolution ** 2
        assert w * h >= 0.7 * resolution ** 2  # each as large as fits its width
        assert (h, w) in found


def test_nearest_bucket_at_512():
    assert nearest_bucket((4000, 3000), 512) == (576, 448)  # 4:3
    assert nearest_bucket((3000, 4000), 512) == (448, 576)
    assert nearest_bucket((1920, 1080), 512) == (640, 384)  # 16:9 (1.78) -> 1.67
    assert nearest_bucket((1000, 1000), 512) == (512, 512)
    assert nearest_bucket((10000, 100), 512) == (1024, 256)  # extreme panoramas go to the widest bucket


def test_bucket_crop_trims_one_side_to_the_bucket_ratio():
    assert bucket_crop((4000, 3000), (576, 448)) == (71, 0, 3928, 3000)
    l, t, r, b = bucket_crop((3000, 4000), (448, 576))
    assert (l, r) == (0, 3000) and (b - t) == round(3000 * 576 / 448)
    assert bucket_crop((512, 512), (512, 512)) == (0, 0, 512, 512)
