"""The Diffusion-DPO recipe: `train_dpo(cfg, start, pairs)` -> outputs/<run>/, a run's LoRA tuned on preferences.

Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908): for each pair (chosen w, rejected l) of one prompt,
noise both images with the same noise at the same timestep and compare denoising errors

    model_err = ||eps - eps_theta(x_t, t)||^2  per image,  ref_err the same with the frozen reference,
    inside    = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l)),   loss = -logsigmoid(inside).mean()

so the model learns to denoise chosen images better (and rejected ones worse) than the reference does,
and `beta` holds it near the reference. Our beta of 5000 with the 0.5 factor is the paper's SD 1.5 setting;
diffusers' research example writes the same objective without the 0.5 and beta 2500.

The reference is the starting model: the base plus the starting run's LoRA. The UNet carries two peft
adapters with the same weights at the start: "default", which trains (and is what gets saved, in the
main recipe's layout, so the result replaces the run's LoRA everywhere it loads), and "reference", a
frozen copy. The reference pass switches the active adapter (a pointer flip, no weight copies) and costs
one extra forward without gradients. Disabling a single trainable adapter would give the bare base, and
fusing the start LoRA into the base would leave a result that only works on top of that fused base.
A text-encoder LoRA of the starting run is loaded frozen: it is part of both models, so captions are
encoded once.

Functions, read top to bottom: `resolve_config` (the run's config + the DPO preset), `read_pairs`,
`setup`, `fit` (the loop), `evaluate` (held-out implicit reward accuracy), `finish`.
Checkpoints, resume, the stop flag, run.json and samples are the main recipe's (finetune/train/common.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from finetune import runs
from finetune.config import (
    RunConfig,
    apply_overrides,
    from_dict,
    override_keys,
    preset_path,
    read_toml,
)
from finetune.errors import ConfigError, FinetuneError, Stopped
from finetune.train import caching, common
from finetune.train.adapters import lora_metadata, read_lora_metadata, save_lora
from finetune.train.checkpoint import check_resume_compatible
from finetune.train.common import stop_requested
from finetune.train.data import BucketBatchSampler, sha256_file
from finetune.train.losses import make_noise, per_sample_mse
from finetune.train.metrics import MetricsLog, peak_memory_mb, plot_loss
from finetune.train.optim import make_lr_scheduler, make_optimizer
from finetune.train.precision import Precision
from finetune.train.residency import Parked
from finetune.words import plural

DEFAULT_PRESET = "feedback-dpo-sd15"
REPORT = "dpo_report.json"
PAIRS_COPY = "pairs.jsonl"
FIXED_BY_START = ("model.base", "model.config", "model.revision", "lora.rank", "lora.alpha", "lora.targets",
                  "lora.use_dora", "lora.train_text_encoder", "lora.text_encoder_rank", "lora.text_encoder_alpha",
                  "lora.text_encoder_targets")
"""Keys a DPO run takes from its starting run: they describe the adapter it continues."""


# ---------------------------------------------------------------- config and pairs
def resolve_config(start: Path, preset: str | Path | None = DEFAULT_PRESET, overrides=()) -> RunConfig:
    """The starting run's resolved config, with the preset's tables and the `--set` overrides on top."""
    start = Path(start)
    if not (start / runs.CONFIG).is_file() or not (start / runs.LORA_DIR).is_dir():
        raise FinetuneError(f"--from {start} is not a finished run (no config.json or lora/ in it): give the "
                            "outputs/<run> folder that `finetune train` wrote")
    start_cfg = runs.read_config(start)
    data = start_cfg.to_dict()
    problems: list[str] = []
    source = ""
    if preset is not None:
        path = preset_path(preset)
        source = path.name
        for section, table in read_toml(path).items():
            if isinstance(table, dict) and isinstance(data.get(section), dict):
                data[section] = {**data[section], **table}
            else:
                data[section] = table
    data = apply_overrides(data, overrides, problems)
    cfg = from_dict(data, problems=problems, source=source, overridden=override_keys(overrides))
    if problems:
        raise ConfigError(problems)
    changed = [f"{k} = {json.dumps(_get(cfg, k))} (the run has {json.dumps(_get(start_cfg, k))})"
               for k in FIXED_BY_START if _get(cfg, k) != _get(start_cfg, k)]
    if changed:
        raise FinetuneError(f"a DPO run continues the adapter of {start}, so it keeps that run's model and LoRA "
                            f"shape, but the preset or --set gives {'; '.join(changed)}: remove these keys")
    return cfg


def _get(cfg: RunConfig, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@dataclass(frozen=True)
class Pair:
    """One preference: two images of `prompt`, the person preferred `chosen`."""

    prompt: str
    chosen: Path
    rejected: Path
    chosen_sha256: str
    rejected_sha256: str


def _image_path(side: dict, start: Path | None) -> Path:
    """Where a pair's image is: its absolute `path`, else its `image` path inside the starting run."""
    path = Path(side.get("path") or "")
    if not path.is_file() and start is not None and side.get("image"):
        path = Path(start) / side["image"]
    return path


def read_pairs(path: Path, start: Path | None = None) -> tuple[list[Pair], list[str]]:
    """The pairs of a `finetune review --export` file and the reasons for pairs skipped (an image changed).

    A missing image is an error (the file no longer describes images on disk); a changed one (another
    sha256 than when it was rated) only drops its pair, since the rating was about the old image.
    """
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"pairs file {path} not found: write it with `finetune review RUN --export {path}`")
    pairs, skipped, missing = [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, sides = str(row["prompt"]), {k: row[k] for k in ("chosen", "rejected")}
            files = {k: _image_path(v, start) for k, v in sides.items()}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FinetuneError(f"{path}:{n} is not a preference pair (needs \"prompt\", \"chosen\" and \"rejected\"; "
                                f"{type(e).__name__}: {e}): write the file with `finetune review RUN --export`") from None
        gone = [f"{k} {sides[k].get('path') or sides[k].get('image')}" for k, f in files.items() if not f.is_file()]
        if gone:
            missing.append(f"line {n} {gone[0]}")
            continue
        changed = [k for k, f in files.items() if sides[k].get("sha256") and sha256_file(f) != sides[k]["sha256"]]
        if changed:
            skipped.append(f"{path.name}:{n}: the {changed[0]} image {files[changed[0]]} changed since it was rated")
            continue
        pairs.append(Pair(prompt, files["chosen"], files["rejected"], sha256_file(files["chosen"]),
                          sha256_file(files["rejected"])))
    if missing:
        raise FinetuneError(f"{path}: the images of {plural(len(missing), 'pair')} are missing (first: {missing[0]}); they were "
                            f"moved or deleted since the export: restore them or re-export the pairs with "
                            f"`finetune review RUN --export {path}`")
    return pairs, skipped


def pairs_hash(pairs: list[Pair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.prompt}\t{p.chosen_sha256}\t{p.rejected_sha256}\n".encode())
    return h.hexdigest()


def split_pairs(n: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) pair indices: a fixed share held out, chosen by the seed."""
    order = np.random.default_rng([seed, 0xD90]).permutation(n).tolist()
    k = min(max(1, round(n * held_out)), n - 1) if held_out > 0 and n > 1 else 0
    return sorted(order[k:]), sorted(order[:k])


def square_pixels(path: Path, resolution: int) -> torch.Tensor:
    """An image centre-cropped to a square and resized to the training resolution, (3, R, R) in [-1, 1]."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.fit(im.convert("RGB"), (resolution, resolution), Image.LANCZOS)
        arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)


# ---------------------------------------------------------------- the objective
def dpo_loss(model_err: torch.Tensor, ref_err: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, implicit reward accuracy) from per-image errors laid out [chosen..., rejected...].

    Accuracy: the share of pairs whose `inside` is positive (the model prefers the chosen image more
    than the reference does), ties counted as half, as in diffusers' example.
    """
    model_w, model_l = model_err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    accuracy = (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()
    return -F.logsigmoid(inside).mean(), accuracy


def held_out_loss(model_err: torch.Tensor, ref_err: torch.Tensor, beta: float) -> float:
    """The DPO loss over held-out errors (pairs, 2, timesteps), each timestep a sample: log 2 at the reference."""
    inside = -0.5 * beta * ((model_err[:, 0] - model_err[:, 1]) - (ref_err[:, 0] - ref_err[:, 1]))
    return -F.logsigmoid(inside).mean().item()


def implicit_accuracy(model_err: torch.Tensor, ref_err: torch.Tensor) -> float:
    """Held-out implicit reward accuracy from errors (pairs, 2 = chosen/rejected, timesteps): a pair counts
    when the model's chosen-minus-rejected error, averaged over the fixed timesteps, is below the reference's."""
    margin = ((ref_err[:, 0] - ref_err[:, 1]) - (model_err[:, 0] - model_err[:, 1])).mean(-1)
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()


@contextlib.contextmanager
def reference_adapter(unet):
    """Run the UNet as the reference model: the frozen "reference" adapter active, no dropout.

    peft's set_adapter also marks the active adapter trainable; switching back restores "default" as
    the only trainable one, so enter this before the model's forward pass, not between it and backward.
    """
    training = unet.training
    unet.eval()
    unet.set_adapter("reference")
    try:
        yield unet
    finally:
        unet.set_adapter("default")
        unet.train(training)


def add_reference_adapter(unet) -> None:
    """A frozen "reference" copy of the UNet's "default" adapter (the starting run's LoRA)."""
    with warnings.catch_warnings():  # peft warns that a second adapter makes two; that is the point
        warnings.simplefilter("ignore")
        unet.add_adapter(copy.deepcopy(unet.peft_config["default"]), adapter_name="reference")
    unet.set_adapter("default")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if ".default." in name:
                params[name.replace(".default.", ".reference.")].copy_(p)
    unet.requires_grad_(False)
    for name, p in params.items():
        if ".default." in name:
            p.requires_grad_(True)


# ---------------------------------------------------------------- setup
@dataclass
class DpoRun:
    """A DPO run in progress. The loop state (what a checkpoint holds): `step`, the "default" adapter's
    weights, `optimizer`, `lr_scheduler`, `accelerator.scaler`, `sampler`, and the global RNG states
    (noise and timesteps come from them). The held-out evaluation uses its own fixed
    generator, so it never moves the training RNG."""

    cfg: RunConfig
    dir: Path
    start: Path
    start_info: dict
    accelerator: object
    base: object
    denoiser: torch.nn.Module
    """The family's denoiser, with the "default" (trained) and "reference" adapters."""
    encoders: dict[str, torch.nn.Module]
    """The text encoders by component name (frozen; a text-encoder LoRA of the start is loaded into them)."""
    vae: torch.nn.Module
    noise_scheduler: object
    pairs: list[Pair]
    train_ids: list[int]
    held_ids: list[int]
    chosen: list[torch.Tensor]
    """Latents (the VAE posterior's mean, scaled for the UNet) of each pair's chosen image, on the device."""
    rejected: list[torch.Tensor]
    text: dict[str, dict[str, torch.Tensor]]
    """prompt -> the family's text conditioning (batch of one), on the device."""
    conditioning: dict[str, torch.Tensor]
    """The per-image conditioning of one pair image (square, at the training resolution), batch of one."""
    sampler: BucketBatchSampler
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    base_hash: str
    start_hash: str
    pairs_hash: str
    started_at: str
    precision: Precision
    skipped: list[str] = field(default_factory=list)
    parked: Parked | None = None
    """The VAE and (without a LoRA of the start run's) the text encoder: encoded once, off the device
    until sampling."""
    step: int = 0
    metrics: MetricsLog | None = None
    sampled_at: set[int] = field(default_factory=set)
    saved_at: int | None = None
    """The step of the last checkpoint this process wrote or resumed from."""

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def trainable(self) -> dict[str, torch.Tensor]:
        """The "default" adapter's parameters by `<denoiser>.<name>` (fp32)."""
        return common.trainable(self, {self.base.family.denoiser: self.denoiser})


def train_dpo(cfg: RunConfig, start: Path, pairs: Path | None = None, out: Path | None = None, *,
              resume: str | None = None) -> Path:
    """Tune the LoRA of run `start` on preference pairs; return the new run folder (with dpo_report.json)."""
    run = setup(cfg, start, pairs, out, resume=resume)
    fit(run)
    finish(run)
    return run.dir


def default_run_dir(start: Path) -> Path:
    return runs.default_run_dir(f"{Path(start).resolve().name}-dpo")


def _locate_pairs(cfg: RunConfig, start: Path, pairs: Path | None, run_dir: Path, resume: str | None,
                  tmp: Path) -> Path:
    """The pairs file: --pairs, dpo.pairs, the resumed run's copy, or an export of the start run's ratings."""
    if pairs is not None:
        return Path(pairs)
    if cfg.dpo.pairs:
        return Path(cfg.dpo.pairs)
    if resume and (run_dir / PAIRS_COPY).is_file():
        return run_dir / PAIRS_COPY
    from finetune.ratings import export_pairs

    result = export_pairs(start, tmp / PAIRS_COPY)
    tqdm.write(f"exported {result.written} preference pairs from {start}'s ratings")
    return result.path


def setup(cfg: RunConfig, start: Path, pairs: Path | None = None, out: Path | None = None, *,
          resume: str | None = None) -> DpoRun:
    """Everything the loop needs: the pairs, the base with the starting adapter twice, latents, optimizer."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params

    from finetune import lora_io
    from finetune.models import families, load_base
    from finetune.train.data import Example

    t = cfg.train
    started_at = common.now()
    start = Path(start)
    run_dir = Path(out) if out is not None else default_run_dir(start)
    # Fail fast on what needs no model: the run folders, the checkpoint to resume, the pairs, their count.
    if resume is None and run_dir.exists() and any(run_dir.iterdir()):
        raise FinetuneError(f"{run_dir} already holds a run: pass --out NEW_FOLDER, or --resume latest to continue it")
    state = None
    if resume is not None:
        run_dir, found, state, caught = common.open_resume(run_dir, resume, out is not None)
    start_info = runs.read_info(start)
    with tempfile.TemporaryDirectory(prefix="finetune-dpo-") as tmp:
        pairs_file = _locate_pairs(cfg, start, pairs, run_dir, resume, Path(tmp))
        all_pairs, skipped = read_pairs(pairs_file, start)
        pairs_text = pairs_file.read_text(encoding="utf-8")
        # an export into the temporary folder is gone when the user reads the message: name its source
        source = f"{start}'s ratings give" if pairs_file.parent == Path(tmp) else f"{pairs_file} gives"
    train_ids, held_ids = split_pairs(len(all_pairs), cfg.dpo.held_out, t.seed)
    if len(train_ids) < t.batch_size:
        raise FinetuneError(f"{source} {len(train_ids)} preference pairs to train on ({len(all_pairs)} "
                            f"usable, {len(held_ids)} held out for the report) but train.batch_size = {t.batch_size}: "
                            "rate more pairs in `finetune review`, or lower --set train.batch_size=N or dpo.held_out")

    accelerator, precision = common.make_accelerator(cfg, run_dir)
    if t.attention == "xformers":
        raise FinetuneError("the DPO recipe runs PyTorch SDPA attention: use --set train.attention=sdpa (or auto)")
    device, weight_dtype = accelerator.device, precision.dtype
    if state is not None:
        common.show_warnings(caught, tqdm.write if accelerator.is_main_process else (lambda *a, **k: None))
        common.check_resume(state, found, cfg, precision)  # what needs no model; the hashes once known

    # The starting model: the base plus the run's adapter(s), loaded as adapter "default".
    if cfg.model.offload != "none":
        raise FinetuneError(f"model.offload = {cfg.model.offload!r} is for finetune train; train-dpo keeps the "
                            "denoiser on the device: set model.offload = \"none\" (model.quantize works)")
    base = load_base(cfg.model.base, config=cfg.model.config, allow_pickle=cfg.model.allow_pickle,
                     revision=cfg.model.revision, quantize=cfg.model.quantize)
    pipe, family = base.pipe, base.family
    lora_file = runs.final_lora(start)
    lora_io.load_lora(pipe, lora_file, adapter_name="default", base_name=cfg.model.base, arch=base.arch)
    unet, vae = getattr(pipe, family.denoiser), getattr(pipe, family.vae)
    text_parts = family.component(families.TEXT_ENCODER)
    encoders = {c.name: getattr(pipe, c.name) for c in text_parts}
    noise_scheduler = family.training_scheduler(pipe, cfg.flow)
    common.place_frozen(pipe, family, device, weight_dtype)
    vae.eval()
    vae.requires_grad_(False)
    for m in encoders.values():
        m.eval()
        m.requires_grad_(False)
    add_reference_adapter(unet)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    cast_training_params([unet], dtype=torch.float32)
    for name, p in unet.named_parameters():  # the reference in fp32 too: at step 0 the two must be equal
        if ".reference." in name:
            p.data = p.data.float()
    base_hash = base.model_hash()

    # Each image encoded once at the training resolution; each prompt's text, once. We keep the VAE
    # posterior's mean, not draws from it: a pair compares two images, and draws would add VAE noise to
    # that comparison (negligible with SD's VAE, whose posterior std is tiny; large with a random one).
    res = cfg.data.resolution
    chosen, rejected = [], []
    for p in tqdm(all_pairs, desc="encoding pairs", unit="pair", disable=not accelerator.is_main_process):
        pixels = torch.stack([square_pixels(p.chosen, res), square_pixels(p.rejected, res)])
        means = caching.scale_latents(vae, caching.encode_pixels(vae, pixels).chunk(2, dim=1)[0])
        chosen.append(means[0].to(device))
        rejected.append(means[1].to(device))
    components = {**encoders, **{c.tokenizer: getattr(pipe, c.tokenizer) for c in text_parts}}
    with torch.no_grad():
        text = {prompt: {k: v.to(device) for k, v in family.encode_text(components, [prompt]).items()}
                for prompt in dict.fromkeys(p.prompt for p in all_pairs)}
    square = Example(image=Path(), caption="", bucket=(res, res), sha256="")
    conditioning = {k: v.to(device) for k, v in family.example_conditioning([square]).items()}

    set_seed(t.seed)
    optimizer = make_optimizer([{"params": [p for p in unet.parameters() if p.requires_grad], "lr": t.lr}], t)
    lr_scheduler = make_lr_scheduler(optimizer, t)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    set_seed(t.seed, device_specific=True)
    sampler = BucketBatchSampler([(res, res)] * len(train_ids), t.batch_size, t.seed,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    run = DpoRun(cfg=cfg, dir=run_dir, start=start, start_info=start_info, accelerator=accelerator, base=base,
                 denoiser=unet, encoders=encoders, vae=vae, noise_scheduler=noise_scheduler, pairs=all_pairs,
                 train_ids=train_ids, held_ids=held_ids, chosen=chosen, rejected=rejected, text=text,
                 conditioning=conditioning,
                 sampler=sampler, optimizer=optimizer, lr_scheduler=lr_scheduler, base_hash=base_hash,
                 start_hash=sha256_file(lora_file), pairs_hash=pairs_hash(all_pairs), started_at=started_at,
                 precision=precision, skipped=skipped)
    run.parked = Parked(pipe, device)  # every image and prompt is encoded: only sampling runs them again
    run.parked.park([family.vae] + [n for n, m in encoders.items() if not getattr(m, "peft_config", None)])

    resume_step = None
    if state is not None:
        check_resume_compatible(state["config"], checkpoint_config(run))  # the base, the start LoRA, the pairs
        common.load_state(run, state, run.trainable())
        run.saved_at = resume_step = run.step

    accelerator.wait_for_everyone()
    if run.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            (run_dir / PAIRS_COPY).write_text(pairs_text, encoding="utf-8")  # the run describes what it learnt from
        else:
            run.started_at = common.started_at(run_dir, started_at)
            tqdm.write(common.resumed_note(run, common.drop_newer_checkpoints(run_dir, run.step)))
        common.write_json(run_dir / runs.CONFIG, cfg.to_dict())
        common.write_json(run_dir / runs.RUN_INFO, run_info(run))
        run.metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_step)
        tqdm.write(f"Diffusion-DPO on {plural(len(train_ids), 'pair')} ({len(held_ids)} held out) from {start} -> {run_dir} "
                   f"[{device}, precision {precision.describe()}, beta {cfg.dpo.beta:g}]"
                   + (f", resuming at step {run.step}" if resume_step is not None else ""))
        for reason in skipped:
            tqdm.write(f"skipped {reason}")
    if state is not None:
        common.restore_rngs(run, state)  # last, right before the loop
    return run


def run_info(run: DpoRun, finished: bool = False) -> dict:
    """run.json: the contract's keys (so export, sample and review read a DPO run) plus where it started."""
    info = run.start_info
    return common.run_info(run, dataset=info.get("dataset"), dataset_hash=info.get("dataset_hash"), finished=finished,
                           method="diffusion-dpo", **{"from": str(run.start)}, from_steps=info.get("steps"),
                           from_lora_sha256=run.start_hash, pairs=PAIRS_COPY, pairs_hash=run.pairs_hash,
                           pairs_train=len(run.train_ids), pairs_held_out=len(run.held_ids))


def checkpoint_config(run: DpoRun) -> dict:
    """The resolved config plus what a resume must find unchanged (see check_resume_compatible)."""
    return {**run.cfg.to_dict(), "_base_hash": run.base_hash, "_start_lora_sha256": run.start_hash,
            "_pairs_hash": run.pairs_hash, "_num_processes": run.accelerator.num_processes,
            "_precision": run.precision.mode}


# ---------------------------------------------------------------- the loop
def fit(run: DpoRun) -> None:
    """The training loop, from `run.step` to `train.max_steps`. A first SIGINT/SIGTERM on any process:
    all finish the step, save, print the resume command, exit 130/143."""
    from finetune.train.signals import GracefulStop

    cfg, acc, t = run.cfg, run.accelerator, run.cfg.train
    params = [p for p in run.denoiser.parameters() if p.requires_grad]
    family, scheduler = run.base.family, run.noise_scheduler
    reference = acc.unwrap_model(run.denoiser)
    run.denoiser.train()
    bar = tqdm(total=t.max_steps, initial=run.step, desc="Diffusion-DPO", unit="step", disable=not run.main,
               dynamic_ncols=True)
    window, window_start = [], time.perf_counter()
    with GracefulStop() as stop:
        while run.step < t.max_steps:
            losses, accuracies, model_losses, ref_losses = [], [], [], []
            for _ in range(t.grad_accum):
                batch = run.sampler.next()
                ids = [run.train_ids[i] for i in batch.instance]
                with acc.accumulate(run.denoiser):
                    # Chosen images first, then rejected: each pair shares its noise, timestep and prompt.
                    latents = torch.stack([run.chosen[i] for i in ids] + [run.rejected[i] for i in ids])
                    noise = make_noise(latents[:len(ids)], t.noise_offset).repeat(2, 1, 1, 1)
                    timesteps = family.sample_timesteps(scheduler, len(ids), latents.device).repeat(2)
                    noisy = family.add_noise(scheduler, latents, noise, timesteps)
                    cond = pair_conditioning(run, [run.pairs[i].prompt for i in ids] * 2)
                    target = family.target(scheduler, latents, noise, timesteps)
                    with torch.no_grad(), reference_adapter(reference):
                        ref_err = per_sample_mse(family.predict(scheduler, run.denoiser, noisy, timesteps, cond), target)
                    model_err = per_sample_mse(family.predict(scheduler, run.denoiser, noisy, timesteps, cond), target)
                    loss, accuracy = dpo_loss(model_err, ref_err, cfg.dpo.beta)
                    acc.backward(loss)
                    if acc.sync_gradients and t.max_grad_norm:
                        acc.clip_grad_norm_(params, t.max_grad_norm)
                    run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
                accuracies.append(accuracy.detach())
                model_losses.append(model_err.detach().mean())
                ref_losses.append(ref_err.mean())
            run.lr_scheduler.step()
            run.step += 1

            row = {k: acc.reduce(torch.stack(v).mean(), reduction="mean").item()
                   for k, v in (("loss", losses), ("implicit_acc", accuracies), ("model_loss", model_losses),
                                ("ref_loss", ref_losses))}
            if not math.isfinite(row["loss"]):
                raise FinetuneError(f"the DPO loss became {row['loss']} at step {run.step}: lower train.lr "
                                    f"(now {t.lr:g}) or dpo.beta (now {cfg.dpo.beta:g})")
            window.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['implicit_acc']:.2f}", refresh=False)
            bar.update(1)
            if run.step % t.log_every == 0 or run.step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                memory, kind = peak_memory_mb(acc.device)
                if run.main:
                    run.metrics.write(step=run.step, epoch=run.sampler.epoch,
                                      **{k: sum(r[k] for r in window) / len(window) for k in row},
                                      lr=run.lr_scheduler.get_last_lr()[0],
                                      it_s=len(window) / elapsed if elapsed else None,
                                      peak_memory_mb=round(memory, 1), memory=kind)
                window, window_start = [], time.perf_counter()
            if t.save_every and run.step % t.save_every == 0 and run.step < t.max_steps:
                checkpoint(run)
            if cfg.sample.every and run.step % cfg.sample.every == 0 and run.step < t.max_steps:
                sample(run)
                window_start = time.perf_counter()
            if stop_requested(run, stop):
                bar.close()
                if run.saved_at != run.step:
                    checkpoint(run)
                if run.main:
                    tqdm.write(f"stopped at step {run.step}; continue with: finetune train-dpo --from {run.start} "
                               f"--out {run.dir} --resume latest")
                raise Stopped(stop.signum)
    bar.close()


def pair_conditioning(run: DpoRun, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The denoiser's conditioning of a batch of pair images: each prompt's text, and the per-image
    conditioning of a square image at the training resolution."""
    cond = {k: torch.cat([run.text[p][k] for p in prompts]) for k in run.text[prompts[0]]}
    return {**cond, **{k: v.expand(len(prompts), *v.shape[1:]) for k, v in run.conditioning.items()}}


def checkpoint(run: DpoRun) -> Path:
    """checkpoints/step-NNNNNN/ with the adapter (the main recipe's layout) and the whole loop state."""
    path = common.save(run, run.trainable(), checkpoint_config(run), lora_files=lambda d: save_adapter(run, d))
    run.saved_at = run.step
    return path


def save_adapter(run: DpoRun, folder: Path) -> Path:
    """The tuned adapter ("default"; the text-encoder LoRA of the start, unchanged) with its metadata."""
    unet = run.accelerator.unwrap_model(run.denoiser)
    meta = lora_metadata(run.cfg, base=run.base, base_hash=run.base_hash, steps=run.step,
                         dataset_hash=run.start_info.get("dataset_hash") or "", started_at=run.started_at,
                         dataset_name=Path(run.start_info.get("dataset") or "dataset").name, tag_frequency={})
    start_meta = read_lora_metadata(run.start / runs.LORA_DIR)
    if "finetune.tag_frequency" in start_meta:  # the subject data the adapter learnt first
        meta["finetune.tag_frequency"] = start_meta["finetune.tag_frequency"]
    meta.update({"finetune.method": "diffusion-dpo", "finetune.dpo_from": run.start.name,
                 "finetune.dpo_from_steps": str(run.start_info.get("steps", "")),
                 "finetune.dpo_beta": f"{run.cfg.dpo.beta:g}", "finetune.dpo_pairs_hash": run.pairs_hash})
    family = run.base.family
    return save_lora(folder, {family.denoiser: unet, **run.encoders}, meta, arch=run.base.arch)


def sample(run: DpoRun) -> None:
    """Sample images of the tuned model into samples/step-NNNNNN/, as the main recipe does."""
    common.sample(run, [run.denoiser])


# ---------------------------------------------------------------- the report
@torch.no_grad()
def denoising_errors(run: DpoRun, ids: list[int], adapter: str) -> torch.Tensor:
    """Errors (pairs, 2 = chosen/rejected, timesteps) of one adapter at fixed timesteps and noises.

    The noise of pair i comes from a generator seeded by (seed, i), so the
    numbers depend only on the weights: the same for both adapters, before and after training, on resume.
    """
    unet = run.accelerator.unwrap_model(run.denoiser)
    family, scheduler = run.base.family, run.noise_scheduler
    timesteps = family.spread_timesteps(scheduler, run.cfg.dpo.eval_timesteps)
    k = len(timesteps)
    device = run.accelerator.device
    out = []
    ctx = reference_adapter(unet) if adapter == "reference" else contextlib.nullcontext()
    mode = unet.training
    unet.eval()
    with ctx:
        for i in ids:
            latents = torch.stack([run.chosen[i], run.rejected[i]])
            g = torch.Generator().manual_seed(run.cfg.train.seed * 1_000_003 + i)
            noise = torch.randn((k, *latents.shape[1:]), generator=g).to(device, latents.dtype)
            x = latents.repeat_interleave(k, dim=0)  # chosen x k, then rejected x k
            ts = timesteps.repeat(2).to(device)
            noise2 = noise.repeat(2, 1, 1, 1)
            noisy = family.add_noise(scheduler, x, noise2, ts)
            with run.accelerator.autocast():
                pred = family.predict(scheduler, unet, noisy, ts, pair_conditioning(run, [run.pairs[i].prompt] * (2 * k)))
            err = per_sample_mse(pred, family.target(scheduler, x, noise2, ts))
            out.append(err.view(2, k).cpu())
    unet.train(mode)
    return torch.stack(out) if out else torch.zeros(0, 2, k)


def evaluate(run: DpoRun) -> dict:
    """Implicit reward accuracy on the held-out pairs, before (the model is the reference: 0.5 by
    construction, computed all the same) and after, with how often each model alone prefers the chosen image."""
    ids = run.held_ids
    if not ids:
        return {"held_out_pairs": 0, "note": "dpo.held_out = 0: no pairs were kept out for the report"}
    ref = denoising_errors(run, ids, "reference")
    tuned = denoising_errors(run, ids, "default")

    def prefers_chosen(err):
        return (err[:, 0].mean(-1) < err[:, 1].mean(-1)).float().mean().item()

    return {"held_out_pairs": len(ids), "eval_timesteps": run.cfg.dpo.eval_timesteps,
            "implicit_reward_accuracy": {"before": implicit_accuracy(ref, ref), "after": implicit_accuracy(tuned, ref)},
            "dpo_loss": {"before": held_out_loss(ref, ref, run.cfg.dpo.beta),
                         "after": held_out_loss(tuned, ref, run.cfg.dpo.beta)},
            "prefers_chosen": {"reference": prefers_chosen(ref), "tuned": prefers_chosen(tuned)},
            "mean_error_margin": {"reference": (ref[:, 1] - ref[:, 0]).mean().item(),
                                  "tuned": (tuned[:, 1] - tuned[:, 0]).mean().item()}}


# ---------------------------------------------------------------- the end
def finish(run: DpoRun) -> dict:
    """The final adapter, samples, loss curve, run.json and dpo_report.json (also printed); returns the report."""
    from finetune.train.metrics import read_metrics

    acc = run.accelerator
    acc.wait_for_everyone()
    report = {}
    if run.main:
        path = save_adapter(run, run.dir / runs.LORA_DIR)
        sample(run)
        run.metrics.close()
        plot_loss(run.dir / "metrics.jsonl", run.dir / "loss.png")
        rows = read_metrics(run.dir / "metrics.jsonl")
        report = {"from": str(run.start), "steps": run.step, "beta": run.cfg.dpo.beta,
                  "pairs": {"train": len(run.train_ids), "held_out": len(run.held_ids), "skipped": run.skipped},
                  "loss": {"first": rows[0]["loss"], "last": rows[-1]["loss"]} if rows else None,
                  **evaluate(run)}
        common.write_json(run.dir / REPORT, report)
        common.write_json(run.dir / runs.RUN_INFO, run_info(run, finished=True))
        tqdm.write(format_report(report))
        tqdm.write(f"done: {plural(run.step, 'DPO step')}; LoRA in {path}; report in {run.dir / REPORT}")
    acc.end_training()
    return report


def format_report(report: dict) -> str:
    if not report.get("held_out_pairs"):
        return "no held-out pairs: set dpo.held_out above 0 to measure implicit reward accuracy"
    a, p = report["implicit_reward_accuracy"], report["prefers_chosen"]
    return (f"implicit reward accuracy on {plural(report['held_out_pairs'], 'held-out pair')}: {a['before']:.3f} before -> "
            f"{a['after']:.3f} after (the share of pairs whose chosen image the tuned model denoises better, "
            f"relative to the rejected one, than the starting model does); the chosen image has the lower error "
            f"for {p['reference']:.0%} of pairs with the starting model, {p['tuned']:.0%} after")
