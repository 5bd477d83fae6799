"""TeaCache's rescaling polynomial, fitted per model from uncached trajectories."""

from __future__ import annotations

import numpy as np
import pytest

from budcache_pipeline.caching.teacache import StackChanges, fit_teacache_coefficients


def test_teacache_fit_recovers_a_known_polynomial():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.01, 0.5, size=(20, 4))
    truth = (3.0, -2.0, 0.5, 0.1, 0.01)
    changes = StackChanges(x, np.polyval(truth, x), np.ones(20))
    fit = fit_teacache_coefficients(changes)
    np.testing.assert_allclose(fit.coefficients, truth, rtol=1e-6, atol=1e-8)
    assert fit.r_squared == pytest.approx(1.0)
    with pytest.raises(ValueError, match="more than 4"):
        fit_teacache_coefficients(StackChanges(x[:1, :2], x[:1, :2], np.ones(1)))
