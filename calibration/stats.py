"""Per-layer statistics of per-call activation amax, built only from exactly mergeable sufficient statistics.

Why: calibration accumulates over prompts, ComfyUI restarts, processes and machines. Every quantity kept here can be
combined pairwise so that ``merge(record(A), record(B)) == record(A + B)``:

* count, exact min and max, a count of non-finite values;
* central moments (n, mean, M2, M3, M4) combined with the pairwise formulas of Chan et al. / Pébay (2008) — equal to
  the one-pass result to floating-point rounding, and numerically stable when the mean is large against the spread
  (raw power sums are not: cross_attn.q has amax ~50 with a coefficient of variation of 0.002);
* the integer log-histogram of :mod:`.histogram` (exact), giving any percentile, clip fractions and the outlier
  fraction later;
* per (cond, step) buckets with count/mean/M2, min, max and a coarse (16 bins/octave) histogram, for the
  amax-vs-step plots and per-cond summaries. ``buckets`` hold whole calls (they partition the layer's calls, so
  merging them over all keys gives the layer totals); ``chunk_buckets`` hold per cond/uncond *chunks* of batched
  calls (``add_chunk``): they describe the same calls again, split by cond, and are never added to the totals;
* the calls per logged quantization format and, for layers that already ran with a static ``input_scale``
  ('provided' lines of the original log), the provided scale values with their counts.

The outlier fraction ``|x - mean| > 3·std`` is computed from the histogram: bins entirely beyond the thresholds count
fully, the bin straddling a threshold counts in proportion to the log-width beyond it. The error is at most the
count of the two straddling bins (each 0.27 % wide), i.e. well below one call per thousand for realistic spreads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .histogram import BINS_PER_OCTAVE, MAX_EXP, MIN_EXP, STEP_BINS_PER_OCTAVE, LogHistogram, bin_indices


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Moments:
    """Count, mean and central moment sums M2..M4 (sums of (x-mean)^k), mergeable pairwise."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    @classmethod
    def from_values(cls, x: np.ndarray) -> Moments:
        """Two-pass moments of a batch (float64)."""
        x = np.asarray(x, dtype=np.float64).ravel()
        n = int(x.size)
        if n == 0:
            return cls()
        if n == 1:
            return cls(1, float(x[0]), 0.0, 0.0, 0.0)
        mean = float(x.mean())
        d = x - mean
        d2 = d * d
        return cls(n, mean, float(d2.sum()), float((d2 * d).sum()), float((d2 * d2).sum()))

    def merge(self, other: Moments) -> Moments:
        """Pairwise combination (Pébay 2008, eq. 3.1 and the M3/M4 updates)."""
        na, nb = self.n, other.n
        if nb == 0:
            return Moments(self.n, self.mean, self.m2, self.m3, self.m4)
        if na == 0:
            return Moments(other.n, other.mean, other.m2, other.m3, other.m4)
        n = na + nb
        delta = other.mean - self.mean
        dn = delta / n
        mean = self.mean + dn * nb
        m2 = self.m2 + other.m2 + delta * dn * na * nb
        m3 = (self.m3 + other.m3 + delta * dn * dn * na * nb * (na - nb)
              + 3.0 * dn * (na * other.m2 - nb * self.m2))
        m4 = (self.m4 + other.m4 + delta * dn * dn * dn * na * nb * (na * na - na * nb + nb * nb)
              + 6.0 * dn * dn * (na * na * other.m2 + nb * nb * self.m2)
              + 4.0 * dn * (na * other.m3 - nb * self.m3))
        return Moments(n, mean, m2, m3, m4)

    @property
    def variance(self) -> float | None:
        """Population variance (the original analyzer's convention); None when empty."""
        return max(self.m2, 0.0) / self.n if self.n else None

    @property
    def std(self) -> float | None:
        v = self.variance
        return math.sqrt(v) if v is not None else None

    @property
    def skewness(self) -> float | None:
        if self.n < 2 or self.m2 <= 0:
            return None
        return math.sqrt(self.n) * self.m3 / self.m2 ** 1.5

    @property
    def kurtosis(self) -> float | None:
        """Excess kurtosis n·M4/M2² − 3; None when n < 2 or the variance is 0 (the original wrote NaN)."""
        if self.n < 2 or self.m2 <= 0:
            return None
        return self.n * self.m4 / (self.m2 * self.m2) - 3.0

    def to_json(self) -> dict:
        return {"n": self.n, "mean": self.mean, "m2": self.m2, "m3": self.m3, "m4": self.m4}

    @classmethod
    def from_json(cls, d: dict) -> Moments:
        m = cls(int(d["n"]), float(d["mean"]), float(d["m2"]), float(d["m3"]), float(d["m4"]))
        if m.n < 0 or not all(math.isfinite(v) for v in (m.mean, m.m2, m.m3, m.m4)):
            raise ValueError("moments must be finite with n >= 0")
        return m

    def close_to(self, other: Moments, rtol: float = 1e-9) -> bool:
        """Equality to floating-point tolerance (merge order changes the last bits)."""
        if self.n != other.n:
            return False
        scale2 = max(abs(self.m2), abs(other.m2), 1e-300)
        scale = math.sqrt(scale2 / max(self.n, 1))
        return (math.isclose(self.mean, other.mean, rel_tol=rtol, abs_tol=rtol * scale)
                and math.isclose(self.m2, other.m2, rel_tol=rtol, abs_tol=rtol * scale2)
                and math.isclose(self.m3, other.m3, rel_tol=rtol * 10, abs_tol=rtol * 10 * scale2 ** 1.5)
                and math.isclose(self.m4, other.m4, rel_tol=rtol * 10, abs_tol=rtol * 10 * scale2 * scale2))


@dataclass
class Moments2:
    """Count, mean and M2 only (for step buckets: mean and std are all the plots need)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def merge(self, other: Moments2) -> Moments2:
        na, nb = self.n, other.n
        if nb == 0:
            return Moments2(self.n, self.mean, self.m2)
        if na == 0:
            return Moments2(other.n, other.mean, other.m2)
        n = na + nb
        delta = other.mean - self.mean
        return Moments2(n, self.mean + delta * nb / n, self.m2 + other.m2 + delta * delta * na * nb / n)

    @property
    def std(self) -> float | None:
        return math.sqrt(max(self.m2, 0.0) / self.n) if self.n else None

    def close_to(self, other: Moments2, rtol: float = 1e-9) -> bool:
        if self.n != other.n:
            return False
        scale2 = max(abs(self.m2), abs(other.m2), 1e-300)
        return (math.isclose(self.mean, other.mean, rel_tol=rtol, abs_tol=rtol * math.sqrt(scale2 / max(self.n, 1)))
                and math.isclose(self.m2, other.m2, rel_tol=rtol, abs_tol=rtol * scale2))


@dataclass
class StepBucket:
    """Statistics of the calls of one (cond, step) pair: count/mean/M2, exact min/max, coarse histogram."""

    moments: Moments2 = field(default_factory=Moments2)
    min: float | None = None
    max: float | None = None
    hist: LogHistogram = field(default_factory=lambda: LogHistogram(STEP_BINS_PER_OCTAVE))

    @property
    def count(self) -> int:
        return self.moments.n

    @property
    def mean(self) -> float | None:
        return self.moments.mean if self.moments.n else None

    @property
    def std(self) -> float | None:
        return self.moments.std

    def percentile(self, p: float) -> float | None:
        """Percentile from the coarse histogram (bins 4.4 % wide): for plots, not for scales."""
        if not self.count:
            return None
        return float(self.hist.quantiles([p / 100.0], self.min, self.max)[0])

    def update(self, other: StepBucket) -> None:
        if not other.count:
            return
        self.moments = self.moments.merge(other.moments)
        self.min = other.min if self.min is None else min(self.min, other.min)
        self.max = other.max if self.max is None else max(self.max, other.max)
        self.hist.update(other.hist)

    def copy(self) -> StepBucket:
        return StepBucket(Moments2(self.moments.n, self.moments.mean, self.moments.m2), self.min, self.max,
                          self.hist.copy())

    def same_as(self, other: StepBucket, rtol: float = 1e-9) -> bool:
        return (self.min == other.min and self.max == other.max and self.hist == other.hist
                and self.moments.close_to(other.moments, rtol))


_COARSE_SHIFT = int(math.log2(BINS_PER_OCTAVE // STEP_BINS_PER_OCTAVE))


def _fold_buckets(target: dict, keys: list, x: np.ndarray, fine_idx: np.ndarray, gid: np.ndarray) -> None:
    """Add values grouped by bucket id (index into `keys`) to the buckets in `target`: vectorized per group."""
    order = np.argsort(gid, kind="stable")
    g, xs, ci = gid[order], x[order], fine_idx[order] >> _COARSE_SHIFT
    starts = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1])))
    cnt = np.diff(np.append(starts, g.size))
    means = np.add.reduceat(xs, starts) / cnt
    d = xs - np.repeat(means, cnt)
    m2 = np.add.reduceat(d * d, starts)
    mins = np.minimum.reduceat(xs, starts)
    maxs = np.maximum.reduceat(xs, starts)
    cmin = int(ci.min())
    span = int(ci.max()) - cmin + 1
    comb = np.repeat(np.arange(starts.size, dtype=np.int64), cnt) * span + (ci - cmin)
    uc, cc = np.unique(comb, return_counts=True)
    buckets = []
    for gj, n, mu, v2, lo, hi in zip(g[starts].tolist(), cnt.tolist(), means.tolist(), m2.tolist(),
                                     mins.tolist(), maxs.tolist()):
        key = keys[gj]
        b = target.get(key)
        if b is None:
            b = target[key] = StepBucket()
        b.moments = b.moments.merge(Moments2(n, mu, v2))
        b.min = lo if b.min is None else min(b.min, lo)
        b.max = hi if b.max is None else max(b.max, hi)
        buckets.append(b)
    lo_i = MIN_EXP * STEP_BINS_PER_OCTAVE
    hi_i = MAX_EXP * STEP_BINS_PER_OCTAVE
    for pos, k, c in zip((uc // span).tolist(), (uc % span + cmin).tolist(), cc.tolist()):
        h = buckets[pos].hist
        if k < lo_i:
            h.under += c
        elif k >= hi_i:
            h.over += c
        else:
            h.counts[k] = h.counts.get(k, 0) + c


def _buckets_to_json(buckets: dict) -> dict:
    """Columnar JSON of a bucket dict (one list per field; far smaller than one object per bucket)."""
    keys = sorted(buckets, key=_bucket_sort_key)
    bs = [buckets[k] for k in keys]
    hists = [b.hist.to_json() for b in bs]
    out = {"cond": [k[0] for k in keys], "step": [k[1] for k in keys], "n": [b.moments.n for b in bs],
           "mean": [b.moments.mean for b in bs], "m2": [b.moments.m2 for b in bs], "min": [b.min for b in bs],
           "max": [b.max for b in bs], "hist_index_delta": [h["index_delta"] for h in hists],
           "hist_count": [h["count"] for h in hists]}
    if any(b.hist.under for b in bs):
        out["hist_under"] = [b.hist.under for b in bs]
    if any(b.hist.over for b in bs):
        out["hist_over"] = [b.hist.over for b in bs]
    return out


def _buckets_from_json(d: dict) -> dict:
    if not isinstance(d, dict):
        raise TypeError("buckets must be an object of columns")
    cols = ("cond", "step", "n", "mean", "m2", "min", "max", "hist_index_delta", "hist_count")
    m = len(d["cond"])
    for c in cols + tuple(c for c in ("hist_under", "hist_over") if c in d):
        if not isinstance(d[c], list) or len(d[c]) != m:
            raise ValueError(f"bucket column {c!r} must be a list of {m} entries")
    under, over = d.get("hist_under", [0] * m), d.get("hist_over", [0] * m)
    out: dict = {}
    for i in range(m):
        cond, step = d["cond"][i], d["step"][i]
        if cond is not None and not isinstance(cond, str):
            raise TypeError("bucket cond must be a string or null")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise TypeError("bucket step must be an integer or null")
        if (cond, step) in out:
            raise ValueError(f"duplicate bucket {(cond, step)}")
        hist = LogHistogram.from_json({"bins_per_octave": STEP_BINS_PER_OCTAVE, "index_delta": d["hist_index_delta"][i],
                                       "count": d["hist_count"][i], "under": under[i], "over": over[i]})
        n = int(d["n"][i])
        b = StepBucket(Moments2(n, float(d["mean"][i]), float(d["m2"][i])), _finite_or_none(d["min"][i]),
                       _finite_or_none(d["max"][i]), hist)
        if n <= 0 or hist.total != n or b.min is None or b.max is None or b.min > b.max:
            raise ValueError(f"bucket {(cond, step)} is inconsistent (count, histogram, min/max)")
        out[(cond, step)] = b
    return out


BucketKey = tuple[str | None, int | None]
ANY_COND = object()  # sentinel for LayerStats.steps(): merge all conds


def _key(cond: str | None, step: int | None) -> BucketKey:
    if cond is not None and not isinstance(cond, str):
        raise TypeError(f"cond must be a str or None, got {type(cond).__name__}")
    return (cond, None if step is None else int(step))


def _bucket_sort_key(key: BucketKey) -> tuple:
    cond, step = key
    return (cond is not None, cond or "", step is not None, step if step is not None else -1)


class LayerStats:
    """Everything recorded about one layer's per-call input amax. See the module docstring."""

    __slots__ = ("moments", "min", "max", "nonfinite", "hist", "buckets", "chunk_buckets", "formats", "provided",
                 "approximate")

    def __init__(self) -> None:
        self.moments = Moments()
        self.min: float | None = None
        self.max: float | None = None
        self.nonfinite = 0
        self.hist = LogHistogram(BINS_PER_OCTAVE, track_ranges=True)
        self.buckets: dict[BucketKey, StepBucket] = {}
        self.chunk_buckets: dict[BucketKey, StepBucket] = {}
        self.formats: dict[str, int] = {}
        self.provided: dict[float, int] = {}
        self.approximate = False

    # ------------------------------------------------------------------ recording
    def add(self, amax_values: np.ndarray | list[float] | float, step: int | None = None,
            cond: str | None = None, *, fmt: str | None = None) -> None:
        """Record per-call amax values (one value per forward call), all from the same sampler step and cond.

        Vectorized: 1e5 values take ~10 ms. NaN/Inf are counted in ``nonfinite`` and otherwise ignored;
        negative values are a caller bug and raise ValueError.
        """
        x = np.asarray(amax_values, dtype=np.float64).ravel()
        self.add_grouped(x, np.zeros(x.size, np.int64), [_key(cond, step)], fmt=fmt)

    def add_chunk(self, amax_values: np.ndarray | list[float] | float, step: int | None = None,
                  cond: str | None = None) -> None:
        """Record the amax of one cond/uncond chunk of batched calls: only the chunk buckets see them (the whole
        call was already recorded with `add`)."""
        x = np.asarray(amax_values, dtype=np.float64).ravel()
        self.add_grouped(x, np.zeros(x.size, np.int64), [_key(cond, step)], chunk=True)

    def add_grouped(self, values: np.ndarray, group: np.ndarray, keys: list[BucketKey], *, chunk: bool = False,
                    fmt: str | None = None) -> None:
        """Record many calls at once: ``values[i]`` belongs to bucket ``keys[group[i]]`` (a (cond, step) pair).

        One pass over the layer's values for the totals, one grouped pass for all buckets: what the store uses to
        fold everything recorded since the last save. chunk=True: chunk buckets only (see `add_chunk`)."""
        x = np.asarray(values, dtype=np.float64).ravel()
        gid = np.asarray(group, dtype=np.int64).ravel()
        if x.size != gid.size:
            raise ValueError("values and group must have the same length")
        if x.size == 0:
            return
        finite = np.isfinite(x)
        if not finite.all():
            if not chunk:
                self.nonfinite += int(x.size - np.count_nonzero(finite))
            x, gid = x[finite], gid[finite]
            if x.size == 0:
                return
        lo, hi = float(x.min()), float(x.max())
        if lo < 0:
            raise ValueError("amax values must be >= 0 (got a negative value)")
        idx = bin_indices(x)
        if not chunk:
            self.hist.add_indices(idx, x)
            self.moments = self.moments.merge(Moments.from_values(x))
            self.min = lo if self.min is None else min(self.min, lo)
            self.max = hi if self.max is None else max(self.max, hi)
            if fmt:
                self.formats[fmt] = self.formats.get(fmt, 0) + int(x.size)
        _fold_buckets(self.chunk_buckets if chunk else self.buckets, keys, x, idx, gid)

    def add_provided(self, scale: float, count: int = 1, *, fmt: str | None = None) -> None:
        """Record calls that ran with a static (provided) input_scale: their amax is unknown, the scale is kept."""
        scale = float(scale)
        if not math.isfinite(scale) or count <= 0:
            return
        self.provided[scale] = self.provided.get(scale, 0) + int(count)
        if fmt:
            self.formats[fmt] = self.formats.get(fmt, 0) + int(count)

    # ------------------------------------------------------------------ merging
    def update(self, other: LayerStats) -> None:
        """Add `other` in place (exact for integer parts, float tolerance for moments)."""
        self.moments = self.moments.merge(other.moments)
        if other.min is not None:
            self.min = other.min if self.min is None else min(self.min, other.min)
        if other.max is not None:
            self.max = other.max if self.max is None else max(self.max, other.max)
        self.nonfinite += other.nonfinite
        self.hist.update(other.hist)
        for mine_all, theirs in ((self.buckets, other.buckets), (self.chunk_buckets, other.chunk_buckets)):
            for key, b in theirs.items():
                mine = mine_all.get(key)
                if mine is None:
                    mine_all[key] = b.copy()
                else:
                    mine.update(b)
        for f, c in other.formats.items():
            self.formats[f] = self.formats.get(f, 0) + c
        for v, c in other.provided.items():
            self.provided[v] = self.provided.get(v, 0) + c
        self.approximate = self.approximate or other.approximate

    def merge(self, other: LayerStats) -> LayerStats:
        out = self.copy()
        out.update(other)
        return out

    def copy(self) -> LayerStats:
        out = LayerStats()
        out.moments = Moments(**vars(self.moments))
        out.min, out.max, out.nonfinite = self.min, self.max, self.nonfinite
        out.hist = self.hist.copy()
        out.buckets = {k: b.copy() for k, b in self.buckets.items()}
        out.chunk_buckets = {k: b.copy() for k, b in self.chunk_buckets.items()}
        out.formats = dict(self.formats)
        out.provided = dict(self.provided)
        out.approximate = self.approximate
        return out

    def same_as(self, other: LayerStats, rtol: float = 1e-9) -> bool:
        """Equal up to float rounding of the moments: what `merge == record both` promises."""
        if (self.min != other.min or self.max != other.max or self.nonfinite != other.nonfinite
                or self.hist != other.hist or self.formats != other.formats or self.provided != other.provided
                or set(self.buckets) != set(other.buckets) or set(self.chunk_buckets) != set(other.chunk_buckets)
                or not self.moments.close_to(other.moments, rtol)):
            return False
        for mine, theirs in ((self.buckets, other.buckets), (self.chunk_buckets, other.chunk_buckets)):
            for k, b in mine.items():
                if not b.same_as(theirs[k], rtol):
                    return False
        return True

    # ------------------------------------------------------------------ statistics
    @property
    def count(self) -> int:
        """Finite amax values recorded."""
        return self.moments.n

    @property
    def provided_count(self) -> int:
        return sum(self.provided.values())

    @property
    def mean(self) -> float | None:
        return self.moments.mean if self.count else None

    @property
    def std(self) -> float | None:
        return self.moments.std

    @property
    def kurtosis(self) -> float | None:
        return self.moments.kurtosis

    @property
    def cv(self) -> float | None:
        """Coefficient of variation std/mean (the original's scale_cv); None when undefined."""
        if not self.count or not self.mean:
            return None
        return self.std / self.mean

    def percentiles(self, ps: Iterable[float]) -> np.ndarray:
        """Percentiles (0..100) of the recorded amax, linear-interpolation convention, from the fine histogram."""
        ps = np.asarray(list(ps), dtype=np.float64)
        if not self.count:
            return np.full(ps.shape, np.nan)
        return self.hist.quantiles(ps / 100.0, self.min, self.max)

    def percentile(self, p: float) -> float | None:
        if not self.count:
            return None
        return float(self.percentiles([p])[0])

    def fraction_above(self, threshold: float) -> float:
        """Share of recorded calls whose amax exceeds `threshold` (0 when none recorded)."""
        if not self.count:
            return 0.0
        return self.hist.count_above(float(threshold), self.min, self.max) / self.count

    def outlier_fraction(self, k: float = 3.0) -> float | None:
        """Share of calls with |amax − mean| > k·std, from the histogram (see the module docstring)."""
        if self.count < 2:
            return None
        std = self.std
        if not std:
            return None
        mean = self.mean
        lo = self.hist.count_below(mean - k * std, self.min, self.max)
        hi = self.hist.count_above(mean + k * std, self.min, self.max)
        return (lo + hi) / self.count

    def conds(self) -> list[str]:
        """Cond labels seen (whole calls recorded with a cond, or chunks)."""
        labels = {c for c, _ in self.buckets if c is not None} | {c for c, _ in self.chunk_buckets if c is not None}
        return sorted(labels)

    def steps(self, cond: object = ANY_COND) -> dict[int | None, StepBucket]:
        """Per-step statistics: of all whole calls (default), or of one cond label (its whole calls and chunks)."""
        out: dict[int | None, StepBucket] = {}
        sources = [self.buckets] if cond is ANY_COND else [self.buckets, self.chunk_buckets]
        for buckets in sources:
            for (c, s), b in buckets.items():
                if cond is not ANY_COND and c != cond:
                    continue
                if s in out:
                    out[s].update(b)
                else:
                    out[s] = b.copy()
        return dict(sorted(out.items(), key=lambda kv: (kv[0] is not None, kv[0] if kv[0] is not None else -1)))

    def by_cond(self) -> dict[str, StepBucket]:
        """Per cond label (whole calls with that label plus chunks), merged over steps."""
        out: dict[str, StepBucket] = {}
        for buckets in (self.buckets, self.chunk_buckets):
            for (c, _), b in buckets.items():
                if c is None:
                    continue
                if c in out:
                    out[c].update(b)
                else:
                    out[c] = b.copy()
        return out

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        d: dict = {
            "count": self.count,
            "nonfinite": self.nonfinite,
            "min": self.min,
            "max": self.max,
            "moments": self.moments.to_json(),
            "hist": self.hist.to_json(),
        }
        if self.buckets:
            d["buckets"] = _buckets_to_json(self.buckets)
        if self.chunk_buckets:
            d["chunk_buckets"] = _buckets_to_json(self.chunk_buckets)
        if self.formats:
            d["formats"] = dict(sorted(self.formats.items()))
        if self.provided:
            d["provided"] = [[v, c] for v, c in sorted(self.provided.items())]
        if self.approximate:
            d["approximate"] = True
        return d

    @classmethod
    def from_json(cls, d: dict) -> LayerStats:
        """Inverse of to_json; raises ValueError/TypeError/KeyError on malformed input (the store names the file)."""
        if not isinstance(d, dict):
            raise TypeError("layer entry must be an object")
        s = cls()
        s.moments = Moments.from_json(d["moments"])
        s.min, s.max = _finite_or_none(d.get("min")), _finite_or_none(d.get("max"))
        s.nonfinite = int(d.get("nonfinite", 0))
        s.hist = LogHistogram.from_json(d["hist"])
        if s.hist.bins_per_octave != BINS_PER_OCTAVE:
            raise ValueError(f"layer histogram must have {BINS_PER_OCTAVE} bins per octave, "
                             f"got {s.hist.bins_per_octave}")
        if s.hist.ranges is None:
            raise ValueError("layer histogram lacks its per-bin ranges (bin_min/bin_max)")
        if int(d.get("count", s.count)) != s.count or s.hist.total != s.count:
            raise ValueError(f"count {d.get('count')} does not match the moments ({s.count}) "
                             f"and histogram ({s.hist.total})")
        if s.count and (s.min is None or s.max is None or s.min > s.max):
            raise ValueError("min/max missing or inconsistent")
        if "buckets" in d:
            s.buckets = _buckets_from_json(d["buckets"])
        if "chunk_buckets" in d:
            s.chunk_buckets = _buckets_from_json(d["chunk_buckets"])
        if s.buckets and sum(b.count for b in s.buckets.values()) != s.count:
            raise ValueError("step buckets do not add up to the layer count")
        s.formats = {str(k): int(v) for k, v in d.get("formats", {}).items()}
        s.provided = {}
        for v, c in d.get("provided", []):
            s.provided[float(v)] = s.provided.get(float(v), 0) + int(c)
        s.approximate = bool(d.get("approximate", False))
        return s
