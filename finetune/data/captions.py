"""Captions: the template (`[trigger]`, `[class]`), optional model captions, and keeping users' edits.

Each kept image gets images/NNNN.txt (the kohya / ai-toolkit convention). The manifest remembers
what prepare generated ("caption_generated"); a .txt whose text differs from that was edited by the
user and is kept on re-runs unless --overwrite-captions is given.
"""

from __future__ import annotations

import re
from pathlib import Path

from finetune.errors import FinetuneError

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
MAX_NEW_TOKENS = 40


def _word(word: str) -> re.Pattern:
    """`word` as a whole word (not inside another: "ohwx" is not in "ohwxy"), in any case, as CLIP reads it."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def mentions(caption: str, word: str) -> bool:
    """Whether `caption` holds `word` as a whole word."""
    return bool(_word(word).search(caption))


def replace_word(caption: str, old: str, new: str) -> str:
    """`caption` with every whole-word `old` replaced by `new`."""
    return _word(old).sub(lambda _: new, caption)


def fill(template: str, trigger: str, class_word: str) -> str:
    text = template.replace("[trigger]", trigger).replace("[class]", class_word)
    return " ".join(text.split())


def _resolve(spec: str) -> str:
    """A local folder for `spec` (a folder, or a hub id already in the local cache), or a one-line error."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if not HUB_ID.match(spec):
        raise FinetuneError(f"data.captioner = {spec!r}: no such folder, and not a hub id like "
                            "'Salesforce/blip-image-captioning-base'")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, or an offline/cache problem: same advice
        raise FinetuneError(f"data.captioner = {spec!r} is not available offline ({type(e).__name__}); download it "
                            f"first (`hf download {spec}`) or set data.captioner to a local model folder") from None


class Captioner:
    """Any transformers image-text-to-text model (BLIP, GIT, Florence-2, ...) on the CPU or first GPU."""

    def __init__(self, spec: str, prompt: str = ""):
        local = _resolve(spec)
        import torch
        from transformers import pipeline

        try:
            self.pipe = pipeline("image-text-to-text", model=local, device=0 if torch.cuda.is_available() else "cpu",
                                 trust_remote_code=False)
        except Exception as e:
            raise FinetuneError(f"data.captioner = {spec!r} could not be loaded as an image-to-text model "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.prompt = prompt

    def __call__(self, images) -> list[str]:
        out = self.pipe(images=list(images), text=[self.prompt] * len(images), max_new_tokens=MAX_NEW_TOKENS,
                        return_full_text=False)
        texts = [(o[0] if isinstance(o, list) else o)["generated_text"] for o in out]
        return [" ".join(str(t).split()).strip(" ,.") for t in texts]


def compose(base: str, model_caption: str) -> str:
    return f"{base}, {model_caption}" if model_caption else base
