"""What `finetune sample` shows: labelled contact sheets (Pillow) and the index.html gallery.

Pure rendering: images and labels in, a sheet image or an HTML page out. finetune/sample.py decides
what goes where and writes the files.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (236, 236, 236)
"""Light grey, not white: the watermark cannot move pixels that are already at 255."""
INK = (20, 20, 20)
MARGIN = 8
GAP = 4


@dataclass
class SheetLayout:
    """Where everything is on a contact sheet (pixel boxes are [left, top, right, bottom])."""

    width: int
    height: int
    tiles: list[list[list[int]]]
    """tiles[row][column]: the box of each image."""
    row_labels: list[str]
    column_labels: list[str]
    title: str


def _font(size: int):
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis so it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(tiles: list[list[Image.Image]], row_labels: list[str], column_labels: list[str],
                  title: str = "") -> tuple[Image.Image, SheetLayout]:
    """Images in a grid, a label left of each row and above each column, a title on top.

    Every tile has the size of tiles[0][0] (one prompt = one image size)."""
    rows, cols = len(tiles), len(tiles[0])
    if len(row_labels) != rows or len(column_labels) != cols or any(len(r) != cols for r in tiles):
        raise ValueError("contact_sheet: labels and tiles disagree")
    tw, th = tiles[0][0].size
    size = max(11, min(20, th // 6))
    font, title_font = _font(size), _font(size + 2)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(measure.textlength(t, font=font) for t in row_labels)) + 2 * GAP
    line = size + 2 * GAP
    top = MARGIN + (line + GAP if title else 0)
    grid_top = top + line
    left = MARGIN + label_w
    width = left + cols * tw + (cols - 1) * GAP + MARGIN
    height = grid_top + rows * th + (rows - 1) * GAP + MARGIN

    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((MARGIN, MARGIN), _fit(draw, title, title_font, width - 2 * MARGIN), font=title_font, fill=INK)
    boxes = []
    for c, label in enumerate(column_labels):
        x = left + c * (tw + GAP)
        draw.text((x + tw / 2, top + line / 2), _fit(draw, label, font, tw), font=font, fill=INK, anchor="mm")
    for r, label in enumerate(row_labels):
        y = grid_top + r * (th + GAP)
        draw.text((MARGIN + label_w - GAP, y + th / 2), label, font=font, fill=INK, anchor="rm")
        row_boxes = []
        for c in range(cols):
            x = left + c * (tw + GAP)
            tile = tiles[r][c]
            if tile.size != (tw, th):
                raise ValueError(f"contact_sheet: tile {r},{c} is {tile.size}, not {(tw, th)}")
            sheet.paste(tile.convert("RGB"), (x, y))
            row_boxes.append([x, y, x + tw, y + th])
        boxes.append(row_boxes)
    return sheet, SheetLayout(width, height, boxes, list(row_labels), list(column_labels), title)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
section { margin-bottom: 3em; }
h2 { font-size: 1.1em; }
.sheet img { max-width: 100%; border: 1px solid #ccc; image-rendering: pixelated; }
.grid { display: grid; gap: 0.6em; }
figure { margin: 0; font-size: 0.8em; }
figure img { width: 100%; image-rendering: pixelated; }
figcaption pre { white-space: pre-wrap; font-size: 0.9em; background: #f6f6f6; padding: 0.4em; }
.settings td { padding: 0 0.8em 0 0; }
.score { display: block; color: #064; } .score.none { color: #777; } .score.bad { color: #a11; }
.scores td, .scores th { padding: 0 0.8em 0 0; text-align: right; } .best { font-weight: 600; }
"""


SHEET_MIN_WIDTH = 720
"""A contact sheet narrower than this is shown at a whole multiple of its size (pixelated) that reaches it."""


def sheet_display_width(width: int) -> int:
    """How wide a page shows a contact sheet of `width` px: the sheet is the overview, so it is the largest
    picture of its section (small sheets are enlarged by whole multiples; the page's width caps it)."""
    return width * max(1, -(-SHEET_MIN_WIDTH // width))


def index_html(title: str, settings: dict[str, str], prompts: list[dict], scores: dict | None = None) -> str:
    """The gallery page. `prompts`: {"prompt", "negative", "sheet" (relative path), "columns", "size"
    ([w, h] of one image), "layout" ({"width": the sheet's width, ...}),
    "images": [{"file", "row", "seed", "parameters"}]}, images in sheet order (row by row).
    The sheet is shown large and each image as a thumbnail (`thumbnail_width`) that links to the file.
    `scores`: what `finetune score` wrote (scores.json), shown beside each image and above the sheets."""
    e = html.escape
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
           '<table class="settings">']
    out += [f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in settings.items()]
    out.append("</table>")
    per_image = {}
    if scores:
        out += scores_section(scores)
        per_image = {im["file"]: image_score(im) for im in scores["images"]}
    for n, p in enumerate(prompts, 1):
        out.append(f'<section id="p{n}"><h2>{n}. {e(p["prompt"])}</h2>')
        if p.get("negative"):
            out.append(f"<p>Negative prompt: {e(p['negative'])}</p>")
        sheet_width = (p.get("layout") or {}).get("width")  # absent from galleries written before it was recorded
        style = f' style="width: {sheet_display_width(sheet_width)}px"' if sheet_width else ""
        out.append(f'<p class="sheet"><a href="{e(p["sheet"])}"><img src="{e(p["sheet"])}"{style} '
                   f'alt="contact sheet for prompt {n}"></a></p>')
        thumb = thumbnail_width((p.get("size") or [256])[0])
        out.append(f'<div class="grid" style="grid-template-columns: repeat({p["columns"]}, {thumb}px)">')
        for im in p["images"]:
            label = f"{im['row']}, seed {im['seed']}"
            out.append(f'<figure><a href="{e(im["file"])}"><img src="{e(im["file"])}" alt="{e(label)}" '
                       f'title="{e(im["parameters"])}" loading="lazy"></a>'
                       f"<figcaption>{e(label)}{per_image.get(im['file'], '')}<details><summary>settings</summary>"
                       f"<pre>{e(im['parameters'])}</pre></details></figcaption></figure>")
        out.append("</div></section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def thumbnail_width(width: int) -> int:
    """How wide a page shows one image: small images twice or more (pixelated), large ones at 256 px,
    so a row of seeds fits the page and the contact sheet stays the largest picture."""
    return max(128, min(256, width)) if width >= 128 else width * -(-128 // width)


_SAMPLES_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.sheet img { max-width: 100%; border: 1px solid #ccc; image-rendering: pixelated; }
table.samples { border-collapse: collapse; }
table.samples th, table.samples td { padding: 0.25em; font-size: 0.85em; font-weight: normal; text-align: center; }
table.samples th.step { text-align: right; white-space: nowrap; }
table.samples img { display: block; image-rendering: pixelated; }
"""


def samples_html(title: str, prompts: list[str], seeds: list[int], steps: list[tuple[int, list[str | None]]],
                 sheet: str | None, image_width: int, sheet_width: int | None = None) -> str:
    """The page of a run's training samples: the prompts, the contact sheet, then one row per step.
    `steps`: (step, files relative to the page, one per prompt x seed, prompt-major; None where missing)."""
    e = html.escape
    thumb = thumbnail_width(image_width)
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title><style>{_SAMPLES_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
           "<ol>", *[f"<li>{e(p)}</li>" for p in prompts], "</ol>"]
    if sheet:
        style = f' style="width: {sheet_display_width(sheet_width)}px"' if sheet_width else ""
        out.append(f'<p class="sheet"><a href="{e(sheet)}"><img src="{e(sheet)}"{style} '
                   f'alt="contact sheet: a row per step, a column per prompt and seed"></a></p>')
    out.append('<table class="samples"><tr><th></th>'
               + "".join(f"<th>prompt {n}, seed {seed}</th>" for n in range(1, len(prompts) + 1) for seed in seeds)
               + "</tr>")
    for step, files in steps:
        cells = []
        for n, file in enumerate(files):
            label = f"step {step}, prompt {n // len(seeds) + 1}, seed {seeds[n % len(seeds)]}"
            cells.append(f'<td><a href="{e(file)}"><img src="{e(file)}" width="{thumb}" alt="{e(label)}" '
                         f'title="{e(label)}" loading="lazy"></a></td>' if file else "<td>—</td>")
        out.append(f'<tr><th class="step">step {step}</th>{"".join(cells)}</tr>')
    out += ["</table>", "</body></html>"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- identity scores (finetune.score)
def image_score(im: dict) -> str:
    """One image's scores as a caption line."""
    what = "class leak" if im["class_prompt"] else "likeness"
    if not im["face"]:
        text, kind = "no face found", "score none"
    else:
        text, kind = f"{what} {im['likeness']:.2f}", "score"
    if im.get("copy_of"):
        text, kind = f"{text}; copies {im['copy_of']}", "score bad"
    return f'<span class="{kind}">{html.escape(text)}</span>'


def scores_section(scores: dict) -> list[str]:
    """The recommendation, the table per checkpoint x scale and the plot against the training step."""
    e = html.escape
    best = scores.get("recommendation") or {}
    out = ['<section id="scores"><h2>Likeness (finetune score)</h2>', f"<p><b>{e(scores['summary'])}</b></p>",
           f'<p>Faces found in {e(scores["faces_found"])} LoRA images. Likeness = 1 - identity distance to the '
           f'subject (the same person above {1 - scores["same_person_under"]:.1f}); class leak = the likeness of '
           f'images whose prompt lacks the trigger (ruled out from {scores["leak_limit"]:.1f}).</p>',
           '<table class="scores"><tr><th>checkpoint</th><th>scale</th><th>likeness</th><th>faces</th>'
           "<th>class leak</th><th>copies</th></tr>"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for c in scores["cells"]:
        mark = ' class="best"' if best and (c["checkpoint"], c["scale"]) == (best["checkpoint"], best["scale"]) else ""
        out.append(f"<tr{mark}><td>{e(c['checkpoint'] or ('base' if c['scale'] == 0 else 'final'))}</td>"
                   f"<td>{c['scale']:g}</td><td>{fmt(c['likeness'])}</td><td>{c['faces']}/{c['images']}</td>"
                   f"<td>{fmt(c['class_leak'])}</td><td>{c['copies']}</td></tr>")
    out.append("</table>")
    out.append(score_plot(scores["cells"]))
    out.append("</section>")
    return out


def score_plot(cells: list[dict], width: int = 560, height: int = 260) -> str:
    """An inline SVG: likeness (solid) and class leak (dashed) against the training step, one colour per
    LoRA scale. Empty when fewer than two steps have a score."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    series: dict[float, dict[str, list[tuple[int, float]]]] = {}
    for c in cells:
        if c["scale"] > 0 and c["step"] is not None:
            for key in ("likeness", "class_leak"):
                if c[key] is not None:
                    series.setdefault(c["scale"], {}).setdefault(key, []).append((c["step"], c[key]))
    steps = sorted({s for d in series.values() for pts in d.values() for s, _ in pts})
    if len(steps) < 2:
        return '<p class="score none">(no plot: scores at fewer than two training steps)</p>'
    left, right, top, bottom = 44, 110, 12, 30
    x = lambda s: left + (s - steps[0]) / (steps[-1] - steps[0]) * (width - left - right)  # noqa: E731
    y = lambda v: top + (1 - v) * (height - top - bottom)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           'aria-label="likeness and class leak against the training step" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           'fill="none" stroke="#bbb"/>']
    for v in (0, 0.5, 1):
        out.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for s in (steps[0], steps[-1]):
        out.append(f'<text x="{x(s):.1f}" y="{height - 12}" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 1}" text-anchor="middle">step</text>')
    for n, (scale, d) in enumerate(sorted(series.items())):
        colour = colours[n % len(colours)]
        for key, dash in (("likeness", ""), ("class_leak", ' stroke-dasharray="5 3"')):
            pts = sorted(d.get(key, []))
            if pts:
                path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts)
                out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{width - right + 8}" y="{top + 14 * (n + 1)}" fill="{colour}">scale {scale:g}</text>')
    out.append(f'<text x="{width - right + 8}" y="{height - bottom}" fill="#555">— likeness</text>')
    out.append(f'<text x="{width - right + 8}" y="{height - bottom + 13}" fill="#555">- - class leak</text>')
    out.append("</svg>")
    return "\n".join(out)
