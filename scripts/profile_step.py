"""Where one engine step's time goes: the engine runs in this process and the V1 runner's stages are timed.

    python scripts/profile_step.py --pair allaccept --mode plugin --k 4 --batch 1
    python scripts/profile_step.py --pair trained --mode adaptive --schedule 0 --batch 16 --in-process
        (every step at 0 drafts: compare the engine step with --mode none)
    python scripts/profile_step.py --pair zeroaccept --mode adaptive --batch 1 [--no-held-shortcut]
        (the policy holds every request at 0: what answering those steps before vLLM's propose path saves)
    python scripts/profile_step.py --pair trained --mode none --batch 1 --prompt-tokens 2000
    python scripts/profile_step.py --pair trained --mode adaptive --batch 16 --seeded 0.5
        (half the requests seeded at T=1, the rest greedy: what seeded requests cost a batch)

Prints, per stage, calls and mean milliseconds per engine step (the stages nest: execute_model holds the
target forward, sample_tokens holds the sampler and the draft round). Settings match scripts/bench.py.
Without --in-process the engine runs as the bench runs it (front end, engine core and worker processes) and
the stages are timed in the worker; --cprofile then profiles the worker's main thread. The modes run one
after the other, so compare them with scripts/bench.py (interleaved) before trusting a difference: on the
2-core VM the same target forward took 3.1 ms in one run and 5.0 ms in the next.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]

TIMES: dict[str, list[float]] = collections.defaultdict(list)


def _timed(cls, name: str, label: str | None = None) -> None:
    fn = getattr(cls, name, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            TIMES[label or name].append(time.perf_counter() - t)

    setattr(cls, name, staticmethod(wrapper) if isinstance(cls.__dict__.get(name), staticmethod) else wrapper)


def instrument() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.spec_decode.gemma4 import Gemma4Proposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _timed(EngineCore, "step", "engine step")
    # after each step, outside `step`: the scheduler takes the drafts (vLLM asks the worker in one more RPC;
    # the plugin's come with the step's output, compat.patch_drafts_with_output)
    _timed(EngineCore, "post_step", "engine post_step")
    _timed(Scheduler, "schedule", "  scheduler.schedule")
    _timed(Scheduler, "update_from_output", "  scheduler.update_from_output")
    for name in ("execute_model", "_update_states", "_prepare_inputs", "_calc_spec_decode_metadata",
                 "_build_attention_metadata", "_preprocess", "_model_forward", "sample_tokens", "_sample",
                 "_update_states_after_model_execute", "propose_draft_token_ids", "_bookkeeping_sync",
                 "_copy_draft_token_ids_to_cpu"):
        _timed(GPUModelRunner, name, "  runner." + name)
    for name in ("prepare_next_token_ids_padded", "prepare_inputs_padded", "propose"):
        _timed(Gemma4Proposer, name, "    proposer." + name)
    from vllm_gemma_mtp.proposer import GemmaMTPProposer

    _timed(GemmaMTPProposer, "propose", "    proposer.propose")
    _timed(GemmaMTPProposer, "gather_kv", "      proposer.gather_kv")
    _timed(GemmaMTPProposer, "_decide", "      proposer._decide (adaptive)")
    from vllm_gemma_mtp.policy import DraftPolicy

    _timed(DraftPolicy, "decide", "        policy.decide")
    from vllm.v1.sample.sampler import Sampler

    from vllm_gemma_mtp.sampler import GemmaMTPRejectionSampler

    # the sampler: verify steps (forward) and plain steps with seeded rows (sample_plain)
    _timed(GemmaMTPRejectionSampler, "forward", "    sampler.forward (verify)")
    _timed(GemmaMTPRejectionSampler, "sample_plain", "    sampler.sample_plain (seeded rows, plain step)")
    _timed(GemmaMTPRejectionSampler, "_process_every_row", "      sampler._process_every_row")
    _timed(GemmaMTPRejectionSampler, "_sample_keyed", "      sampler._sample_keyed")
    _timed(Sampler, "forward", "      vLLM Sampler.forward")


def _install_remote(worker):
    import profile_step  # the engine-core process finds scripts/ through PYTHONPATH, set in main()

    profile_step.instrument()


def _clear_remote(worker):
    import profile_step

    profile_step.TIMES.clear()


def _script_remote(worker, schedule):
    from vllm_gemma_mtp.policy import PolicyConfig, ScriptedPolicy

    d = worker.model_runner.drafter
    d.policy = ScriptedPolicy(PolicyConfig(max_k=d.policy.cfg.max_k), schedule)


def _no_shortcut_remote(worker):
    d = worker.model_runner.drafter
    d.held_zero_drafts = lambda *a, **kw: None


def _held_fast_remote(worker):
    return getattr(getattr(worker.model_runner.drafter, "stats", None), "held_fast", None)


def _cprofile_remote(worker, path):
    import cProfile

    import profile_step

    if path is None:
        profile_step._PROF = cProfile.Profile()
        profile_step._PROF.enable()
    else:
        profile_step._PROF.disable()
        profile_step._PROF.dump_stats(path)


def _read_remote(worker):
    import profile_step

    return dict(profile_step.TIMES)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="allaccept")
    ap.add_argument("--mode", default="plugin", choices=("none", "builtin", "plugin", "adaptive"))
    ap.add_argument("--schedule", default=None,
                    help="adaptive mode: replace the policy by a fixed schedule of draft lengths, e.g. '0' (every "
                         "step at 0 drafts: shows what a skipped draft round costs) or '4,0,2'")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=48, help="trained pair: prompt length in tokens (about)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-held-shortcut", action="store_true",
                    help="adaptive mode: send steps held at 0 drafts through vLLM's propose path too "
                         "(what compat.patch_held_zero_steps saves)")
    ap.add_argument("--cprofile", action="store_true", help="also print the top functions by own time")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: max(16, batch)")
    ap.add_argument("--seeded", type=float, default=0.0,
                    help="fraction of the requests sampled at temperature 1 with a seed of their own (the rest greedy)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the engine core in this process (as the bench does not: it runs it in its own)")
    args = ap.parse_args()
    if args.schedule is not None and args.mode != "adaptive":
        # the schedule replaces the plugin's policy, which only the adaptive mode has (it crashed the worker)
        ap.error(f"--schedule needs --mode adaptive (got --mode {args.mode})")

    if args.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:  # stages are timed inside the engine-core process, installed and read back over collective_rpc
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                 os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("VLLM_GEMMA_MTP_COMPILE", "1")
    from bench import TRAINED, code_prompts
    from engine_runs import seeded_mix, start_engine, timed_runs
    from transformers import AutoTokenizer

    from vllm_gemma_mtp.fixtures import ensure_pair

    d = TRAINED if args.pair == "trained" else ensure_pair(args.pair)
    tok = AutoTokenizer.from_pretrained(d / "target")
    prompts = (code_prompts(tok, args.batch, tok.bos_token_id or 2, args.prompt_tokens) if args.pair == "trained"
               else [[2] + [(13 * i + j) % 400 + 5 for j in range(8 + i)] for i in range(args.batch)])
    mml = max(1024, max(len(p) for p in prompts) + args.max_tokens + 16)
    if args.in_process:
        instrument()
    llm = start_engine(str(d / "target"), str(d / "assistant"), args.mode, max(args.k, 1),
                       max_num_seqs=args.max_num_seqs or max(16, args.batch), max_model_len=mml)
    if not args.in_process:
        llm.collective_rpc(_install_remote)
    if args.schedule is not None:
        sched = [int(x) for x in args.schedule.split(",")]
        llm.collective_rpc(_script_remote, args=(sched,))
    if args.no_held_shortcut:
        llm.collective_rpc(_no_shortcut_remote)
    params = seeded_mix(len(prompts), args.seeded, args.max_tokens)
    timed_runs(llm, prompts, args.max_tokens, runs=1, warmup=1, params=params)
    if args.in_process:
        TIMES.clear()
    else:
        llm.collective_rpc(_clear_remote)
    prof = None
    if args.cprofile:
        import cProfile

        if args.in_process:
            prof = cProfile.Profile()
            prof.enable()
        else:  # the worker process's main thread (where collective_rpc runs)
            llm.collective_rpc(_cprofile_remote, args=(None,))
    r = timed_runs(llm, prompts, args.max_tokens, runs=args.runs, warmup=0, mode=args.mode, k=args.k, params=params)
    if prof is not None:
        prof.disable()
    elif args.cprofile:
        worker_stats = f"/tmp/profile_step_worker_{os.getpid()}.prof"
        llm.collective_rpc(_cprofile_remote, args=(worker_stats,))
        import pstats

        prof = pstats.Stats(worker_stats)
    if not args.in_process:
        TIMES.update(llm.collective_rpc(_read_remote)[0])
    # engine steps are timed only when the engine core runs in this process; else count the runner's steps
    steps = len(TIMES["engine step"]) or len(TIMES.get("  runner.execute_model", ())) or 1
    print(f"\n{args.pair} {args.mode} K={args.k} batch={args.batch} seeded={args.seeded}: {r.tokens_per_s:.1f} tok/s, "
          f"MAL {r.mean_acceptance_length}, {steps} engine steps")
    if args.mode == "adaptive":
        print(f"steps answered by the held-zero shortcut (engine lifetime): {llm.collective_rpc(_held_fast_remote)[0]}")
    print(f"{'stage':48s} {'calls':>7s} {'ms/step':>9s}")
    for name, ts in TIMES.items():
        print(f"{name:48s} {len(ts):7d} {1e3 * sum(ts) / steps:9.3f}")
    if prof is not None:
        import pstats

        st = prof if isinstance(prof, pstats.Stats) else pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(35); st.sort_stats("cumtime").print_stats("sample|sampler|rejection|propose|prepare", 40)


if __name__ == "__main__":
    main()
