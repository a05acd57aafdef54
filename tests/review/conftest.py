"""A fake run folder with a few sample PNGs (solid colours, real provenance) and an HTTP helper."""

import json
import threading
from pathlib import Path
from http.client import HTTPConnection
from urllib.parse import urlsplit

import pytest
from PIL import Image

from finetune.provenance import GenerationInfo, save_generated_png

P0 = "a photo of ohwx person"
P1 = "a portrait of ohwx person as an astronaut, oil painting"


def write_png(run: Path, rel: str, prompt: str, seed: int, scale: float | None, color, extra=None):
    info = GenerationInfo(prompt=prompt, negative_prompt="blurry", steps=4, seed=seed, width=64, height=64,
                          model_name="tiny", loras=[("run", scale)] if scale is not None else [], extra=extra or {})
    return save_generated_png(Image.new("RGB", (64, 64), color), run / rel, info, watermark=False)


@pytest.fixture()
def fake_run(tmp_path) -> Path:
    """6 reviewable images (4 of P0, 2 of P1) as train and `finetune sample` write them, and files to skip."""
    run = tmp_path / "outputs" / "run"
    # Training samples: samples/step-NNNNNN/<prompt index>-<seed>.png
    write_png(run, "samples/step-000100/0-1.png", P0, 1, 1.0, "red", {"Training step": "100"})
    write_png(run, "samples/step-000100/0-2.png", P0, 2, 1.0, "green")  # the step from the folder name
    write_png(run, "samples/step-000100/1-1.png", P1, 1, 1.0, "blue", {"Training step": "100"})
    write_png(run, "samples/step-000200/0-1.png", P0, 1, 1.0, "yellow", {"Training step": "200"})
    write_png(run, "samples/step-000200/1-1.png", P1, 1, 1.0, "purple", {"Training step": "200"})
    # A `finetune sample` gallery: <timestamp>/pNN/<row>-seed<S>.png, a contact sheet, one still being written.
    write_png(run, "gallery/20250101-120000/p01/scale-0_8-seed1.png", P0, 1, 0.8, "orange", {"LoRA scale": "0.8"})
    write_png(run, "gallery/20250101-120000/p01/sheet.png", P0, 1, None, "white",
              {"Sheet rows": "scale 0.8", "Sheet columns": "seeds 1"})
    write_png(run, "gallery/.20250102-090000.partial-x/p01/scale-1-seed1.png", P0, 1, 1.0, "black")
    Image.new("RGB", (128, 64), "white").save(run / "gallery" / "grid.png")  # no settings at all
    (run / "samples" / "notes.txt").write_text("not an image")
    return run


@pytest.fixture()
def server(fake_run):
    """A review server for the fake run on a free port, answering from a background thread."""
    from finetune.review.server import ReviewServer

    srv = ReviewServer(fake_run, 0)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(url: str, method: str, path: str, body=None, headers=None) -> tuple[int, object]:
    """Send `path` exactly as given (no client-side `..` clean-up); returns (status, JSON or bytes)."""
    u = urlsplit(url)
    con = HTTPConnection(u.hostname, u.port, timeout=30)
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    con.request(method, path, body=data, headers=hdrs)
    res = con.getresponse()
    raw = res.read()
    con.close()
    if res.getheader("Content-Type", "").startswith("application/json"):
        return res.status, json.loads(raw)
    return res.status, raw


@pytest.fixture()
def http():
    return request
