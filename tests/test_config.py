"""Typed config: presets load, overrides convert, every problem is named with its key."""

import pytest
from click.testing import CliRunner

from finetune.cli import cli
from finetune.config import (ConfigError, RunConfig, all_keys, field_docs, list_presets, load_config,
                             load_preset, SECTIONS)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_opens_with_its_command(name):
    from finetune.config import PRESETS_DIR

    cfg = load_preset(name)
    assert isinstance(cfg, RunConfig)
    first = (PRESETS_DIR / f"{name}.toml").read_text().splitlines()[0]
    assert first.startswith("# finetune "), f"{name}.toml must open with the command that uses it"


def test_every_field_has_a_docstring():
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for f in cls.__dataclass_fields__:
            assert docs.get(f), f"{cls.__name__}.{f} has no docstring"


def test_set_converts_to_the_field_type():
    cfg = load_preset("tiny-demo", ["train.lr=2e-3", "train.max_steps=7", "lora.train_text_encoder=true",
                                    "sample.seeds=3,4", "sample.scales=[0, 0.5]", "data.trigger=zwx",
                                    "lora.alpha=4"])
    assert cfg.train.lr == 2e-3 and isinstance(cfg.train.max_steps, int) and cfg.train.max_steps == 7
    assert cfg.lora.train_text_encoder is True
    assert cfg.sample.seeds == [3, 4] and cfg.sample.scales == [0.0, 0.5]
    assert cfg.data.trigger == "zwx" and cfg.lora.alpha == 4.0 and isinstance(cfg.lora.alpha, float)


def test_all_problems_reported_together_with_keys_and_hints():
    with pytest.raises(ConfigError) as e:
        load_preset("tiny-demo", ["train.lrr=1", "train.lr=fast", "lora.rank=0", "data.crop=square",
                                  "train.rank=4"])
    text = str(e.value)
    assert "unknown key train.lrr" in text and "did you mean train.lr?" in text
    assert "train.lr = 'fast'" in text and "should be number" in text
    assert "lora.rank = 0 is below the minimum 1" in text
    assert "data.crop = 'square' is not one of" in text
    assert "unknown key train.rank" in text and "did you mean lora.rank?" in text
    assert len(e.value.problems) == 5


def test_unknown_section_and_wrong_types_in_a_preset_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('# finetune train --preset bad.toml\n[trian]\nlr = 1\n[lora]\nrank = "big"\n')
    with pytest.raises(ConfigError) as e:
        load_preset(bad)
    assert "unknown section [trian] in bad.toml (did you mean [train]?)" in str(e.value)
    assert "lora.rank = 'big' in bad.toml should be integer" in str(e.value)


def test_cross_checks():
    with pytest.raises(ConfigError, match="data.resolution = 100 must be a multiple of 64"):
        load_config(overrides=["data.resolution=100"])
    with pytest.raises(ConfigError, match="sample.width = 65 must be divisible by 8"):
        load_config(overrides=["sample.width=65"])


def test_defaults_and_round_trip_through_dict():
    cfg = load_config()
    assert cfg.data.crop == "face" and cfg.train.optimizer == "adamw8bit"
    again = load_config(base=cfg.to_dict())
    assert again == cfg
    assert len(all_keys()) == sum(len(c.__dataclass_fields__) for c in SECTIONS.values())


def test_cli_unknown_key_is_a_clean_message_with_exit_2():
    r = CliRunner().invoke(cli, ["presets", "show", "tiny-demo", "--set", "train.lrr=1"])
    assert r.exit_code == 2
    assert "unknown key train.lrr" in r.output and "did you mean train.lr?" in r.output
    assert "Traceback" not in r.output


def test_cli_wrong_type_is_a_clean_message_with_exit_2():
    r = CliRunner().invoke(cli, ["presets", "show", "tiny-demo", "--set", "train.max_steps=lots"])
    assert r.exit_code == 2
    assert "train.max_steps = 'lots'" in r.output and "should be integer" in r.output
    assert "Traceback" not in r.output


def test_cli_presets_list_show_validate(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["presets", "list"])
    assert r.exit_code == 0 and "tiny-demo" in r.output
    r = runner.invoke(cli, ["presets", "show", "tiny-demo"])
    assert r.exit_code == 0 and "[train]" in r.output and "Learning rate" in r.output
    r = runner.invoke(cli, ["presets", "validate"])
    assert r.exit_code == 0, r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_steps = -1\n")
    r = runner.invoke(cli, ["presets", "validate", str(bad)])
    assert r.exit_code == 2 and "train.max_steps = -1 is below the minimum 1" in r.output


def test_a_typo_in_set_is_blamed_on_set_not_the_preset_file():
    """Issue 13 item 10: `--set train.lrate=1` / `train.max_steps=ten` name --set, not tiny-demo.toml."""
    with pytest.raises(ConfigError) as e:
        load_preset("tiny-demo", ["train.lrate=1", "train.max_steps=ten", "trian.lr=1"])
    text = str(e.value)
    assert "unknown key train.lrate in --set (did you mean train.lr?)" in text
    assert "train.max_steps = 'ten' in --set should be integer" in text
    assert "unknown section [trian] in --set (did you mean [train]?)" in text
    assert "tiny-demo.toml" not in text


def test_a_problem_in_the_preset_file_is_still_blamed_on_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('# finetune train --preset bad.toml\n[train]\nlrate = 1\nmax_steps = "ten"\n')
    with pytest.raises(ConfigError) as e:
        load_preset(bad, ["train.lr=1e-3", "train.seed=x"])
    text = str(e.value)
    assert "unknown key train.lrate in bad.toml" in text
    assert "train.max_steps = 'ten' in bad.toml should be integer" in text
    assert "train.seed = 'x' in --set should be integer" in text
    # a file value that --set replaces is judged as the --set value
    with pytest.raises(ConfigError) as e:
        load_preset(bad, ["train.max_steps=ten"])
    assert "train.max_steps = 'ten' in --set should be integer" in str(e.value)


def test_cli_set_typo_names_set_as_the_source():
    r = CliRunner().invoke(cli, ["presets", "show", "tiny-demo", "--set", "train.lrate=1"])
    assert r.exit_code == 2
    assert "unknown key train.lrate in --set (did you mean train.lr?)" in r.output
    assert "tiny-demo.toml" not in r.output
