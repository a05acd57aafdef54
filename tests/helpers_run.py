"""A run folder in the contract's layout, without training: the tiny base (or, with `arch="sdxl"`, the
tiny SDXL) plus a random, non-zero LoRA.

`make_fake_run(tmp_path)` writes what `finetune train` leaves behind (config.json, run.json, lora/,
checkpoints/step-NNNNNN/ with COMPLETE, optionally samples/) so that export, sample and review tests
can run before (and independently of) the training recipe. `lora_pipe(...)` rebuilds the same
"trained" pipeline in memory (same seed, same weights) to compare images against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import runs

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PROMPT = "a photo of ohwx person"
FINAL_STEP, CHECKPOINT_STEP, UNFINISHED_STEP = 10, 5, 8


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():
    """Run a test module's tiny models on one CPU thread (restored after): on a shared machine two
    threads per process oversubscribe the cores, and a 4-step 64 px image takes ~10 s instead of ~1 s.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")` after importing it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BASES = {"sd1": "tiny", "sdxl": "tiny-sdxl"}


def _text_encoders(pipe) -> list[str]:
    return [name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]


def lora_pipe(*, text_encoder: bool = False, rank: int = 4, alpha: float = 8.0, seed: int = 0, arch: str = "sd1"):
    """The tiny base (`arch` sd1) or tiny SDXL (sdxl) with peft LoRAs whose up matrices are random (so
    the LoRA changes the image).

    UNet LoRA: rank `rank`, alpha `alpha`; text-encoder LoRA (on both encoders of SDXL): rank `rank`,
    alpha `alpha / 4`: neither alpha equals the rank, so a loader that assumes alpha = rank gives
    another image."""
    from peft import LoraConfig

    from finetune.models import load_base

    pipe = load_base(BASES[arch]).pipe
    torch.manual_seed(seed)
    # init_lora_weights=False keeps nn.Linear's random init for lora_B too (peft's default zeroes it).
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS))
    if text_encoder:
        for name in _text_encoders(pipe):
            getattr(pipe, name).add_adapter(LoraConfig(r=rank, lora_alpha=alpha / 4, init_lora_weights=False,
                                                       target_modules=TE_TARGETS))
    return pipe


def render(pipe, prompt: str = PROMPT, seed: int = 0, steps: int = 4) -> np.ndarray:
    """A 64 px image as float numpy, deterministic for a given pipeline and seed."""
    out = pipe(prompt, height=64, width=64, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               output_type="np")
    return out.images[0]


def read_header(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A .safetensors file's (string metadata, tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def load_lora(pipe, path):
    """`pipe` with only the LoRA file `path` loaded, through diffusers' own `load_lora_weights`."""
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(path))
    return pipe


def _save_adapter(folder: Path, pipe, header: dict[str, str], up_factor: float = 1.0) -> Path:
    """What the trainer writes: the pipeline class's save_lora_weights with adapter metadata, then the
    finetune.* keys added to the same header."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def layers(model):
        sd = get_peft_model_state_dict(model)
        return convert_state_dict_to_diffusers({k: v * up_factor if "lora_B" in k else v for k, v in sd.items()})

    kwargs = dict(unet_lora_layers=layers(pipe.unet), unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    for name in _text_encoders(pipe):
        model = getattr(pipe, name)
        if getattr(model, "peft_config", None):
            kwargs.update({f"{name}_lora_layers": layers(model),
                           f"{name}_lora_adapter_metadata": model.peft_config["default"].to_dict()})
    type(pipe).save_lora_weights(str(folder), safe_serialization=True, **kwargs)
    path = runs.adapter_file(folder)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    save_file(load_file(str(path)), str(path), metadata={**meta, **header})
    return path


def make_fake_run(tmp_path: Path, *, text_encoder: bool = False, rank: int = 4, alpha: float = 8.0,
                  samples: bool = False, name: str = "ohwx-run", arch: str = "sd1") -> Path:
    """Write outputs/<name>/ as train would and return the run folder (`arch` sdxl: on the tiny SDXL).

    lora/ holds the final adapter (step 10, the weights of `lora_pipe(...)` with the same arguments);
    checkpoints/step-000005/ a complete checkpoint whose lora_B are halved; checkpoints/step-000008/ an
    unfinished one (no COMPLETE). With `samples`, samples/step-000010/<prompt>-<seed>.png exist.
    """
    from finetune.config import load_config
    from finetune.models import load_base

    run = Path(tmp_path) / "outputs" / name
    run.mkdir(parents=True)
    pipe = lora_pipe(text_encoder=text_encoder, rank=rank, alpha=alpha, arch=arch)
    base = BASES[arch]
    cfg = load_config(base={
        "model": {"base": base},
        "data": {"trigger": "ohwx", "class_word": "person", "resolution": 64},
        "lora": {"rank": rank, "alpha": alpha, "targets": UNET_TARGETS, "train_text_encoder": text_encoder,
                 "text_encoder_rank": rank, "text_encoder_alpha": alpha / 4, "text_encoder_targets": TE_TARGETS},
        "train": {"max_steps": FINAL_STEP, "seed": 0},
    })
    base_hash = load_base(base).model_hash()
    started = "2025-01-02T03:04:05+00:00"
    (run / runs.CONFIG).write_text(cfg.to_json())
    (run / runs.RUN_INFO).write_text(json.dumps({
        "base": base, "base_kind": "tiny", "arch": arch, "base_hash": base_hash, "dataset": "datasets/ohwx",
        "dataset_hash": "d" * 64, "trigger": "ohwx", "class_word": "person", "started_at": started,
        "finished_at": "2025-01-02T03:14:05+00:00", "steps": FINAL_STEP, "version": "0.1.0"}, indent=2))

    def header(steps: int) -> dict[str, str]:
        meta = {"finetune.trigger": "ohwx", "finetune.class_word": "person", "finetune.base": base,
                "finetune.base_hash": base_hash, "finetune.arch": arch, "finetune.steps": str(steps),
                "finetune.rank": str(rank), "finetune.alpha": f"{alpha:g}", "finetune.dataset_hash": "d" * 64,
                "finetune.started_at": started,
                "finetune.tag_frequency": json.dumps({"ohwx": {"a photo of ohwx person": 6}}),
                "finetune.config": cfg.to_json()}
        if text_encoder:
            meta.update({"finetune.te_rank": str(rank), "finetune.te_alpha": f"{alpha / 4:g}"})
        return meta

    _save_adapter(run / runs.LORA_DIR, pipe, header(FINAL_STEP))
    done = runs.checkpoint_dir(run, CHECKPOINT_STEP)
    _save_adapter(done / runs.LORA_DIR, pipe, header(CHECKPOINT_STEP), up_factor=0.5)
    (done / runs.MARKER).write_text(json.dumps({"step": CHECKPOINT_STEP}))
    _save_adapter(runs.checkpoint_dir(run, UNFINISHED_STEP) / runs.LORA_DIR, pipe, header(UNFINISHED_STEP))
    if samples:
        from PIL import Image

        folder = run / runs.SAMPLES / runs.checkpoint_name(FINAL_STEP)
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for prompt in range(2):
            for seed in (1, 2):
                pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{prompt}-{seed}.png")
    return run
