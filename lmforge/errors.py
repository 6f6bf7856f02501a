"""One exception family, so the CLI can print one line and exit 2 for any user error."""

from __future__ import annotations


class LmforgeError(Exception):
    """Base class: the message is one line naming the file/field and the cause."""


class ModelNotFoundError(LmforgeError):
    """A path, built-in name or hub id that does not resolve to model files."""


class CheckpointError(LmforgeError):
    """Checkpoint files exist but cannot be read or do not match the config."""


class ConfigError(LmforgeError):
    """A config value is missing, unsupported or inconsistent."""


class TokenizerError(LmforgeError):
    """Tokenizer files are missing or unusable."""


class DataError(LmforgeError):
    """Input data (CSV, JSONL, SQuAD JSON, text) is missing or malformed."""


class GenerationError(LmforgeError):
    """Invalid generation arguments (empty prompt, bad top_p, ...)."""


class TrainingError(LmforgeError):
    """Invalid training setup or an unusable run/checkpoint directory."""
