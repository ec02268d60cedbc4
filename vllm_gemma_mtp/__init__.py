"""vllm-gemma-mtp: a vLLM plugin for Gemma 4 MTP ("-assistant") speculative decoding."""

__version__ = "0.1.0"


def register() -> None:
    """`vllm.general_plugins` entry point (idempotent; runs in every vLLM process)."""
    from vllm_gemma_mtp.plugin import install

    install()
