"""Acceptance-length regression (in the spirit of vLLM's test_acceptance_length): the plugin on the
committed trained pair, greedy, K=4, must reproduce the recorded acceptance within 5 %, so a change that
quietly degrades drafting (a wrong KV layer, position, window or hidden-state row) fails CI."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_trained_pair_acceptance_matches_record():
    from acceptance import RECORD, measure

    rec = json.loads(RECORD.read_text())
    got = measure()
    assert got["num_drafts"] > 50
    assert abs(got["mean_acceptance_length"] - rec["mean_acceptance_length"]) <= 0.05 * rec["mean_acceptance_length"], (got, rec)
    for i, (g, r) in enumerate(zip(got["per_position_acceptance"], rec["per_position_acceptance"])):
        assert abs(g - r) <= 0.05 * max(r, 0.05), f"position {i}: {g:.3f} vs recorded {r:.3f}"
    # a real drafter: acceptance falls with position
    pp = got["per_position_acceptance"]
    assert all(a >= b for a, b in zip(pp, pp[1:])), pp
