"""Adding peft LoRA adapters to the denoiser (and text encoders) and writing them in diffusers' layout.

`save_lora` writes exactly what `StableDiffusionPipeline.save_lora_weights` writes for peft's own state
dict (keys `unet.<module>.lora_A.weight` / `.lora_B.weight`, so `pipe.load_lora_weights(folder)` reads
it, alpha included through the adapter metadata), then adds our `finetune.*` string metadata to the same
safetensors header. Checkpoints use it too.

Why not `convert_state_dict_to_diffusers` first, as diffusers' training examples do: it renames only the
attention LoRAs (`to_q.lora.down.weight`) and leaves other targets (proj_in, ff, conv) as peft keys; on
such a mixed file `load_lora_weights` sees a peft first key and silently drops every renamed LoRA.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from finetune.config import LoraConfig
from finetune.errors import FinetuneError
from finetune.filemode import follow_umask

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _peft_config(rank: int, alpha: float, dropout: float, targets: list[str], use_dora: bool,
                 exclude: tuple[str, ...] = ()):
    import re

    from peft import LoraConfig as PeftLoraConfig

    # a string is matched by peft against each module's whole dotted name: these exact modules only
    excluded = "|".join(re.escape(m) for m in exclude) or None
    return PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                          exclude_modules=excluded, init_lora_weights="gaussian", use_dora=use_dora)


def _add(model, config, what: str, key: str) -> None:
    try:
        model.add_adapter(config)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            raise FinetuneError(f"{key} = {sorted(config.target_modules)} matches no module of the {what}: "
                                f"use module names such as to_q, to_k, to_v, to_out.0, ff.net.2, proj_in, conv1") from None
        raise


def add_lora(denoiser, text_encoders, cfg: LoraConfig, family=None) -> None:
    """Freeze the models and add trainable LoRA adapters (the only parameters that train): `lora.targets`
    on the denoiser, and with `lora.train_text_encoder` the same text-encoder LoRA on each of
    `text_encoders` (those that may carry one). Empty targets are the family's defaults (its
    `lora_targets` less its `lora_exclude`; SD's attention without a family)."""
    from finetune.models.families import sd1

    encoders = [m for m in text_encoders if m is not None]
    for m in (denoiser, *encoders):
        m.requires_grad_(False)
    targets = cfg.targets or (family.lora_targets if family else sd1.LORA_TARGETS)
    exclude = family.lora_exclude if family and not cfg.targets else ()
    _add(denoiser, _peft_config(cfg.rank, cfg.alpha, cfg.dropout, targets, cfg.use_dora, exclude),
         type(denoiser).__name__, "lora.targets")
    if cfg.train_text_encoder:
        te_targets = cfg.text_encoder_targets or (family.text_encoder_lora_targets if family else
                                                  sd1.TEXT_ENCODER_LORA_TARGETS)
        for m in encoders:
            _add(m, _peft_config(cfg.text_encoder_rank, cfg.text_encoder_alpha, cfg.dropout,
                                 te_targets, cfg.use_dora),
                 "text encoder", "lora.text_encoder_targets")


def lora_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_lora(folder: Path, models: dict, metadata: dict[str, str] | None = None, arch: str = "sd1") -> Path:
    """Write the adapters of `models` ({component name: model}, e.g. {"unet": ..., "text_encoder": ...};
    models without a peft adapter are skipped) to `folder` (created or replaced whole, via a temporary
    folder and a rename), with the pipeline class of `arch`'s family (keys `<component>.<module>...`)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from finetune.models import families

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    for name, model in models.items():
        if model is not None and getattr(model, "peft_config", None):
            kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
            kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    pipeline_class = getattr(diffusers, families.for_arch(arch).pipeline_class)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipeline_class.save_lora_weights(str(tmp), safe_serialization=True, **kwargs)
        path = tmp / WEIGHT_NAME
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
        header.update({k: str(v) for k, v in (metadata or {}).items()})
        tensors = load_file(str(path))
        save_file(tensors, str(path), metadata=header)
        follow_umask(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / WEIGHT_NAME


def read_lora_metadata(folder: Path) -> dict[str, str]:
    """The safetensors header metadata of a saved adapter."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / WEIGHT_NAME), framework="pt") as f:
        return dict(f.metadata() or {})


def lora_metadata(cfg, *, base, base_hash: str, steps: int, dataset_hash: str, started_at: str,
                  dataset_name: str, tag_frequency: dict[str, int]) -> dict[str, str]:
    """The `finetune.*` header keys (strings) that make an adapter describe itself."""
    meta = {
        "finetune.trigger": cfg.data.trigger,
        "finetune.class_word": cfg.data.class_word,
        "finetune.base": base.spec,
        "finetune.base_hash": base_hash,
        "finetune.arch": base.arch,
        "finetune.steps": str(steps),
        "finetune.rank": str(cfg.lora.rank),
        "finetune.alpha": f"{cfg.lora.alpha:g}",
        "finetune.dataset_hash": dataset_hash,
        "finetune.started_at": started_at,
        "finetune.tag_frequency": json.dumps({dataset_name: tag_frequency}),
        "finetune.config": cfg.to_json(),
    }
    if cfg.lora.train_text_encoder:
        meta["finetune.te_rank"] = str(cfg.lora.text_encoder_rank)
        meta["finetune.te_alpha"] = f"{cfg.lora.text_encoder_alpha:g}"
    return meta
