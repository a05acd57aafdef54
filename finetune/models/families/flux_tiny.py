"""The embedded FLUX.1 test bases: tiny, architecturally real Flux models with random weights
(`--base tiny-flux` like FLUX.1-dev, `--base tiny-flux-schnell` like FLUX.1-schnell).

Same topology as FLUX.1, with small widths: a `FluxTransformer2DModel` of double-stream and
single-stream blocks with 3-axis RoPE over packed 2x2 latent patches (64 input channels), a guidance
embedding on the dev variant; a CLIP-L-shaped `CLIPTextModel` whose pooled output conditions the
modulation; a T5-v1.1-shaped `T5EncoderModel` (gated GELU, relative position buckets) whose hidden
states are the text tokens; a 16-channel VAE without quant convs and with Flux's latent scale and
shift; FLUX.1's flow-matching scheduler settings. The tokenizers are real (CLIP byte-level BPE, T5
Unigram with SentencePiece's `▁` spaces), built locally with a small vocabulary.

Each variant is cached in both layouts people have: a diffusers folder, and the split files that
ComfyUI users have (an original-layout transformer, `clip_l`, `t5xxl`, `ae`) with a base spec naming
them (`flux_files.py` reads it).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from finetune.models import tiny

TINY_FLUX_VERSION = "tiny-flux-v1"  # bump when the recipe below changes: the cache key follows it
TINY_FLUX_SEED = 0
VARIANTS = ("dev", "schnell")

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x a 2x2 patch, as FLUX.1
    num_layers=2,  # FLUX.1: 19 double-stream blocks
    num_single_layers=2,  # FLUX.1: 38 single-stream blocks
    attention_head_dim=16,  # FLUX.1: 128
    num_attention_heads=2,  # FLUX.1: 24
    joint_attention_dim=32,  # the T5 width (FLUX.1: 4096)
    pooled_projection_dim=32,  # the CLIP width (FLUX.1: 768)
    axes_dims_rope=(4, 6, 6),  # FLUX.1: (16, 56, 56); sums to the head width
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),  # FLUX.1: (128, 256, 512, 512)
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
CLIP_CONFIG = dict(tiny.TEXT_CONFIG)
T5_CONFIG = dict(
    d_model=32,  # FLUX.1's t5xxl: 4096
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",  # T5 v1.1
    dense_act_fn="gelu_new",
    is_gated_act=True,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
T5_MAX_LENGTH = 32  # FLUX.1-dev: 512, schnell: 256; short here so the tests stay fast
# FLUX.1's scheduler_config.json: dev shifts by resolution, schnell does not shift.
SCHEDULER_CONFIGS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
}
# The split single files, as ComfyUI names them.
SPLIT_FILES = {"transformer": "flux1-{variant}-tiny.safetensors", "clip_l": "clip_l.safetensors",
               "t5xxl": "t5xxl_tiny.safetensors", "ae": "ae.safetensors"}
BASE_SPEC = "base.toml"


def write_t5_tokenizer(folder: Path):
    """A real T5 tokenizer (SentencePiece-style Unigram: `▁` marks a word start, `</s>` ends every
    text, unknown characters become `<unk>`) over the tiny CLIP vocabulary's words plus single
    characters; saved as transformers does and returned."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # T5's special ids: pad 0, eos 1, unk 2. Whole words score higher than their characters.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -2.0) for w in tiny.WORDS]
    pieces += [("▁", -3.0)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                           normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                         model_max_length=T5_MAX_LENGTH)
    t5.save_pretrained(str(folder))
    return t5


def build_tiny_flux_pipeline(variant: str = "dev", seed: int = TINY_FLUX_SEED):
    """Build the tiny Flux pipeline in memory, deterministically from `seed`."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    if variant not in VARIANTS:
        raise ValueError(f"tiny Flux variant {variant!r}: expected one of {VARIANTS}")
    with tempfile.TemporaryDirectory() as tmp:
        tiny.write_tokenizer(Path(tmp) / "clip")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "clip" / "vocab.json"), str(Path(tmp) / "clip" / "merges.txt"),
                                  model_max_length=CLIP_CONFIG["max_position_embeddings"])
        tokenizer_2 = write_t5_tokenizer(Path(tmp) / "t5")
    clip_cfg = dict(CLIP_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG, guidance_embeds=variant == "dev")
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(T5Config(**T5_CONFIG, vocab_size=len(tokenizer_2)))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[variant]), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _key_parts(variant: str) -> list:
    return [TINY_FLUX_VERSION, variant, TINY_FLUX_SEED, TRANSFORMER_CONFIG, VAE_CONFIG, CLIP_CONFIG, T5_CONFIG,
            T5_MAX_LENGTH, SCHEDULER_CONFIGS[variant], tiny.WORDS]


def tiny_flux_base_dir(variant: str = "dev") -> Path:
    """The tiny Flux as a diffusers folder, built once (atomically) and reused."""
    return tiny.cached_build(f"{TINY_FLUX_VERSION}-{variant}", _key_parts(variant),
                             lambda: build_tiny_flux_pipeline(variant))


def config_for(shapes) -> Path | None:
    """The tiny base's folder for an original-layout transformer file of its width (dev or schnell by
    the guidance embedding), else None."""
    from finetune.models.families.flux_layout import ORIGINAL_PREFIX

    bare = {k.removeprefix(ORIGINAL_PREFIX): tuple(v) for k, v in shapes.items()}
    inner = TRANSFORMER_CONFIG["attention_head_dim"] * TRANSFORMER_CONFIG["num_attention_heads"]
    if bare.get("img_in.weight") != (inner, TRANSFORMER_CONFIG["in_channels"]):
        return None
    return tiny_flux_base_dir("dev" if "guidance_in.in_layer.weight" in bare else "schnell")


class _SplitFiles:
    """Writes the split files of a loaded pipeline with `save_pretrained`, so `tiny.cached_build`
    can place them atomically like a diffusers folder."""

    def __init__(self, variant: str, config_dir: Path):
        self.variant, self.config_dir = variant, config_dir

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        from finetune.models.families.flux_files import write_split_files

        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(str(self.config_dir), local_files_only=True)
        names = {part: name.format(variant=self.variant) for part, name in SPLIT_FILES.items()}
        write_split_files(pipe, Path(folder), names, config=str(self.config_dir), spec_name=BASE_SPEC)
        # cached_build knows a finished build by this file
        (Path(folder) / "model_index.json").write_text(json.dumps({"split_files": names}))


def tiny_flux_split_dir(variant: str = "dev") -> Path:
    """The tiny Flux as split single files (original-layout transformer, clip_l, t5xxl, ae) plus
    `base.toml` naming them, built once from the diffusers folder and reused."""
    config_dir = tiny_flux_base_dir(variant)
    return tiny.cached_build(f"{TINY_FLUX_VERSION}-{variant}-files", _key_parts(variant) + ["split"],
                             lambda: _SplitFiles(variant, config_dir))
