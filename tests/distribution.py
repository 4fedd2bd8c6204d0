"""A goodness-of-fit check for sampler tests: draws from a seeded generator against the distribution the code
must follow. Pearson's chi-square with the critical value at p = 0.001, so a correct sampler passes (the seed
makes it the same run every time) and a distribution off by a percentage point in any cell fails at the draw
counts the tests use; a draw where the expected probability is 0 fails outright."""

from __future__ import annotations

import numpy as np

# chi-square critical values at p = 0.001 by degrees of freedom
CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def assert_follows(counts, expected) -> None:
    counts, expected = np.asarray(counts, dtype=float), np.asarray(expected, dtype=float)
    expected = expected / expected.sum()
    impossible = (expected == 0) & (counts > 0)
    assert not impossible.any(), f"drew tokens {np.flatnonzero(impossible).tolist()}, whose probability is 0"
    live = expected > 0
    n = counts.sum()
    chi2 = float((((counts - n * expected) ** 2)[live] / (n * expected[live])).sum())
    df = int(live.sum()) - 1
    if df == 0:
        return
    assert chi2 < CRITICAL[df], (f"frequencies {np.round(counts / n, 4).tolist()} do not follow "
                                 f"{np.round(expected, 4).tolist()} (chi-square {chi2:.1f} >= {CRITICAL[df]}, df {df})")
