"""User-facing errors: each names the problem and the fix; the CLI prints them without a traceback."""

from __future__ import annotations


class UnitrainError(Exception):
    """A problem the user can fix. `str(e)` is a one-paragraph explanation with the fix."""

    exit_code = 2


class RecipeError(UnitrainError):
    """Every problem found in a recipe, each prefixed with its key path."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"recipe has {n} problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


class PlanError(UnitrainError):
    """Nothing feasible: says the smallest footprint found and what would make it fit."""


class DataError(UnitrainError):
    pass


class ModelError(UnitrainError):
    pass


class CheckpointError(UnitrainError):
    pass


class MissingPackageError(UnitrainError):
    def __init__(self, package: str, purpose: str, extra: str | None = None):
        install = f"pip install 'unitrain[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{purpose} needs the package '{package}', which is not installed. "
                         f"Install it with: {install}")


class RunLockedError(UnitrainError):
    """Another run holds the run directory's lock."""
