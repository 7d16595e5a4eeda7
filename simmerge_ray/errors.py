"""Error types. Every message names the file, model, tensor or field at fault."""


class SimMergeError(Exception):
    """Base class: a user-facing error, printed without a traceback by the CLI."""


class CheckpointError(SimMergeError):
    """A checkpoint folder or safetensors file is missing, corrupt or inconsistent."""


class ConfigError(SimMergeError):
    """A YAML/JSON config is invalid: unknown key, missing field, bad value."""


class MergeError(SimMergeError):
    """A merge cannot be carried out on these inputs (shapes, NaN/Inf, zero weights...)."""
