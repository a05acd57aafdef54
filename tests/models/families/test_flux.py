"""The FLUX.1 family: detection from folders, files and LoRAs of other tools, its conditioning and
objective as FluxPipeline has them, its names and its single file."""

import pytest
import torch
from safetensors.torch import save_file

from finetune import lora_io
from finetune.models import families
from finetune.models.families import flux, flux_flow, flux_layout
from finetune.models.families.flux_tiny import tiny_flux_base_dir, tiny_flux_split_dir
from finetune.models.load import load_base, peek_architecture, read_single_file_keys


@pytest.fixture(scope="module")
def base():
    return load_base("tiny-flux")


def test_registered_and_detected():
    assert families.for_arch("flux1-dev") is flux.FAMILY and families.title("flux1-schnell") == "FLUX.1-schnell"
    assert families.folder_arch(tiny_flux_base_dir("dev")) == "flux1-dev"
    assert families.folder_arch(tiny_flux_base_dir("schnell")) == "flux1-schnell"
    assert peek_architecture("tiny-flux-schnell") == "flux1-schnell"
    shapes = read_single_file_keys(tiny_flux_split_dir("dev") / "flux1-dev-tiny.safetensors")
    assert families.single_file_arch(shapes) == "flux1-dev"
    assert families.single_file_arch({"model.diffusion_model." + k: v for k, v in shapes.items()}) == "flux1-dev"
    schnell = {k: v for k, v in shapes.items() if not k.startswith("guidance_in.")}
    assert families.single_file_arch(schnell) == "flux1-schnell"
    assert flux.single_file_config(shapes) == tiny_flux_base_dir("dev")
    assert families.declared_arch({"modelspec.architecture": "flux-1-dev/lora"}) == "flux1-dev"
    assert families.declared_arch({"ss_base_model_version": "flux1"}) == "flux1-dev"


def _lora_file(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("layout", ["peft", "ai-toolkit", "kohya", "comfyui"])
def test_loras_of_other_tools_are_named_flux(tmp_path, layout):
    down, up = torch.zeros(2, 3072), torch.zeros(3072, 2)
    if layout == "peft":  # diffusers' save_lora_weights
        t = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up}
    elif layout == "ai-toolkit":  # ai-toolkit saves diffusers names, single blocks included
        t = {"transformer.single_transformer_blocks.3.proj_mlp.lora_A.weight": down,
             "transformer.single_transformer_blocks.3.proj_mlp.lora_B.weight": torch.zeros(12288, 2)}
    elif layout == "kohya":
        t = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 2),
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)}
    else:  # ComfyUI's own saver: original names under diffusion_model.
        t = {"diffusion_model.single_blocks.0.linear2.lora_A.weight": torch.zeros(2, 15360),
             "diffusion_model.single_blocks.0.linear2.lora_B.weight": torch.zeros(3072, 2)}
    tensors, metadata, kind = lora_io.read_lora(_lora_file(tmp_path / "l.safetensors", t))
    layers = lora_io.to_layers(tensors, metadata, kind)
    assert lora_io.lora_architecture(layers, metadata) == "flux1-dev"
    assert lora_io.describe_lora_architecture(layers, metadata).startswith("FLUX.1-dev")


def test_sd_loras_are_not_flux():
    sd = [lora_io.LoraLayer("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                            torch.zeros(2, 768), torch.zeros(320, 2), 2.0)]
    assert flux.detect_lora(sd, {}) is None


def test_encode_text_is_flux_pipelines(base):
    pipe = base.pipe
    cond = flux.encode_text(pipe.components, ["a photo of ohwx person", "a dog"])
    hidden, pooled, _ = pipe.encode_prompt(["a photo of ohwx person", "a dog"], max_sequence_length=32)
    assert torch.equal(cond["hidden"], hidden) and torch.equal(cond["pooled"], pooled)


def test_objective_is_flow_matching_with_flux_shift(base):
    obj = flux.FAMILY.training_scheduler(base.pipe)
    assert obj.guidance == 1.0 and obj.sampling.sampler == "flux_shift"
    torch.manual_seed(0)
    u = flux.FAMILY.sample_timesteps(obj, 3, "cpu")
    latents, noise = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    sig = flux_flow.sigmas(u, 16, obj.sampling)
    assert torch.equal(flux.FAMILY.add_noise(obj, latents, noise, u), flux_flow.noisy(latents, noise, sig))
    assert torch.equal(flux.FAMILY.target(obj, latents, noise, u), noise - latents)
    cond = flux.encode_text(base.pipe.components, ["a"] * 3)
    with torch.no_grad():
        pred = flux.FAMILY.predict(obj, base.pipe.transformer, latents, u, cond)
        want = flux_flow.predict(base.pipe.transformer, latents, sig, cond["hidden"], cond["pooled"], 1.0)
    assert torch.equal(pred, want)
    assert torch.equal(flux.FAMILY.loss_weights(obj, u, 0.0), torch.ones(3))
    with pytest.raises(ValueError, match="min_snr_gamma = 5.0.*flow matching"):
        flux.FAMILY.loss_weights(obj, u, 5.0)


def test_the_flow_section_sets_the_sampler_and_the_training_guidance():
    from types import SimpleNamespace

    from finetune.config import load_config

    def pipe(guidance_embeds):
        return SimpleNamespace(scheduler=SimpleNamespace(config={"base_shift": 0.5, "max_shift": 1.15}),
                               transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=guidance_embeds)))

    u = torch.linspace(0.05, 0.95, 7)
    for sampler, shift in [("uniform", 3.0), ("sigmoid", 3.0), ("shift", 5.0), ("flux_shift", 3.0)]:
        cfg = load_config("tiny-flux-demo", [f"flow.timestep_sampler={sampler}", f"flow.shift={shift}",
                                             "flow.sigmoid_scale=0.8", "flow.guidance=3.5"])
        obj = flux.objective(pipe(True), cfg.flow)
        assert obj.guidance == 3.5 and obj.sampling.sampler == sampler
        want = flux_flow.sigmas(u, 64, flux_flow.FlowSampling(sampler=sampler, shift=shift, sigmoid_scale=0.8))
        assert torch.equal(flux_flow.sigmas(u, 64, obj.sampling), want)
    assert torch.equal(flux_flow.sigmas(u, 64, flux.objective(pipe(True), load_config(
        "tiny-flux-demo", ["flow.timestep_sampler=uniform"]).flow).sampling), u)
    assert flux.objective(pipe(False), cfg.flow).guidance is None  # schnell embeds no guidance
    with pytest.raises(Exception, match="flow.timestep_sampler = 'logit'"):
        load_config("tiny-flux-demo", ["flow.timestep_sampler=logit"])


def test_sd_bases_refuse_flow_settings():
    from types import SimpleNamespace

    from finetune.config import load_config
    from finetune.errors import FinetuneError

    pipe = SimpleNamespace(scheduler=load_base("tiny").pipe.scheduler)
    sd1 = families.get("sd1")
    sd1.training_scheduler(pipe, load_config("tiny-demo", []).flow)
    with pytest.raises(FinetuneError, match=r"flow.timestep_sampler, flow.guidance set, but this base trains with DDPM"):
        sd1.training_scheduler(pipe, load_config("tiny-demo", ["flow.timestep_sampler=uniform", "flow.guidance=2"]).flow)


def test_names_and_single_file(base):
    t = base.pipe.transformer
    names = flux.kohya_lora_names("transformer", ["transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.proj_out"],
                                  t.config)
    assert names == {"transformer_blocks.0.attn.to_k": "lora_unet_double_blocks_0_img_attn_qkv",
                     "single_transformer_blocks.1.proj_out": "lora_unet_single_blocks_1_linear2"}
    assert flux.kohya_lora_names("text_encoder", ["encoder.layers.0.self_attn.q_proj"]) == {
        "encoder.layers.0.self_attn.q_proj": "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"}
    with pytest.raises(ValueError, match="no kohya LoRA prefix for 'text_encoder_2'"):
        flux.kohya_lora_names("text_encoder_2", ["encoder.block.0.layer.0.SelfAttention.q"])
    aliases = flux.original_aliases(t, ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_q"])
    assert aliases == {"transformer_blocks.0.attn.to_out.0": "double_blocks.0.img_attn.proj"}
    single = flux.FAMILY.to_single_file(base.pipe)
    assert single.keys() == flux_layout.to_original(t.state_dict(), t.config).keys()


def test_base_loads_from_split_files_and_from_a_transformer_file(base):
    files = tiny_flux_split_dir("dev")
    split = load_base(str(files / "base.toml"))
    assert (split.arch, split.kind, type(split.pipe).__name__) == ("flux1-dev", "split-files", "FluxPipeline")
    assert {f.name for f in split.files} == {"flux1-dev-tiny.safetensors", "clip_l.safetensors",
                                             "t5xxl_tiny.safetensors", "ae.safetensors"}
    one = load_base(str(files / "flux1-dev-tiny.safetensors"))  # the tiny finds its own other parts
    assert (one.arch, one.kind) == ("flux1-dev", "single-file")
    want = base.pipe.transformer.state_dict()
    for b in (split, one):
        got = b.pipe.transformer.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_kohya_export_fuses_and_fits_the_base_it_came_from(base, tmp_path):
    t = base.pipe.transformer
    g = torch.Generator().manual_seed(0)
    mods = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
            "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.attn.to_q",
            "transformer_blocks.1.ff.net.2"]
    layers = [lora_io.LoraLayer("transformer", m, torch.randn(2, t.get_submodule(m).in_features, generator=g),
                                torch.randn(t.get_submodule(m).out_features, 2, generator=g), 1.0) for m in mods]
    tensors = lora_io.to_kohya(layers, "flux1-dev", t.config)
    assert {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in tensors} == {
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1", "lora_unet_double_blocks_1_img_mlp_2"}
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3.0  # rank 6, scale 1/2
    path = lora_io.write_safetensors(tmp_path / "k.safetensors", tensors, {})
    read, metadata, layout = lora_io.read_lora(path)
    back = lora_io.to_layers(read, metadata, layout)
    lora_io.check_fits(back, base.pipe, lora_name="k", base_name="tiny-flux", arch="flux1-dev")
    sd_base = load_base("tiny")
    with pytest.raises(lora_io.FinetuneError, match="made for FLUX.1-dev, the base is SD 1.x"):
        lora_io.check_fits(back, sd_base.pipe, lora_name="k", base_name="tiny", arch="sd1", metadata=metadata)


def test_cli_writes_the_tiny_flux_in_both_layouts(base, tmp_path):
    from click.testing import CliRunner

    from finetune.cli import cli

    r = CliRunner().invoke(cli, ["base", "tiny-flux", "--single-file", str(tmp_path / "t.safetensors"),
                                 "--split-files", str(tmp_path / "split")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "split" / "base.toml").is_file() and not (tmp_path / "split" / "model_index.json").exists()
    want = base.pipe.transformer.state_dict()
    for spec in (tmp_path / "t.safetensors", tmp_path / "split" / "base.toml"):
        b = load_base(str(spec))
        got = b.pipe.transformer.state_dict()
        assert b.arch == "flux1-dev" and all(torch.equal(got[k], want[k]) for k in want)
    r = CliRunner().invoke(cli, ["base", "info", str(tmp_path / "split" / "base.toml")])
    assert r.exit_code == 0 and "flux1-dev" in r.output and "text_encoder_2:" in r.output, r.output
