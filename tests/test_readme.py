"""Every shell example in README.md works as written (issue 13 item 16).

The examples are read from the README's ```bash blocks at test time, so the test follows the README as
it is edited. Each `finetune ...` line (also after `accelerate launch ... -m finetune`) must parse with
the CLI: known command, known options, valid choices and numbers. Then the examples run, in README
order, in a sandbox that holds what a reader has: their photos in ~/Pictures/me, a preset file of their
own, LoRA files from elsewhere, and no GPU or hub model, so every `train` also gets `--base tiny` and
settings that make it take seconds (appended `--set`s win over the example's). What a reader does
between commands (rating images in the browser) is done through the review store. A training example
runs only if it uses an option no earlier one did (`--set` values are checked when parsed). Lines with elisions
(`...`, or a word in capitals such as PATH or SPEC that stands for the reader's own value), `make`,
`accelerate launch`, the review server, and commands of other programs are only parsed.
"""

from __future__ import annotations

import glob
import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from finetune.cli import cli

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# What makes a README training run take seconds on the tiny base, on a CPU.
TINY_STEPS = ["--set", "train.max_steps=2", "--set", "train.save_every=0", "--set", "train.prior_preservation=false",
              "--set", "train.batch_size=1", "--set", "train.grad_accum=1", "--set", "train.mixed_precision=no",
              "--set", "train.gradient_checkpointing=false", "--set", "train.optimizer=adamw",
              "--set", "dpo.eval_timesteps=1",
              "--set", "sample.every=0", "--set", "sample.width=64", "--set", "sample.height=64",
              "--set", "sample.steps=2", "--set", "sample.seeds=[1, 2]",
              "--set", "sample.prompts=['a photo of [trigger] [class]']"]
TINY_TRAIN = ["--base", "tiny", "--set", "data.resolution=64", *TINY_STEPS]
PLACEHOLDER = re.compile(r"(^|[\s:=])(\.\.\.|[A-Z]{3,}[A-Z_]*)(?=[\s:=]|$)")


def bash_examples(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every command in the ```bash blocks; comments and `\\` joins handled."""
    commands, block, pending = [], False, ""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            block = line.strip() == "```bash" if not block else False
            continue
        if not block:
            continue
        words = shlex.split(line, comments=True)
        if not words:
            continue
        joined = shlex.join(words)
        if line.rstrip().endswith("\\"):
            pending += joined.removesuffix(" '\\'").removesuffix("\\") + " "
            continue
        commands.append((n, pending + joined))
        pending = ""
    return commands


EXAMPLES = bash_examples(README.read_text())


def finetune_args(command: str) -> list[str] | None:
    """The arguments to `finetune` of a README command, or None for another program."""
    words = shlex.split(command)
    if words[0] == "finetune":
        return words[1:]
    if words[:2] == ["accelerate", "launch"] and "-m" in words and words[words.index("-m") + 1] == "finetune":
        return words[words.index("-m") + 2:]
    return None


def parse(args: list[str]) -> None:
    """Parse `finetune ARGS` as click would run it, without running it."""
    cmd, name, parent = cli, "finetune", None
    while True:
        ctx = cmd.make_context(name, list(args), parent=parent)
        if not isinstance(cmd, click.Group):
            return
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return
        name, cmd, args = cmd.resolve_command(ctx, rest)
        parent = ctx


def test_the_readme_has_examples_to_check():
    commands = [c for _, c in EXAMPLES]
    assert len(commands) > 20 and any(c.startswith("finetune train ") for c in commands)


@pytest.mark.parametrize("line, command", EXAMPLES, ids=[f"README:{n}" for n, _ in EXAMPLES])
def test_every_readme_command_parses(line, command):
    words = shlex.split(command)
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert words[1] in targets, f"README:{line}: no make target {words[1]!r}"
        return
    args = finetune_args(command)
    if args is None:
        return  # another program (source, pip, tensorboard)
    elided = "..." in args
    try:  # a bare `...` elides words (`finetune train ... --resume latest`); after an option it is its value
        parse([a for i, a in enumerate(args) if a != "..." or (i and args[i - 1].startswith("-"))])
    except click.MissingParameter:
        assert elided, f"README:{line}: `{command}` misses a required option"
    except click.BadParameter as e:
        # an existing file is the reader's business (their photos, their LoRA), not the syntax's
        assert "does not exist" in e.format_message(), f"README:{line}: `{command}`: {e.format_message()}"
    except click.UsageError as e:
        pytest.fail(f"README:{line}: `{command}`: {e.format_message()}")
    preset = option_values(args, "--preset")
    sets = option_values(args, "--set")
    if (preset or sets) and "..." not in preset:  # the preset and every --set value are valid config
        from finetune.config import collect_config

        _, problems = collect_config(preset[-1] if preset else None, sets)
        assert not problems, f"README:{line}: `{command}`: {problems}"


def option_values(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == option]


def runnable(command: str) -> bool:
    args = finetune_args(command)
    if args is None or not command.startswith("finetune ") or PLACEHOLDER.search(command):
        return False
    if args[0] == "demo" or (args[0] == "review" and "--export" not in args):
        return False  # the demo has its own test; the review page is a server
    return True


def rate_samples(run: Path) -> None:
    """What the reader does in the review page: a favourite and a reject of each prompt's images."""
    from finetune.review.images import scan_run
    from finetune.ratings import DB_NAME, Store

    store = Store(run / DB_NAME)
    by_prompt: dict[str, list] = {}
    for img in scan_run(run).images:
        by_prompt.setdefault(img.prompt, []).append(img)
    for images in by_prompt.values():
        if len(images) >= 2:
            store.rate(images[0], "favourite")
            store.rate(images[-1], "reject")


@pytest.fixture()
def reader_home(tmp_path, monkeypatch, example_photos):
    """A reader's machine: photos in ~/Pictures/me, a preset of their own, LoRA files from elsewhere."""
    home = tmp_path / "home"
    shutil.copytree(example_photos, home / "Pictures" / "me", ignore=shutil.ignore_patterns("*.md"))
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(REPO / "presets" / "tiny-demo.toml", work / "my-preset.toml")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return work


def expand(args: list[str]) -> list[str]:
    """What the shell does to the words: ~ and globs (an unmatched glob stays as written)."""
    out = []
    for a in args:
        a = str(Path(a).expanduser()) if a.startswith("~") else a
        matches = sorted(glob.glob(a)) if any(ch in a for ch in "*?[") else []
        out += matches or [a]
    return out


def test_the_readme_examples_run_on_the_tiny_base(reader_home):
    ran, runner, trained_with = [], CliRunner(), set()
    for line, command in EXAMPLES:
        if not runnable(command):
            continue
        args = expand(finetune_args(command))
        if args[0] == "train":  # seconds each: only examples that use an option no earlier one did
            options = {a for a in args if a.startswith("--")} - {"--set"}  # --set values: checked when parsed
            if options <= trained_with:
                continue
            trained_with |= options
        if args[0] in ("train", "prepare"):
            args += TINY_TRAIN if args[0] == "train" else ["--set", "data.resolution=64"]
            if args[0] == "train":
                # README lines are often alternatives: each training example starts its own run
                from finetune.train.preflight import default_run_dir

                value = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
                out = Path(value["--out"]) if "--out" in value else default_run_dir(
                    Path(value["--dataset"]), value["--preset"], value.get("--feedback"))
                shutil.rmtree(out, ignore_errors=True)
        if args[0] == "train-dpo":
            args += TINY_STEPS
        if args[0] == "review" and "--export" in args:
            rate_samples(Path(args[1]))
        r = runner.invoke(cli, args)
        assert r.exit_code == 0, f"README:{line}: `{command}` failed:\n{r.output}{r.exception!r}"
        ran.append(args[0])
    # the stages the README walks through all ran
    assert {"prepare", "train", "export", "sample", "verify", "inspect", "review", "train-dpo"} <= set(ran), ran
    # where the README says TensorBoard logs go (tensorboard is in the dev extras)
    assert list(Path("outputs").glob("*/tensorboard/*")), "README promises outputs/<run>/tensorboard/"


def test_the_readme_says_how_to_get_finetune_on_path_and_where_tensorboard_logs_are():
    """Issue 13 item 17: after `make demo` the reader has to know how to type `finetune`."""
    commands = [c for _, c in EXAMPLES]
    assert "source .venv/bin/activate" in commands and "pip install ." in commands
    assert "tensorboard --logdir outputs" in README.read_text()
    assert "outputs/<run>/tensorboard/" in README.read_text()
