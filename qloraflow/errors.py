"""Typed errors. Each message names the input at fault and says how to fix it.

The library raises these; only the Flyte wrappers in ``tasks/`` decide what is retryable.
"""


class QloraflowError(Exception):
    """Base class of every error the pipeline raises on purpose."""


class ConfigError(QloraflowError):
    """The config is invalid. The message lists every problem found, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} config problem(s):\n{lines}")


class DataValidationError(QloraflowError):
    """The input data is unusable as a whole (missing file, reject rate too high, nothing left)."""


class EmptyDatasetError(DataValidationError):
    """No usable record is left: the pipeline stops here, before any GPU is requested."""


class TemplateError(QloraflowError):
    """No prompt template can be chosen for the tokenizer."""


class CheckpointError(QloraflowError):
    """A checkpoint is incomplete or does not match its manifest."""


class PreemptedError(QloraflowError):
    """Training stopped on SIGTERM after saving a checkpoint: retryable, the retry resumes from it."""


class DiskFullError(QloraflowError, OSError):
    """A write ran out of room (disk full, quota, file size limit); the message names the file and the space needed."""


class MergeVerificationError(QloraflowError):
    """The merged model does not reproduce the adapter's outputs or metrics."""


class ServeError(QloraflowError):
    """The inference server failed to start, to answer, or to pass the smoke suite."""


class TrackingError(QloraflowError):
    """The MLflow tracking server cannot be reached at start."""


class RegistryError(QloraflowError):
    """A model registry operation failed (unknown version, no previous champion, ...)."""


class ExportError(QloraflowError):
    """An export for a local runtime (GGUF, MLX) failed, or its parity check against the merged model did."""
