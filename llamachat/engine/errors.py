"""Errors the engine raises. Each message is one line a user can act on."""


class EngineError(Exception):
    """Base class: anything the engine reports to a front end."""


class UnsupportedModelError(EngineError):
    """The model's architecture or a setting in its config is not one this engine implements."""


class ModelLoadError(EngineError):
    """The model folder is missing files, or its weights do not match its config."""


class DeviceError(EngineError):
    """The requested device or dtype is not available here."""


class ContextOverflowError(EngineError):
    """The part of the conversation that cannot be dropped does not fit the context window."""
