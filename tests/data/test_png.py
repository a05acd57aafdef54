"""finetune.data.png: our PNG encoder gives files that any reader decodes to the same pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from finetune.data.png import encode_png


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (64, 65), (512, 512)])
def test_round_trip_is_lossless(size):
    rng = np.random.default_rng(size[0])
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[size[1] // 2:] = pixels[: size[1] - size[1] // 2] // 3  # rows that repeat: the Up filter's case
    image = Image.fromarray(pixels, "RGB")
    data = encode_png(image)
    decoded = Image.open(io.BytesIO(data))
    decoded.load()  # verifies every chunk's CRC and the deflate stream
    assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == size
    assert np.array_equal(np.asarray(decoded), pixels)
    assert encode_png(image.copy()) == data  # same pixels, same bytes (re-runs are byte-identical)


def test_smaller_than_raw_and_decodable_by_opencv(example_photos):
    import cv2

    photo = Image.open(example_photos / "IMG_0001.jpg").convert("RGB")
    data = encode_png(photo)
    assert len(data) < 0.8 * photo.width * photo.height * 3
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(bgr[:, :, ::-1], np.asarray(photo))


def test_refuses_other_modes():
    with pytest.raises(ValueError, match="RGB images, not RGBA"):
        encode_png(Image.new("RGBA", (2, 2)))
