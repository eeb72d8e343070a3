"""Probe statistics: the U-statistic, the control-variate norm and the jackknife interval."""

import itertools

import pytest
import torch

from hessdiag.stats import ProbeStatistics, half_width_on_norm, t975, u_statistic


def noisy_estimates(generator, num, mean, noise):
    """Probe estimates with mean ``mean`` and noise far larger than it (as Hutchinson's)."""
    return mean + noise * torch.randn(num, mean.numel(), generator=generator, dtype=torch.float64)


def test_u_statistic_is_the_mean_over_distinct_pairs():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(6, 5, generator=g, dtype=torch.float64)
    pairs = [float(d[i] @ d[j]) for i, j in itertools.permutations(range(6), 2)]
    assert float(u_statistic(d)) == pytest.approx(sum(pairs) / len(pairs), rel=1e-12)


def test_u_statistic_is_unbiased_where_the_naive_norm_is_not():
    # ‖μ‖² = 20·0.01 = 0.2; per-probe noise variance 20·1 = 20, so the naive norm
    # overshoots by 20/N = 2.5 at N = 8. Over 2000 repetitions the U-statistic's mean has a
    # standard error ≈ 0.03 (measured sd ≈ 1.3 / √2000), so 0.15 is 5 SE and the naive
    # mean (≈ 2.7) is far outside it.
    g = torch.Generator().manual_seed(1)
    mu = torch.full((20,), 0.1, dtype=torch.float64)
    truth = float(mu @ mu)
    u = [float(u_statistic(noisy_estimates(g, 8, mu, 1.0))) for _ in range(2000)]
    naive = [float(noisy_estimates(g, 8, mu, 1.0).mean(0).pow(2).sum()) for _ in range(2000)]
    assert abs(sum(u) / len(u) - truth) < 0.15
    assert abs(sum(naive) / len(naive) - truth) > 1.0


def test_accumulator_matches_the_closed_forms_per_block_and_in_total():
    g = torch.Generator().manual_seed(2)
    d = torch.randn(37, 7, generator=g, dtype=torch.float64)
    base = torch.randn(7, generator=g, dtype=torch.float64)
    stats = ProbeStatistics([("a", 3), ("b", 4)], base, groups=5)
    stats.add(d[:10])
    stats.add(d[10:])
    out = stats.statistics()
    for name, cols in (("a", slice(0, 3)), ("b", slice(3, 7)), ("total", slice(0, 7))):
        b, r = base[cols], d[:, cols]
        expected = float(b @ b + 2 * b @ r.mean(0) + u_statistic(r))
        assert out[name].sq_norm == pytest.approx(expected, rel=1e-12)
        assert out[name].naive_sq_norm == pytest.approx(float((b + r.mean(0)).pow(2).sum()), rel=1e-12)
    assert torch.allclose(stats.mean(), base + d.mean(0))
    assert out["total"].sq_norm == pytest.approx(out["a"].sq_norm + out["b"].sq_norm, rel=1e-12)


def test_result_does_not_depend_on_how_probes_are_added():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(40, 9, generator=g, dtype=torch.float64)
    one, two = ProbeStatistics([("x", 9)]), ProbeStatistics([("x", 9)])
    one.add(d)
    for chunk in d.split(7):
        two.add(chunk)
    assert one.statistics()["total"].ci95 == pytest.approx(two.statistics()["total"].ci95, rel=1e-12)


def test_jackknife_interval_covers_at_about_the_nominal_rate():
    # 300 repetitions of 64 noisy probes; the true coverage of a correct 95 % interval
    # gives ≥ 0.90 with overwhelming probability (binomial sd ≈ 0.013), while an interval
    # around the naive value (bias 20/64 ≈ 0.3 ≫ its width) or a too narrow one fails.
    g = torch.Generator().manual_seed(4)
    mu = torch.linspace(0.2, 1.0, 20, dtype=torch.float64)
    truth = float(mu @ mu)
    covered, widths = 0, []
    for _ in range(300):
        stats = ProbeStatistics([("x", 20)])
        stats.add(noisy_estimates(g, 64, mu, 1.0))
        lo, hi = stats.statistics()["total"].ci95
        covered += lo <= truth <= hi
        widths.append(hi - lo)
    assert 0.90 <= covered / 300 <= 0.995
    # Interval width is about 2·1.96·sd(U): sd(U) ≈ √(4·μᵀΣμ/N + 2·tr Σ²/N²) ≈ 0.62.
    assert 1.5 < sorted(widths)[150] < 4.0


def test_exact_probes_give_a_zero_width_interval():
    d = torch.arange(1.0, 6.0, dtype=torch.float64)
    stats = ProbeStatistics([("x", 5)])
    stats.add(d.expand(10, 5))
    s = stats.statistics()["total"]
    assert s.sq_norm == pytest.approx(float(d @ d), rel=1e-12)
    assert s.ci95 == pytest.approx((s.sq_norm, s.sq_norm), rel=1e-12)
    assert half_width_on_norm(s) == pytest.approx(0.0, abs=1e-12)


def test_t_quantiles():
    assert t975(15) == pytest.approx(2.131)
    assert t975(1000) == pytest.approx(1.96)
