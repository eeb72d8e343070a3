"""``curvprop``: exact diag(GGN) plus a per-example Monte-Carlo residual.

The statistical tests share one set of runs: 100 seeds × 8 replicates on a tiny
elementwise CNN (P = 171, 6 examples in uneven batches of 4 and 2), each given the exact
GGN diagonal. References are float64 (basis-vector HVPs for diag H, the P×P GGN of
tests/reference.py for diag(GGN)). Every check is deterministic (fixed seeds); the
tolerances below say how likely a correct estimator is to fail them, and each test also
checks that a wrong answer (the GGN diagonal alone, or a too-narrow interval) would fail.
"""

import math

import pytest
import torch
from torch import nn

import hessdiag
from hessdiag.curvature_tape import TapedBatch
from hessdiag.errors import HessdiagError
from hessdiag.estimators import (
    CurvpropEstimator,
    EstimatorError,
    EstimatorOptions,
    ExactEstimator,
    get_estimator,
)
from hessdiag.objective import Objective
from hessdiag.result import normalized_norm

from ..models import randomize_batchnorm, residual_cnn, residual_cnn_data
from ..reference import flat, max_relative_error, reference_ggn_diagonal

SEEDS = 100
REPLICATES = 8


def tiny_net() -> nn.Module:
    """1×8×8 → stride-2 conv (2 channels) → BN → tanh → Linear(32, 4) → SiLU → Linear(4, 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(),
        nn.Linear(32, 4), nn.SiLU(), nn.Linear(4, 3),
    )
    return randomize_batchnorm(model).double()


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g))


def tiny_objective() -> Objective:
    return Objective(tiny_net(), tiny_data(), "ce", batch_size=4)


@pytest.fixture(scope="module")
def exact():
    """The exact diagonal and GGN diagonal of the tiny net, flat, float64."""
    objective = tiny_objective()
    diagonal = ExactEstimator(EstimatorOptions(), analytic=False).estimate(objective).diagonal
    x, y = tiny_data()
    ggn = reference_ggn_diagonal(tiny_net(), "ce", x, y)
    return {"diagonal": flat(diagonal), "ggn": flat(ggn), "ggn_dict": ggn}


@pytest.fixture(scope="module", params=["proportional", "uniform"])
def runs(exact, request):
    """Per seed: the diagonal, and the norm and residual statistics of the total, for each
    allocation of draws to examples."""
    objective = tiny_objective()
    objective.ggn.remember(exact["ggn_dict"], "reference")
    out = {"diagonal": [], "norm": [], "residual": [], "allocation": request.param}
    for seed in range(SEEDS):
        chosen = CurvpropEstimator(EstimatorOptions(samples=REPLICATES, seed=seed),
                                   allocation=request.param)
        est = chosen.estimate(objective)
        assert est.samples == REPLICATES
        out["diagonal"].append(flat(est.diagonal))
        out["norm"].append(est.norm_statistics["total"])
        out["residual"].append(est.residual_statistics["total"])
    out["diagonal"] = torch.stack(out["diagonal"])
    return out


def test_the_residual_is_a_large_part_of_the_diagonal(exact):
    """Otherwise the statistical tests below could not tell curvprop from the GGN alone."""
    d, g = exact["diagonal"], exact["ggn"]
    assert float((d - g).norm() / d.norm()) > 0.3


def test_diagonal_is_unbiased(exact, runs):
    d = exact["diagonal"]
    mean = runs["diagonal"].mean(0)
    se = runs["diagonal"].std(0) / math.sqrt(SEEDS)
    scale = float(d.abs().max())
    noisy = se > 1e-12 * scale
    # Entries without sampling noise must be exact: the head (no activation after it, no
    # residual) and, with one draw per example, Linear(32, 4) (each of its entries reaches
    # one SiLU unit only, so the injected noise has no cross terms there and its square is
    # that unit's exact term); proportional allocation adds the noise of the random number
    # of draws per example there (132 more entries).
    expected = {"uniform": 24, "proportional": 24 + 132}[runs["allocation"]]
    assert int(noisy.sum()) == expected  # the conv and BatchNorm parameters (+ Linear(32, 4))
    assert float((mean - d)[~noisy].abs().max()) <= 1e-12 * scale
    # 5 standard errors per entry: the seed means are close to normal (100 seeds of means of
    # 8 replicates), P(|z| > 5) < 1e-5 per entry, < 1e-3 over the 24 noisy entries.
    z = (mean - d)[noisy] / se[noisy]
    assert float(z.abs().max()) <= 5.0
    # The GGN diagonal alone (residual missing) sits far outside that band.
    z_ggn = (exact["ggn"] - d)[noisy] / se[noisy]
    assert float(z_ggn.abs().max()) > 20.0


def squared_norm_check(statistics: list, exact_value: float, wrong_value: float) -> None:
    values = torch.tensor([s.sq_norm for s in statistics], dtype=torch.float64)
    se = float(values.std()) / math.sqrt(len(values))
    # 4 standard errors of the mean over 100 seeds: a correct estimator fails with
    # probability < 1e-4. Two biased answers lie beyond (observed ≥ 9 se): the norm without
    # the residual, and the plug-in ‖mean of 8 replicates‖², which overshoots by the
    # replicates' variance / 8.
    assert abs(float(values.mean()) - exact_value) <= 4 * se
    assert abs(wrong_value - exact_value) > 4 * se
    plug_in = torch.tensor([s.naive_sq_norm for s in statistics], dtype=torch.float64)
    assert float(plug_in.mean()) - exact_value > 4 * se


def test_squared_norm_is_unbiased(exact, runs):
    d, g = exact["diagonal"], exact["ggn"]
    squared_norm_check(runs["norm"], float(d.pow(2).sum()), float(g.pow(2).sum()))


def test_residual_squared_norm_is_unbiased(exact, runs):
    d, g = exact["diagonal"], exact["ggn"]
    squared_norm_check(runs["residual"], float((d - g).pow(2).sum()), 0.0)


def coverage(statistics: list, value: float, shrink: float = 1.0) -> int:
    """Seeds whose 95 % interval, its half-width scaled by ``shrink``, contains ``value``."""
    hits = 0
    for s in statistics:
        lo, hi = s.ci95
        half = shrink * (hi - lo) / 2
        hits += s.sq_norm - half <= value <= s.sq_norm + half
    return hits


@pytest.mark.parametrize("which", ["norm", "residual"])
def test_intervals_cover_at_about_95_percent(exact, runs, which):
    d, g = exact["diagonal"], exact["ggn"]
    value = float(d.pow(2).sum() if which == "norm" else (d - g).pow(2).sum())
    # Nominal 95 %: the count of 100 independent seeds is Binomial(100, 0.95), mean 95,
    # sd 2.2, so ≥ 85 fails a correct interval with probability < 1e-4 and leaves room for
    # the approximate jackknife with 8 groups (t with 7 degrees of freedom).
    assert coverage(runs[which], value) >= 85
    # An interval of half the width covers ~68 % and fails: the bound has power.
    assert coverage(runs[which], value, shrink=0.5) < 85


# -- exactness, errors, reproducibility ----------------------------------------------------------


def test_piecewise_linear_net_gets_the_exact_diagonal_with_a_zero_width_interval():
    model = residual_cnn(nn.ReLU, inplace_add=True)
    x, y = residual_cnn_data()
    result = hessdiag.measure(model, (x, y), estimator="curvprop", dtype="float64",
                              batch_size=3, samples=8, keep_diagonal=True)
    objective = Objective(model, (x, y), "ce", batch_size=3)
    exact = ExactEstimator(EstimatorOptions(), analytic=False).estimate(objective).diagonal
    # Same quantity by different float64 routes (per-example squares vs. basis HVPs).
    assert max_relative_error(result.diagonal, exact) <= 1e-10
    assert result.ci95[0] == result.ci95[1] == pytest.approx(result.normalized_norm, rel=1e-15)
    assert result.samples is None
    assert "piecewise-linear" in result.method


class LayerNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.head = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.a(x))))


def test_general_network_is_refused_in_one_line_pointing_to_hutchinson():
    torch.manual_seed(0)
    data = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(HessdiagError) as err:
        hessdiag.measure(LayerNormNet(), data, estimator="curvprop", samples=4)
    message = str(err.value)
    assert "\n" not in message
    assert "hutchinson" in message and "layer_norm" in message


class ModifiesLayerInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        out = self.b(h)
        h.mul_(2.0)  # after b read it: b's per-example squares would use the wrong input
        return out


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("model, shape", [
    (ModifiesLayerInput, (5, 4)),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 2, padding="same"), nn.Tanh(), nn.Flatten(),
                           nn.Linear(32, 3)), (5, 1, 4, 4)),
], ids=["inplace-after-use", "asymmetric-same-padding"])
def test_what_the_tape_cannot_follow_is_refused_pointing_to_hutchinson(model, shape):
    torch.manual_seed(0)
    data = (torch.randn(*shape), torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(HessdiagError, match="hutchinson") as err:
        hessdiag.measure(model(), data, estimator="curvprop", samples=4)
    assert "\n" not in str(err.value)


def test_too_few_replicates_are_refused():
    with pytest.raises(EstimatorError, match="at least 3"):
        get_estimator("curvprop", EstimatorOptions(samples=2)).estimate(tiny_objective())


def test_same_seed_is_bit_identical_and_different_seeds_differ():
    def run(seed):
        return CurvpropEstimator(EstimatorOptions(samples=4, seed=seed)).estimate(tiny_objective())

    first, again, other = run(0), run(0), run(1)
    for name in first.diagonal:
        assert torch.equal(first.diagonal[name], again.diagonal[name])
    assert first.norm_statistics == again.norm_statistics
    assert not torch.equal(flat(first.diagonal), flat(other.diagonal))
    assert first.norm_statistics["total"] != other.norm_statistics["total"]


def test_the_known_ggn_replaces_the_computed_one_without_changing_the_draws(exact):
    """With the GGN diagonal given, the same seed gives the same estimate up to rounding
    (the draws do not depend on whether the GGN passes ran)."""
    options = EstimatorOptions(samples=4, seed=3)
    computed = CurvpropEstimator(options).estimate(tiny_objective())
    objective = tiny_objective()
    objective.ggn.remember(exact["ggn_dict"], "reference")
    given = CurvpropEstimator(options).estimate(objective)
    assert max_relative_error(computed.diagonal, given.diagonal) <= 1e-12
    assert computed.info["backward_passes"] > given.info["backward_passes"]


def test_adaptive_stopping_adds_rounds_of_replicates():
    estimate = CurvpropEstimator(EstimatorOptions(rtol=0.3, max_samples=64)).estimate(
        tiny_objective())
    assert estimate.samples in (16, 32, 48, 64)
    assert estimate.info["relative_half_width"] <= 0.3 or estimate.samples == 64


def test_split_ggn_gives_exact_ggn_norms_and_a_residual_interval_around_the_exact_one(exact):
    model = tiny_net()
    result = hessdiag.measure(model, tiny_data(), estimator="curvprop", dtype="float64",
                              batch_size=4, samples=16, seed=0, split_ggn=True)
    d, g = exact["diagonal"], exact["ggn"]
    # The GGN diagonal is exact: float64 rounding only.
    assert result.ggn_normalized_norm == pytest.approx(normalized_norm(g), rel=1e-10)
    for layer in result.per_layer:
        ggn_layer = exact["ggn_dict"][layer.name]
        assert layer.ggn_normalized_norm == pytest.approx(normalized_norm(ggn_layer), rel=1e-10)
    # The residual and total norms are estimates: their 95 % intervals (seed 0) contain the
    # exact values (coverage itself is checked over 100 seeds above).
    lo, hi = result.residual_ci95
    assert lo < normalized_norm(d - g) < hi
    assert result.ci95[0] < normalized_norm(d) < result.ci95[1]
    assert lo < hi  # a real interval, not an exact value


def test_monte_carlo_ggn_is_unbiased_too(exact):
    """ggn="mc" (the default beyond 32 outputs): each replicate adds one pass of Qₙξ, ξ
    Rademacher over the outputs, so every entry of d carries noise; the mean over 60 seeds
    is within 5 standard errors of the exact diagonal (P(|z| > 5) < 1e-3 over 171 entries),
    and the GGN's noise makes the interval wider than with the exact GGN."""
    objective = tiny_objective()
    diagonals, widths = [], []
    for seed in range(60):
        est = CurvpropEstimator(EstimatorOptions(samples=REPLICATES, seed=seed),
                                ggn="mc").estimate(objective)
        assert est.info["ggn"] == "monte-carlo" and est.residual_statistics is None
        diagonals.append(flat(est.diagonal))
        widths.append(est.info["relative_half_width"])
    stack = torch.stack(diagonals)
    se = stack.std(0) / math.sqrt(len(diagonals))
    d = exact["diagonal"]
    assert bool((se > 0).all())
    assert float(((stack.mean(0) - d) / se).abs().max()) <= 5.0
    exact_ggn = CurvpropEstimator(EstimatorOptions(samples=REPLICATES, seed=0), ggn="exact")
    assert exact_ggn.estimate(objective).info["relative_half_width"] < sorted(widths)[30]


# -- the leading layers by per-example probes (probe_layers) ----------------------------------

LEADING = ["0.weight", "0.bias", "4.conv1.weight", "4.conv2.weight"]
"""residual_cnn's first three linear/convolution layers: the stem and the block's two convs."""


def stem_case() -> tuple[Objective, dict]:
    """residual_cnn with SiLU (BatchNorm, residual add, max pooling), 6 examples in batches of
    4 and 2, float64; the exact diagonal and GGN diagonal (flat)."""
    x, y = residual_cnn_data(6)
    objective = Objective(residual_cnn(nn.SiLU), (x, y), "ce", batch_size=4)
    diagonal = ExactEstimator(EstimatorOptions(), analytic=False).estimate(objective).diagonal
    ggn = reference_ggn_diagonal(residual_cnn(nn.SiLU), "ce", x, y)
    objective.ggn.remember(ggn, "reference")
    return objective, {"diagonal": diagonal, "ggn": ggn}


def test_leading_layer_products_give_the_exact_residual():
    """Basis tangents (the same for every example) through the per-example copies of the
    first three layers give Σₙ diag Rₙ there, which must equal diag H − diag G from float64
    autograd: for the stem and for the two convolutions inside the residual block, whose
    inputs depend on θ."""
    objective, exact = stem_case()
    total = {name: torch.zeros_like(objective.params[name]) for name in LEADING}
    for x, y, _ in objective.batches():
        batch = TapedBatch(objective, x, y)
        assert batch.leading_parameters(1) == LEADING[:2]  # the stem: weight and bias
        assert batch.leading_parameters(3) == LEADING
        assert batch.leading_parameters(0) == []
        for name in LEADING:
            flat_view = total[name].view(-1)
            for i in range(flat_view.numel()):
                basis = torch.zeros_like(flat_view)
                basis[i] = 1.0
                tangent = basis.reshape(total[name].shape).expand(batch.num, *total[name].shape).clone()
                flat_view[i] += batch.residual_products({name: tangent})[name].sum(0).view(-1)[i]
    for name in LEADING:
        expected = exact["diagonal"][name] - exact["ggn"][name]
        assert float(expected.abs().max()) > 1e-3  # a residual worth checking
        assert max_relative_error({name: total[name] / 6}, {name: expected}) <= 1e-10


def test_products_on_a_slice_of_the_examples_are_those_examples_rows():
    """``residual_products`` on examples 1..2 equals rows 1..2 of the product on the batch
    (the estimator splits large batches this way to bound the copies' memory)."""
    objective, _ = stem_case()
    x, y, _ = next(objective.batches())
    batch = TapedBatch(objective, x, y)
    g = torch.Generator().manual_seed(0)
    tangents = {n: torch.randn(batch.num, *objective.params[n].shape, generator=g, dtype=torch.float64)
                for n in LEADING}
    whole = batch.residual_products(tangents)
    part = batch.residual_products({n: t[1:3] for n, t in tangents.items()}, slice(1, 3))
    for name in LEADING:
        assert torch.allclose(part[name], whole[name][1:3], rtol=1e-12, atol=1e-14)


def test_probe_groups_do_not_change_the_draws(monkeypatch):
    """With room for the copies of one example at a time the estimate equals the one-pass
    estimate to rounding: the probes are drawn for the whole batch before it is split."""
    from hessdiag.estimators import curvprop

    objective, _ = stem_case()
    chosen = CurvpropEstimator(EstimatorOptions(samples=3, seed=1), probe_layers=3)
    whole = flat(chosen.estimate(objective).diagonal)
    monkeypatch.setattr(curvprop, "PROBE_COPY_NUMBERS", 1)
    split = flat(chosen.estimate(objective).diagonal)
    assert torch.allclose(whole, split, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("value", [-1, 1.5, True, "probes"])
def test_probe_layers_must_be_a_whole_number(value):
    with pytest.raises(EstimatorError, match="probe_layers"):
        CurvpropEstimator(EstimatorOptions(samples=3), probe_layers=value)


@pytest.mark.parametrize("layers", [1, 3])
def test_leading_layer_probes_are_unbiased(layers):
    """50 seeds × 4 replicates with the first ``layers`` layers probed: every probed entry is
    noisy, the seed means lie within 5 standard errors of the exact diagonal, and so does ‖d‖²."""
    objective, exact = stem_case()
    probed = LEADING[:2] if layers == 1 else LEADING
    d = flat(exact["diagonal"])
    runs = []
    for seed in range(SEEDS // 2):
        chosen = CurvpropEstimator(EstimatorOptions(samples=4, seed=seed), probe_layers=layers)
        est = chosen.estimate(objective)
        # About one pass over the data per replicate (the draws per example are random).
        assert 0 < est.info["probe_products"] <= 4 * 6
        runs.append(est)
    diagonals = torch.stack([flat(e.diagonal) for e in runs])
    mean, se = diagonals.mean(0), diagonals.std(0) / math.sqrt(len(runs))
    noisy = se > 1e-12 * float(d.abs().max())
    probed_entries = flat({n: torch.full_like(v, float(n in probed)) for n, v in exact["diagonal"].items()}) > 0
    assert bool(noisy[probed_entries].all())
    # 5 standard errors per entry, as in test_diagonal_is_unbiased.
    assert float(((mean - d)[noisy] / se[noisy]).abs().max()) <= 5.0
    squared_norm_check([e.norm_statistics["total"] for e in runs], float(d.pow(2).sum()),
                       float(flat(exact["ggn"]).pow(2).sum()))
