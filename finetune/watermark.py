"""An invisible watermark in every image finetune generates: the DWT-DCT ("dwtDct") scheme of the
invisible-watermark package (`imwatermark`, the one Stable Diffusion's reference scripts use), with a
project-specific 64-bit payload, b"finetune".

Why our own code instead of depending on the package: invisible-watermark 0.2.0 (its last release,
2023) requires `opencv-python` and `torch`; in our venv `pip install invisible-watermark` resolves
`opencv-python 5.0`, a second OpenCV wheel that overwrites the `cv2` of our `opencv-python-headless<5`
(5.x has no Haar cascades, which `prepare` needs). The scheme is a few lines of numpy on PyWavelets,
so it lives here; tests/test_watermark.py checks that the package's own
`WatermarkDecoder('bytes', 64).decode(bgr, 'dwtDct')` reads our mark.

The scheme, as the package's decoder reads it:
- RGB -> OpenCV's uint8 YUV; one level of the Haar DWT over the part of a channel whose sides are
  multiples of 4; the approximation band is cut into 4x4 blocks, taken row by row; block n carries
  payload bit n mod 64;
- in each block the largest-magnitude coefficient other than the first is quantised to
  (k + 1/4) * 36 for a 0 bit or (k + 3/4) * 36 for a 1 bit, keeping its sign; the decoder reads
  `|c| mod 36 > 18` and takes the majority over the repeats of each bit.
(Despite its name the package's dwtDct path applies no DCT to the blocks; what matters for
compatibility is what its decoder reads, and that is what we write.)

Where we differ from the package's encoder, without changing what its decoder reads:
- The package marks only U, where its decoder looks by default. U alone does not survive JPEG: JPEG
  halves the chroma resolution and its decoder interpolates it back, which moves every coefficient
  (measured: the package's own mark on a 512 px photo reads 34-36 wrong bits of 64 after JPEG at
  quality 95, 90, 75 or 50). So we also write the same payload into Y, which JPEG keeps at full
  resolution; the package reads that copy with `decode(bgr, 'dwtDct', scales=[36, 0, 0])`.
- We take the nearest quantisation level (the package always rounds down, up to 3/4 of a step away),
  round instead of truncating to uint8, put the detail bands back in their own places (the package
  swaps horizontal and vertical on the way back), and move a coefficient up by whole steps when its
  new magnitude would no longer be the block's largest (the decoder would then read another one).

Measured on the six bundled photos resized to 512/256/128/64 px (PSNR of the mark 36-38 dB; embedding
takes ~20 ms at 512 px; an unmarked image reads 22-38 wrong bits, and a reading counts as our mark
with at most 8 wrong):
- survives: lossless saves; JPEG quality 90 (0 wrong bits at 256/512 px, at most 7 at 64 px), JPEG
  quality 75 and WebP quality 90 (all detected from 128 px up), JPEG quality 50 (all at 256/512 px);
  +5% brightness; halving and re-enlarging to the same size (256/512 px); cutting rows off the bottom,
  and off the top too when the width is a multiple of 512 px (every block row then holds the same bits).
- does not survive: resizing to another size (0.5x, 0.9x, 1.1x: 25-37 wrong bits), crops from the left
  or right (the bit order in each row moves), crops from the top at other widths, flips and rotations.
- cannot be written: pixels at 0 or 255 cannot move, so blown-out areas carry no mark. The same photos
  brightened 1.4x (large areas clipped at 255) read 1-15 wrong bits at 256 px, 8-18 after JPEG q90;
  a mostly pure-white or pure-black image holds no mark. (Contact sheets use a light grey background
  for this reason.)
The package's decoder refuses images under 256x256 px; ours reads any image with at least 64 blocks
(64x64 px), where each bit is written only once, so small images hold the mark less robustly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from finetune.errors import FinetuneError

PAYLOAD = b"finetune"
"""The 8 bytes (64 bits) finetune writes; read it with WatermarkDecoder('bytes', 64)."""
STRENGTH = 36.0
"""Quantisation step in U's Haar approximation band (the package's default for dwtDct)."""
CHANNELS = {"U": (1, STRENGTH), "Y": (0, STRENGTH)}
"""Where the mark goes: name -> (index in OpenCV's YUV, quantisation step). U is what the package's
decoder reads by default; the copy in Y is the one that survives JPEG (which halves the chroma
resolution), read by the package with `scales=[36, 0, 0]`. (A step of 24 in Y shows 1 dB less but
loses the mark at JPEG q90 on some 64 px images.)"""
BLOCK = 4
MAX_BIT_ERRORS = 8
"""A reading within this many wrong bits of PAYLOAD counts as our mark. Random bits come that close
with probability ~2e-10; JPEG q90 on a 512 px image flips none."""


@dataclass
class WatermarkReading:
    """What the decoder found in one image."""

    detected: bool
    payload: bytes
    """The bytes read (b"" when the image is too small to hold a mark)."""
    bit_errors: int | None
    """How many of the 64 bits differ from PAYLOAD (None when nothing could be read)."""
    channel: str = ""
    """The channel read (U or Y): the one closer to PAYLOAD."""
    note: str = ""


def _payload_bits(payload: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(payload, dtype=np.uint8)).astype(np.int64)


def capacity(width: int, height: int) -> int:
    """How many 4x4 blocks the mark is spread over (each payload bit needs at least one)."""
    return (height // (2 * BLOCK)) * (width // (2 * BLOCK))


def _blocks(band: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The approximation band's 4x4 blocks, row by row, as rows of 16 (a copy)."""
    rows, cols = band.shape[0] // BLOCK, band.shape[1] // BLOCK
    b = band[: rows * BLOCK, : cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3)
    return b.reshape(rows * cols, BLOCK * BLOCK).copy(), rows, cols


def _unblocks(blocks: np.ndarray, band: np.ndarray, rows: int, cols: int) -> None:
    b = blocks.reshape(rows, cols, BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(rows * BLOCK, cols * BLOCK)
    band[: rows * BLOCK, : cols * BLOCK] = b


def _yuv(image: Image.Image) -> tuple[np.ndarray, Image.Image | None]:
    """OpenCV's uint8 YUV of the image (what the package's decoder computes from BGR) and its alpha."""
    import cv2

    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    rgb = np.asarray(image.convert("RGB"))
    return cv2.cvtColor(np.ascontiguousarray(rgb[..., ::-1]), cv2.COLOR_BGR2YUV), alpha


def _band(yuv: np.ndarray, channel: int):
    """One level of the Haar DWT over the part of a channel whose sides are multiples of 4."""
    import pywt

    h4, w4 = yuv.shape[0] // 4 * 4, yuv.shape[1] // 4 * 4
    return pywt.dwt2(yuv[:h4, :w4, channel].astype(np.float64), "haar")


def _embed_channel(yuv: np.ndarray, channel: int, step: float, bits: np.ndarray) -> None:
    """Write `bits` into one channel of `yuv` (in place)."""
    import pywt

    ca, details = _band(yuv, channel)
    blocks, rows, cols = _blocks(ca)
    n = len(blocks)
    idx = np.arange(n)
    want = bits[idx % len(bits)]
    mags = np.abs(blocks[:, 1:])
    pos = np.argmax(mags, axis=1)
    val = blocks[idx, pos + 1]
    # The nearest magnitude that reads as the wanted bit: (k + 1/4) * S for 0, (k + 3/4) * S for 1.
    offset = (0.25 + 0.5 * want) * step
    new = np.maximum(np.round((np.abs(val) - offset) / step), 0) * step + offset
    # The decoder finds the coefficient again as the block's largest (the first one on ties): keep it so.
    mags[idx, pos] = -1.0
    others = mags.max(axis=1)
    short = new <= others
    new[short] += (np.floor((others[short] - new[short]) / step) + 1) * step
    blocks[idx, pos + 1] = np.where(val >= 0, new, -new)
    _unblocks(blocks, ca, rows, cols)
    h4, w4 = yuv.shape[0] // 4 * 4, yuv.shape[1] // 4 * 4
    yuv[:h4, :w4, channel] = np.clip(np.rint(pywt.idwt2((ca, details), "haar")), 0, 255).astype(np.uint8)


def _block_bits(yuv: np.ndarray, channel: int, step: float) -> np.ndarray:
    """The bit each block of one channel reads as (imwatermark's EmbedMaxDct.infer_dct_matrix)."""
    ca, _ = _band(yuv, channel)
    blocks, _, _ = _blocks(ca)
    pos = np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1
    return (np.abs(blocks[np.arange(len(blocks)), pos]) % step) > 0.5 * step


def _read_channel(yuv: np.ndarray, channel: int, step: float, nbits: int) -> np.ndarray:
    """The bits as imwatermark's EmbedMaxDct.decode reads them from one channel: each bit's majority."""
    score = _block_bits(yuv, channel, step)
    n = len(score)
    which = np.arange(n) % nbits
    mean = np.bincount(which, weights=score, minlength=nbits) / np.bincount(which, minlength=nbits)
    return (mean * 255 > 127).astype(np.uint8)  # the package's own threshold


def embed_watermark(image: Image.Image, payload: bytes = PAYLOAD) -> Image.Image:
    """A copy of `image` with `payload` hidden in its U and Y channels (RGB; alpha is kept as it was)."""
    import cv2

    if capacity(image.width, image.height) < len(payload) * 8:
        raise FinetuneError(
            f"a {image.width}x{image.height} image is too small for the invisible watermark (it needs at least "
            f"64x64 px); generate larger images or turn the watermark off (--no-watermark / sample.watermark = false)")
    yuv, alpha = _yuv(image)
    bits = _payload_bits(payload)
    for channel, step in CHANNELS.values():
        _embed_channel(yuv, channel, step, bits)
    bgr = cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)
    out = Image.fromarray(np.ascontiguousarray(bgr[..., ::-1]), "RGB")
    if alpha is not None:
        out.putalpha(alpha)
    return out


def read_watermark(image: Image.Image, payload: bytes = PAYLOAD) -> WatermarkReading:
    """Decode len(payload) bytes from each marked channel as imwatermark's dwtDct decoder does; the
    channel closer to `payload` is reported."""
    nbits = len(payload) * 8
    if capacity(image.width, image.height) < nbits:
        return WatermarkReading(False, b"", None, "", f"{image.width}x{image.height} is too small to hold a mark")
    yuv, _ = _yuv(image)
    want = _payload_bits(payload)
    best = None
    for name, (channel, step) in CHANNELS.items():
        bits = _read_channel(yuv, channel, step, nbits)
        errors = int((bits != want).sum())
        if best is None or errors < best.bit_errors:
            best = WatermarkReading(errors <= MAX_BIT_ERRORS, np.packbits(bits).tobytes(), errors, name)
    return best


def detect_watermark(image: Image.Image) -> bool:
    """Whether `image` carries finetune's mark."""
    return read_watermark(image).detected
