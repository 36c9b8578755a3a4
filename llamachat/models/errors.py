"""Errors of the model store. Each message is one line that says what to do."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for everything the store reports to a front end."""


class ModelNotFoundError(StoreError):
    def __init__(self, name: str, suggestions: list[str]):
        self.name = name
        self.suggestions = suggestions
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"no model named {name!r}{hint} (`llamachat list` shows installed models)")


class ManifestError(StoreError):
    """A model's manifest.json cannot be read or does not describe a model."""


class BrokenModelError(StoreError):
    """An installed model that cannot be used as it is: `hint` says how to repair it."""

    def __init__(self, name: str, problem: str, hint: str):
        self.name = name
        self.problem = problem
        super().__init__(f"{name} is broken: {problem}; {hint}")


class DamagedModelError(StoreError):
    """An installed model whose files are not the ones its manifest recorded."""

    def __init__(self, name: str, problems: list[str], hint: str):
        self.name = name
        self.problems = problems
        shown = "; ".join(problems[:2])
        if len(problems) > 2:
            shown += f" (and {len(problems) - 2} more)"
        super().__init__(f"{name} is damaged: {shown}; {hint}")


class SourceError(StoreError):
    """The thing to pull cannot be found, reached or read."""


class SpecError(SourceError):
    """What was asked for is malformed (not merely absent): a usage error."""

    exit_code = 2


class IntegrityError(StoreError):
    """A downloaded or converted file does not match its checksum."""


class BusyError(StoreError):
    """Another process is installing the same model."""
