"""What a run writes for people watching it: metrics.jsonl, a loss-curve PNG, peak memory."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MiB, what was measured): CUDA allocations on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "rss"


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, flushed at once (a crash keeps what was logged).

    `resume_step`: when continuing a run, lines after that step (written before the stop, then lost
    with the unsaved steps) are dropped so every step appears once.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, **row) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


RAW_COLOUR, SMOOTH_COLOUR = "#9ab8e0", "#1f4e99"
LEGEND = ((RAW_COLOUR, "loss as logged"), (SMOOTH_COLOUR, "smoothed (EMA 0.9)"))
"""The two lines of loss.png, as its legend names them."""


def plot_loss(metrics: Path, out: Path, size: tuple[int, int] = (640, 360)) -> Path:
    """Draw the loss curve (as logged, and smoothed) from metrics.jsonl as a PNG with a legend, PIL only."""
    from PIL import Image, ImageDraw

    rows = [r for r in read_metrics(metrics) if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    w, h = size
    left, right, top, bottom = 60, 16, 28, 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), f"training loss ({Path(metrics).parent.name})", fill="black")
    draw.rectangle([left, top, w - right, h - bottom], outline="#888888")
    if rows:
        steps = [r["step"] for r in rows]
        losses = [r["loss"] for r in rows]
        smooth, ema = [], losses[0]
        for v in losses:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-6
        s0, s1 = min(steps), max(steps)
        s1 = s1 if s1 > s0 else s0 + 1

        def xy(s, v):
            return (left + (s - s0) / (s1 - s0) * (w - left - right),
                    h - bottom - (v - lo) / (hi - lo) * (h - top - bottom))

        if len(rows) > 1:
            draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=RAW_COLOUR, width=1)
            draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=SMOOTH_COLOUR, width=2)
            x = w - right  # the legend, right-aligned in the title strip
            for colour, label in reversed(LEGEND):
                x -= draw.textlength(label) + 30
                draw.line([(x, 14), (x + 18, 14)], fill=colour, width=3)
                draw.text((x + 22, 8), label, fill="black")
        else:
            x, y = xy(steps[0], losses[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=SMOOTH_COLOUR)
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, h - bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, h - bottom + 6), f"step {s0}", fill="black")
        draw.text((w - right - 70, h - bottom + 6), f"step {max(steps)}", fill="black")
    else:
        draw.text((left + 10, h // 2), "no loss logged", fill="black")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out
