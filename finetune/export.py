"""`finetune export`: a run's adapter -> files people share.

- `peft`: one .safetensors in the diffusers/peft layout, adapter config (alpha) in its header, for
  `pipe.load_lora_weights`.
- `kohya`: `lora_unet_*` / `lora_te_*` keys with each module's real alpha and kohya's `ss_*`,
  `modelspec.*` and `sshs_*` header keys, for AUTOMATIC1111, Forge and ComfyUI. The names are the
  base family's (`Family.kohya_names`: on SDXL the UNet modules carry the original layout's names,
  `lora_unet_input_blocks_4_1_...`, which depend on the base's UNet config, and the text encoders are
  `lora_te1_` / `lora_te2_`).
- `merged`: the LoRA fused into the base at `scale`, one single-file checkpoint in the family's
  original layout (`Family.to_single_file`); `merged-diffusers`: the same as a diffusers folder.

The architecture (e.g. sd1 | sd2) is the adapter header's `finetune.arch`, else run.json's, else
what the LoRA's modules show; every export states it in its header, with the family's metadata
(finetune.models.families).

Every output is written under a temporary name and renamed; an existing one is only replaced with
`force`. In the default folder (<run>/export/) a README.md model card and a samples image go beside
the exports; with `-o` only the asked-for file is written, unless `--card` asks for the card too. A
card describes one run's exports only: where README.md is another run's card (or the user's own
file), it is written as <name>.md instead. A merged-diffusers folder always holds its own card.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from finetune import lora_io, runs, vocab
from finetune.errors import FinetuneError
from finetune.filemode import follow_umask
from finetune.models import families
from finetune.words import plural

FORMATS = vocab.EXPORT_FORMATS
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""By `vocab.EXPORT_DTYPES` name."""
CARD_MARK = "<!-- model card written by finetune export -->"
EXPORT_INFO = "finetune_export.json"  # inside a merged-diffusers folder: what it is
_SUFFIX = {"peft": "-peft", "kohya": "", "merged": "-merged", "merged-diffusers": "-merged-diffusers"}


@dataclass
class Adapter:
    """A run's adapter as export sees it: the file, what it says about itself, and its layers."""

    run_dir: Path
    file: Path
    checkpoint: str
    """"final" (the run's lora/) or the checkpoint folder name, e.g. step-000500."""
    metadata: dict[str, str]
    layers: list[lora_io.LoraLayer]
    cfg: object | None
    """The run's resolved RunConfig (config.json), when the run has one."""
    run: dict
    """run.json, when the run has one."""

    def meta(self, key: str, run_key: str | None = None, default: str = "") -> str:
        """A `finetune.<key>` header value, else run.json's value, else `default`."""
        value = self.metadata.get(f"finetune.{key}")
        if value is None and run_key and self.run.get(run_key) is not None:
            value = str(self.run[run_key])
        return default if value is None else value

    @property
    def arch(self) -> str:
        return self.meta("arch", "arch") or lora_io.lora_architecture(self.layers, self.metadata) or "sd1"

    @property
    def trigger(self) -> str:
        return self.meta("trigger", "trigger", getattr(getattr(self.cfg, "data", None), "trigger", ""))

    @property
    def class_word(self) -> str:
        return self.meta("class_word", "class_word", getattr(getattr(self.cfg, "data", None), "class_word", ""))

    @property
    def base(self) -> str:
        return self.meta("base", "base", getattr(getattr(self.cfg, "model", None), "base", ""))

    @property
    def steps(self) -> str:
        m = re.fullmatch(r"step-(\d+)", self.checkpoint)
        return self.meta("steps", None if m else "steps", str(int(m.group(1))) if m else "")


# ---------------------------------------------------------------- finding the adapter


def best_checkpoint(run_dir: Path) -> tuple[str | None, str]:
    """The checkpoint `finetune score` recommends (None: the final lora/) and its recommendation line."""
    from finetune.score import SCORES

    try:
        scores = json.loads((Path(run_dir) / SCORES).read_text())
    except OSError:
        raise FinetuneError(f"--checkpoint best: {run_dir} has no {SCORES} yet: sample its checkpoints and score "
                            f"them first (finetune sample {run_dir} --checkpoints all; it scores them)") from None
    except ValueError as e:
        raise FinetuneError(f"--checkpoint best: {run_dir}/{SCORES} is unreadable ({e}): run finetune score "
                            f"{run_dir} again") from None
    best = scores.get("recommendation")
    if not best:
        raise FinetuneError(f"--checkpoint best: the scores recommend no checkpoint ({scores.get('summary')}); "
                            "choose one with --checkpoint step-N")
    return best["checkpoint"], scores["summary"]


def find_adapter(run_dir: Path, checkpoint: str | None = None) -> tuple[Path, str]:
    """(adapter file, label): the run's final lora/ by default, else its newest complete checkpoint;
    `checkpoint` = "latest", "step-N" (or N) or a checkpoint folder picks a checkpoint
    (runs.find_checkpoint), "best" the one `finetune score` recommends (run/scores.json)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FinetuneError(f"run folder {run_dir} does not exist")
    final = runs.final_lora(run_dir)
    if checkpoint == "best":
        checkpoint, _ = best_checkpoint(run_dir)
        if checkpoint is None:
            if not final.is_file():
                raise FinetuneError(f"--checkpoint best: the recommended final adapter {final} is missing")
            return final, "final"
    if checkpoint is None:
        if final.is_file():
            return final, "final"
        complete = runs.complete_checkpoints(run_dir)
        if complete:
            return runs.checkpoint_lora(complete[-1][1]), complete[-1][1].name
        raise FinetuneError(
            f"run {run_dir} has no adapter to export: no {runs.LORA_DIR}/{runs.WEIGHT_NAME} and no complete checkpoint "
            f"under {run_dir / runs.CHECKPOINTS}; train it first (finetune train), or let a checkpoint finish saving")
    folder = runs.find_checkpoint(run_dir, checkpoint, resume=False)
    if runs.run_of(folder).resolve() != run_dir.resolve():
        raise FinetuneError(f"--checkpoint {checkpoint} belongs to the run {runs.run_of(folder)}, not to {run_dir}: "
                            "export that run, or name one of this run's checkpoints")
    return runs.checkpoint_lora(folder), folder.name


def open_adapter(run_dir: Path, checkpoint: str | None = None) -> Adapter:
    run_dir = Path(run_dir)
    file, label = find_adapter(run_dir, checkpoint)
    tensors, metadata, layout = lora_io.read_lora(file)
    return Adapter(run_dir, file, label, metadata, lora_io.to_layers(tensors, metadata, layout),
                   runs.read_config(run_dir), runs.read_info(run_dir))


# ---------------------------------------------------------------- names and atomic outputs


def export_name(adapter: Adapter) -> str:
    """export.name, else the run folder's name, as a file-name-safe stem."""
    name = getattr(getattr(adapter.cfg, "export", None), "name", "") or adapter.run_dir.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "lora"


def default_filename(name: str, fmt: str, checkpoint: str, rank: int | None, scale: float) -> str:
    stem = name
    if checkpoint != "final":
        stem += f"-{checkpoint}"
    if rank:
        stem += f"-r{rank}"
    if fmt.startswith("merged") and scale != 1:
        stem += f"-x{scale:g}"
    stem += _SUFFIX[fmt]
    return stem if fmt == "merged-diffusers" else stem + ".safetensors"


def _refuse_existing(path: Path, force: bool) -> None:
    if (path.exists() or path.is_symlink()) and not force:
        raise FinetuneError(f"{path} already exists; pass --force to replace it, or choose another -o")


def _replace_folder(tmp: Path, dest: Path) -> None:
    """Move a finished temporary folder to `dest`, replacing what is there only at the last moment."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, dest)


# ---------------------------------------------------------------- metadata


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _unix_time(iso: str) -> str:
    try:
        return str(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return iso


def _summary(layers: list[lora_io.LoraLayer], component: str) -> tuple[str, str]:
    """(rank, alpha) of one component as kohya writes them: a number, or "Dynamic" when layers differ."""
    mine = [l for l in layers if l.component == component]
    ranks, alphas = {l.rank for l in mine}, {l.alpha for l in mine}
    rank = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    alpha = f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic"
    return rank, alpha


def finetune_metadata(adapter: Adapter, layers, fmt: str, dtype: str, name: str, extra: dict | None = None) -> dict:
    """The source's `finetune.*` keys (rank/alpha as exported), what this export is, and modelspec."""
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith("finetune.")}
    for component, prefix in (("unet", ""), ("text_encoder", "te_"), ("text_encoder_2", "te2_")):
        if any(l.component == component for l in layers):
            meta[f"finetune.{prefix}rank"], meta[f"finetune.{prefix}alpha"] = _summary(layers, component)
    meta.update({"finetune.export_format": fmt, "finetune.export_dtype": dtype, "finetune.checkpoint": adapter.checkpoint,
                 "finetune.run": adapter.run_dir.resolve().name, "finetune.exported_at": _now()})
    for key in ("trigger", "class_word", "base", "arch"):
        meta.setdefault(f"finetune.{key}", str(getattr(adapter, key)))
    if adapter.steps:
        meta["finetune.steps"] = adapter.steps
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    lora = fmt in ("peft", "kohya")
    family = families.for_arch(adapter.arch)
    variant = family.variant(adapter.arch)
    resolution = getattr(getattr(adapter.cfg, "data", None), "resolution", variant.resolution)
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": variant.modelspec + ("/lora" if lora else ""),
        # as kohya's sai_model_spec: a LoRA names its family's modules (diffusers' or the original's);
        # a merged model is the original layout
        "modelspec.implementation": family.lora_implementation if lora else family.single_file_implementation,
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(timezone.utc).date().isoformat(),
        "modelspec.description": f"DreamBooth LoRA of {adapter.trigger} {adapter.class_word} on {adapter.base}, "
                                 "made with finetune"
                                 + ("" if lora else f" (fused at scale {meta.get('finetune.lora_scale', '1')})"),
    }
    if adapter.trigger:
        spec["modelspec.trigger_phrase"] = adapter.trigger
        spec["modelspec.usage_hint"] = f"Use '{adapter.trigger} {adapter.class_word}'".rstrip() + " in the prompt"
    meta.update(spec)
    return meta


def _is_hub_id(spec: str) -> bool:
    from finetune.models.load import HUB_ID

    return bool(HUB_ID.match(spec)) and not Path(spec).exists()


def _a1111_legacy_hash(path: Path) -> str | None:
    """A1111's old 8-digit model hash: sha256 of the 64 KiB at offset 1 MiB of the checkpoint file."""
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except OSError:
        return None


def kohya_metadata(adapter: Adapter, layers, name: str) -> dict[str, str]:
    """kohya's `ss_*` training metadata, from the run's header, run.json and config."""
    cfg = adapter.cfg
    main = "unet" if any(l.component == "unet" for l in layers) else "text_encoder"
    rank, alpha = _summary(layers, main)
    base = adapter.base
    base_hash = adapter.meta("base_hash", "base_hash")
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_base_model_version": families.variant(adapter.arch).kohya_version,
        **families.variant(adapter.arch).kohya_extra,
        "ss_output_name": name,
        "ss_steps": adapter.steps,
        "ss_training_started_at": _unix_time(adapter.meta("started_at", "started_at")),
        "ss_tag_frequency": adapter.meta("tag_frequency", None, "{}"),
        "ss_sd_model_name": Path(base.rstrip("/")).name if base else "",
        "ss_new_sd_model_hash": base_hash,
        # A1111 shows a checkpoint's legacy hash only for a single file; for a folder or hub base the short
        # form of the weights' sha256 (A1111's current "shorthash") is the closest thing.
        "ss_sd_model_hash": (Path(base).is_file() and _a1111_legacy_hash(Path(base))) or base_hash[:10],
        "ss_training_comment": f"trigger: {adapter.trigger}" if adapter.trigger else "",
    }
    te = [l for l in layers if l.component == "text_encoder"]
    if te and te[0].rank != layers[0].rank:
        meta["ss_network_args"] = json.dumps({"text_encoder_dim": te[0].rank, "text_encoder_alpha": te[0].alpha})
    if cfg is not None:
        t, d = cfg.train, cfg.data
        meta.update({
            "ss_learning_rate": t.lr, "ss_unet_lr": t.lr,
            "ss_text_encoder_lr": t.text_encoder_lr if cfg.lora.train_text_encoder else 0.0,
            "ss_max_train_steps": t.max_steps, "ss_lr_scheduler": t.lr_scheduler, "ss_lr_warmup_steps": t.warmup_steps,
            "ss_optimizer": t.optimizer, "ss_seed": t.seed,
            "ss_resolution": f"({d.resolution}, {d.resolution})", "ss_batch_size_per_device": t.batch_size,
            "ss_gradient_accumulation_steps": t.grad_accum, "ss_gradient_checkpointing": t.gradient_checkpointing,
            "ss_max_grad_norm": t.max_grad_norm, "ss_min_snr_gamma": t.min_snr_gamma, "ss_noise_offset": t.noise_offset,
            "ss_prior_loss_weight": t.prior_loss_weight if t.prior_preservation else 0.0,
            "ss_caption_dropout_rate": t.caption_dropout, "ss_cache_latents": t.cache_latents,
            "ss_network_dropout": cfg.lora.dropout, "ss_clip_skip": "None",
        })
        precision = trained_precision(adapter, t.mixed_precision)
        if precision:
            meta["ss_mixed_precision"] = precision
    return {k: str(v) for k, v in meta.items()}


KOHYA_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
"""run.json's precision names -> kohya's (accelerate's) `ss_mixed_precision` values."""


def trained_precision(adapter: Adapter, configured: str) -> str:
    """The precision the adapter was trained in, in kohya's names: what "auto" resolved to on the training
    machine (run.json's `precision`), else the config's when it names one; "" when neither can tell (a
    bare file trained with "auto"), so the key is left out rather than written as "auto"."""
    resolved = adapter.run.get("precision")
    if resolved in KOHYA_PRECISION:
        return KOHYA_PRECISION[resolved]
    return "" if configured == "auto" else configured


# ---------------------------------------------------------------- writers


def write_lora_file(adapter: Adapter, fmt: str, path: Path, *, dtype: str, name: str, rank: int | None,
                    echo: Callable[[str], None]) -> Path:
    layers = adapter.layers
    extra = {}
    if rank:
        before = sorted({l.rank for l in layers})
        layers, kept = lora_io.resize(layers, rank)
        echo(f"rank {'/'.join(map(str, before))} -> {rank}: share of each layer's update (Frobenius norm) kept: "
             f"min {min(kept):.2%}, mean {sum(kept) / len(kept):.2%} over {plural(len(kept), 'layer')}")
        extra = {"finetune.resized_from": json.dumps(before), "finetune.resize_kept_min": f"{min(kept):.6f}",
                 "finetune.resize_kept_mean": f"{sum(kept) / len(kept):.6f}"}
    layers = lora_io.cast(layers, DTYPES[dtype])
    meta = finetune_metadata(adapter, layers, fmt, dtype, name, extra)
    if fmt == "peft":
        configs = lora_io.adapter_metadata(adapter.metadata)
        for config in configs.values():  # a local path here would tell every downloader where the base lived
            config["base_model_name_or_path"] = adapter.base if _is_hub_id(adapter.base) else None
        tensors, header = lora_io.to_peft(layers, configs)
        meta.update(header)
    else:
        family = families.for_arch(adapter.arch)
        needs = family.kohya_needs_config and any(l.component == family.denoiser for l in layers)
        unet_config = unet_config_of_base(adapter, echo) if needs else None
        tensors = lora_io.to_kohya(layers, adapter.arch, unet_config)
        meta.update(kohya_metadata(adapter, layers, name))
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = lora_io.kohya_hashes(tensors, meta)
    return lora_io.write_safetensors(path, tensors, meta)


def _no_base(adapter: Adapter, what: str) -> FinetuneError:
    return FinetuneError(f"run {adapter.run_dir} does not say which base it was trained on (no finetune.base in "
                         f"{adapter.file.name}, no run.json): {what} needs it")


def _load_run_base(adapter: Adapter):
    from finetune.models import load_base

    model_cfg = getattr(adapter.cfg, "model", None)
    return load_base(adapter.base, config=getattr(model_cfg, "config", ""),
                     allow_pickle=getattr(model_cfg, "allow_pickle", False),
                     revision=getattr(model_cfg, "revision", ""), dtype=torch.float32)


def unet_config_of_base(adapter: Adapter, echo: Callable[[str], None]) -> dict:
    """The denoiser config of the run's base, which kohya's module names depend on for some families
    (SDXL's original-layout names): read from the base's (or model.config's) diffusers folder or the Hub
    cache when there is one, else from the loaded base."""
    from finetune.models.load import HUB_ID

    family = families.for_arch(adapter.arch)
    denoiser = family.denoiser
    spec = adapter.base
    if not spec:
        raise _no_base(adapter, f"naming {family.variant(adapter.arch).title} {denoiser} modules in the kohya layout")
    model_cfg = getattr(adapter.cfg, "model", None)
    folders = []
    tiny = families.tiny_specs()
    if spec in tiny:
        folders.append(tiny[spec][1]())
    elif Path(spec).expanduser().is_dir():
        folders.append(Path(spec).expanduser())
    if getattr(model_cfg, "config", ""):
        folders.append(Path(model_cfg.config).expanduser())
    for folder in folders:
        if (folder / denoiser / "config.json").is_file():
            return json.loads((folder / denoiser / "config.json").read_text())
    if HUB_ID.match(spec) and not Path(spec).exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, f"{denoiser}/config.json",
                                        revision=getattr(model_cfg, "revision", "") or None)
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
    echo(f"loading base {spec} for its {denoiser} layout (kohya names {family.variant(adapter.arch).title} "
         f"{denoiser} modules as the original layout does)")
    return dict(getattr(_load_run_base(adapter).pipe, denoiser).config)


def fused_pipeline(adapter: Adapter, scale: float, echo: Callable[[str], None]):
    """The run's base (fp32) with the adapter fused into its weights at `scale`, LoRA layers removed."""
    spec = adapter.base
    if not spec:
        raise _no_base(adapter, "a merged export")
    echo(f"loading base {spec}")
    base = _load_run_base(adapter)
    lora_io.check_fits(adapter.layers, base.pipe, lora_name=str(adapter.file), base_name=spec, arch=base.arch,
                       metadata=adapter.metadata)
    trained_on = adapter.meta("base_hash", "base_hash")
    if trained_on and base.model_hash() != trained_on:
        echo(f"warning: base {spec} now hashes to {base.model_hash()[:12]}, but the run was trained on "
             f"{trained_on[:12]}; the merged model uses the base as it is now")
    pipe = base.pipe
    lora_io.load_layers(pipe, adapter.layers, adapter_name="export")
    components = sorted({l.component for l in adapter.layers})
    echo(f"fusing the LoRA into {' and '.join(components)} at scale {scale:g}")
    pipe.fuse_lora(components=components, lora_scale=scale, adapter_names=["export"])
    pipe.unload_lora_weights()
    return base


def cast_in_place(pipe, dtype: torch.dtype) -> None:
    """Cast the weights in place: `Module.to` swaps one tensor at a time, so each old copy is freed as its
    new one appears and the peak stays near one model."""
    for name in (c.name for c in families.of_pipeline(pipe).components):
        model = getattr(pipe, name, None)
        if model is not None:
            # torch's own Module.to: diffusers' override only adds a warning about fp32-pinned modules
            torch.nn.Module.to(model, dtype)


def write_merged(pipe, path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
    """Single-file checkpoint from the live (fused) weights: cast in place, then written without a copy,
    so the peak stays near one model in memory."""
    from finetune.models.single_file import save_single_file

    cast_in_place(pipe, dtype)
    save_single_file(pipe, path, dtype=None, metadata=metadata, arch=metadata.get("finetune.arch"))
    return path


def write_merged_diffusers(pipe, path: Path, dtype: torch.dtype, info: dict) -> Path:
    cast_in_place(pipe, dtype)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        follow_umask(tmp)
        _replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------- the stage


def export(run_dir: Path, fmt: str, *, checkpoint: str | None = None, dtype: str | None = None,
           scale: float | None = None, out: Path | None = None, rank: int | None = None, force: bool = False,
           card: bool | None = None, echo: Callable[[str], None] = print) -> Path:
    """Export a run's adapter as `fmt` (peft | kohya | merged | merged-diffusers) and return the path.

    `dtype` and `scale` default to the run's export config (fp16, 1.0); `scale` is fused into merged
    exports only, `rank` (SVD resize) applies to LoRA files only. `out` is a file (a folder for
    merged-diffusers) or an existing folder to write the default name into; default
    `<run>/export/<name>...`. An existing output is replaced only with `force`. `card`: also write the
    model card and samples image beside the export (default: only when `out` is not given, so a
    user's folder such as ComfyUI's models/loras/ receives nothing but the file).
    """
    if fmt not in FORMATS:
        raise FinetuneError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    adapter = open_adapter(Path(run_dir), checkpoint)
    export_cfg = getattr(adapter.cfg, "export", None)
    dtype = dtype or getattr(export_cfg, "dtype", "fp16")
    if dtype not in DTYPES:
        raise FinetuneError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    lora_format = fmt in ("peft", "kohya")
    if lora_format and scale is not None and scale != 1:
        raise FinetuneError(f"--scale {scale:g} applies to merged exports; a LoRA file is scaled where it is loaded "
                            "(e.g. <lora:name:0.8> in A1111, set_adapters in diffusers)")
    scale = float(getattr(export_cfg, "scale", 1.0) if scale is None else scale)
    if rank is not None and not lora_format:
        raise FinetuneError(f"--rank {rank} resizes LoRA files (peft, kohya); a merged model has no rank")
    if rank is not None and rank < 1:
        raise FinetuneError(f"--rank {rank}: a LoRA rank must be at least 1")
    if rank is not None and rank > max(l.rank for l in adapter.layers):
        raise FinetuneError(f"--rank {rank} is above this LoRA's rank ({max(l.rank for l in adapter.layers)}): "
                            "resizing only reduces the rank")
    if fmt == "merged" and not families.variant(adapter.arch).single_file:
        can = ", ".join(v.title for f in families.families() for v in f.variants if v.single_file)
        raise FinetuneError(f"--format merged writes {can} single files; this run's base is "
                            f"{families.variant(adapter.arch).title}: use --format merged-diffusers")

    name = export_name(adapter)
    filename = default_filename(name, fmt, adapter.checkpoint, rank, scale)
    if out is None:
        path = adapter.run_dir / runs.EXPORT / filename
    else:
        out = Path(out)
        # an existing folder receives the default name, unless it is an earlier merged-diffusers export
        # (so --force can never replace a folder that finetune did not write)
        path = out / filename if out.is_dir() and not (out / EXPORT_INFO).is_file() else out
    _refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    if adapter.checkpoint != "final":
        echo(f"exporting checkpoint {adapter.checkpoint} of {adapter.run_dir}")
    if (note := runs.unfinished_note(adapter.run_dir)) is not None:
        echo(f"warning: {note}")

    if lora_format:
        write_lora_file(adapter, fmt, path, dtype=dtype, name=name, rank=rank, echo=echo)
    else:
        base = fused_pipeline(adapter, scale, echo)
        meta = finetune_metadata(adapter, adapter.layers, fmt, dtype, name,
                                 {"finetune.lora_scale": f"{scale:g}", "finetune.merged_base_hash": base.model_hash()})
        echo(f"writing {path}")
        if fmt == "merged":
            write_merged(base.pipe, path, DTYPES[dtype], meta)
        else:
            write_merged_diffusers(base.pipe, path, DTYPES[dtype], meta)
        del base
    echo(f"{fmt}: {path}")
    if fmt == "merged-diffusers":  # the folder is the export: its card is part of it
        write_model_card(path, adapter, name, echo)
    if out is None if card is None else card:
        written = write_model_card(path.parent, adapter, name, echo)
        if written:
            echo(f"model card: {written}")
    return path


# ---------------------------------------------------------------- model card and sample grid


def _run_mark(adapter: Adapter) -> str:
    """The line that says which run a card describes (a run's folder name and its start time)."""
    return f"<!-- run: {adapter.run_dir.resolve().name} started {adapter.metadata.get('finetune.started_at', '?')} -->"


def _same_run(meta: dict[str, str], adapter: Adapter) -> bool:
    """Whether an export's header says it comes from `adapter`'s run (any of its checkpoints)."""
    return (meta.get("finetune.run") == adapter.run_dir.resolve().name
            and meta.get("finetune.started_at") == adapter.metadata.get("finetune.started_at"))


def _exports_in(folder: Path) -> list[tuple[Path, dict[str, str]]]:
    """The finetune exports in `folder`: (path, metadata), files and merged-diffusers folders."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix == ".safetensors":
            try:
                _, meta = lora_io.read_header(p)
            except FinetuneError:
                continue
            if "finetune.export_format" in meta:
                found.append((p, meta))
        elif p.is_dir() and (p / EXPORT_INFO).is_file():
            try:
                found.append((p, json.loads((p / EXPORT_INFO).read_text())))
            except json.JSONDecodeError:
                continue
    return found


def sample_grid(run_dir: Path, dest: Path) -> Path | None:
    """The run's newest sample images (samples/step-N/<prompt>-<seed>.png) as one grid: rows are prompts,
    columns seeds. Returns None when the run has no samples."""
    from PIL import Image, PngImagePlugin

    from finetune.provenance import SOFTWARE, xmp_packet

    steps = sorted(((int(m.group(1)), p) for p in (run_dir / runs.SAMPLES).glob("step-*")
                    if (m := re.fullmatch(r"step-(\d+)", p.name)) and p.is_dir()), reverse=True)
    for step, folder in steps:
        cells = {}
        for f in folder.glob("*.png"):
            if m := re.fullmatch(r"(\d+)-(\d+)\.png", f.name):
                cells[int(m.group(1)), int(m.group(2))] = f
        if not cells:
            continue
        rows, cols = sorted({r for r, _ in cells}), sorted({c for _, c in cells})
        with Image.open(next(iter(cells.values()))) as first:
            w, h = first.size
        grid = Image.new("RGB", (w * len(cols), h * len(rows)), "white")
        for (r, c), f in cells.items():
            with Image.open(f) as im:
                grid.paste(im.convert("RGB").resize((w, h)), (cols.index(c) * w, rows.index(r) * h))
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", SOFTWARE)
        info.add_text("Description", f"samples of {run_dir.name} at step {step}: rows = prompts, columns = seeds {cols}")
        info.add_itxt("XML:com.adobe.xmp", xmp_packet(f"finetune samples, step {step}"))
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        grid.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, dest)
        return dest
    return None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def model_card(adapter: Adapter, name: str, exports: list[tuple[Path, dict]], grid: Path | None,
               inside: bool = False) -> str:
    # A local base path would tell every reader where it lived on this machine: only its name goes out.
    base = adapter.base if _is_hub_id(adapter.base) else (Path(adapter.base.rstrip("/")).name or "unknown")
    base_ref = base if _is_hub_id(adapter.base) else f"path/to/{base}"
    trigger, cls = adapter.trigger, adapter.class_word
    template = getattr(getattr(adapter.cfg, "data", None), "caption_template", "a photo of [trigger] [class]")
    instance_prompt = template.replace("[trigger]", trigger).replace("[class]", cls).strip()
    family = families.variant(adapter.arch).hub_tag
    tags = [family, f"{family}-diffusers", "text-to-image", "lora", "dreambooth", "finetune"]
    lines = ["---", f"base_model: {json.dumps(base)}", "tags:", *[f"- {t}" for t in tags],
             f"instance_prompt: {json.dumps(instance_prompt)}", "library_name: diffusers", "---", CARD_MARK,
             _run_mark(adapter), "",
             f"# {name}", "",
             f"A DreamBooth LoRA of **{trigger} {cls}** trained with finetune on `{base}`"
             + (f" for {plural(adapter.steps, 'step')}" if adapter.steps else "") + ".", "",
             f"**Trigger word:** `{trigger}` — put it in the prompt, e.g. `{instance_prompt}`.", "",
             "| file | format | dtype | size |", "|---|---|---|---|"]
    for path, meta in exports:
        fmt = meta.get("finetune.export_format", "?")
        detail = fmt + (f" (scale {meta['finetune.lora_scale']})" if "finetune.lora_scale" in meta else "")
        lines.append(f"| `{path.name}` | {detail} | {meta.get('finetune.export_dtype', '?')} | "
                     f"{_size(path) / 1e6:.1f} MB |")
    by_fmt = {meta.get("finetune.export_format"): path for path, meta in exports}
    lines += _usage(by_fmt, base_ref, trigger, instance_prompt, inside, adapter.arch)
    if grid is not None:
        lines += ["", "## Samples", "", f"![samples from the last training samples]({grid.name})"]
    lines += ["", "## Training", ""]
    for label, key in (("base hash", "base_hash"), ("dataset hash", "dataset_hash"), ("started", "started_at")):
        if value := adapter.meta(key, key):
            lines.append(f"- {label}: `{value}`")
    for component in lora_io.COMPONENTS:
        if any(l.component == component for l in adapter.layers):
            rank, alpha = _summary(adapter.layers, component)
            lines.append(f"- {component} LoRA: rank {rank}, alpha {alpha}")
    lines.append(f"- checkpoint: {adapter.checkpoint}")
    lines += _likeness_lines(adapter)
    return "\n".join(lines) + "\n"


def _likeness_lines(adapter: Adapter) -> list[str]:
    """The card's identity scores (`finetune score`, run/scores.json): the recommendation and this
    checkpoint's likeness and class leak at each scale."""
    from finetune.score import SCORES

    try:
        scores = json.loads((adapter.run_dir / SCORES).read_text())
    except (OSError, ValueError):
        return []
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["", "## Likeness", "", f"Scored by `finetune score` on {scores.get('faces_found', '?')} LoRA sample "
             "images with a face found (likeness = 1 - face identity distance to the training photos' subject; "
             "class leak = likeness of images prompted without the trigger).", "",
             f"**Recommendation:** {scores.get('summary', '')}", "",
             "| checkpoint | scale | likeness | faces | class leak | copies |", "|---|---|---|---|---|---|"]
    for c in scores.get("cells", []):
        if c["scale"] > 0 and (c["checkpoint"] or "final") == adapter.checkpoint:
            lines.append(f"| {adapter.checkpoint} | {c['scale']:g} | {fmt(c['likeness'])} | {c['faces']}/{c['images']} "
                         f"| {fmt(c['class_leak'])} | {c['copies']} |")
    return lines


def _usage(by_fmt: dict[str, Path], base_ref: str, trigger: str, prompt: str, inside: bool,
           arch: str = "sd1") -> list[str]:
    """How to load each kind of export present, in diffusers, AUTOMATIC1111/Forge and ComfyUI; `inside`:
    the card is in the (merged-diffusers) export itself."""
    pipeline = families.for_arch(arch).pipeline_class
    ref = {fmt: "." if inside else path.name for fmt, path in by_fmt.items()}
    lora = ref.get("peft") or ref.get("kohya")
    lines = ["", "## diffusers", "", "```python", "import torch", f"from diffusers import {pipeline}", ""]
    if lora:
        lines += [f"pipe = {pipeline}.from_pretrained({json.dumps(base_ref)}, torch_dtype=torch.float16)",
                  f"pipe.load_lora_weights(\".\", weight_name={json.dumps(lora)})  # scale: pipe.set_adapters(...)"]
    elif "merged-diffusers" in ref:
        lines.append(f"pipe = {pipeline}.from_pretrained({json.dumps(ref['merged-diffusers'])}, "
                     "torch_dtype=torch.float16)")
    elif "merged" in ref:
        lines.append(f"pipe = {pipeline}.from_single_file({json.dumps(ref['merged'])}, "
                     "torch_dtype=torch.float16)")
    lines += ["pipe = pipe.to(\"cuda\")", f"image = pipe({json.dumps(prompt)}, num_inference_steps=30).images[0]", "```"]
    if lora and "merged-diffusers" in ref:
        lines += ["", f"The merged folder `{ref['merged-diffusers']}` loads on its own with `from_pretrained`."]
    lines += ["", "## AUTOMATIC1111 / Forge", ""]
    if "kohya" in ref:
        lines.append(f"Copy `{ref['kohya']}` to `stable-diffusion-webui/models/Lora/` and add "
                     f"`<lora:{Path(ref['kohya']).stem}:0.8>` to the prompt together with `{trigger}`.")
    if "merged" in ref:
        lines.append(f"The merged checkpoint `{ref['merged']}` goes to `stable-diffusion-webui/models/Stable-diffusion/`.")
    if "kohya" not in ref and "merged" not in ref:
        lines.append("Export the kohya format (`finetune export RUN --format kohya`) or a merged checkpoint for these.")
    lines += ["", "## ComfyUI", ""]
    if "kohya" in ref:
        lines.append(f"Copy `{ref['kohya']}` to `ComfyUI/models/loras/` and load it with a *Load LoRA* node.")
    if "merged" in ref:
        lines.append(f"The merged checkpoint `{ref['merged']}` goes to `ComfyUI/models/checkpoints/` "
                     "and needs no LoRA node.")
    if "kohya" not in ref and "merged" not in ref:
        lines.append("Export the kohya format or a merged checkpoint for ComfyUI.")
    return lines


def write_model_card(folder: Path, adapter: Adapter, name: str, echo: Callable[[str], None]) -> Path | None:
    """A Hugging Face model card describing the exports of `adapter`'s run in `folder` (only that run's:
    several runs may share a folder). It is README.md, unless README.md there is the user's own file or
    another run's card: then it is <name>.md, and README.md is left alone."""
    readme = folder / "README.md"
    inside = (folder / EXPORT_INFO).is_file()  # a merged-diffusers folder: it is the one export
    if readme.exists() and not inside:
        text = readme.read_text(errors="replace")
        # a card that names no run was written before cards named theirs: it described this folder's exports
        if CARD_MARK not in text or ("<!-- run: " in text and _run_mark(adapter) not in text):
            whose = "another run's model card" if CARD_MARK in text else "not written by finetune"
            readme = folder / f"{name}.md"
            if readme.exists() and CARD_MARK not in readme.read_text(errors="replace"):
                echo(f"note: {folder / 'README.md'} and {readme} exist and are not this run's model card; "
                     "not replacing them (no card written)")
                return None
            echo(f"note: {folder / 'README.md'} is {whose}; not replacing it: this run's card is {readme.name}")
    if inside:
        exports, grid = [(folder, json.loads((folder / EXPORT_INFO).read_text()))], None
    else:
        exports = [(p, meta) for p, meta in _exports_in(folder) if _same_run(meta, adapter)]
        grid = sample_grid(adapter.run_dir, folder / f"{name}-samples.png")
    tmp = readme.with_name(f".{readme.name}.tmp{os.getpid()}")
    tmp.write_text(model_card(adapter, name, exports, grid, inside))
    os.replace(tmp, readme)
    return readme
