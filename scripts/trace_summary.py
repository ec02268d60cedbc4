#!/usr/bin/env python
"""What a draft-length trace (VLLM_GEMMA_MTP_TRACE=path, vllm_gemma_mtp/decision_log.py) shows: per engine,
the batch's life in segments of one batch size (steps, how many drafted, how long, why), the step-cost
samples the cost model was offered, and its estimates at the end of each segment; optionally a timeline plot.

    VLLM_GEMMA_MTP_TRACE=/tmp/trace.jsonl python scripts/bench.py --pairs trained --ks 4 --batches 1,4,16 ...
    python scripts/trace_summary.py /tmp/trace.jsonl [--plot /tmp/trace.png] [--pid N]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_gemma_mtp.decision_log import read  # noqa: E402


def segments(decisions: list[dict]) -> list[dict]:
    """Consecutive decide lines of one batch size, with what the chooser did in them. Held steps (the all-zero
    shortcut, counted on the next decide line) count as steps at 0 drafts."""
    out: list[dict] = []
    for d in decisions:
        B = len(d["k"])
        if not out or out[-1]["batch"] != B:
            out.append({"batch": B, "first_step": d["step"], "decisions": 0, "held": 0, "drafting": 0,
                        "full": 0, "drafted": 0, "why": collections.Counter(), "verify": None, "draft": None})
        s = out[-1]
        s["last_step"] = d["step"]
        s["decisions"] += 1
        s["held"] += d.get("held", 0)
        s["why"][d["why"]] += 1
        if any(d["k"]):
            s["drafting"] += 1
            s["drafted"] += sum(d["k"])
        if max(d["k"], default=0) > 1:
            s["full"] += 1
        if d.get("verify") is not None:
            s["verify"], s["draft"] = d["verify"], d["draft"]
    return out


def summarize(lines: list[dict], pid: int | None = None) -> str:
    by_pid = collections.defaultdict(list)
    for x in lines:
        by_pid[x.get("pid")].append(x)
    text = []
    for p, xs in sorted(by_pid.items(), key=lambda kv: str(kv[0])):
        if pid is not None and p != pid:
            continue
        start = next((x for x in xs if x["ev"] == "start"), {})
        dec = [x for x in xs if x["ev"] == "decide"]
        text.append(f"engine worker pid {p}: K={start.get('k')} adaptive={start.get('adaptive')} "
                    f"tp={start.get('tp')}; {len(dec)} decisions, {sum(d.get('held', 0) for d in dec)} held steps")
        if not dec:
            continue
        text.append("  segments (one batch size each; steps = decisions + held steps):")
        text.append("  steps        batch  steps  drafting  full-K  tokens/req-step  reasons                       "
                    "verify ms (v0, /request, /token, +drafting)  draft ms (d0, /step, /row-step)")
        for s in segments(dec):
            n = s["decisions"] + s["held"]
            why = ", ".join(f"{k} {v}" for k, v in s["why"].most_common(4))
            v = "-" if s["verify"] is None else ", ".join(f"{c:.3g}" for c in s["verify"])
            dr = "-" if s["draft"] is None else ", ".join(f"{c:.3g}" for c in s["draft"])
            text.append(f"  {s['first_step']:>5}-{s['last_step']:<6} {s['batch']:>5}  {n:>5}  {s['drafting']:>8}  "
                        f"{s['full']:>6}  {s['drafted'] / max(1, n * s['batch']):>15.2f}  {why:<29} {v:<44} {dr}")
        ver = collections.defaultdict(list)
        kept = collections.Counter()
        for x in xs:
            if x["ev"] == "verify":
                key = (x["tokens"], x["drafts"] > 0)
                ver[key].append(x["ms"])
                kept[key] += bool(x["kept"])
        if ver:
            text.append("  verify samples (most frequent shapes): tokens, drafting -> count (fitted), median ms")
            for key, ms in sorted(ver.items(), key=lambda kv: -len(kv[1]))[:12]:
                text.append(f"    {key[0]:>4} {'yes' if key[1] else 'no ':>3} -> {len(ms):>5} ({kept[key]:>5}), "
                            f"{statistics.median(ms):8.3f}")
        dra = collections.defaultdict(list)
        for x in xs:
            if x["ev"] == "draft":
                dra[(x["rows"], x["len"])].append(x["ms"])
        if dra:
            text.append("  draft rounds (most frequent shapes): rows, length -> count, median ms")
            for key, ms in sorted(dra.items(), key=lambda kv: -len(kv[1]))[:8]:
                text.append(f"    {key[0]:>4} {key[1]:>3} -> {len(ms):>5}, {statistics.median(ms):8.3f}")
    return "\n".join(text)


def plot(lines: list[dict], path: Path, pid: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = [x for x in lines if x["ev"] == "decide" and (pid is None or x.get("pid") == pid)]
    pids = sorted({x.get("pid") for x in dec}, key=str)
    fig, axes = plt.subplots(len(pids) or 1, 1, figsize=(11, 2.6 * max(1, len(pids))), squeeze=False)
    colors = {"policy": "#228833", "probe": "#ee6677", "calibration": "#999999", "explore": "#4477aa",
              "remeasure": "#aa3377", "scripted": "#66ccee"}
    for ax, p in zip(axes[:, 0], pids):
        xs = [x for x in dec if x.get("pid") == p]
        steps = [x["step"] for x in xs]
        ax.step(steps, [len(x["k"]) for x in xs], where="post", color="#bbbbbb", label="batch size")
        ax.set_ylabel("batch size")
        ax2 = ax.twinx()
        for why, c in colors.items():
            pts = [(x["step"], sum(x["k"]) / max(1, len(x["k"]))) for x in xs if x["why"] == why]
            if pts:
                ax2.scatter(*zip(*pts), s=6, color=c, label=why)
        ax2.set_ylabel("draft tokens / request")
        ax2.legend(fontsize=7, loc="upper right", markerscale=2)
        ax.set_title(f"worker {p}: each decision's mean draft length (held all-zero steps not drawn)", fontsize=9)
    axes[-1, 0].set_xlabel("engine step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--pid", type=int, default=None, help="one engine's worker only")
    ap.add_argument("--plot", default=None, help="write a timeline PNG here")
    args = ap.parse_args(argv)
    lines = read(args.trace)
    if not lines:
        print(f"{args.trace}: no trace lines", file=sys.stderr)
        return 1
    print(summarize(lines, args.pid))
    if args.plot:
        plot(lines, Path(args.plot), args.pid)
        print(f"timeline: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
