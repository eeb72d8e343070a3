"""Data specs resolve to (x, y) without downloads."""

import pytest
import torch

from hessdiag.io import DataSpecError, load_data


def test_digits_splits_are_fixed_disjoint_and_scaled():
    xtr, ytr = load_data("digits", "train")
    xte, yte = load_data("digits", "test")
    xall, _ = load_data("digits", "all")
    assert xtr.shape == (1438, 1, 8, 8) and xte.shape == (359, 1, 8, 8) and xall.shape[0] == 1797
    assert 0.0 <= float(xall.min()) and float(xall.max()) == 1.0
    assert torch.equal(load_data("digits", "test")[0], xte)  # seeded: same every time
    train_rows = {tuple(r.tolist()) for r in xtr.reshape(len(xtr), -1)}
    overlap = sum(tuple(r.tolist()) in train_rows for r in xte.reshape(len(xte), -1))
    assert overlap < 5  # a handful of digits images are exact duplicates in the source data
    assert ytr.dtype == torch.int64


def test_tensors_spec_reads_dict_and_tuple(tmp_path):
    x, y = torch.randn(7, 3), torch.arange(7) % 2
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    torch.save((x, y), tmp_path / "t.pt")
    for name in ("d.pt", "t.pt"):
        a, b = load_data(f"tensors:{tmp_path / name}", max_examples=5)
        assert torch.equal(a, x[:5]) and torch.equal(b, y[:5])


@pytest.mark.parametrize("spec, message", [("mnist", "unknown data spec"), ("tensors:", "unknown data spec"),
                                           ("tensors:/no/such.pt", "not found")])
def test_bad_specs_raise_one_line_errors(spec, message):
    with pytest.raises(DataSpecError, match=message):
        load_data(spec)


def test_mismatched_lengths_are_rejected(tmp_path):
    torch.save({"x": torch.randn(4, 2), "y": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(DataSpecError, match="4 examples but y has 3"):
        load_data(f"tensors:{tmp_path / 'bad.pt'}")
