"""Bootstrap intervals over users, and paired differences between systems interviewed on the same users.

Every score metric is a function of per-user counts summed over users: a mean is sum(x) / users,
a pooled rate is sum(events) / sum(turns), and corpus BLEU is ``metrics.bleu_from_counts`` of the
summed n-gram counts. So a system keeps a few numbers per user (``UserTable``: one float per
column per user, plus BLEU's ten counts), and a bootstrap resample of users is a vector of counts
(how often each user was drawn) times those columns: nothing about the sessions' texts is kept.

- ``intervals``: for each metric, the 2.5 and 97.5 percentiles of the metric over ``resamples``
  resamples of the users (percentile bootstrap, Efron & Tibshirani 1993, ch. 13).
- ``paired``: the difference A - B on the users both systems interviewed (matched by session id),
  its percentile interval over resamples that draw the same users for both, and a two-sided
  p-value: the share of resampled differences at least as far from the observed one as the
  observed one is from 0, ``(1 + #{|d* - d| >= |d|}) / (1 + resamples)`` (the shifted-null paired
  bootstrap test, Efron & Tibshirani 1993, ch. 16; Koehn 2004 for MT metrics). A difference is
  *significant* when p < ``ALPHA``.

All randomness comes from ``numpy.random.default_rng(seed)``: the same seed gives the same numbers.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence

from funnelqa import metrics
from funnelqa.errors import UsageError

RESAMPLES = 1000
ALPHA = 0.05
# Resampled users are drawn in blocks of this many resamples: a block is resamples x users counts,
# so 20,000 users take 16 MB per block rather than 160 MB for all 1,000 at once.
_BLOCK = 100
BLEU = "bleu"
_BLEU_WIDTH = 2 * metrics.BLEU_MAX_ORDER + 2


class UserTable:
    """Per-user numbers of one system: ``columns`` (names) of floats, and optionally BLEU's counts.

    ``add(user, values, bleu)`` appends one user: ``values`` maps every column to a float,
    ``bleu`` is the user's additive BLEU counts (``score._bleu_stats``: 10 ints) or None. A user id
    seen before is kept once (its first session), so pairing by id is well defined; ``duplicates``
    counts the sessions dropped that way. Memory: 8 bytes per column and user, plus 80 for BLEU.
    """

    def __init__(self, columns: Sequence[str], *, with_bleu: bool = True):
        self.columns = tuple(columns)
        self.ids: list[str] = []
        self._index: dict[str, int] = {}
        self._values = {name: array("d") for name in self.columns}
        self.bleu = array("q") if with_bleu else None
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, user: str, values: Mapping[str, float], bleu: Sequence[int] | None = None) -> None:
        """Append ``user``'s row (see the class); KeyError when ``values`` lacks a column."""
        if user in self._index:
            self.duplicates += 1
            return
        self._index[user] = len(self.ids)
        self.ids.append(user)
        for name in self.columns:
            self._values[name].append(float(values[name]))
        if self.bleu is not None:
            self.bleu.extend(bleu if bleu is not None else [0] * _BLEU_WIDTH)

    def matrix(self, rows: Sequence[int] | None = None):
        """(users x columns) float64 numpy array of the rows ``rows`` (all when None), in column order."""
        import numpy as np

        data = np.column_stack([np.frombuffer(self._values[name], dtype=np.float64) for name in self.columns]) \
            if self.ids else np.zeros((0, len(self.columns)))
        return data if rows is None else data[np.asarray(rows, dtype=np.int64)]

    def bleu_matrix(self, rows: Sequence[int] | None = None):
        """(users x 10) int64 numpy array of BLEU counts (None without BLEU)."""
        import numpy as np

        if self.bleu is None:
            return None
        data = np.frombuffer(self.bleu, dtype=np.int64).reshape(-1, _BLEU_WIDTH) if self.ids \
            else np.zeros((0, _BLEU_WIDTH), dtype=np.int64)
        return data if rows is None else data[np.asarray(rows, dtype=np.int64)]

    def index(self, user: str) -> int | None:
        """The row of ``user``, None when absent."""
        return self._index.get(user)


def _statistics(sums, bleu_sums, columns: Sequence[str], ratios: Mapping[str, tuple[str, str]]):
    """{metric: (resamples,) float array} from summed columns (resamples x columns); nan where a
    denominator is 0. ``bleu_sums`` (resamples x 10) adds BLEU."""
    import numpy as np

    position = {name: i for i, name in enumerate(columns)}
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for metric, (numerator, denominator) in ratios.items():
            den = sums[:, position[denominator]]
            out[metric] = np.where(den > 0, sums[:, position[numerator]] / np.where(den > 0, den, 1), np.nan)
    if bleu_sums is not None:
        order = metrics.BLEU_MAX_ORDER
        out[BLEU] = np.array([
            metrics.bleu_from_counts(list(row[:order]), list(row[order : 2 * order]), int(row[2 * order]), int(row[2 * order + 1]))["bleu"]
            for row in bleu_sums.tolist()
        ])
    return out


def _draws(users: int, resamples: int, rng):
    """Blocks of resampling counts: (block x users) int arrays, each row summing to ``users``."""
    import numpy as np

    done = 0
    while done < resamples:
        size = min(_BLOCK, resamples - done)
        picks = rng.integers(0, users, size=(size, users))
        counts = np.zeros((size, users), dtype=np.int64)
        np.add.at(counts, (np.repeat(np.arange(size), users), picks.ravel()), 1)
        yield counts
        done += size


def _check(resamples: int) -> None:
    if resamples < 1:
        raise UsageError("--bootstrap must be at least 1")


def _interval(values) -> list[float] | None:
    import numpy as np

    values = values[~np.isnan(values)]
    if not len(values):
        return None
    low, high = np.percentile(values, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return [float(low), float(high)]


def intervals(table: UserTable, ratios: Mapping[str, tuple[str, str]], *, resamples: int = RESAMPLES,
              seed: int = 0) -> dict[str, list[float] | None]:
    """{metric: [low, high]} 95 % percentile intervals over ``resamples`` bootstrap resamples of
    ``table``'s users. ``ratios`` defines each metric as (numerator column, denominator column) of
    summed counts; "bleu" is added when the table keeps BLEU counts. None for a metric whose
    denominator is 0 in every resample, and for every metric of an empty table. Raises UsageError
    for ``resamples`` < 1."""
    import numpy as np

    _check(resamples)
    names = list(ratios) + ([BLEU] if table.bleu is not None else [])
    if not len(table):
        return {name: None for name in names}
    data, bleu = table.matrix(), table.bleu_matrix()
    rng = np.random.default_rng(seed)
    collected: dict[str, list] = {name: [] for name in names}
    for counts in _draws(len(table), resamples, rng):
        stats = _statistics(counts @ data, counts @ bleu if bleu is not None else None, table.columns, ratios)
        for name in names:
            collected[name].append(stats[name])
    return {name: _interval(np.concatenate(collected[name])) for name in names}


def paired(a: UserTable, b: UserTable, ratios: Mapping[str, tuple[str, str]], *, resamples: int = RESAMPLES,
           seed: int = 0) -> dict | None:
    """A - B on the users both tables hold (by id, in ``a``'s order); None when they share none.

    Returns ``{"users": n, "diff": {metric: {"value", "ci95": [low, high] | None, "p",
    "significant"}}}``: ``value`` the metric on the shared users of A minus that of B (None when
    undefined for either), ``ci95`` the 95 % percentile interval of the resampled differences,
    ``p`` the paired-bootstrap p-value of the module docstring, ``significant`` p < ALPHA. Both
    tables must have ``ratios``' columns; BLEU is compared when both keep its counts. Raises
    UsageError for ``resamples`` < 1.
    """
    import numpy as np

    _check(resamples)
    shared = [(i, j) for i, user in enumerate(a.ids) if (j := b.index(user)) is not None]
    if not shared:
        return None
    rows_a, rows_b = [i for i, _ in shared], [j for _, j in shared]
    with_bleu = a.bleu is not None and b.bleu is not None
    names = list(ratios) + ([BLEU] if with_bleu else [])
    # Each side computes its ratios from its own columns, by name: the tables need not agree on order.
    data_a, data_b = a.matrix(rows_a), b.matrix(rows_b)
    bleu_a = a.bleu_matrix(rows_a) if with_bleu else None
    bleu_b = b.bleu_matrix(rows_b) if with_bleu else None

    def difference(counts):
        first = _statistics(counts @ data_a, counts @ bleu_a if with_bleu else None, a.columns, ratios)
        second = _statistics(counts @ data_b, counts @ bleu_b if with_bleu else None, b.columns, ratios)
        return {name: first[name] - second[name] for name in names}

    observed = difference(np.ones((1, len(shared)), dtype=np.int64))
    rng = np.random.default_rng(seed)
    collected: dict[str, list] = {name: [] for name in names}
    for counts in _draws(len(shared), resamples, rng):
        for name, values in difference(counts).items():
            collected[name].append(values)
    diff = {}
    for name in names:
        value = float(observed[name][0])
        draws = np.concatenate(collected[name])
        if math.isnan(value):
            diff[name] = {"value": None, "ci95": None, "p": None, "significant": False}
            continue
        draws = draws[~np.isnan(draws)]
        # A tolerance of float noise: a constant shift resamples to d* == d up to rounding, which
        # must not count as "as far as" a difference of zero.
        tolerance = 1e-12 * max(1.0, abs(value))
        extreme = int(np.count_nonzero(np.abs(draws - value) >= abs(value) - tolerance)) if abs(value) > tolerance else len(draws)
        p = (1 + extreme) / (1 + len(draws))
        diff[name] = {"value": value, "ci95": _interval(draws), "p": p, "significant": p < ALPHA}
    return {"users": len(shared), "diff": diff}
