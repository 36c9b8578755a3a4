"""Errors of the model store. Each message is one line that says what to do."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for everything the store reports to a front end."""


class ModelNotFoundError(StoreError):
    """No installed model has the name. `suggestions`: installed names close to it, else
    catalog names to pull (`from_catalog`)."""

    def __init__(self, name: str, suggestions: list[str], from_catalog: bool = False):
        self.name = name
        self.suggestions = suggestions
        self.from_catalog = from_catalog
        super().__init__(_not_found_message(name, suggestions, from_catalog))


def _not_found_message(name: str, suggestions: list[str], from_catalog: bool) -> str:
    if from_catalog and suggestions == [name]:
        return f"model {name!r} is not installed: `llamachat pull {name}` installs it"
    if not suggestions:
        return f"no model named {name!r} (`llamachat list` shows installed models)"
    guess = f"no model named {name!r}; did you mean {' or '.join(suggestions)}?"
    if not from_catalog:
        return f"{guess} (`llamachat list` shows installed models)"
    if len(suggestions) == 1:
        return f"{guess} (`llamachat pull {suggestions[0]}` installs it)"
    return f"{guess} (`llamachat pull NAME` installs one; `llamachat pull --list` shows them)"


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
