"""metrics.jsonl and the loss curve."""

from __future__ import annotations

import math

from PIL import Image

from finetune.train.metrics import MetricsLog, plot_loss, read_metrics


def test_metrics_log_appends_and_a_resume_drops_lines_after_its_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (10, 20, 30):
        log.write(step=step, loss=1.0 / step)
        assert len(read_metrics(path)) == step // 10  # flushed at once: a crash keeps what was logged
    log.close()
    resumed = MetricsLog(path, resume_step=20)  # the steps after the checkpoint are trained again
    resumed.write(step=30, loss=0.5)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(10, 0.1), (20, 0.05), (30, 0.5)]


def test_loss_curve_png(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 51):
        log.write(step=step, loss=1.0 + math.sin(step) * 0.1 - step * 0.01)
    log.write(step=51, loss=float("nan"))  # skipped, not drawn
    log.close()
    out = plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    with Image.open(out) as im:
        assert im.size == (640, 360)
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert (31, 78, 153) in colours  # the smoothed curve was drawn
    assert not list(tmp_path.glob(".*.tmp"))


def test_loss_curve_has_a_legend_naming_both_lines(tmp_path):
    """Issue 13 item 20: loss.png had two unlabelled lines. The legend sits in the title strip, above the
    plot: a swatch of each line's colour beside its label."""
    from finetune.train.metrics import LEGEND

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 21):
        log.write(step=step, loss=1.0 / step)
    log.close()
    with Image.open(plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")) as im:
        strip = im.convert("RGB").crop((0, 0, im.width, 28))  # above the plot's frame
        colours = {c for _, c in strip.getcolors(1 << 20)}
    assert [label for _, label in LEGEND] == ["loss as logged", "smoothed (EMA 0.9)"]
    assert {(154, 184, 224), (31, 78, 153)} <= colours  # both lines' colours, as swatches
