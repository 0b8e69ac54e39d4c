"""Reference ε lower bounds from jax_privacy (2.0.0) for tests/test_audit.py, printed as Python literals.

Not a test dependency: run it in a throwaway venv and paste its output into the test.

    python3 -m venv /tmp/jp && /tmp/jp/bin/pip install jax-privacy
    /tmp/jp/bin/python tests/data/jax_privacy_one_run_reference.py

Each case (m, k, v, δ) is made into canary scores: v "in" canaries and k − v "out" canaries score 1, the
rest 0, and the public ``CanaryScoreAuditor.epsilon_one_run`` / ``epsilon_one_run_fdp`` are evaluated at
the explicit threshold 0.5 (k guesses "in", v of them right) at significance 0.05.
"""

import jax_privacy
import numpy as np
from jax_privacy.auditing import CanaryScoreAuditor, Explicit

CASES = [  # (m, k, v, δ)
    (100, 50, 45, 1e-5), (200, 100, 90, 1e-5), (500, 100, 95, 1e-5), (1000, 100, 100, 1e-5), (1000, 200, 170, 1e-5),
    (1000, 500, 350, 1e-5), (1000, 1000, 700, 1e-6), (2000, 300, 280, 1e-5), (5000, 1000, 800, 1e-5), (5000, 2500, 1600, 1e-6),
    (400, 40, 40, 1e-3), (300, 150, 120, 1e-4),
]

if __name__ == "__main__":
    print(f"# jax_privacy {getattr(jax_privacy, '__version__', '2.0.0')}: (m, k, v, delta, epsilon_one_run, epsilon_one_run_fdp)")
    for m, k, v, delta in CASES:
        n_in = max(v, m // 2)
        n_out = m - n_in
        assert k - v <= n_out
        ins = np.r_[np.ones(v), np.zeros(n_in - v)]
        outs = np.r_[np.ones(k - v), np.zeros(n_out - (k - v))]
        aud = CanaryScoreAuditor(ins, outs)
        s = aud.epsilon_one_run(0.05, delta, threshold_strategy=Explicit(0.5))
        f = aud.epsilon_one_run_fdp(0.05, delta, threshold_strategy=Explicit(0.5))
        print(f"    ({m}, {k}, {v}, {delta!r}, {float(s)!r}, {float(f)!r}),")
