"""funnelqa: teach language models to ask funnel questions that elicit preferences."""

__version__ = "0.1.0"

import os as _os

# How long torch's OpenMP threads spin before they sleep, once a parallel op ends. libgomp's default
# (300k spins) starves the other process when two share a small machine: 14x slower decoding with
# two on 2 cores. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) survives that, but wakes the threads
# for every op: a SmolLM2 decoding step took 59 ms instead of 36 ms on an idle 2-core machine.
# A short spin keeps the 36 ms when idle and 136 ms with two processes. Read when torch is first
# imported, which funnelqa only does lazily, after this; the user's own settings win.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")
