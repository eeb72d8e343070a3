"""Our BackPACK module extensions read the activations' closed forms."""

import pytest
import torch
from backpack import backpack, extend
from torch import nn

import hessdiag
from hessdiag.activations import activation_derivatives
from hessdiag.backpack_ext import SMOOTH_ACTIVATIONS, diag_ggn_exact, diag_ggn_mc, diag_hessian
from hessdiag.backpack_ext.derivatives import ClosedFormActivationDerivatives


@pytest.mark.parametrize("module", [hessdiag.RCTAF(2, 7.0), nn.SiLU(), nn.GELU(approximate="tanh"),
                                    nn.Softplus(beta=2.0), nn.Mish()])
def test_derivatives_are_the_registered_closed_forms(module):
    x = torch.linspace(-6, 6, 41, dtype=torch.float64).reshape(1, -1)
    module.input0 = x
    d = ClosedFormActivationDerivatives()
    ref = activation_derivatives(module)
    assert torch.equal(d.df(module, None, None), ref.dphi(x))
    assert torch.equal(d.d2f(module, None, None), ref.d2phi(x))
    assert torch.equal(d.df(module, None, None, subsampling=[0]), ref.dphi(x))


def test_extensions_know_every_smooth_activation():
    for ext in (diag_hessian(), diag_ggn_exact(), diag_ggn_mc()):
        known = ext._BackpropExtension__module_extensions
        assert all(cls in known for cls in SMOOTH_ACTIVATIONS)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_ggn_mc_runs_on_a_smooth_network(tiny_classification):
    # DiagGGNMC samples the loss Hessian; here we only check BackPACK can traverse our
    # activations with it (its value is checked in expectation by BackPACK itself).
    torch.manual_seed(0)
    net = extend(nn.Sequential(nn.Linear(6, 4), hessdiag.RCTAF(1, 3.0), nn.Mish(), nn.Linear(4, 3)))
    x, y = tiny_classification
    loss = extend(nn.CrossEntropyLoss())(net(x), y)
    with backpack(diag_ggn_mc(mc_samples=2)):
        loss.backward()
    assert all(torch.isfinite(p.diag_ggn_mc).all() and (p.diag_ggn_mc >= 0).all()
               for p in net.parameters())
