"""LoRA files in peft and kohya layout: detection, reading, alpha, resize, hashes, fitting a base."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers_run import TE_TARGETS, UNET_TARGETS, lora_pipe, make_fake_run, one_torch_thread, render  # noqa: F401 (fixture)

from finetune import lora_io, runs
from finetune.errors import FinetuneError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("lora_io"), text_encoder=True)


@pytest.fixture(scope="module")
def trained():
    return lora_pipe(text_encoder=True)


def _layers(path):
    return lora_io.to_layers(*lora_io.read_lora(path))


def test_detect_layout():
    assert lora_io.detect_layout(["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"]) == "peft"
    assert lora_io.detect_layout(["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"]) == "peft"
    assert lora_io.detect_layout(["text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"]) == "peft"
    assert lora_io.detect_layout(["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
                                  "lora_unet_mid_block_attentions_0_proj_in.alpha"]) == "kohya"
    assert lora_io.detect_layout(["lora_unet_x.hada_w1_a", "lora_unet_x.hada_w1_b"]) == "lycoris"
    checkpoint = ["model.diffusion_model.out.2.weight", "first_stage_model.encoder.conv_in.weight"]
    assert lora_io.detect_layout(checkpoint) == "checkpoint"
    assert lora_io.detect_layout(["down_blocks.0.resnets.0.conv1.weight"]) == "diffusers"
    assert lora_io.detect_layout(["something.else"]) == "unknown"


def test_reads_the_run_file_with_its_real_alphas(run, trained):
    """The trainer's file mixes diffusers' renamed attention keys (`to_q.lora.down.weight`) with peft
    keys (`proj_in.lora_A.weight`); every module must come back, with alpha from the adapter metadata."""
    tensors, metadata, layout = lora_io.read_lora(run / "lora" / runs.WEIGHT_NAME)
    assert layout == "peft"
    assert any(k.endswith(".lora.down.weight") for k in tensors) and any(k.endswith(".lora_A.weight") for k in tensors)
    layers = lora_io.to_layers(tensors, metadata, layout)
    wanted = {(c, n) for c in ("unet", "text_encoder")
              for n, m in getattr(trained, c).named_modules() if hasattr(m, "lora_A")}
    assert {(l.component, l.module) for l in layers} == wanted
    assert {l.alpha for l in layers if l.component == "unet"} == {8.0}
    assert {l.alpha for l in layers if l.component == "text_encoder"} == {2.0}
    assert {l.rank for l in layers} == {4}
    assert {l.target for l in layers} == set(UNET_TARGETS) | set(TE_TARGETS)
    module = trained.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    layer = next(l for l in layers if l.module == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert torch.equal(layer.down, module.lora_A["default"].weight)
    assert torch.equal(layer.up, module.lora_B["default"].weight)


def test_peft_alpha_conventions():
    assert lora_io._peft_alpha(None, "x.to_q", 4) == 4.0  # no metadata: diffusers assumes scale 1
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn2.to_k": 2}, "use_rslora": False}
    assert lora_io._peft_alpha(config, "a.attn1.to_k", 4) == 8.0
    assert lora_io._peft_alpha(config, "a.attn2.to_k", 4) == 2.0
    # rsLoRA scales by alpha / sqrt(r); in kohya's alpha / r convention that is alpha * sqrt(r)
    assert lora_io._peft_alpha({"lora_alpha": 8, "use_rslora": True}, "x", 4) == pytest.approx(16.0)


def test_load_lora_reproduces_the_trained_model(run, trained, tiny_pipe):
    lora_io.load_lora(tiny_pipe, run / "lora" / runs.WEIGHT_NAME, base_name="tiny", arch="sd1")
    assert np.abs(render(tiny_pipe) - render(trained)).max() <= 1e-5  # see test_export: 0 on 2 threads


def test_kohya_names_and_alphas(run):
    tensors = lora_io.to_kohya(_layers(run / "lora" / runs.WEIGHT_NAME))
    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert {f"{unet}.lora_down.weight", f"{unet}.lora_up.weight", f"{unet}.alpha", f"{te}.alpha"} <= set(tensors)
    assert tensors[f"{unet}.alpha"].item() == 8.0 and tensors[f"{te}.alpha"].item() == 2.0
    assert not [k for k in tensors if k.startswith("lora_te1_") or "lora_te_encoder" in k]
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)


def _random_layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    def r(*shape):
        return torch.randn(*shape, generator=g)

    return [lora_io.LoraLayer("unet", "a.to_q", r(8, 24), r(16, 8), 4.0),
            lora_io.LoraLayer("unet", "b.conv1", r(8, 6, 3, 3), r(12, 8, 1, 1), 8.0),
            lora_io.LoraLayer("text_encoder", "c.q_proj", r(2, 10), r(10, 2), 1.0)]


def _delta(layer):
    return layer.scale * layer.up.reshape(layer.up.shape[0], -1) @ layer.down.reshape(layer.rank, -1)


def test_resize_at_full_rank_keeps_every_update():
    layers = _random_layers()
    resized, kept = lora_io.resize(layers, 8)
    assert [l.rank for l in resized] == [8, 8, 2]
    assert kept == pytest.approx([1.0, 1.0, 1.0])
    for old, new in zip(layers, resized):
        assert new.down.shape[1:] == old.down.shape[1:] and new.up.shape[2:] == old.up.shape[2:]
        torch.testing.assert_close(_delta(new), _delta(old), rtol=1e-5, atol=1e-5)


def test_resize_truncates_and_reports_the_kept_frobenius_share():
    layers = _random_layers()
    resized, kept = lora_io.resize(layers, 3)
    assert [l.rank for l in resized] == [3, 3, 2]
    assert [l.alpha for l in resized] == [4.0 * 3 / 8, 8.0 * 3 / 8, 1.0]  # alpha / rank is kept
    for old, new, share in zip(layers, resized, kept):
        d_old, d_new = _delta(old), _delta(new)
        assert torch.linalg.norm(d_new) / torch.linalg.norm(d_old) == pytest.approx(share, rel=1e-4)
        # the best rank-3 approximation: what torch's own SVD truncation gives
        u, s, vh = torch.linalg.svd(d_old.double())
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(d_new.double(), best, rtol=1e-4, atol=1e-4)
    assert kept[0] < 1 and kept[2] == pytest.approx(1.0)


def test_kohya_hashes_match_what_a1111_computes_from_the_file(tmp_path):
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(300, 1000), "lora_unet_a.alpha": torch.tensor(4.0)}
    meta = {"ss_network_dim": "4", "modelspec.title": "x"}
    model_hash, legacy = lora_io.kohya_hashes(tensors, meta)
    path = lora_io.write_safetensors(tmp_path / "a.safetensors", tensors, {**meta, "sshs_model_hash": model_hash})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert model_hash == hashlib.sha256(data[8 + n:]).hexdigest()  # A1111's addnet hash: the tensor data
    assert lora_io.kohya_hashes(tensors, {**meta, "ss_other": "changes the header, not the data"})[0] == model_hash
    ss_only = lora_io.write_safetensors(tmp_path / "b.safetensors", tensors, {"ss_network_dim": "4"}).read_bytes()
    assert legacy == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert oct(path.stat().st_mode & 0o777) != "0o600"  # shareable, not owner-only


def _fake_kohya(tmp_path, width, te2=False, name="other.safetensors"):
    """The keys and shapes of a LoRA for another model (no weights of any real model needed)."""
    t = {}
    for block in ("down_blocks_1_attentions_0_transformer_blocks_1", "mid_block_attentions_0_transformer_blocks_0"):
        t[f"lora_unet_{block}_attn2_to_k.lora_down.weight"] = torch.zeros(4, width)
        t[f"lora_unet_{block}_attn2_to_k.lora_up.weight"] = torch.zeros(320, 4)
        t[f"lora_unet_{block}_attn2_to_k.alpha"] = torch.tensor(4.0)
    if te2:
        t["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 1280)
        t["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(1280, 4)
    return lora_io.write_safetensors(tmp_path / name, t, {})


def test_check_fits_names_both_architectures(tmp_path, tiny_pipe, run):
    sdxl = _layers(_fake_kohya(tmp_path, 2048, te2=True))
    with pytest.raises(FinetuneError) as e:
        lora_io.check_fits(sdxl, tiny_pipe, lora_name="other.safetensors", base_name="tiny", arch="sd1")
    msg = str(e.value)
    assert "SDXL (cross-attention width 2048, two text encoders)" in msg
    assert "SD 1.x (cross-attention width 32)" in msg and "\n" not in msg
    sd15 = _layers(_fake_kohya(tmp_path, 768, name="sd15.safetensors"))
    with pytest.raises(FinetuneError, match=r"made for SD 1\.x \(cross-attention width 768\).*base is SD 1\.x "
                                            r"\(cross-attention width 32\)"):
        lora_io.check_fits(sd15, tiny_pipe, lora_name="sd15.safetensors", base_name="tiny", arch="sd1")
    # a matching LoRA fits, as kohya file too, and also on a pipe that already carries a LoRA
    ours = _layers(run / "lora" / runs.WEIGHT_NAME)
    lora_io.load_layers(tiny_pipe, ours, adapter_name="first")
    lora_io.check_fits(ours, tiny_pipe, lora_name="ours", base_name="tiny")
    kohya = lora_io.to_layers(lora_io.to_kohya(ours), {}, "kohya")
    lora_io.check_fits(kohya, tiny_pipe, lora_name="ours (kohya)", base_name="tiny")


def test_kohya_ldm_named_unet_keys_fit(tiny_pipe):
    """kohya's SDXL-style files name UNet modules as the original layout does; they resolve too."""
    t = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
         "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4),
         "lora_unet_output_blocks_5_1_proj_in.lora_down.weight": torch.zeros(4, 64, 1, 1),
         "lora_unet_output_blocks_5_1_proj_in.lora_up.weight": torch.zeros(64, 4, 1, 1)}
    lora_io.check_fits(lora_io.to_layers(t, {}, "kohya"), tiny_pipe, lora_name="ldm", base_name="tiny")


def test_not_safetensors(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_text("hello, I am text")
    with pytest.raises(FinetuneError, match="is not a safetensors file"):
        lora_io.read_lora(bad)
    pickle = tmp_path / "x.ckpt"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(FinetuneError, match="pickle"):
        lora_io.read_header(pickle)
    checkpoint = lora_io.write_safetensors(tmp_path / "ckpt.safetensors",
                                           {"model.diffusion_model.out.2.weight": torch.zeros(1)}, {})
    with pytest.raises(FinetuneError, match="whole model checkpoint"):
        lora_io.read_lora(checkpoint)


def test_to_peft_patterns_for_mixed_ranks_load_in_diffusers(tmp_path, tiny_pipe, run):
    """Layers of different ranks/alphas: the peft header's rank/alpha patterns make diffusers build each
    module with its own rank and scale."""
    file = run / "lora" / runs.WEIGHT_NAME
    layers = _layers(file)
    te, unet = [l for l in layers if l.component == "text_encoder"], [l for l in layers if l.component == "unet"]
    resized = set(l.module for l in te[:3] + unet[:3])
    mixed = [lora_io.resize([l], 2)[0][0] if l.module in resized else l for l in layers]
    tensors, meta = lora_io.to_peft(mixed, lora_io.adapter_metadata(lora_io.read_lora(file)[1]))
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and set(config["unet.rank_pattern"]) == {l.module for l in unet[:3]}
    assert config["text_encoder.alpha_pattern"] == {l.module: 1.0 for l in te[:3]}
    path = lora_io.write_safetensors(tmp_path / "mixed.safetensors", tensors, meta)
    tiny_pipe.load_lora_weights(str(path), adapter_name="mixed")
    for layer in mixed:
        module = getattr(tiny_pipe, layer.component).get_submodule(layer.module)
        assert module.lora_A["mixed"].weight.shape[0] == layer.rank
        assert module.scaling["mixed"] == pytest.approx(layer.scale), layer.module


def test_a_header_naming_another_architecture_is_refused_even_when_shapes_fit(tiny_pipe, run):
    """kohya's ss_base_model_version / modelspec / finetune.arch say what a LoRA was made for; an SDXL LoRA
    is not applied to an SD 1.x base even where its module sizes happen to match."""
    ours = _layers(run / "lora" / runs.WEIGHT_NAME)
    for header in ({"ss_base_model_version": "sdxl_base_v1-0"}, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
                   {"finetune.arch": "sdxl"}):
        with pytest.raises(FinetuneError, match=r"made for SDXL \(cross-attention width 32\), the base is SD 1\.x"):
            lora_io.check_fits(ours, tiny_pipe, lora_name="ours", base_name="tiny", arch="sd1", metadata=header)
    lora_io.check_fits(ours, tiny_pipe, lora_name="ours", base_name="tiny", arch="sd1",
                       metadata={"ss_base_model_version": "sd_v1"})


def test_a_unet_only_lora_loads_without_diffusers_text_encoder_notice(run, tiny_pipe, tmp_path):
    import logging

    unet_only = [layer for layer in _layers(run / "lora" / runs.WEIGHT_NAME)
                 if layer.component == "unet"]
    peft_file = lora_io.write_safetensors(tmp_path / "unet.safetensors", *lora_io.to_peft(unet_only))
    kohya_file = lora_io.write_safetensors(tmp_path / "kohya.safetensors", lora_io.to_kohya(unet_only), {})
    seen = []
    collect = logging.Handler()
    collect.emit = lambda record: seen.append(record.getMessage())
    library = logging.getLogger("diffusers")  # every diffusers logger's records reach its handlers
    library.addHandler(collect)
    try:
        lora_io.load_lora(tiny_pipe, peft_file, adapter_name="peft_unet_only")
        lora_io.load_lora(tiny_pipe, kohya_file, adapter_name="kohya_unet_only")
        logging.getLogger("diffusers.loaders.lora_base").warning("No LoRA keys associated to X (after loading)")
    finally:
        library.removeHandler(collect)
    # silenced only while our loader runs: the same notice from elsewhere still reaches the user
    assert [m for m in seen if m.startswith("No LoRA keys associated")] == ["No LoRA keys associated to X (after loading)"]
