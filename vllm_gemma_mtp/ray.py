"""Ray Serve and Ray Data with the plugin: one call each, on Ray's own LLM APIs (`ray.serve.llm`,
`ray.data.llm`); this module only fills in what the plugin needs. Install with the `ray` extra
(`pip install "vllm-gemma-mtp[ray]"`, i.e. `ray[serve,data]`; never `ray[llm]`, which pins a CUDA vLLM).

    import ray
    from vllm_gemma_mtp import ray as gm_ray

    ray.init(runtime_env=gm_ray.job_runtime_env())            # ships the plugin to every node
    app = gm_ray.serve_app("google/gemma-4-31b-it", "google/gemma-4-31b-it-assistant",
                           accelerator_type="H100", tensor_parallel_size=2, num_replicas=4)
    ray.serve.run(app)                                         # OpenAI API on :8000

    proc = gm_ray.data_processor(target, assistant, batch_size=64, concurrency=4)
    ds = proc(ray.data.from_items([{"prompt": "..."}]))

How the plugin reaches the workers: vLLM loads it through its `vllm.general_plugins` entry point in every
process, so each node needs the installed distribution (its metadata, not just the code). A wheel in the
*job-level* runtime_env `py_modules` is installed on every node for every actor of the job; a stage- or
deployment-level runtime_env does not reach the engine's own worker processes. The plugin's options are
environment variables (`VLLM_GEMMA_MTP_*`); they travel in `runtime_env["env_vars"]`. Per-request controls
(`gemma_mtp_speculate`, `gemma_mtp_max_draft_tokens`) travel as vLLM's `extra_args`: `vllm_xargs` in an
OpenAI request body, `sampling_params["extra_args"]` in a Ray Data row (`controls=` sets a default).

CPU clusters: vLLM's Ray executor does not run on CPU, so an engine's tensor-parallel ranks stay on one node
(multiprocessing executor); Ray spreads replicas. GPU clusters: set `accelerator_type`, and each replica's
engine gets a placement group of `tensor_parallel_size` GPU bundles.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from vllm_gemma_mtp import controls as _controls
from vllm_gemma_mtp import options as _options

_ROOT = Path(__file__).resolve().parents[1]


def plugin_env(options: dict | None = None) -> dict[str, str]:
    """VLLM_GEMMA_MTP_* for the workers: options given as {name or variable: value}, validated here (a typo fails
    now, not on a remote node); with none, this process's own VLLM_GEMMA_MTP_* variables."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_options.PREFIX)}
    for key, val in (options or {}).items():
        var = key if key.startswith(_options.PREFIX) else _options.PREFIX + _options.env_name(key)
        env[var] = str(int(val)) if isinstance(val, bool) else str(val)
    _options.from_env(env)  # raises OptionsError naming the bad option
    return env


def plugin_wheel(out_dir: str | os.PathLike | None = None) -> Path:
    """Build a wheel of the installed plugin (its source tree), for a job-level runtime_env's py_modules."""
    out = Path(out_dir or tempfile.mkdtemp(prefix="gemma_mtp_wheel_"))
    if not (_ROOT / "pyproject.toml").exists():
        raise FileNotFoundError(f"vllm-gemma-mtp: no source tree at {_ROOT} to build a wheel from; pass the "
                                "plugin's wheel to runtime_env py_modules yourself")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(_ROOT)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"vllm-gemma-mtp: building the plugin's wheel failed:\n{r.stderr[-2000:]}")
    wheels = sorted(out.glob("vllm_gemma_mtp-*.whl"))
    if not wheels:
        raise RuntimeError(f"vllm-gemma-mtp: pip wheel wrote no wheel into {out}")
    return wheels[-1]


def job_runtime_env(options: dict | None = None, ship_plugin: bool = True, env_vars: dict | None = None,
                    **extra) -> dict:
    """The runtime_env for `ray.init` (or a job submission): the plugin's options as env vars, and, with
    ship_plugin, a wheel of the plugin in py_modules so every node can load it."""
    env = {**plugin_env(options), **(env_vars or {})}
    rt = {"env_vars": env, **extra}
    if ship_plugin:
        rt["py_modules"] = [str(plugin_wheel()), *rt.get("py_modules", [])]
    return rt


def speculative_config(assistant: str, num_speculative_tokens: int = 4, **more) -> dict:
    return {"method": "mtp", "model": str(assistant), "num_speculative_tokens": int(num_speculative_tokens), **more}


def _engine_kwargs(assistant, num_speculative_tokens, tensor_parallel_size, engine_kwargs) -> dict:
    kw = dict(engine_kwargs or {})
    if "speculative_config" in kw:
        raise ValueError("vllm-gemma-mtp.ray: give the assistant and num_speculative_tokens as arguments, not a "
                         "speculative_config in engine_kwargs")
    kw["speculative_config"] = speculative_config(assistant, num_speculative_tokens)
    kw["tensor_parallel_size"] = int(tensor_parallel_size)
    return kw


def _placement(accelerator_type, tensor_parallel_size, cpus_per_rank: float = 1) -> dict:
    if accelerator_type:  # GPU nodes: one GPU per rank, the ranks of an engine packed on a node when possible
        return {"bundle_per_worker": {"GPU": 1, "CPU": cpus_per_rank}, "strategy": "PACK"}
    return {"bundles": [{"CPU": cpus_per_rank}] * int(tensor_parallel_size), "strategy": "STRICT_PACK"}


def serve_app(target: str, assistant: str, *, model_id: str | None = None, num_speculative_tokens: int = 4,
              options: dict | None = None, engine_kwargs: dict | None = None, accelerator_type: str | None = None,
              tensor_parallel_size: int = 1, num_replicas: int = 1, deployment_config: dict | None = None,
              ingress_deployment_config: dict | None = None, runtime_env: dict | None = None,
              cpus_per_rank: float = 1):
    """An OpenAI-compatible Ray Serve application of `target` with its MTP `assistant` and the plugin.
    accelerator_type None means CPU replicas. Returns the application for `ray.serve.run`."""
    from ray.serve.llm import LLMConfig, build_openai_app

    cfg = dict(
        model_loading_config={"model_id": model_id or Path(str(target)).name, "model_source": str(target)},
        engine_kwargs=_engine_kwargs(assistant, num_speculative_tokens, tensor_parallel_size, engine_kwargs),
        deployment_config={"num_replicas": int(num_replicas), **(deployment_config or {})},
        runtime_env={**(runtime_env or {}), "env_vars": {**plugin_env(options), **(runtime_env or {}).get("env_vars", {})}},
        placement_group_config=_placement(accelerator_type, tensor_parallel_size, cpus_per_rank),
    )
    if accelerator_type:
        cfg["accelerator_type"] = accelerator_type
    else:
        cfg["accelerator_config"] = {"kind": "cpu"}
    return build_openai_app({"llm_configs": [LLMConfig(**cfg)],
                             **({"ingress_deployment_config": ingress_deployment_config}
                                if ingress_deployment_config else {})})


def data_processor(target: str, assistant: str, *, num_speculative_tokens: int = 4, options: dict | None = None,
                   engine_kwargs: dict | None = None, sampling_params: dict | None = None,
                   controls: dict | None = None, batch_size: int = 32, concurrency: int = 1,
                   accelerator_type: str | None = None, tensor_parallel_size: int = 1,
                   runtime_env: dict | None = None, cpus_per_rank: float = 1, tokenize: bool = True,
                   detokenize: bool = True, chat_template: bool = False, **config):
    """A Ray Data processor (`ray.data.llm.build_processor`) whose engines draft with the plugin. Rows carry
    `prompt` (or `messages` with chat_template=True, or `tokenized_prompt` with tokenize=False) and may carry
    `sampling_params` and `gemma_mtp` (per-row controls, over `controls`). Output rows gain
    `generated_text` / `generated_tokens`."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    if controls:
        _controls.validate(controls)
    base_sp = dict(sampling_params or {"temperature": 0.0, "max_tokens": 64})

    def preprocess(row: dict) -> dict:
        sp = {**base_sp, **(row.get("sampling_params") or {})}
        ctl = {**(controls or {}), **(row.get("gemma_mtp") or {})}
        if ctl:
            sp["extra_args"] = {**(sp.get("extra_args") or {}), **ctl}
        return {**row, "sampling_params": sp}

    cfg = vLLMEngineProcessorConfig(
        model_source=str(target),
        engine_kwargs=_engine_kwargs(assistant, num_speculative_tokens, tensor_parallel_size, engine_kwargs),
        runtime_env={**(runtime_env or {}), "env_vars": {**plugin_env(options), **(runtime_env or {}).get("env_vars", {})}},
        batch_size=int(batch_size), concurrency=int(concurrency),
        placement_group_config=_placement(accelerator_type, tensor_parallel_size, cpus_per_rank),
        chat_template_stage=chat_template, tokenize_stage=tokenize, detokenize_stage=detokenize,
        **({"accelerator_type": accelerator_type} if accelerator_type else {}), **config)
    return build_processor(cfg, preprocess=preprocess)
