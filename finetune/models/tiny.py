"""The embedded default base: a tiny, architecturally real SD 1.x model with random weights.

Same topology as SD 1.5 (UNet: 4 levels x 2 layers, CrossAttn x3 + Down / Up + CrossAttn x3; VAE: 4
levels x 2 layers, scale factor 8; CLIP text encoder; CLIP BPE tokenizer) with small channels, so
every code path that touches a real SD 1.5 (LoRA targets, single-file key mapping, kohya names) runs
on it. Built deterministically from a seed and cached as a diffusers folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from finetune.filemode import follow_umask

TINY_VERSION = "tiny-sd1-v1"  # bump when the recipe below changes: the cache key follows it
TINY_SEED = 0

# Words the tiny tokenizer knows whole; everything else falls back to single byte-level characters,
# as real CLIP BPE does for rare words.
WORDS = ["a", "photo", "of", "person", "portrait", "man", "woman", "dog", "cat", "ohwx", "sks", "in",
          "the", "as", "an", "astronaut", "painting", "oil", "style", "on", "beach", "with", "and", "red",
          "blue", "green", "close", "up", "smiling", "wearing", "hat", "city", "night", "forest"]

UNET_CONFIG = dict(
    sample_size=8,  # 64 px / 8
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.18215,
)
TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
    bos_token_id=0,  # patched to the real ids below
    eos_token_id=2,
    pad_token_id=1,
)
# SD 1.5's noise schedule.
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values, in their canonical order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path) -> None:
    """A real CLIPTokenizer's files (vocab.json + merges.txt) with a small vocabulary."""
    alphabet = _byte_alphabet()
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab.append(merged)
            parts = [merged] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    seen: dict[str, int] = {}
    for tok in vocab:
        seen.setdefault(tok, len(seen))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(seen, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_tiny_pipeline(seed: int = TINY_SEED):
    """Build the tiny SD 1.x pipeline in memory, deterministically from `seed`."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                  model_max_length=TEXT_CONFIG["max_position_embeddings"])
    text_cfg = dict(TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cache_root() -> Path:
    """Where built models are cached: $FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune"


def cached_build(name: str, key_parts: list, build) -> Path:
    """A diffusers folder under the cache named `name-<hash of key_parts>`, built once with `build()`
    into a temporary folder and renamed into place, so a crash never leaves a half-written model."""
    key = hashlib.sha256(json.dumps(key_parts, default=str).encode()).hexdigest()[:12]
    target = cache_root() / f"{name}-{key}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build().save_pretrained(tmp, safe_serialization=True)
        follow_umask(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: its copy is identical
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_base_dir() -> Path:
    """The tiny base as a diffusers folder, built once and reused."""
    return cached_build(TINY_VERSION, [TINY_VERSION, TINY_SEED, UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, WORDS],
                        build_tiny_pipeline)
