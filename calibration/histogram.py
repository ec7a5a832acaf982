"""A fixed, log-spaced, sparse histogram of per-call activation amax values.

Why a fixed grid: two histograms built on different machines, in different processes or on different days must add
bin by bin, so that merging stores is *exact* (integer counts) and any percentile can be computed later.

Grid (see docs/input-scale-methods.md):
* bin ``i`` covers ``[2**(i/B), 2**((i+1)/B))`` with ``B = BINS_PER_OCTAVE = 256`` bins per octave, so a bin is
  ``2**(1/256) - 1 = 0.271 %`` wide. A percentile estimated from the histogram lies in the same bin as the true order
  statistic, so its relative error is at most 0.27 % (typically far less: values are spread log-uniformly inside a
  bin and the exact min and max of the data clamp the outer bins). 128 bins per octave would allow 0.54 %, above the
  0.5 % target; more bins only add stored entries.
* the grid spans ``2**-32 .. 2**32`` (2.3e-10 .. 4.3e9): every finite fp16 amax and any realistic bf16/fp32
  activation. Values below (including exact zeros) go to an ``under`` counter, larger finite values to ``over``;
  percentiles falling there are interpolated towards the exact min / max kept by the caller.
* only occupied bins are stored (a dict index -> count; in JSON the sorted indices are delta-encoded).
* optionally (the per-layer histogram does it) the exact min and max value inside every occupied bin are kept
  (``ranges``; merged with min/max, so still exact). Values of a bin are then spread over [bin min, bin max]
  instead of the bin edges: a bin holding one distinct value is exact. Activations are bf16/fp16, so their amax is
  a bf16/fp16 number; bf16 has 128 values per octave, fewer than the 256 bins, so with ranges every percentile,
  clip fraction and outlier fraction of bf16 data is exact (ties at a threshold included), and fp16 data (1024
  values per octave, ≤ 4 per bin) is nearly so.

A coarser grid (``B / 2**k`` bins per octave) shares the same origin, so a fine index maps to a coarse one with an
arithmetic shift: the per-step buckets of :mod:`.stats` use 16 bins per octave (4.4 % wide bins, enough for plots).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np

BINS_PER_OCTAVE = 256
MIN_EXP = -32
MAX_EXP = 32
STEP_BINS_PER_OCTAVE = 16


def _check_bpo(bpo: int) -> int:
    if bpo <= 0 or BINS_PER_OCTAVE % bpo != 0 or bpo & (bpo - 1):
        raise ValueError(f"bins_per_octave must be a power of two dividing {BINS_PER_OCTAVE}, got {bpo}")
    return bpo


def bin_indices(values: np.ndarray, bins_per_octave: int = BINS_PER_OCTAVE) -> np.ndarray:
    """Signed bin index ``floor(log2(v) * B)`` of finite values (int64); zeros map below the grid (``under``)."""
    v = np.asarray(values, dtype=np.float64)
    out = np.full(v.shape, MIN_EXP * bins_per_octave - 1, dtype=np.int64)
    pos = v > 0
    if np.all(pos):
        return np.floor(np.log2(v) * bins_per_octave).astype(np.int64)
    out[pos] = np.floor(np.log2(v[pos]) * bins_per_octave).astype(np.int64)
    return out


class LogHistogram:
    """Sparse integer counts on the fixed log2 grid; see the module docstring for the grid and its accuracy."""

    __slots__ = ("bins_per_octave", "counts", "under", "over", "ranges")

    def __init__(self, bins_per_octave: int = BINS_PER_OCTAVE, counts: dict[int, int] | None = None,
                 under: int = 0, over: int = 0, *, track_ranges: bool = False,
                 ranges: dict[int, tuple[float, float]] | None = None) -> None:
        self.bins_per_octave = _check_bpo(int(bins_per_octave))
        self.counts: dict[int, int] = dict(counts) if counts else {}
        self.under = int(under)
        self.over = int(over)
        self.ranges: dict[int, tuple[float, float]] | None = (
            dict(ranges) if ranges is not None else ({} if track_ranges else None))

    # ------------------------------------------------------------------ building
    @property
    def lo_index(self) -> int:
        return MIN_EXP * self.bins_per_octave

    @property
    def hi_index(self) -> int:
        return MAX_EXP * self.bins_per_octave

    def add(self, values: np.ndarray) -> None:
        """Count finite, non-negative values (the caller filters NaN/Inf and rejects negatives)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        self.add_indices(bin_indices(v, self.bins_per_octave), v)

    def add_indices(self, idx: np.ndarray, values: np.ndarray | None = None) -> None:
        """Count precomputed indices on this histogram's grid (out-of-range ones go to under/over). `values` (the
        values behind the indices) are required when the histogram tracks per-bin ranges."""
        idx = np.asarray(idx, dtype=np.int64).ravel()
        if idx.size == 0:
            return
        track = self.ranges is not None
        if track:
            if values is None:
                raise ValueError("this histogram keeps per-bin ranges: pass the values with their indices")
            values = np.asarray(values, dtype=np.float64).ravel()
        lo, hi = self.lo_index, self.hi_index
        under = idx < lo
        over = idx >= hi
        n_under = int(np.count_nonzero(under))
        n_over = int(np.count_nonzero(over))
        if n_under or n_over:
            keep = ~(under | over)
            idx = idx[keep]
            if track:
                values = values[keep]
            self.under += n_under
            self.over += n_over
        if idx.size == 0:
            return
        counts = self.counts
        if idx.size == 1:
            k = int(idx[0])
            counts[k] = counts.get(k, 0) + 1
            if track:
                v = float(values[0])
                r = self.ranges.get(k)
                self.ranges[k] = (v, v) if r is None else (min(r[0], v), max(r[1], v))
            return
        if not track:
            base = int(idx.min())
            off = idx - base
            span = int(off.max()) + 1
            if span <= 1 << 16:
                bc = np.bincount(off, minlength=span)
                nz = np.nonzero(bc)[0]
                uniq, cnt = nz + base, bc[nz]
            else:
                uniq, cnt = np.unique(idx, return_counts=True)
            for k, c in zip(uniq.tolist(), cnt.tolist()):
                counts[k] = counts.get(k, 0) + c
            return
        # the bin index is monotone in the value: sorting the values sorts the indices
        order = np.argsort(values)
        si = idx[order]
        starts = np.concatenate(([0], np.nonzero(np.diff(si))[0] + 1))
        uniq = si[starts]
        cnt = np.diff(np.append(starts, si.size))
        for k, c in zip(uniq.tolist(), cnt.tolist()):
            counts[k] = counts.get(k, 0) + c
        if track:
            sv = values[order]
            mins = np.minimum.reduceat(sv, starts).tolist()
            maxs = np.maximum.reduceat(sv, starts).tolist()
            ranges = self.ranges
            for k, a, b in zip(uniq.tolist(), mins, maxs):
                r = ranges.get(k)
                ranges[k] = (a, b) if r is None else (min(r[0], a), max(r[1], b))

    def coarse_indices(self, fine_idx: np.ndarray, fine_bpo: int = BINS_PER_OCTAVE) -> np.ndarray:
        """Map indices of a finer grid (same origin) onto this grid: an arithmetic shift, i.e. floor division."""
        shift = int(math.log2(fine_bpo // self.bins_per_octave))
        return np.asarray(fine_idx, dtype=np.int64) >> shift

    def update(self, other: LogHistogram) -> None:
        """Add another histogram's counts in place (same grid required)."""
        if other.bins_per_octave != self.bins_per_octave:
            raise ValueError(f"cannot merge histograms with {self.bins_per_octave} and {other.bins_per_octave} "
                             "bins per octave")
        if (self.ranges is None) != (other.ranges is None) and (self.counts and other.counts):
            raise ValueError("cannot merge a histogram with per-bin ranges and one without")
        if self.ranges is None and other.ranges is not None and not self.counts:
            self.ranges = {}
        counts = self.counts
        for k, c in other.counts.items():
            counts[k] = counts.get(k, 0) + c
        if self.ranges is not None and other.ranges is not None:
            ranges = self.ranges
            for k, (a, b) in other.ranges.items():
                r = ranges.get(k)
                ranges[k] = (a, b) if r is None else (min(r[0], a), max(r[1], b))
        self.under += other.under
        self.over += other.over

    def merge(self, other: LogHistogram) -> LogHistogram:
        """A new histogram holding both; bin counts are integers, so the result is exact and order-independent."""
        out = self.copy()
        out.update(other)
        return out

    def copy(self) -> LogHistogram:
        return LogHistogram(self.bins_per_octave, self.counts, self.under, self.over, ranges=self.ranges)

    def coarsen(self, bins_per_octave: int) -> LogHistogram:
        """The same counts on a coarser grid (exact: coarse bins are unions of fine bins); ranges are dropped."""
        out = LogHistogram(bins_per_octave)
        if self.counts:
            idx, cnt = self.arrays()
            cidx = out.coarse_indices(idx, self.bins_per_octave)
            for k, c in zip(cidx.tolist(), cnt.tolist()):
                out.counts[k] = out.counts.get(k, 0) + c
        out.under, out.over = self.under, self.over
        return out

    # ------------------------------------------------------------------ reading
    @property
    def total(self) -> int:
        return sum(self.counts.values()) + self.under + self.over

    def __len__(self) -> int:
        return len(self.counts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LogHistogram):
            return NotImplemented
        return (self.bins_per_octave == other.bins_per_octave and self.under == other.under
                and self.over == other.over and {k: c for k, c in self.counts.items() if c}
                == {k: c for k, c in other.counts.items() if c} and self.ranges == other.ranges)

    def __repr__(self) -> str:
        return (f"LogHistogram(bins_per_octave={self.bins_per_octave}, bins={len(self.counts)}, "
                f"total={self.total})")

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Occupied bin indices (sorted) and their counts."""
        if not self.counts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        idx = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
        cnt = np.fromiter(self.counts.values(), dtype=np.int64, count=len(self.counts))
        order = np.argsort(idx)
        return idx[order], cnt[order]

    def edges(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper value edges of the given bins."""
        idx = np.asarray(idx, dtype=np.float64)
        return np.exp2(idx / self.bins_per_octave), np.exp2((idx + 1) / self.bins_per_octave)

    def _segments(self, vmin: float, vmax: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All occupied segments in value order (under, bins, over) as (lo, hi, count), clamped to [vmin, vmax].
        A bin's segment is its exact value range when ranges are kept, else its edges."""
        idx, cnt = self.arrays()
        if self.ranges is not None and idx.size:
            rg = self.ranges
            lo = np.fromiter((rg[k][0] for k in idx.tolist()), np.float64, count=idx.size)
            hi = np.fromiter((rg[k][1] for k in idx.tolist()), np.float64, count=idx.size)
        else:
            lo, hi = self.edges(idx)
        los, his, cnts = [lo], [hi], [cnt]
        if self.under:
            los.insert(0, np.array([vmin]))
            his.insert(0, np.array([min(2.0 ** MIN_EXP, vmax)]))
            cnts.insert(0, np.array([self.under]))
        if self.over:
            los.append(np.array([max(2.0 ** MAX_EXP, vmin)]))
            his.append(np.array([vmax]))
            cnts.append(np.array([self.over]))
        lo = np.clip(np.concatenate(los), vmin, vmax)
        hi = np.clip(np.concatenate(his), vmin, vmax)
        return lo, np.maximum(hi, lo), np.concatenate(cnts).astype(np.int64)

    @staticmethod
    def _spread(lo: np.ndarray, hi: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Point at fraction u of [lo, hi]: log-uniform for positive bins, linear when lo is 0."""
        out = lo + (hi - lo) * u
        pos = lo > 0
        if np.any(pos):
            out[pos] = lo[pos] * np.power(hi[pos] / lo[pos], u[pos])
        return out

    def order_statistics(self, ranks: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
        """Estimated value of the sorted sample at integer ranks 0..n-1.

        The m values of a bin are placed log-uniformly at the centres of m equal sub-intervals of the bin (clamped to
        the exact min and max); rank 0 is the exact min and rank n-1 the exact max.
        """
        lo, hi, cnt = self._segments(vmin, vmax)
        n = int(cnt.sum())
        ranks = np.asarray(ranks, dtype=np.int64)
        if n == 0:
            return np.full(ranks.shape, np.nan)
        cum = np.cumsum(cnt)
        seg = np.searchsorted(cum, ranks, side="right")
        seg = np.minimum(seg, len(cnt) - 1)
        start = cum[seg] - cnt[seg]
        u = (ranks - start + 0.5) / cnt[seg]
        out = self._spread(lo[seg].astype(np.float64), hi[seg].astype(np.float64), u.astype(np.float64))
        out = np.where(ranks <= 0, vmin, out)
        out = np.where(ranks >= n - 1, vmax, out)
        return np.clip(out, vmin, vmax)

    def quantiles(self, qs: Iterable[float] | np.ndarray, vmin: float, vmax: float) -> np.ndarray:
        """Quantiles q in [0, 1] with the convention of the original analyzer / numpy 'linear':
        rank k = (n-1)·q, interpolated linearly between the order statistics floor(k) and ceil(k)."""
        q = np.clip(np.asarray(list(qs) if not isinstance(qs, np.ndarray) else qs, dtype=np.float64), 0.0, 1.0)
        n = self.total
        if n == 0:
            return np.full(q.shape, np.nan)
        k = (n - 1) * q
        f = np.floor(k).astype(np.int64)
        c = np.minimum(f + 1, n - 1)
        vf = self.order_statistics(f, vmin, vmax)
        vc = self.order_statistics(c, vmin, vmax)
        return vf + (vc - vf) * (k - f)

    def count_above(self, threshold: float, vmin: float, vmax: float) -> float:
        """Estimated number of values strictly above `threshold` (log-uniform within the straddling bin)."""
        n = self.total
        if n == 0 or threshold >= vmax:
            return 0.0
        if threshold < vmin:
            return float(n)
        lo, hi, cnt = self._segments(vmin, vmax)
        full = float(cnt[lo > threshold].sum())
        part = (lo <= threshold) & (hi > threshold)
        if np.any(part):
            plo, phi, pc = lo[part], hi[part], cnt[part]
            with np.errstate(divide="ignore", invalid="ignore"):
                frac = np.where(plo > 0, np.log(phi / threshold) / np.log(phi / plo), (phi - threshold) / (phi - plo))
            full += float(np.sum(pc * np.clip(np.nan_to_num(frac, nan=0.0), 0.0, 1.0)))
        return full

    def count_below(self, threshold: float, vmin: float, vmax: float) -> float:
        """Estimated number of values strictly below `threshold`."""
        n = self.total
        if n == 0 or threshold <= vmin:
            return 0.0
        if threshold > vmax:
            return float(n)
        return max(0.0, n - self.count_above(threshold, vmin, vmax))

    def representatives(self, vmin: float, vmax: float) -> tuple[np.ndarray, np.ndarray]:
        """Representative values with counts, for integrating a function over the distribution: the geometric
        centre of every occupied segment (clamped), except that one value each of the first and last segment is the
        exact min and max."""
        lo, hi, cnt = self._segments(vmin, vmax)
        mid = self._spread(lo.astype(np.float64), hi.astype(np.float64), np.full(lo.shape, 0.5))
        if cnt.size == 0 or cnt.sum() < 2:
            return (np.array([vmax]), np.array([int(cnt.sum())])) if cnt.size else (mid, cnt)
        cnt = cnt.copy()
        cnt[0] -= 1
        cnt[-1] -= 1
        vals = np.concatenate([[vmin], mid, [vmax]])
        cnts = np.concatenate([[1], cnt, [1]])
        keep = cnts > 0
        return vals[keep], cnts[keep]

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        """Sparse JSON form: sorted indices delta-encoded (first entry absolute) and their counts.

        Plain Python (no numpy): a store holds tens of thousands of small step-bucket histograms."""
        idx = sorted(k for k, c in self.counts.items() if c)
        delta = [b - a for a, b in zip([0] + idx[:-1], idx)]
        out: dict = {"bins_per_octave": self.bins_per_octave, "index_delta": delta,
                     "count": [self.counts[k] for k in idx]}
        if self.ranges is not None:
            out["bin_min"] = [self.ranges[k][0] for k in idx]
            out["bin_max"] = [self.ranges[k][1] for k in idx]
        if self.under:
            out["under"] = self.under
        if self.over:
            out["over"] = self.over
        return out

    @classmethod
    def from_json(cls, d: dict) -> LogHistogram:
        """Inverse of to_json; raises ValueError/TypeError/KeyError on malformed input (the store wraps them)."""
        if not isinstance(d, dict):
            raise TypeError("histogram must be an object")
        bpo = int(d["bins_per_octave"])
        delta = d["index_delta"]
        count = d["count"]
        if not isinstance(delta, list) or not isinstance(count, list) or len(delta) != len(count):
            raise ValueError("histogram index_delta/count must be lists of equal length")
        for x in delta:
            if type(x) is not int:
                raise ValueError("histogram index_delta must hold integers")
        for c in count:
            if type(c) is not int or c <= 0:
                raise ValueError("histogram counts must be positive integers")
        if any(x <= 0 for x in delta[1:]):
            raise ValueError("histogram indices must be strictly increasing")
        idx_list = list(itertools.accumulate(delta))
        under, over = int(d.get("under", 0)), int(d.get("over", 0))
        if under < 0 or over < 0:
            raise ValueError("histogram under/over counts must be >= 0")
        idx = np.asarray(idx_list, dtype=np.int64)
        ranges = None
        if "bin_min" in d or "bin_max" in d:
            bmin, bmax = d["bin_min"], d["bin_max"]
            if not isinstance(bmin, list) or not isinstance(bmax, list) or not len(bmin) == len(bmax) == len(count):
                raise ValueError("histogram bin_min/bin_max must be lists as long as count")
            a = np.asarray(bmin, dtype=np.float64)
            b = np.asarray(bmax, dtype=np.float64)
            if idx.size and not (np.all(np.exp2(idx / bpo) * (1 - 1e-12) <= a) and np.all(a <= b)
                                 and np.all(b <= np.exp2((idx + 1) / bpo) * (1 + 1e-12))):
                raise ValueError("histogram bin ranges lie outside their bins")
            ranges = dict(zip(idx.tolist(), zip(a.tolist(), b.tolist())))
        return cls(bpo, dict(zip(idx_list, count)), under, over, ranges=ranges)
