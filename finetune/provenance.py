"""Provenance in every PNG this tool generates.

Two labels go into each file:
- the AUTOMATIC1111-style `parameters` text chunk (prompt, sampler, seed, model hash, <lora:...>),
  which A1111, ComfyUI and most image viewers read back;
- an XMP packet with IPTC `DigitalSourceType = trainedAlgorithmicMedia`, the standard label for
  media made by a generative model.
Optionally an invisible watermark in the pixels (finetune.watermark), which survives re-encoding.
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
