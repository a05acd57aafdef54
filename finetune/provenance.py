"""Provenance in every PNG this tool generates.

Two labels go into each file:
- the AUTOMATIC1111-style `parameters` text chunk (prompt, sampler, seed, model hash, <lora:...>),
  which A1111, ComfyUI and most image viewers read back;
- an XMP packet with IPTC `DigitalSourceType = trainedAlgorithmicMedia`, the standard label for
  media made by a generative model.
Optionally an invisible watermark in the pixels (finetune.watermark), which survives JPEG re-encoding
(the text chunks do not). `check_image` reads all three back (`finetune verify`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

IPTC_TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
SOFTWARE = "finetune"


@dataclass
class GenerationInfo:
    """The settings that made one image."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    sampler: str = "DDIM"
    cfg_scale: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    model_name: str = ""
    model_hash: str = ""
    loras: list[tuple[str, float]] = field(default_factory=list)
    """(name, scale) of each LoRA applied; written as <lora:name:scale> like A1111 prompts."""
    extra: dict[str, str] = field(default_factory=dict)
    """More `Key: value` pairs for the parameters line (e.g. Checkpoint: step-000200)."""

    def parameters(self) -> str:
        """The A1111 `parameters` text: prompt line, negative line, then `Key: value` pairs."""
        prompt = self.prompt + "".join(f" <lora:{name}:{scale:g}>" for name, scale in self.loras)
        pairs = {
            "Steps": self.steps,
            "Sampler": self.sampler,
            "CFG scale": f"{self.cfg_scale:g}",
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
        }
        if self.model_hash:
            pairs["Model hash"] = self.model_hash[:10]
        if self.model_name:
            pairs["Model"] = self.model_name
        pairs.update(self.extra)
        pairs["Software"] = SOFTWARE
        lines = [prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items()))
        return "\n".join(lines)


def _quote(value) -> str:
    text = str(value)
    return f'"{text}"' if ("," in text or ":" in text) and not text.startswith('"') else text


def xmp_packet(description: str = "") -> str:
    """An XMP packet labelling the image as made by a trained generative model (IPTC)."""
    desc = description.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
        '    xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
        f'    Iptc4xmpExt:DigitalSourceType="{IPTC_TRAINED_ALGORITHMIC_MEDIA}"\n'
        f'    xmp:CreatorTool="{SOFTWARE}">\n'
        f'   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">{desc}</rdf:li></rdf:Alt></dc:description>\n'
        '  </rdf:Description>\n'
        ' </rdf:RDF>\n'
        '</x:xmpmeta>\n'
        '<?xpacket end="w"?>'
    )


def save_generated_png(image: Image.Image, path: str | Path, info: GenerationInfo, watermark: bool = True) -> Path:
    """Write a generated image as PNG with its provenance (and watermark), atomically."""
    path = Path(path)
    if watermark:
        from finetune.watermark import embed_watermark

        image = embed_watermark(image)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", info.parameters())
    meta.add_text("Software", SOFTWARE)
    meta.add_itxt("XML:com.adobe.xmp", xmp_packet(info.prompt))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=meta)
    os.replace(tmp, path)
    return path


def read_provenance(path: str | Path) -> dict:
    """What a PNG/JPEG says about its origin: the parameters text and whether the XMP AI label is there."""
    with Image.open(path) as im:
        info = dict(im.info)
        xmp = info.get("xmp") or info.get("XML:com.adobe.xmp") or b""
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    return {
        "parameters": info.get("parameters"),
        "software": info.get("Software"),
        "ai_label": "trainedAlgorithmicMedia" in xmp,
    }


@dataclass
class ImageCheck:
    """What one image says about its origin (`finetune verify`)."""

    path: Path
    format: str
    size: tuple[int, int]
    parameters: str | None
    """The A1111 `parameters` text, if the file has one."""
    software: str | None
    ai_label: bool
    """Whether its XMP says IPTC DigitalSourceType = trainedAlgorithmicMedia."""
    watermark: object
    """A finetune.watermark.WatermarkReading."""

    def report(self) -> str:
        """Readable lines for the terminal."""
        w = self.watermark
        if w.detected:
            # As text ("finetune"); a reading with a few wrong bits may hold bytes that print as \x.. escapes.
            text = "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in w.payload)
            mark = f'detected: "{text}" in {w.channel} ({w.bit_errors} of 64 bits off)'
        elif w.bit_errors is None:
            mark = f"not detected ({w.note})"
        else:
            mark = f"not detected (the closest reading is {w.bit_errors} of 64 bits off)"
        lines = [f"{self.path}  [{self.format} {self.size[0]}x{self.size[1]}]"]
        if self.parameters:
            first, *rest = self.parameters.splitlines()
            lines.append(f"  parameters: {first}")
            lines += [f"              {line}" for line in rest]
        else:
            lines.append("  parameters: none")
        lines.append("  AI label:   " + ("XMP Iptc4xmpExt:DigitalSourceType = trainedAlgorithmicMedia"
                                         if self.ai_label else "none"))
        if self.software:
            lines.append(f"  software:   {self.software}")
        lines.append(f"  watermark:  {mark}")
        return "\n".join(lines)


def check_image(path: str | Path) -> ImageCheck:
    """Provenance metadata and watermark of one image file; FinetuneError if it is not a readable image."""
    from PIL import UnidentifiedImageError

    from finetune.errors import FinetuneError
    from finetune.watermark import read_watermark

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            fmt, size = im.format or "?", im.size
            reading = read_watermark(im)
        meta = read_provenance(path)
    except (OSError, UnidentifiedImageError) as e:
        raise FinetuneError(f"{path} cannot be read as an image ({e})") from None
    return ImageCheck(path=path, format=fmt, size=size, parameters=meta["parameters"], software=meta["software"],
                      ai_label=meta["ai_label"], watermark=reading)
