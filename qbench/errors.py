"""The checkpoint errors every reader of model files raises (the zoo, the retrofit folder
format, the training states); qbench.zoo re-exports them.  The CLI maps them to exit codes."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or inconsistent; the message names the file."""


class UnknownModelError(CheckpointError):
    """A model name that is neither in the zoo nor a path (a usage error, exit code 2)."""
