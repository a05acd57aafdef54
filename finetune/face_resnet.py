"""dlib's face descriptor ResNet, run with NumPy (BLAS matrix products) instead of dlib's own kernels.

The dlib-bin wheels are built without BLAS: one descriptor costs ~80 ms of CPU there, most of what
`finetune prepare` spends on a 12 MP photo. The same network as im2col + NumPy matmul (OpenBLAS)
takes ~10 ms, and gives the same vector within float rounding (tests/test_face_resnet.py compares
the two on real photos). Same weights, same file: `dlib_face_recognition_resnet_model_v1.dat`.

The network (dlib's published metric-learning ResNet): a 150x150 RGB chip, mean-subtracted and
divided by 256; conv 7x7/2 (32), affine, ReLU, max pool 3x3/2; residual blocks of two 3x3 convs
(each followed by a per-channel affine, the first by a ReLU) at 32 (x3), 64 (x4), 128 (x3),
256 (x3) and 256 (x1) channels, the first block of each width striding by 2 with a 2x2/2 average
pool on its shortcut; the sum of differently sized tensors is zero-padded to the larger, as dlib's
add_prev does; ReLU after each sum; global average; a 128x256 linear map.

The file is read in order (dlib writes a network innermost layer first, which is the forward order):
each layer's name, then its parameters and sizes; the layer sequence is checked against the network
above, so a different file is refused rather than run wrong.
"""

from __future__ import annotations

import numpy as np

BLOCKS = [(32, False), (32, False), (32, False), (64, True), (64, False), (64, False), (64, False),
          (128, True), (128, False), (128, False), (256, True), (256, False), (256, False), (256, True)]
"""(channels, downsampling) of each residual block, input to output."""


class FormatError(ValueError):
    pass


class _Reader:
    """dlib's serialization: integers as a control byte (length in the low bits, 0x80: negative)
    and little-endian bytes; strings as a length and bytes; tensors as version 2, four sizes and
    little-endian float32s; doubles as a mantissa and an exponent (two integers)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def int(self) -> int:
        control = self.data[self.pos]
        n = control & 0x0F
        value = int.from_bytes(self.data[self.pos + 1:self.pos + 1 + n], "little")
        self.pos += 1 + n
        return -value if control & 0x80 else value

    def double(self) -> float:
        mantissa = self.int()
        return float(np.ldexp(float(mantissa), self.int()))

    def string(self) -> str:
        n = self.int()
        text = self.data[self.pos:self.pos + n]
        self.pos += n
        return text.decode("latin-1")

    def tensor(self) -> np.ndarray:
        if self.int() != 2:
            raise FormatError(f"unknown tensor version at byte {self.pos}")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos)
        self.pos += 4 * count
        return values.reshape(shape)

    def find(self, names: tuple[str, ...]) -> str:
        """Skip to the next of these layer names (past the bookkeeping a layer writes after its
        parameters: flags and empty gradient tensors) and read it."""
        best = None
        for name in names:
            encoded = bytes([1, len(name)]) + name.encode()
            at = self.data.find(encoded, self.pos, self.pos + NEAR)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, name, encoded)
        if best is None:
            raise FormatError(f"expected one of {names} after byte {self.pos}")
        self.pos = best[0] + len(best[2])
        return best[1]


NEAR = 256
"""A layer's name follows the previous layer's parameters within this many bytes."""
LAYERS = ("input_rgb_image_sized", "con_4", "affine_", "relu_", "max_pool_2", "avg_pool_2", "add_prev_", "fc_2")


def _read_layers(data: bytes) -> list[tuple]:
    r = _Reader(data)
    r.pos = data.find(bytes([1, 21]) + b"input_rgb_image_sized")
    if r.pos < 0:
        raise FormatError("no input_rgb_image_sized layer")
    layers = []
    while True:
        name = r.find(LAYERS)
        if name == "input_rgb_image_sized":
            mean = np.array([r.double(), r.double(), r.double()], dtype=np.float32)
            layers.append(("input", mean, r.int(), r.int()))
        elif name == "con_4":
            params = r.tensor().ravel()
            n, kh, kw, sy, sx, py, px = (r.int() for _ in range(7))
            k = (params.size - n) // (n * kh * kw)
            w = params[:n * k * kh * kw].reshape(n, k, kh, kw)
            # as an (kh*kw*k, n) matrix for patches laid out (row, col, channel), channels last
            layers.append(("conv", np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, n)),
                           params[n * k * kh * kw:].copy(), (kh, kw), (sy, sx), (py, px)))
        elif name == "affine_":
            params = r.tensor().ravel()
            half = params.size // 2
            layers.append(("affine", params[:half].copy(), params[half:].copy()))
        elif name == "relu_":
            layers.append(("relu",))
        elif name in ("max_pool_2", "avg_pool_2"):
            nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
            layers.append(("max" if name == "max_pool_2" else "avg", (nr, nc), (sy, sx), (py, px)))
        elif name == "add_prev_":
            layers.append(("add",))
        elif name == "fc_2":
            outputs, inputs = r.int(), r.int()
            params = r.tensor().reshape(-1, outputs)
            if params.shape[0] != inputs:  # a bias row: not in this network
                raise FormatError(f"fc layer of {params.shape[0]} rows for {inputs} inputs")
            layers.append(("fc", params.copy()))
            break
    return layers


def _expected_kinds() -> list[str]:
    kinds = ["input", "conv", "affine", "relu", "max"]
    for _, down in BLOCKS:
        kinds += ["conv", "affine", "relu", "conv", "affine"] + (["avg"] if down else []) + ["add", "relu"]
    return kinds + ["avg", "fc"]


class FaceResNet:
    """The descriptor network, loaded from dlib's model file; `net(chip)` -> 128 float32s."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            data = f.read()
        try:
            layers = _read_layers(data)
        except (IndexError, ValueError) as e:  # cut short: a size or a tensor runs past the end
            raise FormatError(f"{path} is not a complete dlib face descriptor model ({e})") from None
        kinds = [layer[0] for layer in layers]
        if kinds != _expected_kinds():
            raise FormatError(f"{path} does not hold dlib's face descriptor ResNet (layers: {' '.join(kinds)})")
        self.mean = layers[0][1]
        self.size = (layers[0][2], layers[0][3])
        self.layers = layers[1:]

    def __call__(self, chip: np.ndarray) -> np.ndarray:
        """The 128-d descriptor of an aligned RGB uint8 face chip of the model's size (150x150)."""
        if chip.shape[:2] != self.size or chip.shape[2:] != (3,):
            raise ValueError(f"a face chip must be {self.size[0]}x{self.size[1]} RGB, not {chip.shape}")
        x = (chip.astype(np.float32) - self.mean) / 256.0  # (H, W, C): channels last throughout
        layers = iter(self.layers)
        x = self._run(layers, 4, x)  # conv, affine, relu, max pool
        for _, down in BLOCKS:
            shortcut = x
            x = self._run(layers, 5, x)
            if down:
                shortcut = self._run(layers, 1, shortcut)
            next(layers)  # add
            x = np.maximum(_add_padded(x, shortcut), 0.0)
            next(layers)  # relu (applied above)
        next(layers)  # average over the whole map
        x = x.mean(axis=(0, 1))
        return x @ next(layers)[1]

    @staticmethod
    def _run(layers, count: int, x: np.ndarray) -> np.ndarray:
        for _ in range(count):
            layer = next(layers)
            kind = layer[0]
            if kind == "conv":
                x = _conv(x, *layer[1:])
            elif kind == "affine":
                x = x * layer[1] + layer[2]
            elif kind == "relu":
                x = np.maximum(x, 0.0)
            else:
                x = _pool(x, kind, *layer[1:])
        return x


def _windows(x: np.ndarray, size: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
             fill: float = 0.0) -> np.ndarray:
    """(out_h, out_w, C, kh, kw) views of `x` (H, W, C) as dlib slides a window: out = 1 + (in + 2 pad - k) / stride."""
    if pad != (0, 0):
        x = np.pad(x, ((pad[0], pad[0]), (pad[1], pad[1]), (0, 0)), constant_values=fill)
    v = np.lib.stride_tricks.sliding_window_view(x, size, axis=(0, 1))
    return v[::stride[0], ::stride[1]]


def _conv(x, w, b, size, stride, pad) -> np.ndarray:
    v = _windows(x, size, stride, pad)  # (oh, ow, C, kh, kw)
    oh, ow = v.shape[:2]
    cols = v.transpose(0, 1, 3, 4, 2).reshape(oh * ow, -1)  # patches as (kh, kw, C) rows, matching w
    return (cols @ w + b).reshape(oh, ow, -1)


def _pool(x, kind: str, size, stride, pad) -> np.ndarray:
    if size == (0, 0):
        return x.mean(axis=(0, 1), keepdims=True)
    v = _windows(x, size, stride, pad, fill=-np.inf if kind == "max" else 0.0)
    return v.max(axis=(3, 4)) if kind == "max" else v.mean(axis=(3, 4))


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b, each zero-padded (at the end of every axis) to the larger size."""
    if a.shape == b.shape:
        return a + b
    out = np.zeros(tuple(max(p, q) for p, q in zip(a.shape, b.shape)), dtype=np.float32)
    out[:a.shape[0], :a.shape[1], :a.shape[2]] += a
    out[:b.shape[0], :b.shape[1], :b.shape[2]] += b
    return out
