"""The embedded SDXL test base: a tiny, architecturally real SDXL with random weights (`--base tiny-sdxl`).

Same topology as SDXL 1.0 base, with small channels: a 3-level UNet (Down, CrossAttn x2 / CrossAttn x2,
Up; 2 layers each; a different transformer depth per level, linear proj_in/out) conditioned on the two
text encoders' hidden states side by side and, through `add_embedding` ("text_time"), on the second
encoder's pooled projection plus the six micro-conditioning numbers (original size, crop top-left,
target size); SD's 4-level VAE with SDXL's latent scale; Euler with SDXL's schedule. Every code path
that touches a real SDXL (LoRA targets, single-file key mapping, kohya names) runs on it.

The two encoders differ in width (as CLIP-L 768 and OpenCLIP-bigG 1280 do): diffusers' single-file
loader tells them apart by the width of their position embeddings, so equal widths would load the
first encoder's weights into the second.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

from finetune.models import tiny

TINY_SDXL_VERSION = "tiny-sdxl-v1"  # bump when the recipe below changes: the cache key follows it
TINY_SDXL_SEED = 0

# CLIP-L's stand-in is the tiny SD 1.x encoder (same role, same architecture); bigG's is wider, with
# bigG's GELU and a projection to a width of its own, so a missing transpose fails on shape.
TEXT_CONFIG = dict(tiny.TEXT_CONFIG)
TEXT_2_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=32,
    bos_token_id=0,  # patched to the real ids below
    eos_token_id=2,
    pad_token_id=1,
)
ADD_TIME_DIM = 8  # SDXL: 256 per micro-conditioning number
UNET_CONFIG = dict(
    sample_size=8,  # 64 px / 8
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 3),  # SDXL: (1, 2, 10); the middle block takes the last
    attention_head_dim=(2, 4, 4),  # diffusers' name for the number of heads, as in SDXL's config
    use_linear_projection=True,
    cross_attention_dim=TEXT_CONFIG["hidden_size"] + TEXT_2_CONFIG["hidden_size"],
    addition_embed_type="text_time",
    addition_time_embed_dim=ADD_TIME_DIM,
    # pooled text embedding + 6 Fourier-embedded numbers: SDXL's 1280 + 6 * 256 = 2816
    projection_class_embeddings_input_dim=TEXT_2_CONFIG["projection_dim"] + 6 * ADD_TIME_DIM,
    norm_num_groups=32,
)
VAE_CONFIG = dict(tiny.VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)
# SDXL base's scheduler_config.json, minus the keys EulerDiscreteScheduler does not take.
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    steps_offset=1,
)


def _tokenizer(folder: Path, **kwargs):
    from transformers import CLIPTokenizer

    tiny.write_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=TEXT_CONFIG["max_position_embeddings"], **kwargs)


def build_tiny_sdxl_pipeline(seed: int = TINY_SDXL_SEED):
    """Build the tiny SDXL pipeline in memory, deterministically from `seed`."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp) / "1")
        # OpenCLIP pads with token 0 ("!"), not end-of-text; SDXL's tokenizer_2 says so.
        tokenizer_2 = _tokenizer(Path(tmp) / "2", pad_token="!")

    def text_config(base: dict, tok) -> CLIPTextConfig:
        return CLIPTextConfig(**dict(base, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config(TEXT_CONFIG, tokenizer))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(TEXT_2_CONFIG, tokenizer_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        # our own provenance marks the images; SDXL's invisible watermark would also differ by install
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """A few single-file (original layout) tensor shapes that tell the tiny SDXL apart from any real one."""
    c0 = UNET_CONFIG["block_out_channels"][0]
    return {
        "model.diffusion_model.input_blocks.0.0.weight": (c0, UNET_CONFIG["in_channels"], 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (4 * c0, UNET_CONFIG["projection_class_embeddings_input_dim"]),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight":
            (TEXT_CONFIG["max_position_embeddings"], TEXT_CONFIG["hidden_size"]),
        "conditioner.embedders.1.model.positional_embedding":
            (TEXT_2_CONFIG["max_position_embeddings"], TEXT_2_CONFIG["hidden_size"]),
        "conditioner.embedders.1.model.text_projection":
            (TEXT_2_CONFIG["hidden_size"], TEXT_2_CONFIG["projection_dim"]),
    }


def is_tiny_sdxl(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether single-file key shapes are the tiny SDXL's (so its cached folder holds the right configs)."""
    return all(tuple(shapes.get(k, ())) == v for k, v in tiny_sdxl_shapes().items())


def tiny_sdxl_base_dir() -> Path:
    """The tiny SDXL as a diffusers folder, built once (atomically) and reused."""
    return tiny.cached_build(
        TINY_SDXL_VERSION,
        [TINY_SDXL_VERSION, TINY_SDXL_SEED, UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, TEXT_2_CONFIG, SCHEDULER_CONFIG,
         tiny.WORDS],  # the tokenizer's vocabulary
        build_tiny_sdxl_pipeline)
