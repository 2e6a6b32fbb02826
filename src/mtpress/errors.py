"""Every error mtpress raises on purpose.

Each message says what was wrong, where, and what to do. Errors co-inherit the
stdlib type they mean, so callers may catch either.
"""

from __future__ import annotations

from collections.abc import Sequence


class MtpressError(Exception):
    """Root of all mtpress errors. ``hint`` tells the user what to do next."""

    retryable: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  → {hint}")


# CONFIGURATION ERRORS


class ConfigError(MtpressError, ValueError):
    """A release configuration is invalid.

    Example:
        model_configs/demo.yaml: quants[2].type: unknown quant type 'Q3_X'; expected one of Q8_0, …
    """

    def __init__(self, file: str, problems: Sequence[str], *, hint: str | None = None) -> None:
        self.file = file
        self.problems = list(problems)
        lines = "\n".join(f"{file}: {p}" for p in self.problems)
        super().__init__(lines, hint=hint)


class InsufficientDiskError(MtpressError, OSError):
    """Not enough free disk for the planned outputs; raised before any long work starts."""


# MODEL ERRORS


class ModelError(MtpressError, ValueError):
    """A checkpoint cannot be used as given."""


class CorruptCheckpointError(ModelError):
    """A safetensors file or index is damaged or inconsistent."""


class UnsupportedArchitectureError(ModelError, NotImplementedError):
    """No registered architecture handles this checkpoint."""


class MissingMtpHeadError(ModelError):
    """The donor has no MTP head to give."""


class IncompatibleDonorError(ModelError):
    """Donor and fine-tune differ where the head depends on them."""

    def __init__(self, field: str, finetune_value: object, donor_value: object, *, finetune: str, donor: str):
        self.field = field
        self.finetune_value = finetune_value
        self.donor_value = donor_value
        super().__init__(
            f"donor {donor} does not fit fine-tune {finetune}: {field} must match; "
            f"fine-tune has {finetune_value!r}, donor has {donor_value!r}",
            hint="choose a donor of the same base model family and size (the fine-tune's own base model)",
        )


class TrunkMismatchError(ModelError):
    """Hidden states collected from one trunk were offered to train the head of another."""


# TOOLCHAIN ERRORS


class ToolchainError(MtpressError, RuntimeError):
    """llama.cpp (or another external tool) is missing, the wrong version, or failed."""


class ToolFailedError(ToolchainError):
    """An external tool exited badly; keeps the command and the tail of its output."""

    def __init__(self, argv: Sequence[str], *, returncode: int | None, output: str, timed_out: bool = False):
        self.argv = list(argv)
        self.returncode = returncode
        self.output_tail = output[-2000:] if output else "<empty>"
        if timed_out:
            reason = "timed out"
        elif returncode is not None and returncode < 0:
            reason = f"was killed by signal {-returncode}"
        else:
            reason = f"exited with code {returncode}"
        super().__init__(f"command {' '.join(self.argv[:3])} … {reason}. output tail:\n{self.output_tail}")


class RemoteRunError(MtpressError, RuntimeError):
    """A stage handed to a Prefect deployment (another machine's work pool) did not complete there.

    Example:
        realign deployment realign/realign: flow run 0b6f… ended Failed (…)
    """


# QUALITY GATE ERRORS


class QualityGateError(MtpressError, AssertionError):
    """A produced file failed a check (load, greedy equivalence, drafting)."""


class GateError(QualityGateError):
    """A repo, as a real Hub client gets it, is not the release that was tested; names the file and client.

    Example:
        trunk X-Q4_K_M.gguf: llama.cpp -hf user/repo:Q4_K_M --spec-type draft-mtp … picked head
        mtp-X-Q4_0.gguf, intended mtp-X-Q4_K_M.gguf
    """


# PUBLISHING ERRORS


class PublishError(MtpressError):
    """The release could not be published; nothing was committed."""
