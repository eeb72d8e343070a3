"""hessdiag.operators: H, G and R = H − G as linear operators, against float64 references;
the exact GGN diagonal kept once; estimators that act on nothing but the operators.

Tolerances: float64 on both sides by different routes (forward-over-reverse vs dense
autograd Hessians), so the products agree to rounding (~1e-15 relative); 1e-10 leaves
room without letting a wrong term through (those are O(1) relative).
"""

import pytest
import torch

from hessdiag.estimators import HutchinsonEstimator, PlainHutchinsonEstimator
from hessdiag.models import cnn, mlp
from hessdiag.objective import Objective
from hessdiag.operators import CurvatureOperator

from .reference import flat, max_relative_error, reference_ggn, reference_hessian, split_like


def models():
    torch.manual_seed(0)
    yield "mlp", mlp(in_features=6, hidden=(5, 4), num_classes=3, activation="rct:n=2,alpha=7"), (20, 6)
    yield "cnn", cnn(in_channels=1, image_size=4, channels=(2, 2), num_classes=3, activation="silu"), (9, 1, 4, 4)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name, model, shape", list(models()))
def test_hvp_and_ggn_vp_equal_dense_references(name, model, shape, loss):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(*shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g)
    obj = Objective(model, (x, y), loss, dtype=torch.float64, batch_size=4, chunk_size=3)
    v = torch.randn(5, obj.num_params, generator=g, dtype=torch.float64)
    hv = obj.flatten(obj.hessian.apply(obj.unflatten(v)))
    gv = obj.ggn.rows(v)
    assert obj.hessian.shape == (obj.num_params, obj.num_params)
    assert torch.allclose(obj.hessian @ v.T, hv.T, rtol=0, atol=1e-13)  # columns, as curvlinops
    assert torch.allclose(obj.hessian @ v[0], hv[0], rtol=0, atol=1e-13)
    h, ggn = reference_hessian(model, loss, x, y), reference_ggn(model, loss, x, y)
    # float64 on both sides, different routes: rounding is ~1e-15 relative.
    assert float((hv - v @ h).abs().max() / (v @ h).abs().max()) < 1e-10
    assert float((gv - v @ ggn).abs().max() / (v @ ggn).abs().max()) < 1e-10
    diag = obj.ggn.per_example_diagonal(examples_per_chunk=3)
    assert max_relative_error(diag, split_like(ggn.diagonal(), model)) < 1e-10
    assert bool((flat(diag) >= 0).all())
    # The fused residual product is (H − G)·V, the same rounding argument.
    rv = obj.flatten(obj.residual.apply(obj.unflatten(v)))
    ref = v @ (h - ggn)
    assert float((rv - ref).abs().max() / ref.abs().max()) < 1e-10


class DenseOperator(CurvatureOperator):
    """A stand-in that applies a given dense matrix: the estimators must see no difference."""

    name = "dense"

    def __init__(self, objective, matrix):
        super().__init__(objective)
        self.matrix = matrix

    def batch_product(self, chunk, x, y):
        flat_chunk = self.objective.flatten(chunk)
        return self.objective.unflatten(flat_chunk @ self.matrix.T)

    def apply(self, vectors, chunk_size=None):  # no data pass: the matrix is the whole objective
        return self.objective.unflatten(self.objective.flatten(vectors) @ self.matrix.T)


def _digits_like():
    torch.manual_seed(0)
    model = mlp(in_features=6, hidden=(5,), num_classes=3, activation="silu")
    g = torch.Generator().manual_seed(3)
    return model, torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


@pytest.mark.parametrize("estimator", [PlainHutchinsonEstimator(samples=24, seed=2),
                                       HutchinsonEstimator(samples=24, seed=2)], ids=["plain", "lowrank"])
def test_stochastic_estimators_act_only_on_the_hessian_operator(estimator):
    """Swapping the Hessian operator for a dense matrix with the same entries gives the same
    estimate for the same seed; swapping in another matrix changes it accordingly."""
    model, x, y = _digits_like()
    real = Objective(model, (x, y), dtype=torch.float64)
    expected = estimator.estimate(real)
    dense = Objective(model, (x, y), dtype=torch.float64)
    matrix = reference_hessian(model, "ce", x, y)
    dense.hessian = DenseOperator(dense, matrix)
    same = estimator.estimate(dense)
    assert max_relative_error(same.diagonal, expected.diagonal) < 1e-10
    scaled = Objective(model, (x, y), dtype=torch.float64)
    scaled.hessian = DenseOperator(scaled, 3.0 * matrix)
    assert max_relative_error({k: v / 3.0 for k, v in estimator.estimate(scaled).diagonal.items()},
                              expected.diagonal) < 1e-10


def test_the_exact_ggn_diagonal_is_computed_once_and_can_be_handed_over(monkeypatch):
    model, x, y = _digits_like()
    objective = Objective(model, (x, y), dtype=torch.float64)
    assert objective.ggn.known_diagonal is None
    calls = []
    import hessdiag.ggn

    original = hessdiag.ggn.ggn_diagonal

    def counting(obj, method="auto"):
        calls.append(method)
        return original(obj, method)

    monkeypatch.setattr(hessdiag.ggn, "ggn_diagonal", counting)
    first = objective.ggn.diagonal()
    assert objective.ggn.diagonal() is first and objective.ggn.known_diagonal is first and len(calls) == 1
    reference = split_like(reference_ggn(model, "ce", x, y).diagonal(), model)
    assert max_relative_error(first, reference) < 1e-10 and objective.ggn.diagonal_method
    handed = Objective(model, (x, y), dtype=torch.float64)
    handed.ggn.remember(reference, "reference")
    assert handed.ggn.diagonal() is reference and handed.ggn.diagonal_method == "reference" and len(calls) == 1
