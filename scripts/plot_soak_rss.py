#!/usr/bin/env python
"""RSS of each server process against completed requests, from soak.py runs (their soak.json rss_samples).

    python scripts/plot_soak_rss.py --out docs/soak_rss.png LABEL=artifacts/soak_a/soak.json LABEL=...

One panel per process (API server, engine core, worker), one line per run; the JSON next to the PNG keeps the
samples plotted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROCS = ("api_server", "VLLM::EngineCore", "VLLM::Worker")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="LABEL=SOAK_JSON")
    ap.add_argument("--out", required=True, help="PNG path; a JSON of the plotted samples goes beside it")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    for spec in args.runs:
        label, path = spec.split("=", 1)
        rep = json.loads(Path(path).read_text())
        data[label] = {"command": rep["command"], "memory_env": rep.get("memory_env", {}),
                       "rss_growth_after_warmup": rep["rss_growth_after_warmup"],
                       "samples": [(s["done"], s["rss_mib"]) for s in rep["rss_samples"]]}
    fig, axes = plt.subplots(1, len(PROCS), figsize=(5 * len(PROCS), 4))
    for ax, proc in zip(axes, PROCS):
        for label, d in data.items():
            pts = [(done, rss[proc]) for done, rss in d["samples"] if proc in rss]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
        ax.set_title(proc)
        ax.set_xlabel("completed requests")
        ax.set_ylabel("RSS (MiB)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.out)
    fig.savefig(out, dpi=110)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print("wrote", out, out.with_suffix(".json"))


if __name__ == "__main__":
    main()
