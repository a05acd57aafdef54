"""The DreamBooth + LoRA recipe: `train(cfg, dataset)` -> outputs/<run>/.

Three plain functions, read top to bottom:
- `setup`  a few named steps: the checks and the checkpoint to resume, the accelerator, `setup_data`
           (the dataset, prepared first if it is a folder of photos), `setup_model` (the base),
           `setup_class_images`, `setup_caches` (latents, text), `setup_training` (LoRA adapters,
           optimizer and schedule), the data order, `start_run_folder`;
- `fit`    the loop;
- `finish` the final adapter, samples, loss curve and run.json.
What the DPO recipe does alike (accelerator, run.json, checkpoints and resume, the stop flag,
sampling) is in `finetune.train.common`.

Every base goes through the same functions: what differs by architecture (text encoding, per-image
conditioning such as SDXL's micro-conditioning, the noisy input, the model call, the loss target and
weights, which components stay fp32) is the base's family's (finetune.models.families). Text encoders
are cached while frozen (and get LoRAs with `lora.train_text_encoder`).

`accelerate` drives the loop, so `accelerate launch --num_processes N -m finetune train ...` trains
data-parallel without code changes; only the main process writes files.

Everything the loop changes lives in `Run` (see its docstring): that, plus the global RNG states, is
the whole training state, which is what a checkpoint saves (`save`, every `train.save_every` steps and
at the end) and a resume restores (`setup(..., resume="latest" | PATH)`), bit for bit.

Resuming is the same call (or command) as the run's start plus `resume`: the config is resolved the
same way (preset + overrides) and must match the checkpoint's, except keys that only say how long to
train, how often to save/log/sample, or how to compute the same thing (`checkpoint.RESUME_MAY_CHANGE`);
the dataset and base weights must hash the same, and the number of processes must match.
A first SIGINT/SIGTERM finishes the current step, saves a checkpoint, prints the command that
resumes and exits with 130/143.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune import runs
from finetune.config import RunConfig
from finetune.errors import FinetuneError, Stopped
from finetune.train import caching, common
from finetune.train.adapters import add_lora, lora_metadata, lora_parameters, save_lora
from finetune.train.checkpoint import check_resume_compatible
from finetune.train.common import stop_requested
from finetune.train.data import (BucketBatchSampler, Example, dataset_hash, sha256_file, is_prepared, load_pixels,
                                 prepared_target, read_dataset, substitute, tag_frequency)
from finetune.train.dataset_checks import check_trigger
from finetune.train.feedback import feedback_examples, rejected_prompts, rejects_note
from finetune.train.losses import dreambooth_loss, make_noise, per_sample_mse
from finetune.train.metrics import MetricsLog, peak_memory_mb, plot_loss
from finetune.train.optim import make_lr_scheduler, make_optimizer
from finetune.train.precision import Precision
from finetune.train.preflight import (attention_problem, check_before_loading, check_resolution, dataset_problem,
                                      have_xformers)
from finetune.train.residency import Parked
from finetune.train.signals import GracefulStop
from finetune.words import plural


@dataclass
class Run:
    """A run in progress.

    The loop state (what a checkpoint must hold to continue exactly):
      `step`; the LoRA weights (`denoiser`, and the text `encoders` when `cfg.lora.train_text_encoder`);
      `optimizer`; `lr_scheduler`; `accelerator.scaler` (fp16 only, else None); `sampler`
      (`state_dict()` = epoch + position, mid-epoch too); and the global RNG states of python, numpy,
      torch CPU and CUDA of each process: every random draw in the loop (latent samples, noise,
      timesteps, caption dropout, LoRA dropout) comes from them, none from private generators.
    Everything else is rebuilt by `setup` from the config and the files on disk.
    """

    cfg: RunConfig
    dir: Path
    dataset: Path
    accelerator: object
    base: object
    denoiser: torch.nn.Module
    """The family's denoiser (a UNet, a transformer), with the LoRA."""
    encoders: dict[str, torch.nn.Module]
    """The text encoders by component name (text_encoder, text_encoder_2, ...)."""
    tokenizers: dict[str, object]
    """Their tokenizers, by the pipeline's attribute names."""
    vae: torch.nn.Module
    noise_scheduler: object
    examples: list[Example]
    sampler: BucketBatchSampler
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    weight_dtype: torch.dtype
    """The frozen weights' dtype (`precision.dtype`; SDXL's VAE stays fp32)."""
    precision: Precision
    base_hash: str
    dataset_hash: str
    started_at: str
    latents: list[torch.Tensor] | None = None
    """Cached latent Gaussians per example (on the device), or None: `pixels` are encoded every step."""
    pixels: list[torch.Tensor] | None = None
    prior_latents: list[torch.Tensor] | None = None
    prior_pixels: list[torch.Tensor] | None = None
    class_prompt: str = ""
    text: dict[str, dict[str, torch.Tensor]] | None = None
    """Cached caption -> the family's text conditioning ({"hidden", ...}, on the device), or None: the
    text encoders run every step."""
    step: int = 0
    metrics: MetricsLog | None = None
    sampled_at: set[int] = field(default_factory=set)
    saved_at: int | None = None
    """The step of the last checkpoint this process wrote or resumed from."""
    resume_hint: str = ""
    """What to run to continue after a stop (printed with the stop)."""
    feedback: dict | None = None
    """With `--feedback RUN`: {"run", "images", "weight"} of the favourites added to the examples."""
    parked: Parked | None = None
    """The frozen components whose outputs are cached, kept off the device until sampling needs them."""

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def family(self):
        return self.base.family

    def trained_models(self) -> dict[str, torch.nn.Module]:
        """The models with LoRA parameters, by their key prefix (the component name)."""
        from finetune.models.families import TEXT_ENCODER

        tuned = [c.name for c in self.family.component(TEXT_ENCODER) if c.lora] if self.cfg.lora.train_text_encoder else []
        return {self.family.denoiser: self.denoiser, **{n: self.encoders[n] for n in tuned}}

    def text_components(self) -> dict[str, object]:
        """What the family's `encode_text` reads: the text encoders and their tokenizers by name."""
        return {**self.encoders, **self.tokenizers}

    def idle_components(self) -> list[str]:
        """The pipeline components the loop never runs: the VAE when the latents are cached, the
        (frozen) text encoders when the captions are."""
        return (([self.family.vae] if self.latents is not None else [])
                + (list(self.encoders) if self.text is not None else []))


def train(cfg: RunConfig, dataset: Path, out: Path | None = None, *, preset: str | None = None,
          resume: str | Path | None = None, command: list[str] | None = None,
          feedback: Path | None = None, resume_with: str | None = None) -> Path:
    """Train a LoRA on `dataset` (a prepared dataset, or a folder of photos to prepare first); return the run folder.

    `resume`: "latest", a checkpoint folder (or "step-N") or a run folder: continue that run exactly.
    `command`: the `finetune train` arguments (without --resume), for the resume command printed on a stop.
    `resume_with`: instead, the whole shell command that continues the run (`finetune demo`'s own).
    `feedback`: a reviewed run folder whose favourites join the data (see `setup`).
    """
    run = setup(cfg, dataset, out, preset=preset, resume=resume, feedback=feedback)
    run.resume_hint = resume_with or resume_hint(run, command)
    fit(run)
    finish(run)
    return run.dir


# ---------------------------------------------------------------- setup
def setup(cfg: RunConfig, dataset: Path, out: Path | None = None, *, preset: str | None = None,
          resume: str | Path | None = None, feedback: Path | None = None) -> Run:
    """Everything the loop needs, from the config and the files on disk (and from a checkpoint when
    `resume` names one: see `common.find_resume`), in named steps.

    `feedback`: a run folder rated with `finetune review`: its favourited images (their prompts as
    captions) join the examples with loss weight `train.feedback_weight` (so the dataset hash covers
    them), and class images of a prompt rejected there are generated afresh instead of reused."""
    started_at = common.now()
    # Fail fast, all at once, on what needs no model: the dataset, the run folder, the base's path, the
    # device, the resolution (the CLI has run the same checks before importing torch).
    run_dir = check_before_loading(cfg, Path(dataset), out, preset=preset, resume=resume, feedback=feedback)
    state = found = None
    if resume is not None:
        run_dir, found, state, caught = common.open_resume(run_dir, resume, out is not None)
    accelerator, precision = common.make_accelerator(cfg, run_dir)
    attention = check_attention(cfg.train.attention, accelerator.device)
    log = tqdm.write if accelerator.is_main_process else (lambda *a, **k: None)
    if state is not None:
        common.show_warnings(caught, log)
        common.check_resume(state, found, cfg, precision)  # what needs no model; the hashes once known

    dataset, examples, feedback_info = setup_data(cfg, Path(dataset), accelerator, preset, feedback, log)
    base, parts = setup_model(cfg, accelerator, precision)
    base_hash = base.model_hash()
    if state is not None:  # before any slow work: a changed dataset or base is refused at once
        check_resume_compatible(state["config"], run_identity(cfg, dataset_hash(examples), base_hash,
                                                              accelerator.num_processes, precision))
    prior = setup_class_images(cfg, dataset, examples, base, base_hash, accelerator, feedback)
    cached = setup_caches(cfg, dataset, examples, prior, base, parts, accelerator)
    training = setup_training(cfg, base, parts, attention, accelerator)

    run = Run(cfg=cfg, dir=run_dir, dataset=dataset, accelerator=accelerator, base=base, **{**parts, **training},
              **cached, sampler=make_sampler(cfg, examples, prior, accelerator), examples=examples,
              weight_dtype=precision.dtype, precision=precision, base_hash=base_hash,
              dataset_hash=dataset_hash(examples), started_at=started_at, class_prompt=prior.prompt,
              feedback=feedback_info)
    run.resume_hint = resume_hint(run, None)
    run.parked = Parked(base.pipe, accelerator.device)
    run.parked.park(run.idle_components())
    if state is not None:
        common.load_state(run, state, trainable(run))
        run.saved_at = run.step
    start_run_folder(run, state, attention, log)
    if state is not None:
        common.restore_rngs(run, state)  # last, right before the loop
    return run


def resolve_dataset(path: Path, cfg: RunConfig, log=print) -> Path:
    """A prepared dataset folder: `path` itself, or `datasets/<name>` prepared from the photos in `path`."""
    path = Path(path)
    problem = dataset_problem(path)
    if problem:
        raise FinetuneError(problem)
    if is_prepared(path):
        return path
    from finetune.data.prepare import SourceMismatch, prepare

    target = prepared_target(path)
    log(f"{path} is a folder of photos, not a prepared dataset: preparing it into {target} "
        "with the preset's [data] settings")
    try:
        result = prepare(path, target, cfg.data)
    except SourceMismatch as e:
        raise FinetuneError(f"{target} holds a dataset {e.was}, not from {path}: prepare these photos under another "
                            f"name (`finetune prepare {shlex.quote(str(path))} --name {shlex.quote(e.free.name)}`) "
                            f"and train with --dataset {e.free}") from None
    log(result.summary)
    return Path(result.out)


def check_attention(mode: str, device: torch.device) -> str:
    """The attention implementation to use: 'sdpa' or 'xformers' (asked for and available)."""
    problem = attention_problem(mode, device.type)
    if problem:
        raise FinetuneError(problem)
    if mode == "xformers" or (mode == "auto" and have_xformers() and device.type == "cuda"):
        return "xformers"
    return "sdpa"


def setup_data(cfg: RunConfig, dataset: Path, accelerator, preset: str | None, feedback: Path | None,
               log) -> tuple[Path, list[Example], dict | None]:
    """(prepared dataset, its examples, run.json's record of the feedback favourites added to them)."""
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            dataset = resolve_dataset(dataset, cfg, log)
        elif not is_prepared(dataset):
            dataset = prepared_target(dataset)  # where the main process has just prepared it
    examples = read_dataset(dataset, cfg.data.trigger, cfg.data.class_word)
    check_resolution(cfg, dataset, preset)
    check_trigger(cfg, dataset, [ex.caption for ex in examples], preset, log)
    feedback_info = None
    if feedback is not None:
        t = cfg.train
        examples, feedback_info = add_feedback(examples, Path(feedback), t.feedback_weight, log)
        note = rejects_note(Path(feedback), t.prior_preservation,
                            substitute(t.class_prompt, cfg.data.trigger, cfg.data.class_word))
        if note:
            log(note)
    return dataset, examples, feedback_info


def setup_model(cfg: RunConfig, accelerator, precision: Precision) -> tuple[object, dict]:
    """The base, its frozen components on the device in the training precision, and the parts the loop
    uses by `Run` field: denoiser, vae, text encoders and tokenizers, the training noise scheduler."""
    from finetune.models import families, load_base

    base = load_base(cfg.model.base, config=cfg.model.config, allow_pickle=cfg.model.allow_pickle,
                     revision=cfg.model.revision, quantize=cfg.model.quantize)
    pipe, family = base.pipe, base.family
    text_parts = family.component(families.TEXT_ENCODER)
    parts = {"denoiser": getattr(pipe, family.denoiser), "vae": getattr(pipe, family.vae),
             "encoders": {c.name: getattr(pipe, c.name) for c in text_parts},
             "tokenizers": {c.tokenizer: getattr(pipe, c.tokenizer) for c in text_parts},
             "noise_scheduler": family.training_scheduler(pipe, cfg.flow)}
    common.place_frozen(pipe, family, accelerator.device, precision.dtype,  # latents are cast when used
                        offload=cfg.model.offload != "none")
    for m in (parts["vae"], *parts["encoders"].values()):
        m.eval()
    return base, parts


@dataclass
class ClassImages:
    """Prior preservation's class images (none without it): their prompt and (file, bucket) pairs."""

    prompt: str = ""
    files: list[tuple[Path, tuple[int, int]]] | None = None


def setup_class_images(cfg: RunConfig, dataset: Path, examples: list[Example], base, base_hash: str, accelerator,
                       feedback: Path | None) -> ClassImages:
    """Class images (prior preservation): generated once per base + prompt + settings, then reused."""
    from finetune.train.prior import ensure_class_images

    t = cfg.train
    if not t.prior_preservation:
        return ClassImages()
    prompt = substitute(t.class_prompt, cfg.data.trigger, cfg.data.class_word)
    regenerate = feedback is not None and prompt in rejected_prompts(Path(feedback))
    with accelerator.main_process_first():
        files = ensure_class_images(base.pipe, cfg, dataset, [ex.bucket for ex in examples], base_hash=base_hash,
                                    model_name=base.name, autocast=accelerator.autocast,
                                    generate=accelerator.is_main_process, regenerate=regenerate)
    return ClassImages(prompt, files)


def setup_caches(cfg: RunConfig, dataset: Path, examples: list[Example], prior: ClassImages, base, parts: dict,
                 accelerator) -> dict:
    """The loop's inputs by `Run` field: latents cached beside the dataset (or the pixels, encoded every
    step), and the captions' text conditioning while the text encoders are frozen (or None)."""
    t, device = cfg.train, accelerator.device
    vae, encoders, tokenizers = parts["vae"], parts["encoders"], parts["tokenizers"]
    out = {"latents": None, "pixels": None, "prior_latents": None, "prior_pixels": None, "text": None}
    with accelerator.main_process_first():
        if t.cache_latents:
            vae_id = caching.module_hash(vae)
            out["latents"] = [x.to(device) for x in caching.cached_latents(examples, dataset, vae, vae_id,
                                                                           write=accelerator.is_main_process)]
            if prior.files:
                prior_examples = [Example(image=p, caption=prior.prompt, bucket=b, sha256=sha256_file(p))
                                  for p, b in prior.files]
                out["prior_latents"] = [x.to(device) for x in caching.cached_latents(
                    prior_examples, dataset, vae, vae_id, write=accelerator.is_main_process)]
        else:
            out["pixels"] = [load_pixels(ex.image).to(device) for ex in examples]
            if prior.files:
                out["prior_pixels"] = [load_pixels(p).to(device) for p, _ in prior.files]
    if t.cache_text and not cfg.lora.train_text_encoder:
        from finetune.models.families import TEXT_ENCODER

        family = base.family
        with accelerator.main_process_first():
            te_id = "".join(caching.module_hash(encoders[c.name]) + caching.tokenizer_hash(tokenizers[c.tokenizer])
                            for c in family.component(TEXT_ENCODER))
            captions = [ex.caption for ex in examples] + [""] + ([prior.prompt] if prior.prompt else [])
            text = caching.cached_text(captions, dataset, family.encode_text, {**encoders, **tokenizers}, te_id,
                                       write=accelerator.is_main_process)
            out["text"] = {c: {k: v.to(device) for k, v in entry.items()} for c, entry in text.items()}
    return out


def setup_training(cfg: RunConfig, base, parts: dict, attention: str, accelerator) -> dict:
    """LoRA adapters (the only trainable parameters, kept in fp32), the optimizer and its schedule,
    prepared by the accelerator; by `Run` field (the denoiser and encoders as prepared)."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params

    t, train_te = cfg.train, cfg.lora.train_text_encoder
    denoiser, encoders = parts["denoiser"], parts["encoders"]
    from finetune.models.families import TEXT_ENCODER

    tuned = {c.name: encoders[c.name] for c in base.family.component(TEXT_ENCODER) if c.lora}  # not FLUX.1's T5
    for m in encoders.values():
        m.requires_grad_(False)
    set_seed(t.seed)
    add_lora(denoiser, list(tuned.values()), cfg.lora, base.family)
    base.family.set_attention(denoiser, attention == "xformers")
    if t.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        if train_te:  # non-reentrant: gradients reach LoRA layers inside checkpoints
            for m in tuned.values():
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cast_training_params([denoiser] + (list(tuned.values()) if train_te else []), dtype=torch.float32)
    if cfg.model.offload == "blocks":  # after the LoRA is added: its layers move with their blocks
        from finetune.models.quantize import offload_blocks

        offload_blocks(denoiser, accelerator.device)
    if t.compile == "denoiser":
        # In place (the module, its parameter names and the checkpoint layout stay the same). Compiled
        # kernels round differently from eager ones, so a run resumes exactly only under the compile
        # setting it started with, and train.compile is not among the keys a resume may change.
        denoiser.compile()
    groups = [{"params": lora_parameters(denoiser), "lr": t.lr}]
    if train_te:
        groups.append({"params": [p for m in tuned.values() for p in lora_parameters(m)], "lr": t.text_encoder_lr})
    optimizer = make_optimizer(groups, t)
    lr_scheduler = make_lr_scheduler(optimizer, t)  # stepped by hand once per optimizer step
    if train_te:
        denoiser, *prepared, optimizer = accelerator.prepare(denoiser, *tuned.values(), optimizer)
        encoders = {**encoders, **dict(zip(tuned, prepared))}
    else:
        denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    # Different noise on each process; the same on every run of this config.
    set_seed(t.seed, device_specific=True)
    return {"denoiser": denoiser, "encoders": encoders, "optimizer": optimizer, "lr_scheduler": lr_scheduler}


def make_sampler(cfg: RunConfig, examples: list[Example], prior: ClassImages, accelerator) -> BucketBatchSampler:
    """The data order: this process's share of the examples (and class images) by bucket, epoch by epoch."""
    return BucketBatchSampler([ex.bucket for ex in examples], cfg.train.batch_size, cfg.train.seed,
                              repeats=cfg.data.repeats, num_replicas=accelerator.num_processes,
                              rank=accelerator.process_index,
                              prior_buckets=[b for _, b in prior.files] if prior.files else None)


def start_run_folder(run: Run, state: dict | None, attention: str, log) -> None:
    """Create the run folder (only now that everything could be set up: a mistake caught before leaves
    nothing behind, so the same command can simply be run again), with config.json, run.json, the
    metrics log and the header line; a resume drops the checkpoints newer than the one it continues."""
    accelerator, cfg = run.accelerator, run.cfg
    accelerator.wait_for_everyone()
    if run.main:
        run.dir.mkdir(parents=True, exist_ok=True)
        if state is not None:
            run.started_at = common.started_at(run.dir, run.started_at)
            log(common.resumed_note(run, common.drop_newer_checkpoints(run.dir, run.step)))
        common.write_json(run.dir / runs.CONFIG, cfg.to_dict())
        common.write_json(run.dir / runs.RUN_INFO, run_info(run))
        run.metrics = MetricsLog(run.dir / "metrics.jsonl", resume_step=run.step if state is not None else None)
        log(f"training {run.base.name} ({run.base.arch}) on {plural(len(run.examples), 'image')} of {run.dataset} -> "
            f"{run.dir} [{accelerator.device}, precision {run.precision.describe()}, {attention}, {cfg.train.optimizer}]")
    if accelerator.log_with:
        accelerator.init_trackers("tensorboard", config=flat_config(cfg))


def run_info(run: Run, finished: bool = False) -> dict:
    return common.run_info(run, dataset=str(run.dataset), dataset_hash=run.dataset_hash, finished=finished,
                           **({"feedback": run.feedback} if run.feedback else {}))


def resume_hint(run: Run, command: list[str] | None) -> str:
    """The command that continues this run: the one that started it, plus --resume latest."""
    if command is None:
        return f"train(cfg, {str(run.dataset)!r}, {str(run.dir)!r}, resume='latest') with the same cfg"
    n = run.accelerator.num_processes
    launcher = f"accelerate launch --num_processes {n} -m finetune" if n > 1 else "finetune"
    return f"{launcher} train {shlex.join(command)} --resume latest"


def run_identity(cfg: RunConfig, dataset_hash: str, base_hash: str, num_processes: int, precision: Precision) -> dict:
    """The resolved config plus what must not change under a resume: the data, the base weights, the
    number of processes (it decides each process's share of the data order) and the precision
    `train.mixed_precision` resolved to."""
    return {**cfg.to_dict(), "_dataset_hash": dataset_hash, "_base_hash": base_hash,
            "_num_processes": num_processes, "_precision": precision.mode}


def add_feedback(examples: list[Example], run_dir: Path, weight: float, log=print) -> tuple[list[Example], dict]:
    """`examples` plus the favourites of the reviewed run `run_dir` (weighted), and run.json's record of them."""
    skipped: list[str] = []
    rows = feedback_examples(run_dir, weight, skipped)
    added = []
    for row in rows:
        w, h = row["bucket"]
        if w % 8 or h % 8:  # the VAE needs multiples of 8; resizing would train on a distorted favourite
            skipped.append(f"{row['image']}: {w}x{h}, both sides must be multiples of 8 for the VAE")
            continue
        added.append(Example(image=Path(row["image"]), caption=row["caption"], bucket=(w, h), sha256=row["sha256"],
                             weight=row["weight"]))
    for reason in skipped:
        log(f"--feedback: skipped {reason}")
    if not added:
        raise FinetuneError(f"--feedback {run_dir}: none of its {plural(len(rows), 'favourite')} can be trained on "
                            f"({skipped[0]}); favourite images whose sides are multiples of 8")
    log(f"--feedback: {plural(len(added), 'favourite')} of {run_dir} join the {plural(len(examples), 'dataset image')} "
        f"(loss weight {weight:g})")
    return examples + added, {"run": str(Path(run_dir).resolve()), "images": [str(ex.image) for ex in added],
                              "weight": weight}


def trainable(run: Run) -> dict[str, torch.Tensor]:
    """The LoRA parameters by name (`unet.…`, `text_encoder.…`, ...: the component's name first), as they are in the
    model (fp32)."""
    return common.trainable(run, run.trained_models())


def save(run: Run) -> Path:
    """Write checkpoints/step-NNNNNN/ (every process calls this; only the main process writes)."""
    identity = run_identity(run.cfg, run.dataset_hash, run.base_hash, run.accelerator.num_processes, run.precision)
    path = common.save(run, trainable(run), identity, lora_files=lambda folder: save_adapters(run, folder))
    run.saved_at = run.step
    return path


def flat_config(cfg: RunConfig) -> dict:
    """Scalar hyperparameters for TensorBoard (lists as text)."""
    return {f"{s}.{k}": (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
            for s, section in cfg.to_dict().items() for k, v in section.items()}


# ---------------------------------------------------------------- the loop
def batch_inputs(run: Run, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(latents, text hidden states, number of instance samples) for one batch: instance examples
    first, then their class images (prior preservation) in the same tensors."""
    latents, cond, n_instance = batch_conditioning(run, batch)
    return latents, cond["hidden"], n_instance


def batch_examples(run: Run, batch) -> list[Example]:
    """The batch's examples, instance images first; class images are their own uncropped originals at
    their bucket (what per-image conditioning such as SDXL's micro-conditioning reads)."""
    return ([run.examples[i] for i in batch.instance]
            + [Example(image=Path(), caption="", bucket=run.sampler.prior_buckets[i], sha256="") for i in batch.prior])


def batch_conditioning(run: Run, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(latents, conditioning, number of instance samples): the conditioning is the family's text
    encoding of the captions plus its per-image conditioning, all on the device."""
    cfg, device = run.cfg, run.accelerator.device
    captions = [run.examples[i].caption for i in batch.instance]
    if cfg.train.caption_dropout:
        drop = torch.rand(len(captions)) < cfg.train.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    captions += [run.class_prompt] * len(batch.prior)
    if run.latents is not None:
        params = [run.latents[i] for i in batch.instance] + [run.prior_latents[i] for i in batch.prior]
        params = torch.stack(params)
    else:
        pixels = [run.pixels[i] for i in batch.instance] + [run.prior_pixels[i] for i in batch.prior]
        params = caching.encode_pixels(run.vae, torch.stack(pixels))
    latents = caching.sample_latents(run.vae, params)
    if run.text is not None:
        cond = {k: torch.stack([run.text[c][k] for c in captions]) for k in run.text[captions[0]]}
    else:
        grad = contextlib.nullcontext() if run.cfg.lora.train_text_encoder else torch.no_grad()
        with grad:
            cond = run.family.encode_text(run.text_components(), captions)
    cond = {**cond, **run.family.example_conditioning(batch_examples(run, batch))}
    cond = {k: v.to(device) for k, v in cond.items()}
    # The latents come in the VAE's dtype (fp32 for SDXL's); the denoiser takes its own (autocast covers mixing).
    return latents.to(device, run.weight_dtype), cond, len(batch.instance)


def batch_loss(run: Run, batch) -> torch.Tensor:
    """The DreamBooth loss of one batch: noise, timesteps, the denoiser's prediction, per-sample MSE
    (weighted as the family says, e.g. min-SNR; each instance sample times its example's weight, class
    images weight 1)."""
    t, family, scheduler = run.cfg.train, run.family, run.noise_scheduler
    latents, cond, n_instance = batch_conditioning(run, batch)
    noise = make_noise(latents, t.noise_offset)
    timesteps = family.sample_timesteps(scheduler, latents.shape[0], latents.device)
    noisy = family.add_noise(scheduler, latents, noise, timesteps)
    pred = family.predict(scheduler, run.denoiser, noisy, timesteps, cond)
    target = family.target(scheduler, latents, noise, timesteps)
    per_sample = per_sample_mse(pred, target) * family.loss_weights(scheduler, timesteps, t.min_snr_gamma)
    weights = [run.examples[i].weight for i in batch.instance] + [1.0] * len(batch.prior)
    per_sample = per_sample * torch.tensor(weights, device=per_sample.device)
    return dreambooth_loss(per_sample, n_instance, t.prior_loss_weight)


def fit(run: Run) -> None:
    """The training loop, from `run.step` to `train.max_steps`; checkpoints every `train.save_every` steps
    and at the end. A first SIGINT/SIGTERM: finish the step, save, print the resume command, exit 130/143."""
    cfg, acc, t = run.cfg, run.accelerator, run.cfg.train
    trained = list(run.trained_models().values())
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    for m in trained:
        m.train()
    bar = tqdm(total=t.max_steps, initial=run.step, desc="training", unit="step", disable=not run.main,
               dynamic_ncols=True)
    window, window_start = [], time.perf_counter()
    with GracefulStop(notice=run.main) as stop:
        while run.step < t.max_steps:
            losses = []
            for _ in range(t.grad_accum):
                batch = run.sampler.next()
                with acc.accumulate(*trained):
                    loss = batch_loss(run, batch)
                    acc.backward(loss)
                    if acc.sync_gradients and t.max_grad_norm:
                        acc.clip_grad_norm_(params, t.max_grad_norm)
                    run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            run.lr_scheduler.step()
            run.step += 1

            step_loss = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
            if not math.isfinite(step_loss):
                raise FinetuneError(f"the loss became {step_loss} at step {run.step}: lower train.lr "
                                    f"(now {t.lr:g}) or use train.mixed_precision = 'bf16' or 'no'")
            window.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{run.lr_scheduler.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
            if run.step % t.log_every == 0 or run.step == t.max_steps:
                log_row(run, window, window_start)
                window, window_start = [], time.perf_counter()
            if cfg.sample.every and run.step % cfg.sample.every == 0 and run.step < t.max_steps:
                sample(run)
                window_start = time.perf_counter()  # sampling time is not training speed
            if (t.save_every and run.step % t.save_every == 0) or run.step == t.max_steps:
                save(run)
                window_start = time.perf_counter()
            if run.step < t.max_steps and stop_requested(run, stop):
                if run.saved_at != run.step:
                    save(run)
                bar.close()
                if run.main:
                    run.metrics.close()
                    tqdm.write(f"stopped at step {run.step} of {t.max_steps} ({signal_name(stop.signum)}); "
                               f"checkpoint {runs.checkpoint_dir(run.dir, run.step)}\n"
                               f"resume with: {run.resume_hint}")
                acc.end_training()
                raise Stopped(stop.signum)
    bar.close()


def signal_name(signum: int | None) -> str:
    import signal

    return signal.Signals(signum).name if signum else "a stop request"


def log_row(run: Run, window: list[float], window_start: float) -> None:
    acc = run.accelerator
    elapsed = time.perf_counter() - window_start
    memory, kind = peak_memory_mb(acc.device)
    row = dict(step=run.step, epoch=run.sampler.epoch, loss=sum(window) / len(window),
               lr=run.lr_scheduler.get_last_lr()[0], it_s=len(window) / elapsed if elapsed else None,
               peak_memory_mb=round(memory, 1), memory=kind)
    if run.main:
        run.metrics.write(**row)
    if acc.log_with:
        acc.log({"loss": row["loss"], "lr": row["lr"], "it_s": row["it_s"]}, step=run.step)


def sample(run: Run) -> None:
    """Sample images of the model as it is now into samples/step-NNNNNN/ (main process), with their
    identity scores."""
    paths = common.sample(run, [run.denoiser, *run.encoders.values()])
    if paths:
        log_identity_scores(run, paths)


def log_identity_scores(run: Run, paths: list[Path]) -> None:
    """Likeness and class leak of this step's samples (finetune.score) into metrics.jsonl and
    TensorBoard, when the dataset has a face subject and the identity models are installed."""
    from finetune import identity
    from finetune.score import dataset_subject, training_scores
    from finetune.train.samples import prompts

    subject = dataset_subject(run.dataset)
    if not paths or subject is None or not identity.available():
        return
    texts = prompts(run.cfg)
    per_prompt = max(1, len(paths) // max(1, len(texts)))  # write_samples: prompt-major, one per seed
    row = training_scores([(p, texts[i // per_prompt]) for i, p in enumerate(paths)], subject, run.cfg.data.trigger)
    run.metrics.write(step=run.step, **row)
    values = {k: row[k] for k in ("likeness", "class_leak") if row[k] is not None}
    if values:
        run.accelerator.log(values, step=run.step)


# ---------------------------------------------------------------- the end
def adapter_metadata(run: Run) -> dict[str, str]:
    return lora_metadata(run.cfg, base=run.base, base_hash=run.base_hash, steps=run.step,
                         dataset_hash=run.dataset_hash, started_at=run.started_at, dataset_name=run.dataset.name,
                         tag_frequency=tag_frequency(run.examples))


def save_adapters(run: Run, folder: Path) -> Path:
    """The LoRA adapters of the run as they are now into `folder`, keyed by component name."""
    acc = run.accelerator
    return save_lora(folder, {name: acc.unwrap_model(m) for name, m in run.trained_models().items()},
                     adapter_metadata(run), arch=run.base.arch)


def finish(run: Run) -> None:
    """Write the final adapter, samples at the last step, the loss curve and run.json."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if run.main:
        path = save_adapters(run, run.dir / runs.LORA_DIR)
        sample(run)
        run.metrics.close()
        plot_loss(run.dir / "metrics.jsonl", run.dir / "loss.png")
        common.write_json(run.dir / runs.RUN_INFO, run_info(run, finished=True))
        tqdm.write(f"done: {plural(run.step, 'step')}; LoRA in {path}")
    acc.end_training()
