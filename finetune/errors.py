"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class FinetuneError(Exception):
    """A user-facing problem: bad input, missing file, unavailable feature.

    The message says what was wrong, with which value, and what to do. `exit_code` is what the CLI
    exits with (1 unless a subclass says otherwise).
    """

    exit_code = 1


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
