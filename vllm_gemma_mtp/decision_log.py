"""A JSON line for every draft-length decision and every step-cost sample (VLLM_GEMMA_MTP_TRACE=path).

The Prometheus metrics say how often each draft length was chosen and what the cost model believes now;
they cannot say why a batch of 16 drafted K=4 for its first five steps, or which timing made the chooser
stop. Every tuning of the policy so far started from such a per-step record (kept outside the repository
until now); this is that record, for operators and for whoever tunes the policy next.
`scripts/trace_summary.py` reads it back (tables and a timeline plot).

Lines (one object each, `ev` says which; times in ms, `t` seconds since the engine's log opened, `pid` the
worker's process, so the engines of one benchmark can share a file):
- start: the options, K, tensor-parallel size;
- decide: `step`, the batch's draft lengths `k` [B], the policy's `why` (calibration, policy, probe,
  explore, remeasure, scripted), `closed` (the batch valued by when it ends), `held` (steps answered by the
  held all-zero shortcut since the previous decide line), the cost model's `verify` (v0, vr per request
  beyond the first, vt per token, v2 drafting overhead) and `draft` (d0, d1 per step, d2 per row-step), and
  `est` its estimate of this step;
- verify: a step's time as the cost model was offered it (`tokens` scheduled, `drafts` among them, `kept`:
  whether it was fitted: decode steps only, no idle gaps);
- draft: a draft round's time (`rows` drafting, `len` steps run).

Only rank 0 writes (every rank makes the same decision). Off by default: each line is a json.dumps and a
write (~5-10 us), a few per step.
"""

from __future__ import annotations

import json
import os
import time


class DecisionLog:
    def __init__(self, path: str):
        # line-buffered append: whole lines, so several engines' workers may share one file
        self._f = open(path, "a", buffering=1, encoding="utf-8")
        self.path = path
        self._pid = os.getpid()
        self._t0 = time.perf_counter()

    def _write(self, ev: str, **fields) -> None:
        fields = {"ev": ev, "pid": self._pid, "t": round(time.perf_counter() - self._t0, 6), **fields}
        self._f.write(json.dumps(fields, separators=(",", ":")) + "\n")

    def start(self, options: str, k: int, tp_size: int, adaptive: bool) -> None:
        self._write("start", options=options, k=k, tp=tp_size, adaptive=adaptive)

    def decide(self, step: int, lengths, why: str, closed: bool, held: int, verify, draft, est) -> None:
        self._write("decide", step=step, k=[int(x) for x in lengths], why=why, closed=bool(closed), held=int(held),
                    verify=_ms(verify), draft=_ms(draft), est=None if est is None else round(est * 1e3, 4))

    def verify(self, tokens: int, drafts: int, seconds: float, kept: bool) -> None:
        self._write("verify", tokens=int(tokens), drafts=int(drafts), ms=round(seconds * 1e3, 4), kept=bool(kept))

    def draft(self, rows: int, length: int, seconds: float) -> None:
        self._write("draft", rows=int(rows), len=int(length), ms=round(seconds * 1e3, 4))


def _ms(coefs):
    return None if coefs is None else [round(float(c) * 1e3, 5) for c in coefs]


def read(path) -> list[dict]:
    """Every line of a trace file (a torn last line, from an engine killed mid-write, is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
