"""`finetune inspect`: what a LoRA file, checkpoint or diffusers folder is, from its header alone.

Works on files other tools made (kohya's `ss_*` keys, modelspec, bare kohya or diffusers LoRAs
without any metadata): rank and alpha come from the tensors when the header does not say.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from finetune import lora_io, runs
from finetune.errors import FinetuneError
from finetune.words import plural

FORMAT_NAMES = {
    "peft": "LoRA, diffusers/peft layout (diffusers load_lora_weights)",
    "kohya": "LoRA, kohya layout (AUTOMATIC1111, Forge, ComfyUI)",
    "lycoris": "LyCORIS network (LoHa/LoKr; A1111 and ComfyUI read it)",
    "checkpoint": "merged checkpoint, original SD single-file layout (A1111, ComfyUI)",
    "diffusers": "weights of one diffusers/transformers model component",
    "diffusers-folder": "diffusers model folder",
    "training-state": "training checkpoint state of `finetune train`, for resuming: not a LoRA",
    "unknown": "safetensors file of unknown content",
}
_DTYPE_NAMES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64", "I64": "int64", "I32": "int32"}
_CHECKPOINT_PARTS = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "text encoder",
                     "conditioner.embedders.": "text encoders"}


def _first(metadata: dict[str, str], *keys: str) -> str:
    return next((metadata[k] for k in keys if metadata.get(k)), "")


def _top_tags(metadata: dict[str, str], n: int = 3) -> list[str]:
    """The most frequent caption tags of a kohya file (where its trigger usually hides)."""
    raw = _first(metadata, "ss_tag_frequency", "finetune.tag_frequency")
    try:
        per_dataset = json.loads(raw) if raw else {}
        counts = Counter()
        for tags in per_dataset.values():
            counts.update({t.strip(): int(c) for t, c in tags.items()})
    except (ValueError, AttributeError, TypeError):
        return []
    return [t for t, _ in counts.most_common(n)]


def _numbers(values) -> str:
    values = sorted(set(values))
    fmt = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
    return fmt[0] if len(fmt) == 1 else f"{fmt[0]}-{fmt[-1]} (differs between modules)"


def _lora_components(layers: list[lora_io.LoraLayer]) -> dict[str, dict]:
    out = {}
    for component in sorted({l.component for l in layers}):
        mine = [l for l in layers if l.component == component]
        out[component] = {"modules": len(mine), "rank": _numbers(l.rank for l in mine),
                          "alpha": _numbers(round(l.alpha, 6) for l in mine),
                          "scale": _numbers(round(l.scale, 6) for l in mine),
                          "targets": sorted({l.target for l in mine})}
    return out


def _alpha_source(layout: str, keys, metadata: dict[str, str]) -> str:
    if layout == lora_io.KOHYA:
        return "alpha tensors" if any(k.endswith(".alpha") for k in keys) else "none stored: loaders use alpha = rank"
    if metadata.get(lora_io.ADAPTER_METADATA_KEY):
        return f"header ({lora_io.ADAPTER_METADATA_KEY})"
    if any(k.endswith(".alpha") for k in keys):
        return "alpha tensors"
    return "none stored: diffusers assumes alpha = rank"


def inspect_path(path: str | Path) -> dict:
    """A dict describing `path`: format, size, and for a LoRA its rank, alpha, targets, base, trigger."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _inspect_folder(path)
        # a run folder: its final adapter, else (unfinished) its newest complete checkpoint's
        newest = [runs.checkpoint_lora(p) for _, p in runs.complete_checkpoints(path)[-1:]]
        for candidate in (runs.final_lora(path), runs.adapter_file(path), *newest):
            if candidate.is_file():
                return inspect_path(candidate)
        raise FinetuneError(f"{path} is a folder without model_index.json or {runs.WEIGHT_NAME}: "
                            "give a .safetensors file, a diffusers model folder or a run folder")
    shapes, metadata = lora_io.read_header(path)
    if _is_training_state(shapes):
        return _inspect_training_state(path, shapes, metadata)
    layout = lora_io.detect_layout(shapes)
    dtypes = Counter(_DTYPE_NAMES.get(dt, dt.lower()) for dt, _ in shapes.values())
    info = {
        "path": str(path), "format": layout, "description": FORMAT_NAMES[layout], "size_bytes": path.stat().st_size,
        "tensors": len(shapes), "parameters": sum(math.prod(s) for _, s in shapes.values()),
        "dtypes": dict(dtypes.most_common()), "metadata": metadata,
        "base_model": _first(metadata, "finetune.base", "ss_sd_model_name", "modelspec.architecture",
                             "ss_base_model_version"),
        "base_hash": _first(metadata, "finetune.base_hash", "ss_new_sd_model_hash", "ss_sd_model_hash"),
        "trigger": _first(metadata, "finetune.trigger", "modelspec.trigger_phrase"),
    }
    if not info["trigger"] and (tags := _top_tags(metadata)):
        info["top_tags"] = tags
    if layout in lora_io.LORA_LAYOUTS:
        tensors, metadata, layout = lora_io.read_lora(path)
        layers = lora_io.to_layers(tensors, metadata, layout)
        info.update(made_for=lora_io.describe_lora_architecture(layers, metadata), components=_lora_components(layers),
                    alpha_source=_alpha_source(layout, tensors, metadata),
                    rank=_numbers(l.rank for l in layers), alpha=_numbers(round(l.alpha, 6) for l in layers))
    elif layout == "checkpoint":
        from finetune.models.single_file import detect_architecture

        try:
            info["architecture"] = detect_architecture(shapes)
        except ValueError:
            info["architecture"] = "unknown"
        parts = Counter(next((name for prefix, name in _CHECKPOINT_PARTS.items() if k.startswith(prefix)), "other")
                        for k in shapes)
        info["parts"] = dict(parts)
        if "finetune.lora_scale" in metadata:
            info["lora_fused_at_scale"] = metadata["finetune.lora_scale"]
    return info


_STATE_PARTS = {"trainable": "LoRA weights in fp32", "optimizer": "optimizer state",
                "lr_scheduler": "learning-rate schedule", "grad_scaler": "gradient scaler",
                "param_digests": "weight digests"}


def _is_training_state(shapes: dict) -> bool:
    """A checkpoint's state.safetensors (keys `trainable/...`, `optimizer/...`) or rng-rank<i>.safetensors
    (`rank<i>/...`), as finetune.train.checkpoint writes them. Its LoRA weights are named like a peft
    LoRA's, so without this check the file reads as a broken LoRA."""
    roots = {k.split("/", 1)[0] for k in shapes}
    if not shapes or any("/" not in k for k in shapes):
        return False
    return {"trainable", "optimizer"} <= roots or all(re.fullmatch(r"rank\d+", r) for r in roots)


def _inspect_training_state(path: Path, shapes: dict, metadata: dict[str, str]) -> dict:
    folder = path.parent
    parts = Counter(k.split("/", 1)[0] for k in shapes)
    info = {"path": str(path), "format": "training-state", "description": FORMAT_NAMES["training-state"],
            "size_bytes": path.stat().st_size, "tensors": len(shapes),
            "parameters": sum(math.prod(s) for _, s in shapes.values()),
            "dtypes": dict(Counter(_DTYPE_NAMES.get(dt, dt.lower()) for dt, _ in shapes.values()).most_common()),
            "metadata": metadata,
            "holds": {_STATE_PARTS.get(p, "random-number-generator states" if p.startswith("rank") else p): n
                      for p, n in sorted(parts.items(), key=lambda pn: list(_STATE_PARTS).index(pn[0])
                                         if pn[0] in _STATE_PARTS else len(_STATE_PARTS))}}
    try:
        state = json.loads((folder / "state.json").read_text())["state"]
    except (OSError, ValueError, KeyError, TypeError):
        state = {}
    if isinstance(state.get("step"), int):
        info["step"] = state["step"]
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    info["base_model"] = (config.get("model") or {}).get("base", "") if isinstance(config.get("model"), dict) else ""
    info["trigger"] = (config.get("data") or {}).get("trigger", "") if isinstance(config.get("data"), dict) else ""
    adapter = runs.checkpoint_lora(folder)
    if adapter.is_file():
        info["adapter"] = str(adapter)
    run = runs.run_of(folder)
    if folder.parent.name == runs.CHECKPOINTS and (run / runs.RUN_INFO).is_file():
        info["export"] = f"finetune export {run} --checkpoint {folder.name}"
    return info


def _inspect_folder(path: Path) -> dict:
    from finetune.models.families import folder_arch

    index = json.loads((path / "model_index.json").read_text())
    files = [f for f in path.rglob("*") if f.is_file()]
    components = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0])
    info = {"path": str(path), "format": "diffusers-folder", "description": FORMAT_NAMES["diffusers-folder"],
            "pipeline": index.get("_class_name", "?"), "architecture": folder_arch(path), "components": components,
            "size_bytes": sum(f.stat().st_size for f in files),
            "weight_files": sorted(str(f.relative_to(path)) for f in files if f.suffix in (".safetensors", ".bin"))}
    unet_config = path / "unet" / "config.json"
    if unet_config.is_file():
        info["cross_attention_width"] = json.loads(unet_config.read_text()).get("cross_attention_dim")
    export_info = path / "finetune_export.json"
    if export_info.is_file():
        info["metadata"] = json.loads(export_info.read_text())
        info["trigger"] = info["metadata"].get("finetune.trigger", "")
        info["base_model"] = info["metadata"].get("finetune.base", "")
    return info


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _short(value: str, width: int = 100) -> str:
    value = " ".join(value.split())
    return value if len(value) <= width else value[: width - 3] + "..."


def format_report(info: dict, full: bool = False) -> str:
    """Human-readable lines for `inspect_path`'s dict; long metadata values are cut unless `full`."""
    rows = [("file", f"{info['path']} ({_size(info['size_bytes'])})"), ("format", info["description"])]
    if "tensors" in info:
        rows.append(("tensors", f"{info['tensors']} ({info['parameters']:,} parameters; "
                                + ", ".join(f"{n} {d}" for d, n in info["dtypes"].items()) + ")"))
    if "made_for" in info:
        rows.append(("made for", info["made_for"]))
        rows.append(("rank", info["rank"]))
        rows.append(("alpha", f"{info['alpha']} ({info['alpha_source']})"))
        for component, c in info["components"].items():
            rows.append((component, f"{plural(c['modules'], 'module')}, rank {c['rank']}, alpha {c['alpha']} "
                                    f"(scale {c['scale']}), targets {', '.join(c['targets'])}"))
    for key, label in (("architecture", "architecture"), ("pipeline", "pipeline"), ("cross_attention_width",
                       "cross-attention width"), ("lora_fused_at_scale", "LoRA fused at")):
        if info.get(key) not in (None, ""):
            rows.append((label, str(info[key])))
    if info.get("holds"):
        rows.append(("holds", ", ".join(f"{what} ({plural(n, 'tensor')})" for what, n in info["holds"].items())))
    if "step" in info:
        rows.append(("step", str(info["step"])))
    if info.get("adapter"):
        rows.append(("its LoRA", info["adapter"]))
    if info.get("export"):
        rows.append(("to export", info["export"]))
    if info.get("parts"):
        rows.append(("parts", ", ".join(plural(n, f"{p} tensor") for p, n in info["parts"].items())))
    if info.get("components") and "made_for" not in info:
        rows.append(("components", ", ".join(info["components"])))
    rows.append(("base model", info.get("base_model") or "not recorded"))
    if info.get("base_hash"):
        rows.append(("base hash", info["base_hash"]))
    trigger = info.get("trigger") or (f"not recorded; most frequent caption tags: {', '.join(info['top_tags'])}"
                                      if info.get("top_tags") else "not recorded")
    rows.append(("trigger", trigger))
    metadata = info.get("metadata") or {}
    rows.append(("metadata", plural(len(metadata), "key") if metadata else "none"))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    for key in sorted(metadata):
        value = str(metadata[key])
        lines.append(f"  {key}: {value if full else _short(value)}")
    return "\n".join(lines)
