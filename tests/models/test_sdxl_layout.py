"""diffusers -> SDXL single-file layout: names, every tensor once, and diffusers' own reverse conversion."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
from safetensors import safe_open

from finetune.models.single_file import detect_architecture, pipeline_to_ldm, save_single_file
from finetune.models.families.sdxl_layout import (
    OPEN_CLIP_PREFIX,
    clip_l_to_ldm,
    open_clip_to_ldm,
    sdxl_pipeline_to_ldm,
    sdxl_unet_to_ldm,
)
from finetune.models.tiny import build_tiny_pipeline
from finetune.models.families.sdxl_tiny import build_tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sdxl_pipeline()


def test_every_tensor_mapped_exactly_once(pipe):
    ldm = pipeline_to_ldm(pipe)  # dispatches on the pipeline: SDXL has a second text encoder
    assert ldm.keys() == sdxl_pipeline_to_ldm(pipe).keys()
    assert detect_architecture(ldm) == "sdxl"

    # UNet, VAE and CLIP-L are renamed only: the very same tensors, each once
    renamed = [pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict()]
    ours = {k: v for k, v in ldm.items() if not k.startswith(OPEN_CLIP_PREFIX)}
    assert len(ours) == sum(len(sd) for sd in renamed)
    assert {t.data_ptr() for t in ours.values()} == {t.data_ptr() for sd in renamed for t in sd.values()}

    # bigG: q/k/v weights and biases fuse into one in_proj pair per layer; diffusers' own converter
    # gives back exactly the encoder's state dict
    te2 = pipe.text_encoder_2.state_dict()
    bigg = {k: v for k, v in ldm.items() if k.startswith(OPEN_CLIP_PREFIX)}
    assert len(bigg) == len(te2) - 4 * pipe.text_encoder_2.config.num_hidden_layers
    back = convert_open_clip_checkpoint(pipe.text_encoder_2, bigg, prefix=OPEN_CLIP_PREFIX)
    assert back.keys() == te2.keys()
    assert all(torch.equal(back[k], te2[k]) for k in te2)


def test_layout_matches_sdxl_names(pipe):
    ldm = pipeline_to_ldm(pipe)
    te2 = pipe.text_encoder_2.config
    # SDXL base's own names for the pieces whose place depends on the topology: level 0 has no
    # attention, levels 1 and 2 hold 2 and 3 transformer blocks (SDXL: 2 and 10), the deepest level's
    # depth also in the middle block, upsamplers after the attention, none on the last up level.
    for key in ("model.diffusion_model.input_blocks.2.0.out_layers.3.weight",
                "model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
                "model.diffusion_model.input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight",
                "model.diffusion_model.input_blocks.6.0.op.weight",
                "model.diffusion_model.input_blocks.8.1.transformer_blocks.2.ff.net.0.proj.weight",
                "model.diffusion_model.middle_block.1.transformer_blocks.2.norm3.weight",
                "model.diffusion_model.output_blocks.2.1.transformer_blocks.2.attn1.to_out.0.weight",
                "model.diffusion_model.output_blocks.2.2.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.output_blocks.8.0.emb_layers.1.weight",
                "model.diffusion_model.label_emb.0.0.weight",
                "model.diffusion_model.label_emb.0.2.bias",
                "first_stage_model.decoder.up.3.upsample.conv.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.token_embedding.weight",
                "conditioner.embedders.1.model.ln_final.bias",
                "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_proj.bias"):
        assert key in ldm, key
    assert not [k for k in ldm if ".attentions." in k or "output_blocks.8.1" in k or "add_embedding" in k]
    n = te2.hidden_size
    assert ldm[f"{OPEN_CLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * n, n)
    assert ldm[f"{OPEN_CLIP_PREFIX}transformer.resblocks.0.attn.in_proj_bias"].shape == (3 * n,)
    assert ldm[f"{OPEN_CLIP_PREFIX}positional_embedding"].shape == (te2.max_position_embeddings, n)
    # open_clip multiplies x @ text_projection: [hidden, projection], the Linear's weight transposed
    assert torch.equal(ldm[f"{OPEN_CLIP_PREFIX}text_projection"], pipe.text_encoder_2.text_projection.weight.T)


def test_unet_round_trips_through_diffusers_converter(pipe):
    sd = pipe.unet.state_dict()
    back = convert_ldm_unet_checkpoint(sdxl_unet_to_ldm(sd, pipe.unet.config), dict(pipe.unet.config))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_real_sdxl_depths_map_from_config_alone():
    # SDXL base's layout (depth 10 on the deepest level), at a width that builds in a moment
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32, 32), layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(1, 2, 2),
                                use_linear_projection=True, cross_attention_dim=16, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=32, norm_num_groups=8)
    sd = unet.state_dict()
    ldm = sdxl_unet_to_ldm(sd, unet.config)
    assert "model.diffusion_model.output_blocks.0.1.transformer_blocks.9.attn2.to_v.weight" in ldm
    assert "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.bias" in ldm
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_save_single_file_dispatches_and_casts(pipe, tmp_path):
    path = save_single_file(pipe, tmp_path / "xl.safetensors", dtype=torch.float16, metadata={"finetune.arch": "sdxl"})
    assert [p.name for p in tmp_path.iterdir()] == ["xl.safetensors"]
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"finetune.arch": "sdxl"}
        assert set(f.keys()) == pipeline_to_ldm(pipe).keys()
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_wrong_inputs_are_refused(pipe):
    sd1 = build_tiny_pipeline()
    with pytest.raises(ValueError, match="text_time"):
        sdxl_unet_to_ldm(sd1.unet.state_dict(), sd1.unet.config)
    with pytest.raises(ValueError, match="text_projection"):
        open_clip_to_ldm(sd1.text_encoder.state_dict())  # a CLIPTextModel, not WithProjection
    te2 = pipe.text_encoder_2.state_dict()
    with pytest.raises(ValueError, match="q/k/v"):
        open_clip_to_ldm({k: v for k, v in te2.items() if "layers.1.self_attn.k_proj" not in k})
    with pytest.raises(ValueError, match="unknown keys"):
        open_clip_to_ldm({**te2, "text_model.encoder.layers.0.self_attn.qkv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="fuse_lora"):
        open_clip_to_ldm({**te2, "text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="fuse_lora"):
        sdxl_unet_to_ldm({**pipe.unet.state_dict(), "conv_in.lora_A.default.weight": torch.zeros(1)}, pipe.unet.config)
    # CLIP-L keeps transformers' layout, nested under text_model. whatever the transformers version
    flat = pipe.text_encoder.state_dict()
    assert clip_l_to_ldm(flat).keys() == clip_l_to_ldm({f"text_model.{k}": v for k, v in flat.items()}).keys()
