"""`finetune export`, proven by round trips on the tiny base: every format loads where it is meant to and
gives the trained model's image."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from diffusers import StableDiffusionPipeline
from helpers_run import CHECKPOINT_STEP, lora_pipe, make_fake_run, one_torch_thread, render  # noqa: F401 (fixture)
from PIL import Image
from safetensors import safe_open

from finetune import lora_io, runs
from finetune.cli import cli
from finetune.errors import FinetuneError
from finetune.export import export, write_merged
from finetune.models import load_base
from finetune.models.single_file import pipeline_to_ldm
from finetune.models.tiny import tiny_base_dir

SCALE = 0.7
MERGED_FP32_TOL = 5e-5  # fusing reorders float sums; measured ~5e-6 on the tiny base
MERGED_FP16_TOL = 3e-2  # image once every weight is rounded to fp16; measured 1.2e-2 (weights checked exactly)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("export"), text_encoder=True, samples=True)


@pytest.fixture(scope="module")
def refs():
    """Images of the trained model (its peft adapters in memory, not read from any file): at scale 1
    and at SCALE."""
    pipe = lora_pipe(text_encoder=True)
    full = render(pipe)
    pipe.set_adapters(["default"], [SCALE])
    return {"full": full, "scaled": render(pipe)}


def _header(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture()
def base(tiny_base):
    return tiny_base


def _load(pipe, path):
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(path))
    return pipe


def _single_file(path, dtype=torch.float32):
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_base_dir()), local_files_only=True,
                                                    torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- LoRA files


def test_peft_file_gives_the_trained_image(run, refs, base, tmp_path):
    path = export(run, "peft", dtype="fp32", out=tmp_path)
    assert path == tmp_path / "ohwx-run-peft.safetensors"
    meta, tensors = _header(path)
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert (adapter["unet.r"], adapter["unet.lora_alpha"]) == (4, 8.0)
    assert (adapter["text_encoder.r"], adapter["text_encoder.lora_alpha"]) == (4, 2.0)
    assert adapter["unet.base_model_name_or_path"] is None  # no local cache path leaks into a shared file
    assert all(re.search(r"\.lora_[AB]\.weight$", k) for k in tensors)
    assert meta["finetune.trigger"] == "ohwx" and meta["finetune.export_format"] == "peft"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"

    # bit-identical with 2 torch threads; on one thread the conv LoRAs of the deepest blocks round
    # differently in the two models (measured 2.9e-6)
    assert np.abs(render(_load(base, path)) - refs["full"]).max() <= 1e-5

    half = export(run, "peft", out=tmp_path / "half.safetensors")  # the default dtype, fp16
    halves = _header(half)[1]
    assert halves.keys() == tensors.keys() and all(torch.equal(halves[k], tensors[k].half()) for k in tensors)


def test_kohya_file_through_diffusers_own_converter(run, refs, base, tmp_path):
    path = export(run, "kohya", dtype="fp32", out=tmp_path)
    assert path.name == "ohwx-run.safetensors"
    meta, tensors = _header(path)
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == 8.0
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 2.0

    # diffusers' own kohya converter, with network alphas
    assert np.abs(render(_load(base, path)) - refs["full"]).max() <= 1e-5

    # the check has teeth: the same file without alphas (loaders then take alpha = rank) is another image
    bare = lora_io.write_safetensors(tmp_path / "bare.safetensors",
                                     {k: v for k, v in tensors.items() if not k.endswith(".alpha")}, {})
    assert np.abs(render(_load(base, bare)) - refs["full"]).max() > 1e-2


def test_kohya_header(run, tmp_path):
    path = export(run, "kohya", out=tmp_path)
    meta, _ = _header(path)
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_output_name",
                "ss_steps", "ss_training_started_at", "ss_tag_frequency", "ss_sd_model_hash", "modelspec.architecture",
                "modelspec.title", "modelspec.trigger_phrase", "sshs_model_hash", "sshs_legacy_hash"):
        assert meta.get(key), key
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4", "8")
    assert (meta["ss_base_model_version"], meta["ss_output_name"], meta["ss_steps"]) == ("sd_v1", "ohwx-run", "10")
    assert float(meta["ss_training_started_at"]) == pytest.approx(1735787045.0)  # unix time, as kohya writes it
    assert json.loads(meta["ss_tag_frequency"]) == {"ohwx": {"a photo of ohwx person": 6}}
    assert meta["ss_sd_model_hash"] == load_base("tiny").model_hash()[:10]
    assert meta["modelspec.trigger_phrase"] == "ohwx" and meta["modelspec.title"] == "ohwx-run"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()  # what A1111 computes from the file


def test_kohya_mixed_precision_is_what_the_run_trained_in(run, tmp_path):
    """`train.mixed_precision = "auto"` is resolved on the training machine: ss_mixed_precision says what it
    became (run.json's precision, in kohya's names), never "auto"."""
    copy = tmp_path / "outputs" / "ohwx-run"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / runs.CONFIG).read_text())
    info = json.loads((copy / runs.RUN_INFO).read_text())

    def exported(mixed_precision: str, precision: str | None) -> dict:
        cfg["train"]["mixed_precision"] = mixed_precision
        (copy / runs.CONFIG).write_text(json.dumps(cfg))
        (copy / runs.RUN_INFO).write_text(json.dumps({**info, **({"precision": precision} if precision else {})}))
        return _header(export(copy, "kohya", out=tmp_path / f"{mixed_precision}-{precision}.safetensors"))[0]

    assert exported("auto", "bf16")["ss_mixed_precision"] == "bf16"
    assert exported("auto", "fp32")["ss_mixed_precision"] == "no"
    assert exported("no", None)["ss_mixed_precision"] == "no"  # a run from before run.json kept it
    assert "ss_mixed_precision" not in exported("auto", None)  # unknown: left out rather than "auto"


_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}


def _a1111_suffix(kind: str, rest: str) -> str:
    return f"{1 if kind == 'attentions' else 0}_{_A1111_RESNET.get(rest, rest) if kind == 'resnets' else rest}"


def _a1111_compvis_name(module: str) -> str:
    """AUTOMATIC1111's rule for SD 1.x kohya names (extensions-builtin/Lora), restated for this test."""
    rules = [
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda b, kind, i, rest: f"diffusion_model_input_blocks_{1 + int(b) * 3 + int(i)}_{_a1111_suffix(kind, rest)}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda kind, i, rest: f"diffusion_model_middle_block_{1 if kind == 'attentions' else int(i) * 2}_"
                               f"{_A1111_RESNET.get(rest, rest) if kind == 'resnets' else rest}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda b, kind, i, rest: f"diffusion_model_output_blocks_{int(b) * 3 + int(i)}_{_a1111_suffix(kind, rest)}"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
         lambda i, rest: f"transformer_text_model_encoder_layers_{i}_{rest}"),
    ]
    for pattern, build in rules:
        if m := re.fullmatch(pattern, module):
            return build(*m.groups())
    raise AssertionError(f"A1111 has no rule for {module}")


def test_kohya_keys_are_the_ones_a1111_resolves(run, tmp_path, tiny_pipe):
    """Each module name, mapped as A1111 maps SD 1.x kohya names, is a module of the model A1111 builds
    from the original layout: no "lora key not loaded"."""
    _, tensors = _header(export(run, "kohya", out=tmp_path))
    compvis = {k.removeprefix("model.").removeprefix("cond_stage_model.").rsplit(".", 1)[0].replace(".", "_")
               for k in pipeline_to_ldm(tiny_pipe)}
    modules = {k.split(".")[0] for k in tensors}
    assert len(modules) == len(tensors) / 3
    missing = [m for m in modules if _a1111_compvis_name(m) not in compvis]
    assert not missing, missing[:5]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules  # kohya sd-scripts' naming


# ---------------------------------------------------------------- merged


@pytest.fixture(scope="module")
def merged32(run, tmp_path_factory):
    return export(run, "merged", dtype="fp32", scale=SCALE, out=tmp_path_factory.mktemp("merged") / "m32.safetensors")


def test_merged_single_file_in_original_layout(merged32, refs):
    meta, tensors = _header(merged32)
    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in tensors)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0.") for k in tensors)
    assert tensors["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv as the original stores it
    assert not [k for k in tensors if "lora" in k]
    assert meta["finetune.lora_scale"] == "0.7" and meta["modelspec.architecture"] == "stable-diffusion-v1"

    diff = np.abs(render(_single_file(merged32)) - refs["scaled"]).max()
    assert diff <= MERGED_FP32_TOL, diff


def test_merged_fp16_is_the_fp32_merge_rounded(run, merged32, refs, tmp_path):
    path = export(run, "merged", dtype="fp16", scale=SCALE, out=tmp_path / "m16.safetensors")
    _, t16 = _header(path)
    _, t32 = _header(merged32)
    assert t16.keys() == t32.keys()
    not_rounded = [k for k in t32 if not torch.equal(t16[k], t32[k].half() if t32[k].is_floating_point() else t32[k])]
    assert not not_rounded, not_rounded[:3]
    diff = np.abs(render(_single_file(path)) - refs["scaled"]).max()
    assert diff <= MERGED_FP16_TOL, diff


def test_write_merged_writes_the_live_weights_without_a_copy(tiny_pipe, tmp_path, monkeypatch):
    """Peak memory near one model: the fused weights are cast in place and handed to safetensors as they
    are (it writes from their buffers), so no second copy of the model is ever built."""
    import safetensors.torch

    handed, real = {}, safetensors.torch.save_file

    def spy(tensors, filename, metadata=None):
        handed.update({k: v.untyped_storage().data_ptr() for k, v in tensors.items()})
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", spy)
    path = write_merged(tiny_pipe, tmp_path / "m.safetensors", torch.float16, {"finetune.test": "1"})
    live = {t.untyped_storage().data_ptr() for name in ("unet", "vae", "text_encoder")
            for t in getattr(tiny_pipe, name).state_dict().values()}
    assert handed and set(handed.values()) <= live
    assert {p.dtype for p in tiny_pipe.unet.parameters()} == {torch.float16}
    assert path.is_file()


def test_merged_diffusers_folder(run, refs, tmp_path):
    path = export(run, "merged-diffusers", dtype="fp32", scale=SCALE, out=tmp_path / "folder")
    assert (path / "model_index.json").is_file() and (path / "README.md").is_file()
    info = json.loads((path / "finetune_export.json").read_text())
    assert info["finetune.export_format"] == "merged-diffusers" and info["finetune.lora_scale"] == "0.7"
    assert not list(tmp_path.glob(".*tmp*"))
    assert 'from_pretrained(".", torch_dtype' in (path / "README.md").read_text()
    with pytest.raises(FinetuneError, match="already exists"):  # -o an earlier export: refused, not filled
        export(run, "merged-diffusers", scale=SCALE, out=path)
    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    diff = np.abs(render(pipe) - refs["scaled"]).max()
    assert diff <= MERGED_FP32_TOL, diff


# ---------------------------------------------------------------- rank resize


def test_rank_resize(run, refs, base, tmp_path, capsys):
    same = export(run, "kohya", dtype="fp32", rank=4, out=tmp_path / "r4.safetensors")
    assert np.abs(render(_load(base, same)) - refs["full"]).max() <= 1e-5
    assert "min 100.00%, mean 100.00%" in capsys.readouterr().out

    half = export(run, "kohya", dtype="fp32", rank=2, out=tmp_path / "r2.safetensors")
    printed = capsys.readouterr().out
    m = re.search(r"rank 4 -> 2: .* kept: min ([\d.]+)%, mean ([\d.]+)% over (\d+) layers", printed)
    assert m, printed
    meta, tensors = _header(half)
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {2}
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "4"  # alpha / rank kept at 2
    # the printed shares are the kept norms, recomputed here from the two files
    original = {(l.component, lora_io._kohya_module(l.component, l.module)): l
                for l in lora_io.to_layers(*lora_io.read_lora(run / "lora" / runs.WEIGHT_NAME))}
    shares = []
    for layer in lora_io.to_layers(tensors, meta, "kohya"):
        old = original[(layer.component, layer.module)]
        delta = lambda l: l.scale * l.up.reshape(l.up.shape[0], -1).double() @ l.down.reshape(l.rank, -1).double()
        shares.append(float(torch.linalg.norm(delta(layer)) / torch.linalg.norm(delta(old))))
    assert len(shares) == int(m.group(3))
    assert min(shares) * 100 == pytest.approx(float(m.group(1)), abs=0.01)
    assert np.mean(shares) * 100 == pytest.approx(float(m.group(2)), abs=0.01)
    def to_q_rank():
        to_q = base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        return to_q.lora_A[base.get_active_adapters()[0]].weight.shape[0]

    _load(base, half)
    assert to_q_rank() == 2

    peft = export(run, "peft", rank=2, out=tmp_path / "r2-peft.safetensors")
    adapter = json.loads(_header(peft)[0]["lora_adapter_metadata"])
    assert (adapter["unet.r"], adapter["unet.lora_alpha"], adapter["text_encoder.lora_alpha"]) == (2, 4.0, 1.0)
    _load(base, peft)
    assert to_q_rank() == 2


# ---------------------------------------------------------------- checkpoints, model card


def test_checkpoint_choice(run, tmp_path):
    path = export(run, "peft", dtype="fp32", checkpoint="latest", out=tmp_path)
    assert path.name == f"ohwx-run-step-{CHECKPOINT_STEP:06d}-peft.safetensors"
    final = {(l.component, l.module): l
             for l in lora_io.to_layers(*lora_io.read_lora(run / "lora" / runs.WEIGHT_NAME))}
    meta, tensors = _header(path)
    for layer in lora_io.to_layers(tensors, meta, "peft"):
        torch.testing.assert_close(layer.up, final[(layer.component, layer.module)].up * 0.5)
    assert meta["finetune.checkpoint"] == "step-000005" and meta["finetune.steps"] == "5"
    assert export(run, "kohya", checkpoint="step-5", out=tmp_path).name == "ohwx-run-step-000005.safetensors"
    with pytest.raises(FinetuneError, match=r"no COMPLETE marker.*complete ones: step-000005"):
        export(run, "peft", checkpoint="step-8", out=tmp_path)
    with pytest.raises(FinetuneError, match="does not exist"):
        export(run, "peft", checkpoint="step-3", out=tmp_path)
    with pytest.raises(FinetuneError, match="use latest or step-N"):
        export(run, "peft", checkpoint="newest", out=tmp_path)
    with pytest.raises(FinetuneError, match=r"--checkpoint best: .* has no scores.json yet: sample its checkpoints"):
        export(run, "peft", checkpoint="best", out=tmp_path)


def test_model_card_and_sample_grid(run):
    export(run, "kohya", force=True)
    export(run, "peft", force=True)
    folder = run / "export"
    text = (folder / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "tiny" and front["instance_prompt"] == "a photo of ohwx person"
    assert {"lora", "dreambooth", "text-to-image"} <= set(front["tags"])
    assert "`ohwx`" in text and "load_lora_weights" in text and 'weight_name="ohwx-run-peft.safetensors"' in text
    assert "models/Lora/" in text and "<lora:ohwx-run:" in text and "ComfyUI/models/loras/" in text
    assert "| `ohwx-run.safetensors` | kohya |" in text and "| `ohwx-run-peft.safetensors` | peft |" in text
    assert "(ohwx-run-samples.png)" in text
    from finetune.provenance import read_provenance

    with Image.open(folder / "ohwx-run-samples.png") as grid:
        assert grid.size == (128, 128)  # 2 prompts x 2 seeds of 64 px
        cell = np.asarray(grid.convert("RGB"))[64:, 64:]
    with Image.open(run / "samples" / "step-000010" / "1-2.png") as im:
        np.testing.assert_array_equal(cell, np.asarray(im.convert("RGB")))
    assert read_provenance(folder / "ohwx-run-samples.png")["ai_label"]


def test_a_readme_finetune_did_not_write_is_left_alone(run, tmp_path, capsys):
    (tmp_path / "README.md").write_text("my notes\n")
    export(run, "kohya", out=tmp_path, card=True)
    assert (tmp_path / "README.md").read_text() == "my notes\n"
    assert "not written by finetune; not replacing it: this run's card is ohwx-run.md" in capsys.readouterr().out
    assert "| `ohwx-run.safetensors` | kohya |" in (tmp_path / "ohwx-run.md").read_text()


def test_export_o_writes_only_the_asked_for_file_unless_card(run, tmp_path):
    """Issue 13 item 18: `-o` into a user's folder (ComfyUI's models/loras/) leaves only the LoRA there;
    --card asks for the model card and the samples image too."""
    loras = tmp_path / "ComfyUI" / "models" / "loras"
    loras.mkdir(parents=True)
    code, out = _cli("export", run, "-f", "kohya", "-o", loras)
    assert code == 0, out
    assert sorted(p.name for p in loras.iterdir()) == ["ohwx-run.safetensors"]
    assert "model card" not in out
    code, out = _cli("export", run, "-f", "peft", "-o", loras / "me.safetensors")
    assert code == 0, out
    assert sorted(p.name for p in loras.iterdir()) == ["me.safetensors", "ohwx-run.safetensors"]

    hub = tmp_path / "hub-upload"
    hub.mkdir()
    code, out = _cli("export", run, "-f", "kohya", "-o", hub, "--card")
    assert code == 0, out
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "ohwx-run-samples.png", "ohwx-run.safetensors"]
    assert f"model card: {hub / 'README.md'}" in out


def test_two_runs_exported_into_one_folder_get_one_card_each(run, tmp_path, capsys):
    """Issue 13 item 4: a card lists only its own run's files; a second run's card does not replace the
    first's but is named after its export."""
    other = tmp_path / "outputs" / "other-run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("export", "gallery"))
    shared = tmp_path / "shared"
    shared.mkdir()
    export(run, "kohya", out=shared, card=True)
    export(run, "peft", out=shared, card=True)
    export(other, "kohya", out=shared, card=True)
    assert "README.md is another run's model card; not replacing it: this run's card is other-run.md" \
        in capsys.readouterr().out
    mine, theirs = (shared / "README.md").read_text(), (shared / "other-run.md").read_text()
    assert "# ohwx-run" in mine and "# other-run" in theirs
    assert "`ohwx-run.safetensors`" in mine and "`ohwx-run-peft.safetensors`" in mine
    assert "other-run" not in mine
    assert "`other-run.safetensors`" in theirs and "ohwx-run" not in theirs
    export(run, "kohya", out=shared, card=True, force=True)  # the first run's card stays README.md
    assert "other-run" not in (shared / "README.md").read_text()


# ---------------------------------------------------------------- CLI and errors


def _cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def _one_line_error(code, output):
    """The command failed with exactly one `error:` line, last, and no traceback (progress may precede it)."""
    assert code != 0, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and output.endswith(errors[0]) and "Traceback" not in output, output
    return errors[0]


def test_cli_export_default_formats_and_refusing_to_overwrite(run, tmp_path):
    code, out = _cli("export", run, "-o", tmp_path)  # default: export.formats = peft, kohya
    assert code == 0, out
    kohya = tmp_path / "ohwx-run.safetensors"
    assert kohya.is_file() and (tmp_path / "ohwx-run-peft.safetensors").is_file()
    before = kohya.read_bytes()
    msg = _one_line_error(*_cli("export", run, "-f", "kohya", "--dtype", "fp32", "-o", tmp_path))
    assert "already exists" in msg and "--force" in msg
    assert kohya.read_bytes() == before and not list(tmp_path.glob(".*"))
    code, out = _cli("export", run, "-f", "kohya", "--dtype", "fp32", "-o", tmp_path, "--force")
    assert code == 0, out
    assert kohya.read_bytes() != before and _header(kohya)[0]["finetune.export_dtype"] == "fp32"


def test_cli_errors(run, tmp_path):
    empty = tmp_path / "outputs" / "empty"
    empty.mkdir(parents=True)
    shutil.copy(run / "config.json", empty)
    assert "no adapter to export" in _one_line_error(*_cli("export", empty, "-f", "kohya"))

    broken = tmp_path / "outputs" / "broken"
    (broken / "lora").mkdir(parents=True)
    (broken / "lora" / runs.WEIGHT_NAME).write_text("not weights")
    assert "not a safetensors file" in _one_line_error(*_cli("export", broken, "-f", "peft"))

    assert "applies to merged" in _one_line_error(*_cli("export", run, "-f", "kohya", "--scale", "0.5"))
    assert "a merged model has no rank" in _one_line_error(*_cli("export", run, "-f", "merged", "--rank", "2"))
    assert "only reduces" in _one_line_error(*_cli("export", run, "-f", "kohya", "--rank", "8"))


def test_wrong_architecture_is_refused_naming_both(run, tmp_path):
    """A run whose adapter was made for SD 1.5 (cross-attention width 768) cannot merge into the tiny base."""
    other = tmp_path / "outputs" / "sd15-lora"
    (other / "lora").mkdir(parents=True)
    for name in ("config.json", "run.json"):
        shutil.copy(run / name, other)
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    lora_io.write_safetensors(other / "lora" / runs.WEIGHT_NAME,
                              {f"{module}.lora_A.weight": torch.zeros(4, 768),
                               f"{module}.lora_B.weight": torch.zeros(320, 4)},
                              {"finetune.base": "tiny", "finetune.arch": "sd1"})
    msg = _one_line_error(*_cli("export", other, "-f", "merged"))
    assert "SD 1.x (cross-attention width 768)" in msg and "SD 1.x (cross-attention width 32)" in msg
    assert not (other / "export").exists() or not list((other / "export").glob("*.safetensors"))
