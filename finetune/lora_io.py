"""LoRA files in the two layouts people share: diffusers/peft and kohya (what A1111, Forge, ComfyUI read).

Both hold, per adapted module, a down matrix A (rank x in) and an up matrix B (out x rank); they differ
in key names and in where alpha lives:

- peft (diffusers): `unet.<module>.lora_A.weight` / `.lora_B.weight` (older diffusers spellings:
  `.lora.down.weight`, `.lora_linear_layer.down.weight`); alpha and rank are in the header key
  `lora_adapter_metadata` (a JSON of peft `LoraConfig` fields, prefixed `unet.` / `text_encoder.`).
- kohya: `lora_unet_<module with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`, the text
  encoder as `lora_te_text_model_encoder_...` (`lora_te1_` / `lora_te2_` on SDXL).

Everything here works on `LoraLayer`s, one per module with alpha in kohya's convention (the update is
`alpha / rank * up @ down`), so a conversion is read -> layers -> write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from finetune.errors import FinetuneError
from finetune.filemode import follow_umask
from finetune.words import plural

PEFT, KOHYA = "peft", "kohya"
LORA_LAYOUTS = (PEFT, KOHYA)
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
"""The pipeline components a LoRA file may adapt (its peft key prefixes)."""
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_KOHYA_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:(unet|transformer|text_encoder|text_encoder_2)\.)?(?P<module>.+?)"
    r"\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
    r"(?:\.[A-Za-z_]\w*)?\.weight$")
_PEFT_PROCESSOR_KEY = re.compile(  # diffusers' old attention-processor LoRAs
    r"^(?:(unet|text_encoder)\.)?(?P<block>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora"
    r"\.(?P<part>down|up)\.weight$")
_PEFT_EXTRA = re.compile(r"^(?:(unet|transformer|text_encoder|text_encoder_2)\.)?(?P<module>.+?)\.(?P<suffix>lora_magnitude_vector"
                         r"(?:\.weight)?|alpha)$")
_KOHYA_KEY = re.compile(r"^(?P<prefix>lora_unet|lora_te[12]?)_(?P<module>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight"
                        r"|alpha|dora_scale)$")
# Leaf names users put in `lora.targets`, longest first so `ff.net.0.proj` wins over `proj`.
TARGET_NAMES = sorted(["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                       "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2",
                       "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "text_projection"], key=len, reverse=True)
# Cross-attention width (in-features of attn2.to_k) of the families we know.
CROSS_ATTENTION_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


@dataclass
class LoraLayer:
    """One adapted module: the update is `alpha / rank * up @ down`."""

    component: str
    """unet | text_encoder | text_encoder_2"""
    module: str
    """Module path as diffusers/transformers name it (`down_blocks.0....attn1.to_q`); for a kohya file
    read without a base, the underscored name after the prefix (`down_blocks_0_..._attn1_to_q`)."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Other per-module tensors by key suffix (DoRA's `lora_magnitude_vector`)."""
    kohya_name: bool = False
    """True when `module` is a kohya underscored name."""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def target(self) -> str:
        return target_name(self.module, underscored=self.kohya_name)


# ---------------------------------------------------------------- reading


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a .safetensors file; a clear error for anything else."""
    from safetensors import safe_open

    path = Path(path)
    _check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """{key: (dtype, shape)} and the metadata, without reading any tensor data."""
    path = Path(path)
    _check_safetensors(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}, metadata


def _check_safetensors(path: Path) -> None:
    """Raise FinetuneError unless `path` is a readable safetensors file (checked from its header)."""
    if path.is_dir():
        raise FinetuneError(f"{path} is a folder, not a .safetensors file")
    if not path.is_file():
        raise FinetuneError(f"{path} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise FinetuneError(f"{path} is a pickle file ({path.suffix}), not safetensors: unpickling can run code hidden "
                            "in it, so finetune reads only .safetensors (convert it with a tool you trust)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        ok = 2 <= n <= size - 8 and f.read(1) == b"{"
    if not ok:
        raise FinetuneError(f"{path} is not a safetensors file (no safetensors header at its start); "
                            "export and inspect read .safetensors files only")


def detect_layout(keys) -> str:
    """What a safetensors file's keys hold: "peft" or "kohya" (LoRA layouts), "lycoris" (LoHa/LoKr),
    "checkpoint" (a whole model in the original SD layout), "diffusers" (one diffusers/transformers
    component's weights) or "unknown"."""
    keys = list(keys)
    if not keys:
        return "unknown"
    if any(".hada_w1_a" in k or ".lokr_w1" in k for k in keys):
        return "lycoris"
    if any(_KOHYA_KEY.match(k) and k.endswith(".lora_down.weight") for k in keys):
        return KOHYA
    if any(_PEFT_KEY.match(k) or _PEFT_PROCESSOR_KEY.match(k) for k in keys):
        return PEFT
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for k in keys):
        return "checkpoint"
    from finetune.models import families

    try:  # a family's own original layout without SD's prefixes (FLUX.1's transformer file)
        families.single_file_arch({k: () for k in keys})
        return "checkpoint"
    except ValueError:
        pass
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "encoder.layers.", "decoder.up_blocks."))
           for k in keys):
        return "diffusers"
    return "unknown"


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, header metadata, layout) of a LoRA file in peft or kohya layout."""
    tensors, metadata = read_safetensors(path)
    layout = detect_layout(tensors)
    if layout not in LORA_LAYOUTS:
        what = {"checkpoint": "a whole model checkpoint (original SD layout)",
                "diffusers": "a diffusers model component's weights",
                "lycoris": "a LyCORIS (LoHa/LoKr) network, which finetune does not convert",
                "unknown": f"no LoRA keys (first keys: {list(tensors)[:3]})"}[layout]
        raise FinetuneError(f"{path} is not a LoRA file in peft or kohya layout: it holds {what}")
    return tensors, metadata, layout


def adapter_metadata(metadata: dict[str, str]) -> dict[str, dict]:
    """The peft LoraConfig fields per component, from diffusers' `lora_adapter_metadata` header key."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FinetuneError(f"header key {ADAPTER_METADATA_KEY} is not valid JSON ({e})") from None
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        out.setdefault(component, {})[name] = value
    return out


def _pattern_value(patterns: dict, module: str):
    """peft's rank_pattern / alpha_pattern lookup: a key matches the module path or a dotted suffix of it."""
    for pattern, value in (patterns or {}).items():
        if pattern == module or re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return None


def _peft_alpha(config: dict | None, module: str, rank: int) -> float:
    """Alpha in kohya's convention (scale = alpha / rank) for one module of a peft adapter."""
    if not config:
        return float(rank)  # what diffusers assumes without metadata: scale 1
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    alpha = float(config.get("lora_alpha", rank) if alpha is None else alpha)
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank) * rank
    return alpha


def to_layers(tensors: dict[str, torch.Tensor], metadata: dict[str, str], layout: str) -> list[LoraLayer]:
    """The LoRA's modules, each with its down/up matrices and its alpha."""
    if layout == KOHYA:
        return _kohya_layers(tensors)
    if layout == PEFT:
        return _peft_layers(tensors, metadata)
    raise FinetuneError(f"layout {layout!r} is not a LoRA layout ({', '.join(LORA_LAYOUTS)})")


def _peft_layers(tensors, metadata) -> list[LoraLayer]:
    configs = adapter_metadata(metadata)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    extras: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        m = _PEFT_KEY.match(key)
        if m:
            part = "down" if m["part"] in ("lora_A", "lora.down", "lora_linear_layer.down") else "up"
            parts.setdefault((m[1] or "unet", m["module"]), {})[part] = tensor
            continue
        m = _PEFT_PROCESSOR_KEY.match(key)
        if m:
            module = f"{m['block']}.{m['proj']}" + (".0" if m["proj"] == "to_out" else "")
            parts.setdefault((m[1] or "unet", module), {})[m["part"]] = tensor
            continue
        m = _PEFT_EXTRA.match(key)
        if m:
            extras.setdefault((m[1] or "unet", m["module"]), {})[m["suffix"]] = tensor
            continue
        unknown.append(key)
    if unknown:
        raise FinetuneError(f"{plural(len(unknown), 'key')} of this peft-layout LoRA are neither lora_A/lora_B matrices nor "
                            f"alphas (e.g. {unknown[:3]})")
    layers = []
    for (component, module), pair in sorted(parts.items()):
        extra = extras.pop((component, module), {})
        if component == "unet" and module.startswith(("text_model.", "encoder.layers.")):
            component = "text_encoder"  # a bare peft text-encoder adapter (no `text_encoder.` prefix)
        if set(pair) != {"down", "up"}:
            raise FinetuneError(f"LoRA module {component}.{module} has only its {next(iter(pair))} matrix")
        alpha_t = extra.pop("alpha", None)  # diffusers' network-alpha keys, when present, win
        rank = int(pair["down"].shape[0])
        alpha = float(alpha_t.item()) if alpha_t is not None else _peft_alpha(configs.get(component), module, rank)
        layers.append(LoraLayer(component, module, pair["down"], pair["up"], alpha, extra))
    if extras:
        raise FinetuneError(f"tensors for modules without LoRA matrices: {sorted(f'{c}.{m}' for c, m in extras)[:3]}")
    return layers


def _kohya_layers(tensors) -> list[LoraLayer]:
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        m = _KOHYA_KEY.match(key)
        if not m:
            unknown.append(key)
            continue
        groups.setdefault((_KOHYA_COMPONENT[m["prefix"]], m["module"]), {})[m["part"]] = tensor
    if unknown:
        raise FinetuneError(f"{plural(len(unknown), 'key')} of this kohya-layout LoRA are not lora_unet_/lora_te_ "
                            f"lora_down/lora_up/alpha keys (e.g. {unknown[:3]})")
    layers = []
    for (component, module), g in sorted(groups.items()):
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            raise FinetuneError(f"LoRA module {KOHYA_PREFIX.get(component, '')}{module} lacks its lora_down or "
                                "lora_up weight")
        down = g["lora_down.weight"]
        alpha = float(g["alpha"].item()) if "alpha" in g else float(down.shape[0])  # no alpha: kohya uses the rank
        extra = {"dora_scale": g["dora_scale"]} if "dora_scale" in g else {}
        layers.append(LoraLayer(component, module, down, g["lora_up.weight"], alpha, extra, kohya_name=True))
    return layers


def target_name(module: str, underscored: bool = False) -> str:
    """The leaf a module path ends in, as users write targets (`to_q`, `to_out.0`, `ff.net.2`)."""
    for name in TARGET_NAMES:
        if underscored:
            if module == name.replace(".", "_") or module.endswith("_" + name.replace(".", "_")):
                return name
        elif module == name or module.endswith("." + name):
            return name
    return module.rsplit("_" if underscored else ".", 1)[-1]


# ---------------------------------------------------------------- transforming


def cast(layers: list[LoraLayer], dtype: torch.dtype) -> list[LoraLayer]:
    return [replace(l, down=l.down.to(dtype).contiguous(), up=l.up.to(dtype).contiguous(),
                    extra={k: v.to(dtype).contiguous() for k, v in l.extra.items()}) for l in layers]


def resize(layers: list[LoraLayer], rank: int) -> tuple[list[LoraLayer], list[float]]:
    """Reduce every layer to at most `rank` by truncated SVD of its update (as kohya's resize_lora does).

    Returns the new layers and, per layer, the share of the update's Frobenius norm kept
    (sqrt of the kept squared singular values over all of them). The scale alpha / rank is kept, so
    at a layer's own rank the update is unchanged up to float rounding.
    """
    if rank < 1:
        raise FinetuneError(f"--rank {rank}: a LoRA rank must be at least 1")
    out, kept = [], []
    for layer in layers:
        r = layer.rank
        new_rank = min(rank, r)
        down = layer.down.detach().to(torch.float64).reshape(r, -1)  # (r, in*kh*kw)
        up = layer.up.detach().to(torch.float64).reshape(up_rows := layer.up.shape[0], r)  # (out, r)
        # up @ down = Qu Ru Rd^T Qd^T: the SVD of the small r x r core gives the update's exact SVD.
        qu, ru = torch.linalg.qr(up)
        qd, rd = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(ru @ rd.T)
        total = float((s ** 2).sum())
        kept.append(math.sqrt(float((s[:new_rank] ** 2).sum()) / total) if total > 0 else 1.0)
        root = s[:new_rank].sqrt()
        new_up = (qu @ u[:, :new_rank]) * root  # singular values split evenly between the factors
        new_down = root[:, None] * (vh[:new_rank] @ qd.T)
        dtype = layer.down.dtype
        out.append(replace(layer,
                           down=new_down.reshape(new_rank, *layer.down.shape[1:]).to(dtype).contiguous(),
                           up=new_up.reshape(up_rows, new_rank, *layer.up.shape[2:]).to(dtype).contiguous(),
                           alpha=layer.alpha * new_rank / r))
    return out, kept


# ---------------------------------------------------------------- writing


def _kohya_module(component: str, module: str) -> str:
    """The underscored kohya name (no prefix) of a module, for looking files up against a base."""
    # A1111 and ComfyUI name CLIP's modules as transformers < 5 did, under `text_model.`; transformers 5
    # flattened CLIPTextModel, so its module paths start at `encoder.`.
    if component.startswith("text_encoder") and module.split(".", 1)[0] in ("encoder", "embeddings", "final_layer_norm"):
        module = "text_model." + module
    return module.replace(".", "_")


def _kohya_prefix(component: str, arch: str) -> str:
    from finetune.models import families

    prefix = next((c.kohya_prefix for c in families.for_arch(arch).components if c.name == component), "")
    return f"{prefix}_" if prefix else KOHYA_PREFIX[component]


def to_kohya(layers: list[LoraLayer], arch: str = "sd1", unet_config=None) -> dict[str, torch.Tensor]:
    """kohya-layout tensors, each module with its real alpha (fp32 scalar, as loaders read `.item()`).

    Names come from the base's family (`Family.kohya_names`: e.g. diffusers' names for an SD 1.x/2.x UNet,
    the original layout's for one that needs `unet_config`; `lora_te_text_model_...` for the text encoder)."""
    from finetune.models import families
    from finetune.models.kohya_names import kohya_lora_names

    family = families.for_arch(arch)
    own = [l for l in layers if l.component == family.denoiser and not l.kohya_name]
    if own:
        try:  # where the kohya layout fuses modules (FLUX.1's q, k, v), one layer per fused module
            own = family.kohya_fuse(own, unet_config)
        except ValueError as e:
            raise FinetuneError(f"cannot name this LoRA in the kohya layout: {e}") from None
        layers = own + [l for l in layers if not (l.component == family.denoiser and not l.kohya_name)]
    names = {}
    for component in sorted({l.component for l in layers}):
        modules = [l.module for l in layers if l.component == component and not l.kohya_name]
        try:
            names.update({(component, m): n for m, n in
                          kohya_lora_names(component, modules, arch, unet_config).items()})
        except ValueError as e:
            raise FinetuneError(f"cannot name this LoRA in the kohya layout: {e}") from None
    tensors = {}
    for layer in layers:
        if layer.extra:
            raise FinetuneError(f"module {layer.component}.{layer.module} carries {sorted(layer.extra)} (DoRA): the "
                                "kohya layout has no agreed place for it; export --format peft or merged instead")
        name = (_kohya_prefix(layer.component, arch) + layer.module if layer.kohya_name
                else names[(layer.component, layer.module)])
        tensors[f"{name}.lora_down.weight"] = layer.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = layer.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    return tensors


def to_peft(layers: list[LoraLayer],
            configs: dict[str, dict] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """peft-layout tensors and the `lora_adapter_metadata` header (r, lora_alpha and per-module patterns
    where layers differ), starting from `configs` (the source's adapter metadata) when given."""
    if any(l.kohya_name for l in layers):
        raise FinetuneError("this LoRA came from a kohya file read without a base, so its module paths are unknown; "
                            "load it with diffusers' load_lora_weights instead")
    tensors, flat = {}, {}
    for component in COMPONENTS:
        mine = [l for l in layers if l.component == component]
        if not mine:
            continue
        for l in mine:
            tensors[f"{component}.{l.module}.lora_A.weight"] = l.down.contiguous()
            tensors[f"{component}.{l.module}.lora_B.weight"] = l.up.contiguous()
            for suffix, t in l.extra.items():
                tensors[f"{component}.{l.module}.{suffix}"] = t.contiguous()
        config = dict((configs or {}).get(component) or {})
        rank = Counter(l.rank for l in mine).most_common(1)[0][0]
        alpha = Counter(l.alpha for l in mine).most_common(1)[0][0]
        config.update(r=rank, lora_alpha=alpha, use_rslora=False,  # alphas are in the plain alpha / rank convention
                      rank_pattern={l.module: l.rank for l in mine if l.rank != rank},
                      alpha_pattern={l.module: l.alpha for l in mine if l.alpha != alpha})
        config.setdefault("target_modules", sorted({l.target for l in mine}))
        config.setdefault("use_dora", any("lora_magnitude_vector" in k for l in mine for k in l.extra))
        flat.update({f"{component}.{k}": v for k, v in config.items()})
    return tensors, {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True)}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically (temporary name in the same folder, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's trainers precompute them for A1111's extra networks.

    The model hash is the sha256 of the file's tensor data (everything after the header), so it does
    not change when metadata is edited; the legacy hash is 8 hex digits of the sha256 of the 64 KiB at
    offset 1 MiB of the file serialized with only the `ss_*` metadata.
    """
    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    model = hashlib.sha256(blob[8 + n:]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model, legacy


# ---------------------------------------------------------------- matching a base


def _module_table(pipe, arch: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(component, name) -> (flattened in-size, out-size) of every Linear/Conv2d a LoRA could adapt,
    under the names peft uses and the underscored names kohya files use (the denoiser also under the
    names its family's kohya files may use instead, e.g. the original layout's)."""
    from torch import nn

    from finetune.models import families

    family = families.for_arch(arch)
    table = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        names = {}
        for name, mod in model.named_modules():
            if ".base_layer" in name or ".lora_" in name:
                continue  # inside a LoRA already loaded: its wrapper stands for the base module
            mod = getattr(mod, "base_layer", mod)
            if isinstance(mod, nn.Linear):
                names[name] = (mod.in_features, mod.out_features)
            elif isinstance(mod, nn.Conv2d):
                names[name] = (mod.in_channels // mod.groups * math.prod(mod.kernel_size), mod.out_channels)
        for name, shape in names.items():
            table[(component, name)] = shape
            table[(component, _kohya_module(component, name))] = shape
            if component.startswith("text_encoder"):
                table[(component, "text_model." + name)] = shape
        if component == family.denoiser:
            aliases = family.kohya_aliases(model, list(names))
            table.update({(component, alias.replace(".", "_")): names[m] for m, alias in aliases.items()})
    return table


def declared_architecture(metadata: dict[str, str] | None) -> str | None:
    """The arch (sd1 | sd2 | ...) a LoRA's header states (finetune.arch, kohya's ss_base_model_version,
    modelspec.architecture), or None when it says nothing we know."""
    from finetune.models import families

    return families.declared_arch(metadata)


def cross_attention_width(layers: list[LoraLayer]) -> int | None:
    """The in-width of a LoRA's UNet cross-attention key projection (attn2.to_k), if it adapts one."""
    return next((int(l.down.reshape(l.rank, -1).shape[1]) for l in layers
                 if l.component == "unet" and l.module.replace("_", ".").endswith("attn2.to.k")), None)


def lora_architecture(layers: list[LoraLayer], metadata: dict[str, str] | None = None) -> str | None:
    """The arch a LoRA was made for: what the header declares, else what a family recognises in its
    modules (see finetune.models.families); None if unknown."""
    from finetune.models import families

    return families.lora_arch(layers, metadata)


def describe_lora_architecture(layers: list[LoraLayer], metadata: dict[str, str] | None = None) -> str:
    """Which model family a LoRA was made for, told by its header or its shapes and components."""
    from finetune.models import families

    family = families.title(lora_architecture(layers, metadata))
    width = cross_attention_width(layers)
    if family and width is None:  # a transformer's LoRA (FLUX.1) has no UNet cross-attention to describe
        return family
    detail = "no cross-attention layers to tell its width" if width is None else f"cross-attention width {width}"
    if any(l.component == "text_encoder_2" for l in layers):
        detail += ", two text encoders"
    return f"{family} ({detail})" if family else f"an SD-family model ({detail})"


def _family(arch: str | None) -> str | None:
    """The family of an arch (archs of one family tell each other apart by their widths, which check_fits compares)."""
    from finetune.models import families

    return None if arch is None else families.for_arch(arch).name


def base_architecture(pipe, arch: str = "") -> str:
    """A loaded base's arch: `arch` when known (finetune.models.Base.arch), else its pipeline class's family's first."""
    from finetune.models import families

    return arch or families.of_pipeline(pipe).archs[0]


def describe_base_architecture(pipe, arch: str = "") -> str:
    from finetune.models import families

    arch = base_architecture(pipe, arch)
    family = families.for_arch(arch)
    width = getattr(getattr(pipe, family.denoiser).config, "cross_attention_dim", None)
    details = [f"cross-attention width {width}"] if width else []
    encoders = [n for n in family.text_encoders if getattr(pipe, n, None) is not None]
    if len(encoders) > 1:
        details.append(f"{ {2: 'two', 3: 'three'}.get(len(encoders), len(encoders))} text encoders")
    return f"{families.title(arch)} ({', '.join(details)})" if details else families.title(arch)


def check_fits(layers: list[LoraLayer], pipe, *, lora_name: str, base_name: str, arch: str = "",
               metadata: dict[str, str] | None = None) -> None:
    """Raise a FinetuneError naming both architectures unless every LoRA module exists in the base with
    the LoRA's in/out sizes (what "lora key not loaded" means in A1111/ComfyUI), and the LoRA's
    architecture (its header's, else its modules') is the base's family (SDXL or SD 1.x/2.x)."""
    from finetune.models import families

    made_for = lora_architecture(layers, metadata)
    if made_for and _family(made_for) != _family(base_architecture(pipe, arch)):
        raise FinetuneError(
            f"{lora_name} does not fit the base {base_name}: the LoRA was made for "
            f"{describe_lora_architecture(layers, metadata)}, the base is {describe_base_architecture(pipe, arch)}. "
            "Use a LoRA trained on this base's architecture, or the base it was trained on")
    family = families.for_arch(base_architecture(pipe, arch))
    denoiser = getattr(pipe, family.denoiser)
    # kohya files name the denoiser "lora_unet" whatever it is; where they fuse modules, split them first
    kohya = [l for l in layers if l.kohya_name and l.component in ("unet", family.denoiser)]
    if kohya and family.denoiser != "unet":
        try:
            layers = [l for l in layers if not (l.kohya_name and l.component in ("unet", family.denoiser))] + \
                family.kohya_unfuse(kohya, denoiser.config)
        except ValueError as e:
            raise FinetuneError(f"{lora_name} does not fit the base {base_name}: {e}") from None
    table = _module_table(pipe, base_architecture(pipe, arch))
    missing, wrong = [], []
    for l in layers:
        shape = table.get((l.component, l.module))
        label = f"{l.component}.{l.module}"
        if shape is None:
            missing.append(label)
        elif (int(l.down.reshape(l.rank, -1).shape[1]), int(l.up.shape[0])) != shape:
            wrong.append(f"{label} (LoRA {int(l.down.reshape(l.rank, -1).shape[1])}->{int(l.up.shape[0])}, "
                         f"base {shape[0]}->{shape[1]})")
    if not missing and not wrong:
        return
    problems = []
    if missing:
        problems.append(f"{plural(len(missing), 'module')} the base does not have (e.g. {', '.join(missing[:2])})")
    if wrong:
        problems.append(f"{plural(len(wrong), 'module')} with other sizes (e.g. {', '.join(wrong[:2])})")
    raise FinetuneError(
        f"{lora_name} does not fit the base {base_name}: the LoRA was made for "
        f"{describe_lora_architecture(layers, metadata)}, "
        f"the base is {describe_base_architecture(pipe, arch)}; of its {plural(len(layers), 'module')}, {' and '.join(problems)}. "
        "Use a LoRA trained on this base's architecture, or the base it was trained on")


class _NoTextEncoderNotice(logging.Filter):
    """Drops diffusers' "No LoRA keys associated to CLIPTextModel ..." notice, which it logs for every
    text encoder a LoRA has no layers for: for a UNet-only LoRA (the usual kind) that is expected, and
    the line would read like a problem in every export and sample."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No LoRA keys associated to")


@contextmanager
def _quiet_absent_components(layers: list[LoraLayer]):
    names = ("diffusers.loaders.lora_base", "diffusers.loaders.peft", "diffusers.loaders.lora_pipeline")
    loggers = [logging.getLogger(n) for n in names] if layers else []
    quiet = _NoTextEncoderNotice()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def load_layers(pipe, layers: list[LoraLayer], *, adapter_name: str = "default") -> None:
    """Load layers into `pipe` through diffusers' loader, written first as one clean peft-layout file.

    Why not hand diffusers the run's file directly: `convert_state_dict_to_diffusers` renames only the
    attention LoRAs (`to_q.lora.down.weight`) and leaves others (`proj_in.lora_A.weight`); on such a
    mixed file `load_lora_weights` takes the whole dict for peft layout and silently drops the renamed
    attention layers. Normalised keys load completely.
    """
    import tempfile

    # Full module paths as targets: leaf names (`conv1`) would also wrap modules the file has no weights for.
    configs = {c: {"target_modules": sorted(l.module for l in layers if l.component == c)}
               for c in {l.component for l in layers}}
    tensors, metadata = to_peft(layers, configs)
    with tempfile.TemporaryDirectory(prefix="finetune-lora-") as tmp:
        path = write_safetensors(Path(tmp) / "lora.safetensors", tensors, metadata)
        with _quiet_absent_components(layers):
            pipe.load_lora_weights(str(path), adapter_name=adapter_name)


def load_lora(pipe, path: str | os.PathLike, *, adapter_name: str = "default", base_name: str = "the base",
              arch: str = "") -> list[LoraLayer]:
    """Check a LoRA file of either layout against `pipe` and load it as adapter `adapter_name`.

    kohya files go through diffusers' own converter (which reads each module's alpha); peft-layout files
    are normalised first (see `load_layers`). Returns the file's layers.
    """
    tensors, metadata, layout = read_lora(path)
    layers = to_layers(tensors, metadata, layout)
    check_fits(layers, pipe, lora_name=str(path), base_name=base_name, arch=arch, metadata=metadata)
    if layout == KOHYA:
        with _quiet_absent_components(layers):
            pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    else:
        load_layers(pipe, layers, adapter_name=adapter_name)
    return layers
