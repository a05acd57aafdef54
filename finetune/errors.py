"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class FinetuneError(Exception):
    """A user-facing problem: bad input, missing file, unavailable feature.

    The message says what was wrong, with which value, and what to do. `exit_code` is what the CLI
    exits with (1 unless a subclass says otherwise).
    """

    exit_code = 1


class Stopped(FinetuneError):
    """A command stopped on SIGINT/SIGTERM after putting its work in order (a training run saved its
    checkpoint and printed how to resume): the CLI says nothing more and exits 128 + the signal's number
    (130, 143), as shells expect; 0 for `signum` None (a data-parallel process that got no signal itself
    and stops with the one that did)."""

    def __init__(self, signum: int | None):
        self.signum = signum
        self.exit_code = 128 + signum if signum else 0
        super().__init__(f"stopped by signal {signum}" if signum else "stopped with the other processes")


class ConfigError(FinetuneError):
    """One or more config problems, all reported together (exit code 2, like click's usage errors)."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            text = f"invalid config: {self.problems[0]}"
        else:
            text = "invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)
