"""Draft length per request per step: plain code, no vLLM imports.

Each step every running request gets a draft length k_i in [0, cap_i] (cap_i <= num_speculative_tokens)
that maximises the expected tokens emitted per second of step time for the whole batch:

    E(k) = sum_i (1 + sum_{j <= k_i} P_ij)        P_ij = a_i1 * ... * a_ij, a_ij the request's conditional
                                                   acceptance at draft position j
    T(k) = verify(B + sum_i k_i, any k_i > 0) + draft(B_d, max_i k_i)     (no draft term when every k_i = 0)

verify(tokens, s) = v0 + v1 * tokens + v2 * s and draft(B_d, c) = d0 + d1 * c + d2 * B_d * c are learned online
from the engine's own step timings (exponentially weighted least squares), so the same code chooses on a 2-core
CPU, where every verified token costs, and on a GPU, where K+1 tokens cost about what 1 costs until the batch
is compute-bound. v2 is what a step with drafts costs beyond its tokens (speculative metadata, rejection
sampling, the drafter's input preparation): the runner takes the plain path when no request drafts, so that
cost comes with the first draft, not with each; a per-token slope alone mistook it for expensive tokens.
For a fixed longest draft c, E/T is maximised by Dinkelbach's iteration: with
lambda = E/T, each request takes the k <= c that maximises sum_{j<=k} P_ij - lambda * (v1 * k + d2 * c [k > 0]);
every c in 0..K is tried and the best ratio wins (exact: tests/test_policy.py checks it against brute force).

Closed batches: when the caller says nothing waits for a place and the batch is not being refilled (it passes
each request's remaining tokens), a request that ends sooner makes room for nobody and the batch lasts as long
as its slowest request; choose_closed_batch then minimises (steps until the last request ends) x (step time)
instead of the step's rate. It ends with its slowest request, so there each request's drafting gain is taken
at what the slowest of B requests with its posterior is expected to get (slowest_of_batch; the spread of gains
between requests is learned from requests that left, AcceptanceStats.gain_spread), and the engine's rates
count as more observations of a request where requests differ little (AcceptanceStats.prior_weight).

Acceptance: per request, decayed counts of accepted/tried per position, shrunk toward the engine-wide
rates (themselves decayed counts over all requests), so a new request starts from what the engine has seen.

Exploration: a policy that keeps drafting runs one step without drafts every `explore_every` steps, so the
cost of a plain step, which every choice is measured against, stays measured. A request at 0 drafts gets a
1-token probe after `probe_every` steps: it comes back when its text becomes predictable or the step cost
drops. Each probe doubles that request's wait (up to `probe_backoff_max` times) and only the chooser itself
drafting for the request resets it: a probe whose request stays at 0 afterwards - a drafter that is never
right, or one that is right but costs more than it saves at this load - was not worth its draft round, which
can cost as much as a full one. A request the chooser drafted for in `resume_after` steps or more is probed
`resume_wait` steps after it stops instead (then the same doubling): its drafts paid, and a few rejections
in a row kept it at 0 for 16 steps at a time (long prompts, batch 1). Probes coalesce: when one request is
due, every request past half its wait probes in the same step, since the round runs anyway (measured before,
trained pair, greedy, batch 16 on this CPU, where no K beats plain decoding: the accepted probes kept
resetting their waits and 99 of 430 policy steps ran a draft round for a probe; adaptive 0.84x no
speculation). And probes have a budget: what
they cost beyond the chosen step (predicted by the cost model) may be at most `probe_budget` of the plain
step time, an allowance that accrues every step and is saved up for at most `probe_budget_horizon` steps.
Due probes wait until it covers all of them, so one round carries them together. Under load on a CPU a
coalesced probe costs 1-3 plain steps, and without the budget 12 probe steps in 516 cost ~5% (trained pair,
batch 16-64); on a GPU a probe costs a few percent of a step and the budget never binds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class PolicyConfig:
    max_k: int
    request_decay: float = 0.8  # per observation: a request's recent drafts count most
    global_decay: float = 0.995
    prior_weight: float = 3.0  # the engine-wide rates count as this many observations of a request
    # In a closed batch, once departed requests show how much requests differ (AcceptanceStats.gain_spread),
    # the prior counts as (one observation's sampling variance of the gain) / (the spread squared)
    # observations, between prior_weight and prior_weight_max (empirical Bayes): a closed batch goes by its
    # slowest request, i.e. by the unluckiest of B noisy estimates, and where requests differ little one
    # unlucky draft says more about luck than about the request. Measured before (trained pair, batch 4 right
    # after batch 1, spread ~0): one early rejection put a request's gain at 1.6 tokens against ~2.8, the
    # closed-batch chooser chose plain decoding, and the batch stayed plain for ~250 steps where fixed K=4
    # gives 1.5x. The cap keeps a request that really differs visible: with request_decay 0.8 its counts hold
    # at most 5 observations, a third of the weight at prior_weight_max 10. (The open chooser sums over
    # requests, where their noise averages out: prior_weight.)
    prior_weight_max: float = 10.0
    cost_decay: float = 0.99  # per timing sample
    probe_every: int = 16  # steps at 0 drafts before a 1-token probe
    probe_backoff_max: int = 16  # each probe doubles the request's wait, up to this many probe_every
    # the engine's experience for requests that join: each probe step doubles a new request's first wait (up to
    # this many probe_every), a probe that the chooser follows with drafts brings it back to probe_every (the
    # chooser drafting for other reasons - the last request of a batch, alone - does not). Without it every
    # request of a never-right drafter started from probe_every (zero-accept pair, batch 16, 128 tokens: probe
    # rounds at steps 16, 48 and 112 of each batch, each ~2 plain steps of time on this CPU; with a cap of 4, one
    # per batch of 128 steps, ~1.4 % of the time at batch 16)
    new_request_wait_max: int = 4
    # an all-zero answer at a batch size this many times larger or smaller than the last multi-token draft's
    # runs one full-length step instead, so the cost model sees drafting at this size (None: never)
    remeasure_factor: int | None = 2
    remeasure_after: int = 4
    # a size within remeasure_factor of one where a multi-token draft ran in the last remeasure_every steps is
    # not far. Comparing with the latest draft's size alone remeasured once per batch where closed batches of 16
    # end with one request drafting alone (16 -> 1 -> 16: ~2 % of the time at batch 16); a period of 512 steps
    # still cost a zero-accept batch of 32 ~2 % (a full-K step there is ~3 plain steps)
    remeasure_every: int = 4096
    # a request the chooser has drafted for in at least `resume_after` steps is probed `resume_wait` steps after
    # it drops to 0 (then the usual doubling): its drafts paid before, so a dip in its acceptance is checked
    # soon instead of after probe_every steps (None: every request waits probe_every)
    resume_after: int = 8
    resume_wait: int | None = 2
    explore_every: int = 32  # steps with drafts before one step without, so the plain step's cost stays known
    # no request that may draft is expected to get its tokens slower than (1 - this) x plain decoding; None:
    # the batch's rate alone decides (see choose_draft_lengths)
    max_slowdown: float | None = 0.05
    calibration_steps: int = 0  # steps of cycling k over 0..max_k at start (0: 4 * (max_k + 1))
    # a batch the chooser just turned fully off keeps that answer while nothing it reads changes (same requests
    # and caps, no new acceptance): only the costs move, by one sample a step. It is rechecked after
    # zero_hold_max steps, or after zero_recheck_every steps once the cost model's prediction for the batch
    # has moved by more than zero_hold_cost_tol of a plain step. A recheck runs the chooser and vLLM's propose
    # path (~0.35 ms at batch 4 on this CPU, trained pair, half the batch seeded); with a fixed 4-step period
    # that was 28 % of the steps of a batch held at 0, and with a 16-step hold still ~1 % of a plain step at
    # batch 16 (a recheck ~0.6 ms; zero-accept pair, this CPU); the cost comparison every 4 steps is what
    # catches a change, so the hold may be long
    zero_recheck_every: int = 4
    zero_hold_max: int = 64
    zero_hold_cost_tol: float = 0.05
    min_samples: int = 8
    # probes may cost at most this fraction of step time (None: no limit). A probe step runs a draft round the
    # chooser did not want; under load on a CPU it costs 1-3 plain steps (trained pair, batch 16-64: 12 probe
    # steps in 516 cost ~5%). The allowance accrues per step and is spent by probes' predicted extra cost,
    # so where probes are cheap (a GPU below its compute bound) it never binds.
    probe_budget: float | None = 0.02
    probe_budget_horizon: int = 256  # steps of allowance that can be saved up
    # Closed batches end with their slowest request, and a request's acceptance is known only after it has
    # drafted: new requests start at the engine-wide rates, which are what requests get on average, not what
    # the slowest of B gets. So in a closed batch each request's drafting gain is taken at the expected
    # minimum of B draws from its posterior: its estimate less z_B (the expected maximum of B standard
    # normals) x the spread of gains between requests x sqrt(prior_weight / (prior_weight + observations)).
    # Measured before (trained pair, batch 16, 128 tokens, this 2-core CPU, where no K pays at batch 16):
    # each batch's first step drafted K=4 for all 16 new requests, and each 1-token probe raised position-1
    # rates enough that the next 1-2 steps drafted K=4 for all (~2 plain steps each), then stopped: ~7 % of
    # the time. The spread is learned from requests that left after at least spread_min_observations
    # observations; until spread_min_requests of them have left there is no discount.
    spread_min_observations: float = 2.0
    spread_min_requests: float = 4.0
    spread_decay: float = 0.99  # per departed request


_ROUNDING = 1e-12  # seconds: a coefficient this close below 0 is 0 (rounding in a degenerate solve)


class DecayedLeastSquares:
    """Least squares over features x (x[0] = 1, the intercept) with exponentially decayed sufficient statistics
    and a small ridge on the other coefficients (keeps it solvable when recent samples share one x).

    nonneg: coefficients that cannot be negative (a cost per token, a step's fixed cost). They are fitted under
    that constraint, not clipped afterwards: at batch 1 a step is either 1 token without drafts or K+1 tokens
    with them, the two columns move together, and the unconstrained fit put a token at -1.2 ms and the
    drafting step's overhead at +5.2 ms; clipped, it predicted 13.3 ms for a 5-token step measured at 7.3 ms
    (trained pair, this CPU, 2026-12-07).

    skip_first: the first sample at each x is not counted. A step at a shape the engine has not run before
    pays one-time costs (oneDNN kernel selection, graph specialisation): the first 20-token verify step after
    a run at batch 1 took 17.3 ms against 8.3-10 ms for the next 75, and 6- and 10-token steps seen once
    took 22-26 ms against ~8. One such sample turned the per-token cost from 0 to 0.56-0.79 ms, and in 2 of
    4 runs the chooser held batch 4 plain for most of the run, where fixed K=4 gives 1.4x."""

    def __init__(self, n: int, decay: float, ridge: float = 1e-9, nonneg: tuple = (), skip_first: bool = False):
        self.n, self.decay, self.ridge = n, decay, ridge
        self.nonneg, self.skip_first = tuple(nonneg), skip_first
        self.xx = [[0.0] * n for _ in range(n)]
        self.xy = [0.0] * n
        self.yy = 0.0
        self.count = 0  # samples offered (the skipped first ones included)
        self.distinct: set = set()  # the x of counted samples
        self.seen: set = set()
        self._coef = [0.0] * n
        self._dirty = False
        # coefficients held at 0 while the samples cannot tell them from the others (the columns' normalised
        # Gram determinant below identified_tol): see CostModel
        self.conditional: tuple = ()
        self.identified_tol = 1e-6
        self.held: frozenset = frozenset()  # as of the last solve

    def identified(self) -> bool:
        """Whether the counted samples' columns are linearly independent: the determinant of their Gram
        matrix scaled to a unit diagonal (1: orthogonal columns, 0: one is a combination of the others)."""
        n = self.n
        d = [self.xx[r][r] for r in range(n)]
        if min(d) <= 0.0:
            return False
        a = [[self.xx[r][c] / math.sqrt(d[r] * d[c]) for c in range(n)] for r in range(n)]
        det = 1.0
        for col in range(n):  # elimination with partial pivoting (symmetric positive semi-definite)
            piv = max(range(col, n), key=lambda r: abs(a[r][col]))
            if abs(a[piv][col]) < 1e-300:
                return False
            if piv != col:
                a[col], a[piv] = a[piv], a[col]
                det = -det
            det *= a[col][col]
            for r in range(col + 1, n):
                f = a[r][col] / a[col][col]
                a[r] = [a[r][c] - f * a[col][c] for c in range(n)]
        return abs(det) >= self.identified_tol

    def add(self, x: list[float], y: float) -> None:
        self.count += 1
        key = tuple(x)
        if self.skip_first and key not in self.seen:
            self.seen.add(key)
            return
        d = self.decay
        for r in range(self.n):
            self.xy[r] = d * self.xy[r] + x[r] * y
            for c in range(self.n):
                self.xx[r][c] = d * self.xx[r][c] + x[r] * x[c]
        self.yy = d * self.yy + y * y
        self.distinct.add(key)
        self._dirty = True

    @property
    def coef(self) -> list[float]:
        # solved when read: a step held at 0 drafts adds a sample but reads no coefficient (the solve was
        # ~half of that step's policy time)
        if self._dirty:
            self._coef = self._solve()
            self._dirty = False
        return self._coef

    @property
    def last_coef(self) -> list[float]:
        """The coefficients as last solved (no solve): for checks that a sample's lag does not change."""
        return self._coef

    def _solve_on(self, free: list[int]) -> list[float] | None:
        """The ridge solution with the coefficients outside `free` held at 0 (None: singular)."""
        n = len(free)
        scale = max(self.xx[r][r] for r in range(self.n)) or 1.0
        # the ridge pulls every coefficient but the first (the intercept) toward 0: where the samples cannot
        # tell a term from the constant (every recent step at one shape, the older ones decayed away) the
        # constant takes the step's time and the slopes read 0, so the extrapolation errs cheap and a step at
        # another shape measures it. A ridge on the intercept too split the time by size instead: after ~2000
        # plain steps at batch 8 the fit read 0.1 ms fixed + 0.8 ms per token, a K=4 step looked 5x dearer
        # than it was, and the batch never drafted again to show otherwise
        a = [[self.xx[r][c] + (self.ridge * scale if r == c and r != 0 else 0.0) for c in free] + [self.xy[r]]
             for r in free]
        for col in range(n):  # Gauss-Jordan with partial pivoting; n <= 4
            piv = max(range(col, n), key=lambda r: abs(a[r][col]))
            if abs(a[piv][col]) < 1e-300:
                return None
            a[col], a[piv] = a[piv], a[col]
            for r in range(n):
                if r != col:
                    f = a[r][col] / a[col][col]
                    a[r] = [a[r][c] - f * a[col][c] for c in range(n + 1)]
        out = [0.0] * self.n
        for i, r in enumerate(free):
            out[r] = a[i][n] / a[i][i]
        return out

    def _sse(self, c: list[float]) -> float:
        n = self.n
        return (self.yy - 2.0 * sum(c[r] * self.xy[r] for r in range(n))
                + sum(c[r] * self.xx[r][q] * c[q] for r in range(n) for q in range(n)))

    def _solve(self) -> list[float]:
        self.held = frozenset(self.conditional) if self.conditional and not self.identified() else frozenset()
        base = [r for r in range(self.n) if r not in self.held]
        full = self._solve_on(base)
        if full is not None and all(full[i] >= -_ROUNDING for i in self.nonneg):
            return full
        # the constrained optimum has some of the nonneg coefficients at 0: the best feasible fit over the ways
        # of holding them there (n <= 4: at most 15 small solves, and only when the free fit breaks a bound)
        best = None
        nonneg = [i for i in self.nonneg if i not in self.held]
        m = len(nonneg)
        # fewest terms held first, the intercept last: on a tie (samples that cannot tell the terms apart) the
        # earlier wins, so the step's time goes to the constant, not to a slope (see _solve_on's ridge)
        masks = sorted(range(1, 1 << m), key=lambda mk: (0 in {nonneg[j] for j in range(m) if mk >> j & 1},
                                                         bin(mk).count("1"), mk))
        for mask in masks:
            held = {nonneg[j] for j in range(m) if mask >> j & 1}
            c = self._solve_on([r for r in base if r not in held])
            if c is None or any(c[i] < -_ROUNDING for i in self.nonneg):
                continue
            e = self._sse(c)
            if best is None or e < best[0] * (1 - 1e-9) - 1e-300:
                best = (e, c)
        return best[1] if best is not None else (full if full is not None else self._coef)

    def predict(self, x: list[float]) -> float:
        return sum(c * v for c, v in zip(self.coef, x))


class CostModel:
    """Seconds of a verify step by requests and scheduled tokens, and of a draft round by (rows drafted,
    longest draft).

    A verify step costs v0 + vr * (requests - 1) + vt * tokens + v2 [anyone drafts]. Requests and tokens are
    separate terms because a request costs more than its tokens: the scheduler, the sampler and the output
    path (detokenising, streaming) work per request per step, whatever it verifies. With tokens alone a plain
    step's growth with the batch was charged to every token: an API server at concurrency 8 (trained pair,
    this CPU) measured 4.9 ms at 1 request and 6.0 ms at 8, i.e. 0.15 ms a request, against 0.11 ms a draft
    token from its drafting steps; the one-term fit put a draft token at 0.17 ms, predicted 17.9 ms for the
    batch at K=4 where 14.7 ms was measured, and the chooser held the batch at 0 drafts for most of the run
    (0.93x no speculation) where fixed K=4 gave 1.26-1.61x. vr needs two batch sizes timed: at one batch
    size the requests column is constant, and a fit free to split the step's fixed cost
    between v0 and vr extrapolates to other sizes at random; and where every step is plain, or drafts the same
    number of tokens, requests and tokens move together. So vr is fitted only while the samples tell all four
    terms apart (DecayedLeastSquares.identified), else held at 0: the three-term model."""

    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        # [1, requests - 1, tokens, step carries drafts]: every term a cost, none negative
        self.verify = DecayedLeastSquares(4, cfg.cost_decay, nonneg=(0, 1, 2, 3), skip_first=True)
        self.verify.conditional = (1,)
        # [1, c, B * c]: the per-row term a cost; the round's fixed and per-step terms may trade off (a compiled
        # round's time is not linear in its length)
        self.draft = DecayedLeastSquares(3, cfg.cost_decay, nonneg=(2,), skip_first=True)

    def observe_verify(self, tokens: int, seconds: float, drafts: int = 0) -> None:
        """A decode step that scheduled `tokens` tokens, `drafts` of them draft tokens (so tokens - drafts
        requests), took `seconds`."""
        rows = max(int(tokens) - int(drafts), 1)
        self.verify.add([1.0, float(rows - 1), float(tokens), 1.0 if drafts > 0 else 0.0], seconds)

    def observe_draft(self, rows: int, c: int, seconds: float) -> None:
        self.draft.add([1.0, float(c), float(rows * c)], seconds)

    def ready(self) -> bool:
        m = self.cfg.min_samples
        return (self.verify.count >= m and len(self.verify.distinct) >= 2 and self.draft.count >= m)

    def verify_terms(self, lagged: bool = False) -> tuple[float, float, float, float]:
        """(v0, vr, vt, v2): fixed, per request beyond the first, per token, drafting overhead (seconds)."""
        v0, vr, vt, v2 = self.verify.last_coef if lagged else self.verify.coef
        return max(v0, 0.0), max(vr, 0.0), max(vt, 1e-12), max(v2, 0.0)  # a token never costs nothing or less

    def verify_coef(self, rows: int = 1) -> tuple[float, float, float]:
        """The choosers' view for a batch of `rows` requests: (fixed, per token, drafting overhead)."""
        v0, vr, vt, v2 = self.verify_terms()
        return v0 + vr * max(rows - 1, 0), vt, v2

    def predict_verify(self, tokens: int, drafts: int = 0, lagged: bool = False) -> float:
        """A decode step of `tokens` tokens, `drafts` of them drafts. lagged: from the coefficients as last
        solved, without solving (a check that a few samples' lag does not change, made every step)."""
        v0, vr, vt, v2 = self.verify_terms(lagged)
        return v0 + vr * max(tokens - drafts - 1, 0) + vt * tokens + (v2 if drafts > 0 else 0.0)

    def draft_coef(self) -> tuple[float, float, float]:
        d0, d1, d2 = self.draft.coef
        return d0, d1, max(d2, 0.0)

    def predict_step(self, lengths: list, round_len: int | None = None) -> float:
        """Seconds of a step whose requests draft `lengths` [B]: verify plus the draft round (a compiled round
        runs round_len steps for any longest draft above 1; a 1-token round has a one-step graph of its own)."""
        n = sum(lengths)
        t = self.predict_verify(len(lengths) + n, n)
        if n:
            d0, d1, d2 = self.draft_coef()
            L = max(lengths) if (not round_len or max(lengths) == 1) else round_len
            t += max(d0 + d1 * L + d2 * (len(lengths) - lengths.count(0)) * L, 0.0)
        return t

    def snapshot(self) -> dict:
        v0, vr, v1, v2 = self.verify_terms()
        return {"verify_s_per_step": v0, "verify_s_per_request": vr, "verify_s_per_token": v1,
                "verify_s_spec_overhead": v2,
                "draft_coef": list(self.draft_coef()),
                "verify_samples": self.verify.count, "draft_samples": self.draft.count}


@dataclass
class _Counts:
    acc: list
    tried: list

    @classmethod
    def zeros(cls, k: int) -> "_Counts":
        return cls([0.0] * k, [0.0] * k)

    def observe(self, drafted: int, accepted: int, decay: float) -> None:
        # positions 1..accepted were accepted, accepted+1 rejected (if drafted further); later ones unseen
        for j in range(min(drafted, accepted + 1)):
            self.acc[j] = decay * self.acc[j] + (1.0 if j < accepted else 0.0)
            self.tried[j] = decay * self.tried[j] + 1.0


class AcceptanceStats:
    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        self.engine = _Counts.zeros(cfg.max_k)
        self.requests: dict = {}
        # between requests: decayed weight, sum and sum of squares of departed requests' own drafting gains
        # (expected accepted tokens of a full-length draft, from their own counts), and the sum of those
        # estimates' sampling variances, and of those variances times the observations behind them
        self._spread = [0.0, 0.0, 0.0, 0.0, 0.0]

    def observe(self, key, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        accepted = max(0, min(accepted, drafted))
        self.engine.observe(drafted, accepted, self.cfg.global_decay)
        self.requests.setdefault(key, _Counts.zeros(self.cfg.max_k)).observe(drafted, accepted,
                                                                               self.cfg.request_decay)

    def engine_rates(self) -> list[float]:
        # before any observation: an optimistic prior, so a new engine drafts (and learns)
        return [(a + 0.7) / (t + 1.0) for a, t in zip(self.engine.acc, self.engine.tried)]

    def rates(self, key, prior: list[float] | None = None, weight: float | None = None) -> list[float]:
        prior = prior or self.engine_rates()
        c = self.requests.get(key)
        if c is None:
            return prior
        w = self.cfg.prior_weight if weight is None else weight
        return [(a + w * p) / (t + w) for a, t, p in zip(c.acc, c.tried, prior)]

    def observed(self, key) -> float:
        """How many observations of the request its counts hold (decayed: at most 1 / (1 - request_decay))."""
        c = self.requests.get(key)
        return c.tried[0] if c is not None else 0.0

    def gain_spread(self) -> float | None:
        """The standard deviation, between requests, of the true drafting gain (expected accepted tokens of a
        full-length draft): that of the gains estimated from departed requests' own counts, less what those
        estimates' sampling noise adds (a request's counts hold a few observations, and the noise alone made a
        spread of ~0.6 tokens where requests differ less). From requests that left with at least
        `spread_min_observations` observations; None until `spread_min_requests` such requests have left."""
        w, s1, s2, noise, _ = self._spread
        if w < self.cfg.spread_min_requests:
            return None
        m = s1 / w
        return math.sqrt(max(s2 / w - m * m - noise / w, 0.0))

    def prior_weight(self) -> float:
        """How many observations of a request the engine-wide rates count as (PolicyConfig.prior_weight_max)."""
        lo, hi = self.cfg.prior_weight, self.cfg.prior_weight_max
        sd = self.gain_spread()
        if sd is None or hi <= lo:
            return lo
        w, _, _, _, noise1 = self._spread
        per_obs = noise1 / w  # the gain's sampling variance from one observation
        return hi if sd * sd * hi <= per_obs else max(lo, per_obs / (sd * sd))

    def _record_gain(self, c: "_Counts") -> None:
        if c.tried[0] < self.cfg.spread_min_observations:
            return
        prior = self.engine_rates()
        r = [a / t if t >= 0.5 else e for a, t, e in zip(c.acc, c.tried, prior)]  # rarely reached: the engine's
        P = reach_probabilities(r)
        g = sum(P)
        # sampling variance of g (delta method): dg/dr_l = sum_{j >= l} P_j / r_l, var r_l = q (1 - q) / n_l with q
        # the rate smoothed toward 1/2 (a position seen once, accepted, has r = 1 and no plug-in variance)
        var = 0.0
        for j, (x, a, t) in enumerate(zip(r, c.acc, c.tried)):
            if t >= 0.5 and 0.0 < x:
                q = (a + 0.5) / (t + 1.0)
                var += (sum(P[j:]) / x) ** 2 * q * (1.0 - q) / t
        d = self.cfg.spread_decay
        w, s1, s2, noise, noise1 = self._spread
        self._spread = [d * w + 1.0, d * s1 + g, d * s2 + g * g, d * noise + var, d * noise1 + var * c.tried[0]]

    def forget(self, keys) -> None:
        for k in keys:
            c = self.requests.pop(k, None)
            if c is not None:
                self._record_gain(c)


def reach_probabilities(rates: list[float]) -> list[float]:
    """P_j = a_1 * ... * a_j: the chance a draft's position j is accepted, from conditional rates a_j [K]."""
    out, p = [], 1.0
    for a in rates:
        p *= a
        out.append(p)
    return out


def expected_max_normal(n: int) -> float:
    """E[max of n standard normals] (Blom's approximation; 0 for n = 1, 1.03 for 4, 1.77 for 16)."""
    if n <= 1:
        return 0.0
    from statistics import NormalDist

    return NormalDist().inv_cdf((n - 0.375) / (n + 0.25))


def slowest_of_batch(rates: list[list[float]], observed: list[float], spread: float,
                     prior_weight: float) -> list[list[float]]:
    """Per-request rates [B][K] whose drafting gain (sum_j P_ij) is the request's estimate less
    z_B x spread x sqrt(prior_weight / (prior_weight + observed_i)), z_B = expected_max_normal(B): what the
    slowest of B requests with these posteriors is expected to get, for choose_closed_batch. The gain is scaled
    at every position alike (through the first conditional rate), so a request's shape is kept."""
    z = expected_max_normal(len(rates))
    out = []
    for r, n in zip(rates, observed):
        g = sum(reach_probabilities(r))
        sd = spread * math.sqrt(prior_weight / (prior_weight + max(n, 0.0)))
        f = max(0.0, 1.0 - z * sd / g) if g > 0 else 0.0
        out.append([r[0] * f] + list(r[1:]) if r else [])
    return out


def choose_closed_batch(rates: list[list[float]], caps: list[int], remaining: list[int], verify, draft,
                        max_k: int, round_len: int | None = None) -> tuple[list[int], float]:
    """Draft lengths [B] for a closed batch (nothing waits to take a finished request's place), and the
    expected tokens per second of the rest of the batch: it lasts as long as its slowest request, so this
    minimises M x T(k), M the steps until the last request ends and T(k) the step time.

    Drafting k_i keeps request i at g_i(k_i) = 1 + sum_{j <= k_i} P_ij tokens a step, so it ends after
    R_i / g_i(k_i) steps (R_i: its remaining tokens, at most). For each candidate M (every R_i / g_i(k)) each
    request takes the smallest k_i that ends it by M, and the cheapest M x T(k) wins; plain decoding
    (M = max R_i) is the candidate to beat. A request that ends early anyway drafts nothing, and drafts that
    cannot bring the batch's end forward are not worth their step time, whatever they give the requests
    that make them.

    Measured before (trained pair, batch 16, 128 tokens, one batch at a time on a 2-core CPU), choosing by
    tokens per second of the step: the chooser drafted where the batch-wide rate promised 2-20 % more, each
    such round took ~2.5 plain steps, and the batch ended no sooner (127.7 engine steps against 128): the
    requests that drafted got ahead and the rest ended when they would have. Fixed K=4 there: 90 steps a
    batch where its mean acceptance length (3.16) promised 40."""
    import numpy as np

    B = len(rates)
    if B == 0:
        return [], 0.0
    v0, v1 = verify[0], verify[1]
    v2 = verify[2] if len(verify) > 2 else 0.0
    d0, d1, d2 = draft
    caps_a = np.minimum(np.maximum(np.asarray(caps, dtype=np.int64), 0), max_k)  # [B]
    r = np.clip(np.asarray([list(x[:max_k]) + [0.0] * (max_k - len(x[:max_k])) for x in rates], dtype=np.float64),
                0.0, 1.0)  # [B, K]
    g = np.ones((B, max_k + 1))
    g[:, 1:] += np.cumsum(np.cumprod(r, axis=1), axis=1)  # [B, K+1]: tokens a step with k drafts
    R = np.maximum(np.asarray(remaining, dtype=np.float64), 1.0)  # [B]
    ks = np.arange(max_k + 1)
    finish = np.where(ks[None, :] <= caps_a[:, None], R[:, None] / g, np.inf)  # [B, K+1]: steps to the end

    def step_time(k):  # k [C, B] -> [C]
        n = k.sum(-1)
        c = k.max(-1)
        rows = (k > 0).sum(-1)
        L = np.where(c <= 1, c, round_len) if round_len else c
        t = v0 + v1 * (B + n)
        return t + np.where(c > 0, v2 + np.maximum(d0 + d1 * L + d2 * rows * L, 0.0), 0.0)

    plain_M = float(R.max())
    plain_t = float(step_time(np.zeros((1, B), dtype=np.int64))[0])
    total = float(R.sum())
    cands = np.unique(finish[np.isfinite(finish) & (finish < plain_M)])  # [C]
    if cands.size == 0:
        return [0] * B, total / (plain_M * plain_t) if plain_t > 0 else math.inf
    ok = finish[None, :, :] <= cands[:, None, None] * (1 + 1e-12)  # [C, B, K+1]
    feasible = ok.any(-1).all(-1)  # [C]
    k = ok.argmax(-1)  # [C, B]: the smallest k that ends each request by M
    # every request that drafts drafts the longest: by expectation the others would need fewer, but the batch
    # ends with whoever is unlucky, and a draft beyond the expected need costs one verified token (the round
    # runs the longest draft anyway). Trained pair, batch 4: drafting only the expected need (K histogram
    # [61, 32, 278, 287, 362]) gave 0.90x fixed K=4
    k = np.where(k > 0, k.max(-1, keepdims=True), 0)
    k = np.minimum(k, caps_a[None, :])
    cost = np.where(feasible, cands * step_time(k), np.inf)  # [C]
    best = int(cost.argmin())
    if not cost[best] < plain_M * plain_t * (1 - 1e-12):
        return [0] * B, total / (plain_M * plain_t) if plain_t > 0 else math.inf
    return [int(x) for x in k[best]], total / float(cost[best])


def choose_draft_lengths(rates: list[list[float]], caps: list[int], verify: tuple[float, float],
                         draft: tuple[float, float, float], max_k: int,
                         round_len: int | None = None,
                         max_slowdown: float | None = None) -> tuple[list[int], float]:
    """Draft lengths [B] maximising expected tokens per second, and that rate.

    max_slowdown: when set, no request that may draft (cap > 0) is expected to get its tokens slower than
    (1 - max_slowdown) x what a step without drafts would give it. Without it the batch's rate alone decides,
    and where each draft costs step time (a CPU) a request that accepts little pays for the others' drafts:
    its own token rate drops below plain decoding's, and in a batch that waits for its slowest request the
    whole batch gets slower. With it the choice is the best of the per-c optima and the uniform drafts
    min(c, cap) that keep everyone at speed (all zeros always do).

    rates[i][j]: conditional acceptance of request i at draft position j+1; caps[i]: its limit;
    verify = (v0, v1[, v2]): v0 + v1 * tokens seconds, + v2 when anyone drafts; draft = (d0, d1, d2):
    d0 + d1 * c + d2 * rows * c seconds for a round of longest draft c over `rows` drafting requests.
    round_len: a round whose longest draft c is above 1 runs that many steps whatever c is (a compiled round),
    so its cost does not shrink with c; a 1-token round (probes) runs one step (its own compiled graph)."""
    B = len(rates)
    if B == 0:
        return [], 0.0
    if B == 1:
        return _choose_one(rates[0], caps[0], verify, draft, max_k, round_len)
    import numpy as np

    v0, v1 = verify[0], verify[1]
    v2 = verify[2] if len(verify) > 2 else 0.0
    d0, d1, d2 = draft
    caps_a = np.minimum(np.asarray(caps, dtype=np.int64), max_k)  # [B]
    r = np.clip(np.asarray([list(x[:max_k]) + [0.0] * (max_k - len(x[:max_k])) for x in rates], dtype=np.float64),
                0.0, 1.0)  # [B, K]
    cum = np.zeros((B, max_k + 1))
    cum[:, 1:] = np.cumsum(np.cumprod(r, axis=1), axis=1)  # [B, K+1]: expected accepted tokens with k drafts
    ks_all = np.arange(max_k + 1)
    allowed = ks_all[None, :] <= caps_a[:, None]  # [B, K+1]

    def evaluate(ks):
        e = B + cum[np.arange(B), ks].sum()
        c, rows = int(ks.max()), int((ks > 0).sum())
        L = c if (not round_len or c == 1) else round_len
        t = v0 + v1 * (B + int(ks.sum())) + (v2 + max(d0 + d1 * L + d2 * rows * L, 0.0) if c > 0 and rows else 0.0)
        return e / t if t > 0 else math.inf

    best_ks = np.zeros(B, dtype=np.int64)
    best = evaluate(best_ks)
    # Bound first (most steps of a poor drafter end here, in a few microseconds): no drafting choice can
    # emit more than every request at its cap, nor cost less than one draft token of one request.
    e_max = B + cum[np.arange(B), caps_a].sum()
    lens = sorted({1, round_len}) if round_len else range(1, max_k + 1)
    t_min = v0 + v1 * (B + 1) + v2 + min(max(d0 + d1 * L + d2 * L, 0.0) for L in lens)
    if caps_a.max(initial=0) == 0 or (t_min > 0 and e_max / t_min <= best):
        return [0] * B, best
    floor = None
    if max_slowdown is not None:
        t0 = v0 + v1 * B  # a plain step: each request gets 1 token in t0
        floor = (1.0 - max_slowdown) / t0 if t0 > 0 else 0.0
        guarded = caps_a > 0  # a request with speculation off is not held to it (it asked for plain decoding)

        def feasible(ks):
            if not ks.any():
                return True
            e_i = 1.0 + cum[np.arange(B), ks]  # [B]
            rate = evaluate(ks)  # E / T
            t = (B + cum[np.arange(B), ks].sum()) / rate
            return bool(np.all(~guarded | (e_i / t >= floor)))

        best_feasible, best_feasible_ks = best, best_ks
    per_c = []  # the optimum for each longest draft c
    for c in range(1, max_k + 1):
        L = c if (not round_len or c == 1) else round_len
        ok = allowed & (ks_all[None, :] <= c)
        cost = v1 * ks_all + np.where(ks_all > 0, d2 * L, 0.0)  # [K+1] per-request cost of k drafts
        lam, ks = best, None
        for _ in range(64):  # Dinkelbach: maximise E - lam * T for fixed c, then lam = E / T
            gains = np.where(ok, cum - lam * cost[None, :], -np.inf)
            new = gains.argmax(axis=1)  # first maximum: the smaller k on ties
            if ks is not None and np.array_equal(new, ks):
                break
            ks = new
            lam = evaluate(ks)
        rate = evaluate(ks)
        per_c.append(ks)
        if rate > best * (1 + 1e-12):
            best, best_ks = rate, ks
    if floor is not None and not feasible(best_ks):  # (B = 1: never; the request's rate is the batch's)
        for c, ks in enumerate(per_c, start=1):
            for cand in (ks, np.minimum(caps_a, c)):
                r_c = evaluate(cand)
                if r_c > best_feasible * (1 + 1e-12) and feasible(cand):
                    best_feasible, best_feasible_ks = r_c, cand
        best, best_ks = best_feasible, best_feasible_ks
    return [int(k) for k in best_ks], best


def _choose_one(rate: list[float], cap: int, verify, draft, max_k: int,
                round_len: int | None) -> tuple[list[int], float]:
    """choose_draft_lengths for one request: every k in 0..cap, in plain Python (the batch-1 decision runs
    every step, and numpy's per-call overhead made it ~0.5 ms on a 22 ms step). The slowdown guard never
    binds here: the request's rate is the batch's, and k = 0 is always a candidate."""
    v0, v1 = verify[0], verify[1]
    v2 = verify[2] if len(verify) > 2 else 0.0
    d0, d1, d2 = draft
    cap = max(0, min(int(cap), max_k))
    best_k, best, e, p = 0, None, 1.0, 1.0
    for k in range(cap + 1):
        if k:
            p *= min(max(float(rate[k - 1]) if k - 1 < len(rate) else 0.0, 0.0), 1.0)
            e += p
        L = k if (not round_len or k == 1) else round_len
        t = v0 + v1 * (1 + k) + ((v2 + max(d0 + d1 * L + d2 * L, 0.0)) if k else 0.0)
        r = e / t if t > 0 else math.inf
        if best is None or r > best * (1 + 1e-12):  # the smaller k on ties, as the batch path
            best_k, best = k, r
    return [best_k], best


@dataclass
class StepDecision:
    lengths: list  # [B] draft length per request
    reason: str  # "calibration", "policy", "explore", "probe", "remeasure", "scripted"
    expected_rate: float = 0.0


@dataclass
class DraftPolicy:
    """The per-step decision with its state: acceptance statistics, the cost model, probe counters."""

    cfg: PolicyConfig
    acceptance: AcceptanceStats = None
    costs: CostModel = None
    steps: int = 0
    last: dict = field(default_factory=dict)  # request -> the step it last drafted in (first seen: the step before)
    wait: dict = field(default_factory=dict)  # request -> steps at 0 before its next probe (backoff)
    drafted: dict = field(default_factory=dict)  # request -> steps the chooser (not a probe) drafted for it
    probes: int = 0  # request-steps that were probes
    since_plain: int = 0  # steps since the last step in which nobody drafted
    explored: int = 0  # steps forced to 0 drafts to re-measure a plain step
    chosen_hist: list = None  # how often each k was chosen, per request-step
    skipped_rounds: int = 0  # steps where no request drafted
    observations: int = 0  # acceptance observations so far (what a held all-zero answer depends on)
    held_zero: int = 0  # steps that reused the all-zero answer without running the chooser
    _zero_answer: tuple = None  # ((keys, caps, observations), step, rate, cost signature) of the last all-zero choice
    _probe_due: int = 0  # the first step at which some request's probe is due (held steps stop there)
    probe_allowance: float = None  # seconds of step time probes may still spend (probe_budget)
    probes_deferred: int = 0  # times due probes were put off until the allowance covers them
    spec_batch: int = 0  # batch size of the latest step with a multi-token draft (the cost model's last look)
    spec_sizes: dict = field(default_factory=dict)  # batch size -> the latest step with a multi-token draft at it
    _batch: tuple = ((), 0)  # the requests of the latest policy step and the step they first ran together
    remeasures: int = 0  # full-length steps run because the batch size moved far from every size in spec_sizes
    closed_decisions: int = 0  # chooser runs that valued progress by when a closed batch ends
    probed: dict = field(default_factory=dict)  # request -> the step of its last probe
    new_wait: int = 0  # a new request's first wait (new_request_wait_max; 0: probe_every)
    _unaccrued: tuple = (0, 0)  # (steps, batch size) held by take_held since the allowance was last added

    def __post_init__(self):
        self.acceptance = self.acceptance or AcceptanceStats(self.cfg)
        self.costs = self.costs or CostModel(self.cfg)
        self.chosen_hist = self.chosen_hist or [0] * (self.cfg.max_k + 1)
        self.new_wait = self.new_wait or self.cfg.probe_every

    def _accrue(self, B: int) -> None:
        """This step's probe allowance, and that of the held steps since the last decision (take_held)."""
        b = self.cfg.probe_budget
        n_held, B_held = self._unaccrued
        self._unaccrued = (0, 0)
        if b is None:
            return
        inc = b * self.costs.predict_verify(B)  # a plain step's share: what probes are measured against
        if n_held:
            inc += n_held * b * self.costs.predict_verify(B_held)
        cap = b * self.costs.predict_verify(B) * self.cfg.probe_budget_horizon
        self.probe_allowance = min(cap if self.probe_allowance is None else self.probe_allowance + inc, cap)

    def take_held(self, B: int) -> StepDecision:
        """The next step, for a caller that holds_zero() just answered True for: the held all-zero answer,
        with the bookkeeping a decision does, in O(1) (no cost model read; the probe allowance of these steps
        is added at the next decision)."""
        self.steps += 1
        return self._held_step(B)

    def _held_step(self, B: int) -> StepDecision:
        n, _ = self._unaccrued
        self._unaccrued = (n + 1, B)
        self.held_zero += 1
        self.chosen_hist[0] += B
        self.skipped_rounds += 1
        self.since_plain = 0
        return StepDecision([0] * B, "policy", self._zero_answer[2])

    def _clip_caps(self, caps) -> list[int]:
        K = self.cfg.max_k
        return list(caps) if not caps or (min(caps) >= 0 and max(caps) <= K) else [max(0, min(int(c), K))
                                                                                    for c in caps]

    def _phase(self, s: int) -> str:
        """What step `s` is: "calibration", "explore" or "policy" (the chooser's)."""
        K = self.cfg.max_k
        if s <= (self.cfg.calibration_steps or 4 * (K + 1)) or not self.costs.ready():
            return "calibration"
        return "explore" if self.since_plain >= self.cfg.explore_every else "policy"

    def _cost_signature(self, B: int) -> tuple[float, ...]:
        """What the cost model predicts for a batch of B: a plain step, what drafting adds per token and per
        step, and a round's terms at full length, all in seconds (compared against a plain step's time)."""
        v0, v1, v2 = self.costs.verify_coef(B)
        d0, d1, d2 = self.costs.draft_coef()
        K = self.cfg.max_k
        return (v0 + v1 * B, v1 * B * K, v2, d0, d1 * K, d2 * B * K)

    def _held_answer(self, keys, caps: list[int], s: int) -> bool:
        """The last all-zero choice still stands at step `s`: same requests and caps, no new acceptance, and
        younger than zero_recheck_every steps, or than zero_hold_max while the costs have not moved."""
        za = self._zero_answer
        if za is None or za[0] != (tuple(keys), tuple(caps), self.observations):
            return False
        age = s - za[1]
        if age < self.cfg.zero_recheck_every:
            return True
        if age >= self.cfg.zero_hold_max:
            return False
        if age % self.cfg.zero_recheck_every:
            return True  # the costs are compared every zero_recheck_every steps (each check solves the model)
        then, now = za[3], self._cost_signature(len(keys))
        return sum(abs(a - b) for a, b in zip(now, then)) <= self.cfg.zero_hold_cost_tol * max(then[0], 1e-9)

    def decide(self, keys: list, caps: list[int], round_len: int | None = None,
               remaining: list[int] | None = None) -> StepDecision:
        """remaining: each request's tokens still to generate (at most), given when the batch is closed -
        nothing waits for a finished request's place - so the chooser values progress by when the batch
        ends (choose_closed_batch); None: every token counts alike (requests waiting, or arriving)."""
        K = self.cfg.max_k
        caps = self._clip_caps(caps)
        self.steps += 1
        deferred_until = None  # set when due probes wait for the allowance (probe_budget)
        phase = self._phase(self.steps)
        if phase == "calibration":
            k = self.steps % (K + 1)  # every draft length, so both cost models see variety
            lengths, reason, rate = [min(k, c) for c in caps], "calibration", 0.0
        elif phase == "explore":
            # A policy that always drafts stops seeing what a plain step costs, and its estimate of that
            # drifts with the other terms (they are fitted together): one plain step now and then keeps the
            # comparison the chooser makes honest. Costs at most 1/explore_every of the drafting gain.
            lengths, reason, rate = [0] * len(caps), "explore", 0.0
            self.explored += 1
        else:
            za, sig = self._zero_answer, (tuple(keys), tuple(caps), self.observations)
            held = self._held_answer(keys, caps, self.steps)
            if held and self.steps < self._probe_due:
                # nothing the chooser reads has changed and no probe is due: the step costs O(1) Python
                # beyond building the answer (a zero-accept batch of 64 spends most steps here)
                return self._held_step(len(keys))
            self._accrue(len(keys))
            if held:
                lengths, rate = [0] * len(caps), za[2]
                self.held_zero += 1
            else:
                prior = self.acceptance.engine_rates()
                closed = remaining is not None and len(keys) > 1
                w = self.acceptance.prior_weight() if closed else None
                rates = [self.acceptance.rates(key, prior, w) for key in keys]
                if closed:
                    spread = self.acceptance.gain_spread()
                    if spread:
                        rates = slowest_of_batch(rates, [self.acceptance.observed(key) for key in keys], spread, w)
                    lengths, rate = choose_closed_batch(rates, caps, remaining, self.costs.verify_coef(len(keys)),
                                                        self.costs.draft_coef(), K, round_len)
                    self.closed_decisions += 1
                else:
                    lengths, rate = choose_draft_lengths(rates, caps, self.costs.verify_coef(len(keys)),
                                                         self.costs.draft_coef(), K, round_len, self.cfg.max_slowdown)
                self._zero_answer = (None if any(lengths) else
                                     (sig, self.steps, rate, self._cost_signature(len(keys))))
            reason = "policy"
            base = self.cfg.probe_every
            rw = self.cfg.resume_wait
            for i, key in enumerate(keys):
                if lengths[i] > 0:  # the chooser drafts for it: probes start over when it stops
                    if self.steps - self.probed.get(key, -10) <= 2:
                        self.new_wait = base  # its probe paid: new requests probe after probe_every again
                    n = self.drafted[key] = self.drafted.get(key, 0) + 1
                    if rw is not None and n >= self.cfg.resume_after:
                        self.wait[key] = min(rw, base)
                    else:
                        self.wait.pop(key, None)
            s = self.steps
            for key in keys:
                if key not in self.last:
                    self.last[key] = s - 1
                    if self.new_wait > base:
                        self.wait.setdefault(key, self.new_wait)
            # idle: steps at 0 drafts since the request last drafted
            zero = [i for i, key in enumerate(keys) if lengths[i] == 0 and caps[i] > 0]
            if any(s - 1 - self.last[keys[i]] >= self.wait.get(keys[i], base) for i in zero):
                # every request past half its wait, the most overdue first
                due = sorted((i for i in zero if 2 * (s - 1 - self.last[keys[i]]) >= self.wait.get(keys[i], base)),
                             key=lambda i: -(s - 1 - self.last[keys[i]]) / self.wait.get(keys[i], base))
                n = len(due)
                if self.cfg.probe_budget is not None:
                    # all of them in one round when the allowance covers it (the round's fixed cost is paid
                    # once), else wait for it; only a probe dearer than the allowance can ever hold goes in part
                    t0 = self.costs.predict_step(lengths, round_len)
                    extra = []  # [n]: what probing the first n + 1 costs beyond the chosen step
                    trial = list(lengths)
                    for i in due:
                        trial[i] = 1
                        extra.append(self.costs.predict_step(trial, round_len) - t0)
                    per_step = self.cfg.probe_budget * self.costs.predict_verify(len(keys))
                    cap = per_step * self.cfg.probe_budget_horizon
                    if extra[-1] > self.probe_allowance:
                        n = (sum(1 for e in extra if e <= self.probe_allowance) if extra[-1] > cap
                             and self.probe_allowance >= 0.99 * cap else 0)
                    if n:
                        self.probe_allowance -= extra[n - 1]
                    else:
                        short = min(extra[-1], cap) - self.probe_allowance
                        deferred_until = s + 1 + (int(short / per_step) if per_step > 0 else 0)
                        self.probes_deferred += 1
                for i in due[:n]:
                    key = keys[i]
                    w = self.wait.get(key, base)
                    lengths[i] = 1
                    reason = "probe"
                    self.probes += 1
                    self.probed[key] = s
                    self.wait[key] = min(2 * w, base * self.cfg.probe_backoff_max)
                if n:
                    self.new_wait = min(2 * self.new_wait, base * self.cfg.new_request_wait_max)
            B, f = len(keys), self.cfg.remeasure_factor
            if tuple(keys) != self._batch[0]:
                self._batch = (tuple(keys), self.steps)
            # only a batch that has stood for remeasure_after steps: a batch of new requests fills over its
            # first steps (the front end adds them one by one), and each size on the way counted as a move
            # (zero-accept pair: ~2 full-length steps per batch of 128 steps, 9 % of the time at batch 4)
            far = (f and self.spec_sizes and not any(lengths) and max(caps, default=0) > 1
                   and not any(b * f > B and B * f > b and self.steps - t <= self.cfg.remeasure_every
                               for b, t in self.spec_sizes.items()))
            if far and self.steps - self._batch[1] < self.cfg.remeasure_after:
                self._zero_answer = None  # not held: decided again next step, until the batch has stood
            elif far:
                # the batch size moved far from where a multi-token draft was last timed: the fit's split of a
                # drafting step's cost between its tokens and its fixed part is an extrapolation here (after
                # batch 1, where a step either drafts K or nothing, it put a draft token at 0.38 ms against
                # 0.04 measured, and a batch of 4 stayed plain for 375 steps where K=4 gives 1.48x). One step
                # at full length measures it
                lengths = [min(K, c) for c in caps]
                reason = "remeasure"
                self.remeasures += 1
                self._zero_answer = None
        s = self.steps
        if max(lengths, default=0) > 1:
            self.spec_batch = len(keys)
            self.spec_sizes[len(keys)] = s
        for key, k in zip(keys, lengths):
            if k > 0:
                self.last[key] = s
            else:
                self.last.setdefault(key, s - 1)
            self.chosen_hist[k] += 1
        # a request at 0 is due when s - 1 - last >= its wait; those that drafted now count from now
        base = self.cfg.probe_every
        self._probe_due = min((self.last[key] + 1 + self.wait.get(key, base)
                               for key, c in zip(keys, caps) if c > 0), default=math.inf)
        if deferred_until is not None:
            self._probe_due = max(self._probe_due, deferred_until)
        if not any(lengths):
            self.skipped_rounds += 1
            self.since_plain = 0
        else:
            self.since_plain += 1
        return StepDecision(lengths, reason, rate)

    def holds_zero(self, keys: list, caps: list[int]) -> bool:
        """Whether the next decide() for these requests will reuse the held all-zero answer (every request at 0,
        nothing it reads changed, no probe due), so a caller may skip preparing anything else for the step."""
        s = self.steps + 1
        return (s < self._probe_due and self._held_answer(keys, self._clip_caps(caps), s)
                and self._phase(s) == "policy")

    def observe(self, key, drafted: int, accepted: int) -> None:
        """What the request's last drafts showed: `accepted` of `drafted` were accepted."""
        self.acceptance.observe(key, drafted, accepted)
        if drafted <= 0:
            return
        self.observations += 1

    def forget(self, keys) -> None:
        self.acceptance.forget(keys)
        for k in keys:
            self.last.pop(k, None)
            self.wait.pop(k, None)
            self.drafted.pop(k, None)
            self.probed.pop(k, None)


class ScriptedPolicy(DraftPolicy):
    """A fixed schedule of draft lengths (step -> length for every request), for tests and bisecting; the
    cost model and acceptance statistics still learn, so their reporting stays live."""

    def __init__(self, cfg: PolicyConfig, schedule: list[int]):
        super().__init__(cfg)
        self.schedule = list(schedule)

    def decide(self, keys: list, caps: list[int], round_len: int | None = None,
               remaining: list[int] | None = None) -> StepDecision:
        k = self.schedule[self.steps % len(self.schedule)]
        self.steps += 1
        lengths = [max(0, min(k, int(c), self.cfg.max_k)) for c in caps]
        for n in lengths:
            self.chosen_hist[n] += 1
        if not any(lengths):
            self.skipped_rounds += 1
        return StepDecision(lengths, "scripted")
