"""Every error mtpress raises on purpose.

Each message says what was wrong, where, and what to do. Errors co-inherit the
stdlib type they mean, so callers may catch either.
"""

from __future__ import annotations

from collections.abc import Sequence


class MtpressError(Exception):
    """Root of all mtpress errors. ``hint`` tells the user what to do next."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  → {hint}")

    @property
    def retryable(self) -> bool:
        """Whether another attempt can succeed: only when what caused this error was transient."""
        return is_transient(self.__cause__)


def is_transient(error: BaseException | None) -> bool:
    """Whether ``error`` is a failure another attempt can get past, the one rule behind every retry.

    Transient: the Hub answered 5xx, or 429 with a Retry-After; the connection failed, dropped or timed out; a
    tool ran out of time. Everything else repeats itself, or worse: bad input, a failed check, a 401/403/404,
    and a 412 (another writer moved the branch: a retry would plan against their commit and delete their files).
    Wrapped errors are judged by their cause (``raise … from``).
    """
    import httpx2  # huggingface_hub's HTTP client; imported only when a failure is judged

    if error is None:
        return False
    if isinstance(error, MtpressError):
        return error.retryable
    response = getattr(error, "response", None)  # HfHubHTTPError and any HTTPStatusError keep the answer
    if (status := getattr(response, "status_code", None)) is not None:
        return status >= 500 or (status == 429 and "Retry-After" in response.headers)
    if isinstance(error, httpx2.TimeoutException | httpx2.NetworkError | httpx2.RemoteProtocolError | TimeoutError):
        return True
    return is_transient(error.__cause__)


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


class InsufficientMemoryError(MtpressError, MemoryError):
    """Not enough available memory for the conversion or llama-quantize; raised before any download."""


class ReleaseBusyError(MtpressError, BlockingIOError):
    """Another mtpress run is using this release folder (or its work folder); raised at the start of a run.

    Example:
        /srv/releases/X is in use by another mtpress run (pid 4242, since 2026-12-04 16:02:11 UTC)
    """


class SharedStorageError(MtpressError, FileNotFoundError):
    """A task on a cluster worker cannot see a file the run wrote: the release folder is not on shared storage.

    Example:
        worker node-2 (pid 311) cannot see /srv/releases/X/X-BF16.gguf, which this run wrote
    """


class AbandonedError(MtpressError):
    """Work stopped because nobody wants its result any more: the Dask task running it was cancelled (the flow run
    that submitted it was killed). Never retried.

    Example:
        downloading org/model@0a1b2c3d4e5f stopped: the flow run that wanted it is gone (its Dask task was cancelled)
    """

    retryable = False


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
        self.timed_out = timed_out
        self.output_tail = output[-2000:] if output else "<empty>"
        if timed_out:
            reason = "timed out"
        elif returncode is not None and returncode < 0:
            reason = f"was killed by signal {-returncode}"
        else:
            reason = f"exited with code {returncode}"
        super().__init__(f"command {' '.join(self.argv[:3])} … {reason}. output tail:\n{self.output_tail}")

    @property
    def retryable(self) -> bool:
        """A tool that ran out of time may finish on a less busy machine; one that crashed crashes again."""
        return self.timed_out


class RemoteRunError(MtpressError, RuntimeError):
    """Work handed to a Prefect deployment (another machine's work pool) did not complete there: a head's
    re-alignment, or a whole release started by `mtpress release-run` (which also raises it when the run cannot be
    started or is still going at its timeout).

    Example:
        realign deployment realign/realign: flow run 0b6f… ended Failed (…)
        publish/publish flow run 4a55… (aquatic-vulture) ended Failed: … → its logs: `prefect flow-run logs 4a55…`
    """


# QUALITY GATE ERRORS


class QualityGateError(MtpressError, AssertionError):
    """A produced file failed a check (load, greedy equivalence, drafting)."""

    retryable = False  # the same files fail the same check again, whatever made it fail


class GateError(QualityGateError):
    """A repo, as a real Hub client gets it, is not the release that was tested; names the file and client.

    Example:
        trunk X-Q4_K_M.gguf: llama.cpp -hf user/repo:Q4_K_M --spec-type draft-mtp … picked head
        mtp-X-Q4_0.gguf, intended mtp-X-Q4_K_M.gguf
    """


class ChatTemplateError(QualityGateError):
    """llama.cpp cannot parse or render a GGUF's chat template (``--jinja``), so no chat client can use the file;
    quotes llama.cpp's error.

    Example:
        smoke X-Q4_K_M.gguf: llama-server (--jinja) cannot use the file's chat template (tokenizer.chat_template)
        and exits: … Jinja Exception: …
    """


class DeadHeadError(QualityGateError):
    """A head drafts, but llama.cpp accepts fewer of its drafts than ``smoke.min_acceptance``: it only costs time.

    Raised by the smoke test and by the release gate; identical greedy output cannot show it (the trunk
    verifies every draft), only the acceptance rate does.

    Example:
        smoke X-Q4_K_M.gguf + mtp-X-Q4_K_M.gguf: draft-mtp acceptance 0 (0 of 91 drafted tokens accepted at
        draft length 2) is below smoke.min_acceptance 0.2
    """


# PUBLISHING ERRORS


class PublishError(MtpressError):
    """The release could not be published; the message says whether anything was committed."""


class PublishConflictError(PublishError):
    """Another writer committed to the target while the release was being committed: nothing was committed, and
    the release is not retried against their commit (its plan would delete what they added).

    Example:
        mtpress-demo/X-GGUF changed while publishing: the release was planned on commit 1a2b…, the branch is now
        at 3c4d…; nothing was committed
    """


class FileTooLargeError(PublishError):
    """A file is larger than the Hub's per-file limit (``target.max_file_size``): refused before anything is
    uploaded, since the Hub would refuse it after the rest was sent.

    Example:
        T-BF16.gguf is 547,135,008 bytes, over the 50,000,000-byte per-file limit of mtpress-demo/X-GGUF
    """


class HubRequestError(MtpressError, OSError):
    """Reading from the Hub failed for a reason outside the model: the endpoint, the network or the token.

    Retried when transient (5xx, 429 with Retry-After, no answer); the cause keeps the HTTP status.

    Example:
        reading org/model@main from https://huggingface.co failed: 503 Service Unavailable
    """
