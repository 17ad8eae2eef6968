"""The project's exceptions, at the bottom of the import graph so every layer can raise them.

Each is re-exported by the module whose callers meet it first
(`config_validation.ConfigError`, `train.TrainingError`,
`checkpointing.CheckpointError`, `gcs.StorageError`); catch them under either name.
"""


class ConfigError(ValueError):
  """The config cannot work; the message lists every problem found."""


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite steps, a workdir in use, a mismatch)."""


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved or restored."""


class StorageError(RuntimeError):
  """The workdir's storage cannot be used (a missing bucket, no permission)."""
