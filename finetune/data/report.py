"""report.html: one self-contained page showing what prepare did with every input.

Thumbnails are embedded (base64 JPEG) so the page can be moved or mailed; nothing in it depends on
the time or machine, so an unchanged dataset gives a byte-identical page.
"""

from __future__ import annotations

import json
from html import escape

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;width:468px}
.card.bad{width:240px;border-color:#e3b4b4}
.pair{display:flex;gap:8px;align-items:flex-start}
.pair img{max-width:224px;max-height:224px;background:#eee}
.name{font-weight:600;word-break:break-all}.cap{font-family:ui-monospace,monospace;margin:4px 0}
.card.warn{border:3px solid #e69500;background:#fff6e0}.warn-box{background:#fff6e0;border-left:4px solid #e69500;padding:6px 10px}
.note{color:#666;font-size:12px}.reason{color:#a11}.edited{color:#06c;font-size:12px}
table{border-collapse:collapse}td{padding:2px 12px 2px 0}code{font-size:12px}
"""


def _img(b64: str | None, alt: str) -> str:
    if not b64:
        return '<div class="note">(no preview)</div>'
    return f'<img src="data:image/jpeg;base64,{b64}" alt="{escape(alt)}">'


def render(name: str, summary: str, counts: dict, settings: dict, kept: list[dict], rejected: list[dict],
           ignored: list[tuple[str, str]], notices: list[str] = ()) -> str:
    """kept: {image, source, caption, caption_edited, thumb, crop_thumb, notes, distance (to the subject,
    or None), flag (why the face seems someone else's, or None), no_face (face crop mode found none)};
    rejected: {source, reason, thumb or None}; ignored: (path, why). Paths are display strings."""
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>finetune prepare: {escape(name)}</title><style>{STYLE}</style></head><body>",
           f"<h1>Dataset {escape(name)}</h1>", f"<p>{escape(summary)}</p>"]
    out.extend(f'<p class="note">{escape(n)}</p>' for n in notices)
    out.append("<table>")
    for key, value in counts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{v} {k}" for k, v in value.items()) or "none"
        out.append(f"<tr><td>{escape(str(key).replace('_', ' '))}</td><td>{escape(str(value))}</td></tr>")
    out.append("</table>")
    faceless = [k for k in kept if k.get("no_face")]
    if faceless:
        names = ", ".join(f'<a href="#{escape(k["image"])}">{escape(k["source"])}</a>' for k in faceless)
        out.append(f'<p class="warn-box">Kept without a face ({len(faceless)}): {names}. They were centre-cropped '
                   "and captioned like the others: check that they show the subject (the detector also misses "
                   "faces turned away or looking down); remove the others from the photo folder, or set "
                   "data.require_face = true to reject every photo without a face.</p>")
    out.append(f"<h2>Kept ({len(kept)})</h2>")
    out.append('<p class="note">Left: the photo, with the crop in white, the face used in green and other faces '
               "in orange. Right: the training image, its caption (edit images/NNNN.txt to change it).</p>")
    out.append('<div class="grid">')
    for k in kept:
        edited = '<div class="edited">caption edited by you: kept</div>' if k.get("caption_edited") else ""
        notes = "".join(f'<div class="note">{escape(n)}</div>' for n in k.get("notes", []))
        if k.get("distance") is not None:
            notes += f'<div class="note">distance to the subject: {k["distance"]:.2f}</div>'
        if k.get("flag"):
            notes += f'<div class="reason">{escape(k["flag"])}</div>'
        warn = " warn" if k.get("no_face") or k.get("flag") else ""
        out.append(f'<div class="card{warn}" id="{escape(k["image"])}">'
                   f'<div class="pair">{_img(k["thumb"], k["source"])}'
                   f'{_img(k["crop_thumb"], k["image"])}</div>'
                   f'<div class="name">{escape(k["image"])} &larr; {escape(k["source"])}</div>'
                   f'<div class="cap">{escape(k["caption"])}</div>{edited}{notes}</div>')
    out.append("</div>")
    out.append(f"<h2>Rejected ({len(rejected)})</h2>")
    out.append('<div class="grid">')
    for r in rejected:
        out.append(f'<div class="card bad">{_img(r.get("thumb"), r["source"])}'
                   f'<div class="name">{escape(r["source"])}</div>'
                   f'<div class="reason">{escape(r["reason"])}</div></div>')
    out.append("</div>")
    if ignored:
        out.append(f"<h2>Ignored files ({len(ignored)})</h2><ul>")
        out.extend(f"<li><code>{escape(p)}</code>: {escape(why)}</li>" for p, why in ignored)
        out.append("</ul>")
    out.append("<h2>Settings</h2><table>")
    # as a preset or --set writes them (true, "ohwx"), not as Python prints them (True, 'ohwx')
    out.extend(f"<tr><td>data.{escape(k)}</td><td><code>{escape(json.dumps(v))}</code></td></tr>" for k, v in settings.items())
    out.append("</table></body></html>\n")
    return "\n".join(out)
