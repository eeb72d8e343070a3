"""validate_inputs / measure reject bad model–data–loss combinations before measuring."""

import pytest
import torch
from torch import nn

import hessdiag
from hessdiag.validation import InputError, validate_inputs


def _model(outputs=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, outputs))


def test_valid_inputs_pass(tiny_classification):
    validate_inputs(_model(), tiny_classification, "ce")
    x, y = tiny_classification
    validate_inputs(_model(), (x, torch.randn(20, 3)), "mse")
    validate_inputs(_model(), (x, y), "mse")  # integer labels are one-hot encoded
    validate_inputs(_model(), (x, torch.softmax(torch.randn(20, 3), 1)), "ce")  # soft labels


@pytest.mark.parametrize(
    "make, loss, message",
    [
        (lambda x, y: (x, y + 1), "ce", "label 3 is outside the model's output range.*3 outputs.*0..2"),
        (lambda x, y: (x, y - 1), "mse", "label -1 is outside"),
        (lambda x, y: (x[:, :5], y), "ce", r"model rejects inputs of shape \(20, 5\).*mat1 and mat2"),
        (lambda x, y: (x.to(torch.int64), y), "ce", "model rejects inputs"),
        (lambda x, y: (x, y.float()), "ce", "ce needs integer class labels"),
        (lambda x, y: (x, torch.randn(20, 2)), "mse", "one target per model output"),
        (lambda x, y: (x, y.view(20, 1)), "ce", "ce needs integer|shape \\(batch,\\)"),
        (lambda x, y: (x.index_fill(0, torch.tensor([7]), float("nan")), y), "ce", "input data contain NaN"),
        (lambda x, y: (x, torch.full((20, 3), float("inf"))), "mse", "targets contain NaN or Inf"),
    ],
)
def test_bad_data_is_named(tiny_classification, make, loss, message):
    with pytest.raises(InputError, match=message):
        validate_inputs(_model(), make(*tiny_classification), loss)


def test_labels_checked_in_every_batch_not_just_the_first(tiny_classification):
    x, y = tiny_classification
    y = y.clone()
    y[-1] = 9
    with pytest.raises(InputError, match="batch 3: label 9"):
        validate_inputs(_model(), (x, y), "ce", batch_size=8)


def test_non_finite_parameters_and_outputs(tiny_classification):
    model = _model()
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with pytest.raises(InputError, match="non-finite values .* in the model's 2.bias"):
        hessdiag.measure(model, tiny_classification)
    huge = nn.Linear(6, 3)
    with torch.no_grad():
        huge.weight.fill_(3e38)  # finite parameters, overflowing logits
    with pytest.raises(InputError, match="output on the first batch contains NaN or Inf"):
        validate_inputs(huge, tiny_classification, "ce")


def test_model_output_shapes(tiny_classification):
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return (x * self.w).sum()

    with pytest.raises(InputError, match="not one row per example"):
        validate_inputs(Scalar(), tiny_classification, "mse")

    class Tuple(Scalar):
        def forward(self, x):
            return x * self.w, None

    with pytest.raises(InputError, match="returns a tuple, not a tensor"):
        validate_inputs(Tuple(), tiny_classification, "ce")


def test_empty_data_and_unknown_names(tiny_classification):
    x, y = tiny_classification
    with pytest.raises(hessdiag.HessdiagError, match="empty"):
        hessdiag.measure(_model(), (x[:0], y[:0]))
    with pytest.raises(hessdiag.HessdiagError, match="empty"):
        hessdiag.measure(_model(), [])
    with pytest.raises(hessdiag.HessdiagError, match="unknown loss 'hinge'"):
        hessdiag.measure(_model(), (x, y), loss="hinge")
    with pytest.raises(hessdiag.HessdiagError, match="unknown estimator 'magic'"):
        hessdiag.measure(_model(), (x, y), estimator="magic")


def test_unavailable_device_is_bad_input(tiny_classification):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(InputError, match="CUDA is not available"):
        hessdiag.measure(_model(), tiny_classification, device="cuda")


def test_validation_leaves_model_untouched(tiny_classification):
    model = _model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    validate_inputs(model, tiny_classification, "ce")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_progress_callback_counts_every_processed_example(tiny_classification):
    seen = []
    hessdiag.measure(_model(), tiny_classification, batch_size=8, progress=seen.append)
    assert seen == [8, 8, 4]  # the analytic MLP path: one data pass; validation's is not counted
    seen.clear()

    class NotSequential(nn.Module):  # no analytic path: basis-vector HVPs in blocks of 128
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(6, 30), nn.Tanh(), nn.Linear(30, 3))

        def forward(self, x):
            return self.inner(x)

    hessdiag.measure(NotSequential(), tiny_classification, batch_size=8, progress=seen.append)
    assert seen == [8, 8, 4] * 3  # 303 parameters: 3 blocks, one data pass each


def test_labels_must_be_int64(tiny_classification):
    x, y = tiny_classification
    with pytest.raises(InputError, match="must be int64.*got torch.int32.*y.long()"):
        validate_inputs(_model(), (x, y.int()), "ce")
