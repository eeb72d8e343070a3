"""hessdiag.compat: twice-differentiable forwards without touching the model."""

import threading

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import hessdiag
from hessdiag import compat
from hessdiag.compat import func_unsupported_reason, twice_differentiable

from .reference import reference_diagonal

# -- the closed forms ------------------------------------------------------------------


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    dense = torch.linspace(-4, 4, 80_001, dtype=torch.float64)  # every region, both kinks
    special = torch.tensor([-3.0, 3.0, -0.0, 0.0, float("inf"), -float("inf"), float("nan")],
                           dtype=torch.float64)
    x = torch.cat([4 * torch.randn(50_000, generator=g, dtype=torch.float64), dense, special])
    return x.to(dtype)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("native, ours", [(F.hardsigmoid, compat.hardsigmoid),
                                          (F.hardswish, compat.hardswish)])
def test_formulas_are_bit_identical_to_the_native_kernels(native, ours, dtype, device):
    x = _inputs(dtype).to(device)
    for sample in (x, x[::3], x.reshape(-1, 1).expand(-1, 2).T):  # contiguous, strided, 2-D
        a, b = native(sample), ours(sample)
        assert a.dtype == b.dtype and a.shape == b.shape
        same_nan = a.isnan() == b.isnan()
        assert bool(same_nan.all())
        # Bitwise: -0.0 and 0.0 must agree too (NaN payloads are not compared).
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        keep = ~a.isnan()
        assert torch.equal(a[keep].view(bits), b[keep].view(bits))


@pytest.mark.parametrize("native, ours", [(F.hardsigmoid, compat.hardsigmoid),
                                          (F.hardswish, compat.hardswish)])
def test_formulas_have_the_native_first_derivative_and_a_second_one(native, ours):
    x = torch.cat([torch.linspace(-4, 4, 8001, dtype=torch.float64),
                   torch.tensor([-3.0, 3.0], dtype=torch.float64)]).requires_grad_()
    (expected,) = torch.autograd.grad(native(x).sum(), x)
    (first,) = torch.autograd.grad(ours(x).sum(), x, create_graph=True)
    # The native hardsigmoid backward multiplies by the float constant 1.0f/6.0f, also in
    # float64: agreement to float precision, and exactly where the derivative vanishes.
    assert torch.allclose(first, expected, rtol=1e-7, atol=0)
    assert torch.equal(first == 0, expected == 0)  # the kinks x = ±3 included
    (second,) = torch.autograd.grad(first.sum(), x)
    inside = (x.detach() > -3) & (x.detach() < 3)
    curvature = 1 / 3 if native is F.hardswish else 0.0  # d²/dx² of x(x+3)/6 inside
    assert torch.allclose(second[inside], torch.full_like(second[inside], curvature))
    assert bool((second[x.detach().abs() > 3] == 0).all())
    # forward mode agrees with reverse mode
    tangent = jvp(lambda t: ours(t), (x.detach(),), (torch.ones_like(x),))[1]
    assert torch.allclose(tangent, first.detach(), rtol=1e-15, atol=1e-15)


# -- the function mode: module and functional calls, in place, composition -------------


class HardNet(nn.Module):
    """Linear → Hardswish (in place, as in torchvision's MobileNetV3) → SE-style gate."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.act, self.gate = nn.Hardswish(inplace=True), nn.Hardsigmoid()

    def forward(self, x):
        h = self.act(self.a(x))
        h = h * self.gate(h) + F.hardswish(h) - F.hardsigmoid(h, inplace=False)
        return self.b(h)


def _loss(model, x, y):
    names = [n for n, _ in model.named_parameters()]

    def loss(params):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss, {n: p.detach() for n, p in model.named_parameters()}, names


def _func_hvp(loss, params, tangents):
    return vmap(lambda v: jvp(grad(loss), (params,), (v,))[1])(tangents)


def _double_backward_hvp(loss, params, tangents):
    leaves = {k: p.clone().requires_grad_() for k, p in params.items()}
    g = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    rows = []
    for i in range(next(iter(tangents.values())).shape[0]):
        rows.append(torch.autograd.grad(g, list(leaves.values()),
                                        [tangents[k][i] for k in leaves], retain_graph=True))
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(leaves)}


def _tangents(params, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(k, *p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}


def _close(a, b, rtol):
    scale = max(float(t.abs().max()) for t in b.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) <= rtol * scale


def test_mode_sees_module_and_functional_calls_and_keeps_values():
    torch.manual_seed(0)
    model = HardNet().double().eval()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    expected = model(x)
    with twice_differentiable():
        assert torch.equal(model(x), expected)
        h = torch.randn(7, dtype=torch.float64)
        native = F.hardswish(h.clone())
        returned = F.hardswish(h, inplace=True)  # in place, like the native kernel
        assert returned is h and torch.equal(h, native)
        h2 = torch.randn(7)
        assert torch.equal(torch._C._nn.hardsigmoid_(h2.clone()), F.hardsigmoid(h2))
    loss, params, _ = _loss(model, x, y)
    v = _tangents(params)
    with pytest.raises(NotImplementedError, match="Trying to use forward AD with"):
        _func_hvp(loss, params, v)
    with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
        _double_backward_hvp(loss, params, v)
    with twice_differentiable():
        hv_func = _func_hvp(loss, params, v)
        hv_autograd = _double_backward_hvp(loss, params, v)
    assert _close(hv_func, hv_autograd, 1e-12)


def _transformer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return nn.Sequential(encoder, nn.Flatten(), nn.Linear(8 * 5, 3)).eval()


def test_torch_func_hvps_through_attention_need_the_compat_layer():
    model = _transformer()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 8, generator=g), torch.tensor([0, 2])
    loss, params, _ = _loss(model, x, y)
    v = _tangents(params, k=2)
    with pytest.raises(NotImplementedError, match="forward AD with _scaled_dot_product"):
        _func_hvp(loss, params, v)
    with twice_differentiable():
        hv_func = _func_hvp(loss, params, v)
        hv_autograd = _double_backward_hvp(loss, params, v)
    assert _close(hv_func, hv_autograd, 1e-4)  # float32, two routes
    # The MATH backend is the same attention: the forward hardly moves (float32).
    with twice_differentiable():
        compat_out = model(x)
    assert torch.allclose(compat_out, model(x), rtol=1e-5, atol=1e-6)


def test_torch_func_hvps_through_mobilenet_hardswish():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    x, y = torch.randn(1, 3, 16, 16), torch.tensor([3])
    loss, params, _ = _loss(model, x, y)
    v = _tangents(params, k=1)
    with pytest.raises(NotImplementedError, match="hardsigmoid_backward|hardswish_backward"):
        _func_hvp(loss, params, v)
    with twice_differentiable():
        hv_func = _func_hvp(loss, params, v)
        hv_autograd = _double_backward_hvp(loss, params, v)
    assert all(bool(torch.isfinite(t).all()) for t in hv_func.values())
    assert _close(hv_func, hv_autograd, 1e-4)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_rnns_run_under_torch_func(kind):
    torch.manual_seed(0)
    rnn = kind(3, 4, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = rnn, nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Net().eval()
    x, y = torch.randn(2, 5, 3), torch.tensor([0, 1])
    loss, params, _ = _loss(model, x, y)
    v = _tangents(params, k=2)
    mkldnn = torch.backends.mkldnn.enabled
    with twice_differentiable():
        hv_func = _func_hvp(loss, params, v)
        assert torch.backends.mkldnn.enabled == mkldnn  # oneDNN is off only inside RNN calls
    hv_autograd = _double_backward_hvp(loss, params, v)
    assert _close(hv_func, hv_autograd, 1e-4)


# -- global state ----------------------------------------------------------------------


def _flags():
    stack = torch.overrides._get_current_function_mode_stack()
    return {
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "math": torch.backends.cuda.math_sdp_enabled(),
        "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(),
        "mha_fastpath": torch.backends.mha.get_fastpath_enabled(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "cudnn": torch.backends.cudnn.enabled,
        "modes": len(stack),
    }


def test_flags_are_set_inside_and_restored_after_exit_and_exceptions():
    before = _flags()
    with twice_differentiable():
        inside = _flags()
        with twice_differentiable():  # re-entrant: nothing more is pushed
            assert _flags() == inside
        assert _flags() == inside
    assert inside["math"] and not inside["flash"] and not inside["mem_efficient"]
    assert not inside["mha_fastpath"] and inside["modes"] == before["modes"] + 1
    assert _flags() == before
    with pytest.raises(ZeroDivisionError):
        with twice_differentiable():
            with twice_differentiable():
                raise ZeroDivisionError
    assert _flags() == before
    with pytest.raises(RuntimeError):  # an error inside an RNN call restores oneDNN too
        with twice_differentiable():
            nn.LSTM(3, 4)(torch.randn(2, 1, 5))
    assert _flags() == before


def test_flags_restored_when_threads_leave_in_another_order():
    before = _flags()
    entered, release = threading.Event(), threading.Event()

    def worker():
        with twice_differentiable():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait(10)
    with twice_differentiable():
        release.set()  # the other thread leaves first
        thread.join(10)
        assert not torch.backends.mha.get_fastpath_enabled()  # still held by this thread
    assert _flags() == before


# -- recognizing torch.func's refusals -------------------------------------------------


class _NoJvp(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos()


class _OldStyle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class _Buffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("seen", torch.zeros(2))

    def forward(self, x):
        out = self.lin(x)
        self.seen.add_(out.mean(0))  # a buffer written during forward
        return out


def _error_from(forward):
    """The exception torch.func raises on vmap(jvp(grad)) of a small model's loss."""
    model = _Buffer()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])

    def loss(params):
        return F.cross_entropy(forward(model, params, x), y)

    params = {n: p.detach() for n, p in model.named_parameters()}
    try:
        _func_hvp(loss, params, _tangents(params, k=2))
    except Exception as err:  # noqa: BLE001 - collected for the classifier
        return err
    raise AssertionError("torch.func accepted the model")


REFUSALS = {
    "no jvp": lambda m, p, x: _NoJvp.apply(functional_call(m, p, (x,))),
    "old-style Function": lambda m, p, x: _OldStyle.apply(functional_call(m, p, (x,))),
    "buffer written in forward": lambda m, p, x: functional_call(m, p, (x,)) + m.seen,
    "no forward-mode derivative": lambda m, p, x: torch.cdist(functional_call(m, p, (x,)),
                                                              torch.ones(1, 2)),
    "numpy in forward": lambda m, p, x: functional_call(m, p, (x,)) * torch.as_tensor(
        functional_call(m, p, (x,)).numpy()),
}


@pytest.mark.parametrize("forward", REFUSALS.values(), ids=REFUSALS.keys())
def test_real_torch_func_refusals_are_recognized(forward):
    err = _error_from(forward)
    assert func_unsupported_reason(err) == str(err).strip().splitlines()[0]


def test_other_errors_are_not_refusals():
    assert func_unsupported_reason(torch.OutOfMemoryError("vmap: out of memory")) is None
    assert func_unsupported_reason(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert func_unsupported_reason(ValueError("Trying to use forward AD with x")) is None


# -- every measurement path ------------------------------------------------------------


def test_every_measurement_path_runs_on_a_hardswish_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Hardswish(inplace=True), nn.Linear(6, 6),
                          nn.Hardsigmoid(), nn.Linear(6, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with twice_differentiable():  # the reference's own double backward needs it too
        reference = reference_diagonal(model, "ce", x, y)
    # exact (basis HVPs), the exact GGN (the hooked one: Hardswish is an elementwise
    # activation) and PyHessian's double backward on a model copy
    exact = hessdiag.measure(model, (x, y), estimator="exact", dtype="float64", split_ggn=True,
                             extras="trace:3", keep_diagonal=True)
    flat = torch.cat([d.reshape(-1) for d in exact.diagonal.values()])
    ref = torch.cat([d.reshape(-1) for d in reference.values()])
    assert float((flat - ref).abs().max() / ref.abs().max()) < 1e-10
    assert exact.hvp_route == "func" and exact.ggn_method == "tape"
    assert exact.extras["hvps"] == 3 and torch.isfinite(torch.tensor(exact.extras["trace"]))
    ggn = hessdiag.measure(model, (x, y), estimator="hutchinson-ggn", samples=8, dtype="float64")
    assert ggn.hvp_route == "func" and ggn.normalized_norm > 0
