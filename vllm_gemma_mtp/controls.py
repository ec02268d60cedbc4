"""Per-request speculation controls, carried in `SamplingParams(extra_args=...)` (the OpenAI body's
`vllm_xargs`). Plain code, no vLLM imports; compat.py hooks `validate` into vLLM's own SamplingParams
validation, so a bad value fails that request (HTTP 400 from the server) before it reaches the engine.

    gemma_mtp_speculate: bool or 0/1    false (0) turns speculation off for this request (the OpenAI
                                        server's vllm_xargs turns JSON false into 0)
    gemma_mtp_max_draft_tokens: int >= 0 caps this request's draft length (values above the engine's
                                        num_speculative_tokens mean the engine's value; 0 = off)
"""

from __future__ import annotations

SPECULATE = "gemma_mtp_speculate"
MAX_DRAFT = "gemma_mtp_max_draft_tokens"
KEYS = (SPECULATE, MAX_DRAFT)
PREFIX = "gemma_mtp"


class ControlError(ValueError):
    pass


def validate(extra_args) -> None:
    if not extra_args:
        return
    for key in extra_args:
        if isinstance(key, str) and key.startswith(PREFIX) and key not in KEYS:
            raise ControlError(f"unknown vllm-gemma-mtp request option {key!r}; known: {', '.join(KEYS)}")
    if SPECULATE in extra_args and extra_args[SPECULATE] not in (True, False):  # 0 and 1 compare equal
        raise ControlError(f"{SPECULATE} must be true or false (or 1/0), got {extra_args[SPECULATE]!r}")
    if MAX_DRAFT in extra_args:
        v = extra_args[MAX_DRAFT]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ControlError(f"{MAX_DRAFT} must be an integer >= 0, got {v!r}")


def draft_cap(extra_args, num_speculative_tokens: int) -> int:
    """The most drafts this request may get per step (already validated in the front end)."""
    if not extra_args:
        return num_speculative_tokens
    if SPECULATE in extra_args and not extra_args[SPECULATE]:
        return 0
    v = extra_args.get(MAX_DRAFT)
    return num_speculative_tokens if v is None else min(int(v), num_speculative_tokens)
