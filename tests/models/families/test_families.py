"""Every registered family fills the whole interface, and the registry answers from files alone."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from finetune.errors import FinetuneError
from finetune.models import families
from finetune.models.families import Family


def test_each_family_implements_the_whole_interface():
    registered = families.families()
    assert [f.name for f in registered][:2] == ["sd1", "sdxl"]
    for family in registered:
        for f in dataclasses.fields(Family):
            value = getattr(family, f.name)
            assert value is not None, f"{family.name}.{f.name}"
            if "Callable" in str(f.type) and "Mapping" not in str(f.type).split("Callable")[0]:
                assert callable(value), f"{family.name}.{f.name} is not callable"
        # exactly one denoiser and one VAE; every text encoder names its tokenizer
        roles = [c.role for c in family.components]
        assert roles.count(families.DENOISER) == 1 and roles.count(families.VAE) == 1, family.name
        assert all(c.tokenizer for c in family.component(families.TEXT_ENCODER)), family.name
        assert all(c.role in families.ROLES for c in family.components)
        assert family.variants and all(families.for_arch(v.arch) is family for v in family.variants)
        assert all(callable(build) for build in family.tiny.values()) and family.tiny
        assert family.lora_targets and family.text_encoder_lora_targets
        # the functions take what the interface says they take
        arity = {"detect_folder": 2, "detect_single_file": 1, "detect_lora": 2, "single_file_config": 1,
                 "encode_text": 2, "example_conditioning": 1, "training_scheduler": 2, "sample_timesteps": 3,
                 "spread_timesteps": 2, "add_noise": 4, "predict": 5, "target": 4, "loss_weights": 3,
                 "set_attention": 2, "kohya_names": 3, "kohya_aliases": 2, "kohya_fuse": 2, "kohya_unfuse": 2, "load_file": 3, "to_single_file": 1, "sampling_kwargs": 1}
        for name, n in arity.items():
            params = inspect.signature(getattr(family, name)).parameters.values()
            required = [p for p in params if p.default is p.empty]
            assert len(required) <= n <= len(params), f"{family.name}.{name} takes {len(params)} arguments, not {n}"


def test_a_family_with_a_field_unset_is_refused():
    sd1 = families.get("sd1")
    with pytest.raises(TypeError, match="predict"):
        families.register(dataclasses.replace(sd1, name="broken", predict=None))
    with pytest.raises(ValueError, match="belongs to 'sd1'"):
        families.register(dataclasses.replace(sd1, name="copy"))
    assert "broken" not in [f.name for f in families.families()]


def test_lookups():
    assert families.for_arch("sd2").name == "sd1" and families.for_arch("sdxl").name == "sdxl"
    assert families.title("sd2") == "SD 2.x" and families.title(None) is None
    assert set(families.tiny_specs()) >= {"tiny", "tiny-sdxl"}
    with pytest.raises(FinetuneError, match="unknown architecture 'flux9'"):
        families.for_arch("flux9")
    assert families.declared_arch({"ss_base_model_version": "sd_v2_768_v"}) == "sd2"
    assert families.declared_arch({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}) == "sdxl"
    assert families.declared_arch({"finetune.arch": "nope"}) is None
    assert families.single_file_arch({"conditioner.embedders.1.model.x": (1,)}) == "sdxl"
    with pytest.raises(ValueError, match="unknown checkpoint architecture"):
        families.single_file_arch({"model.diffusion_model.double_blocks.0.x": (1,)})


def test_the_registry_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys; from finetune.models import families; families.families(); "
            "families.declared_arch({'ss_base_model_version': 'sdxl_base_v1-0'}); "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
