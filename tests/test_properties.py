"""Property-based tests: whatever bytes, shapes, dtypes or keys arrive, `hessdiag measure`
ends in success (0) or a one-line bad-input error (2) — never a traceback or exit 1.

Example counts are modest (this file runs in well under 30 s on one thread); the
strategies aim at the formats' edges: truncations of valid files, valid headers with
garbage after them, odd dtypes and shapes, and keys renamed the way real training code
renames them (prefixes) or breaks them.
"""

import io
import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hessdiag.cli import main
from hessdiag.models import mlp

KWARGS = {"in_features": 64, "hidden": [3], "num_classes": 10, "activation": "tanh"}
MODEL_ARGS = ["--model", "hessdiag.models:mlp", "--model-kwargs", json.dumps(KWARGS)]
FEW = ["--max-examples", "6"]
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _state():
    torch.manual_seed(0)
    return mlp(**KWARGS).state_dict()


def _native_bytes():
    buffer = io.BytesIO()
    torch.manual_seed(0)
    model = mlp(**KWARGS)
    doc = {"hessdiag": 1, "model": {"factory": "hessdiag.models:mlp", "kwargs": KWARGS},
           "state_dict": model.state_dict(), "meta": {"data": "digits"}}
    torch.save(doc, buffer)
    return buffer.getvalue()


NATIVE = _native_bytes()


def check(capsys, args, allowed=(0, 2)):
    """Run the CLI; the exit code must be allowed and a failure one clean line."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert code in allowed, captured.err
    if code == 2:
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and "internal error" not in err, err
    return code


# -- checkpoint files ----------------------------------------------------------------------


@SETTINGS
@given(data=st.binary(max_size=600))
def test_random_bytes_as_checkpoint(tmp_path, capsys, data):
    path = tmp_path / "random.pt"
    path.write_bytes(data)
    check(capsys, ["measure", path, *MODEL_ARGS, *FEW], allowed=(2,))


@settings(SETTINGS, max_examples=30)
@given(cut=st.integers(0, len(NATIVE) - 1), flip=st.one_of(st.none(), st.integers(0, len(NATIVE) - 1)))
def test_truncated_or_bit_flipped_native_checkpoint(tmp_path, capsys, cut, flip):
    data = bytearray(NATIVE)
    if flip is not None:
        data[flip] ^= 0xFF  # may land in the payload (then the file can still load): 0 or 2
        check_path = tmp_path / "flipped.pt"
        check_path.write_bytes(bytes(data))
        check(capsys, ["measure", check_path, *FEW])
    path = tmp_path / "cut.pt"
    path.write_bytes(NATIVE[:cut])
    check(capsys, ["measure", path, *FEW], allowed=(2,))


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=5),
                                                             st.lists(st.integers(), max_size=3)), max_size=3),
       tail=st.binary(max_size=64), declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_malformed_safetensors(tmp_path, capsys, header, tail, declared):
    body = json.dumps(header).encode()
    size = len(body) if declared is None else declared
    path = tmp_path / "w.safetensors"
    path.write_bytes(size.to_bytes(8, "little") + body + tail)
    check(capsys, ["measure", path, *MODEL_ARGS, *FEW], allowed=(2,))


RENAMES = st.sampled_from([
    lambda k: k, lambda k: "module." + k, lambda k: "model." + k, lambda k: "module.model." + k,
    lambda k: "net." + k, lambda k: k.replace(".", "_"), lambda k: k.upper(), lambda k: k + ".orig",
])


@SETTINGS
@given(renames=st.lists(RENAMES, min_size=5, max_size=5), nest=st.sampled_from(
    [None, "state_dict", "model_state_dict", "model", "weights"]), drop=st.booleans(),
    uniform=st.booleans())
def test_random_key_renames(tmp_path, capsys, renames, nest, drop, uniform):
    state = _state()
    keys = list(state)
    if uniform:
        renames = [renames[0]] * len(keys)
    renamed = {rename(k): state[k] for rename, k in zip(renames, keys)}
    if drop:
        renamed.pop(next(iter(renamed)))
    path = tmp_path / "renamed.pt"
    torch.save(renamed if nest is None else {nest: renamed, "epoch": 1}, path)
    code = check(capsys, ["measure", path, *MODEL_ARGS, *FEW, "--quiet"])
    # A uniform module./model. prefix (nested under a conventional key) must load.
    first = keys[0]
    standard = renames[0](first) in {first, "module." + first, "model." + first, "module.model." + first}
    if uniform and standard and not drop and nest != "weights":
        assert code == 0


# -- data files ----------------------------------------------------------------------------

GOOD_X = [(4, 64), (4, 1, 8, 8), (4, 8, 8)]
BAD_X = [(), (0,), (4,), (0, 64), (4, 63), (5, 64), (4, 10)]
BAD_Y = [(), (0,), (3,), (4, 1), (4, 10), (5,)]
NUMPY_FLOATS = ["float16", "float32", "float64"]
NUMPY_INTS = ["int8", "uint8", "int16", "int32", "int64", "uint16"]
NUMPY_ODD = ["bool", "complex64", "<U3", "object"]
TORCH_FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TORCH_INTS = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]
TORCH_ODD = [torch.bool, torch.complex64]
FINITE = st.lists(st.floats(-3, 3, width=32), min_size=1, max_size=6)
NON_FINITE = st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1.0]), min_size=1, max_size=4)
LABELS = st.lists(st.integers(0, 9), min_size=1, max_size=6)
BAD_LABELS = st.lists(st.integers(-3, 12), min_size=1, max_size=6)


@st.composite
def datasets(draw, floats, ints, odd):
    """(x_shape, x_dtype, x_values, y_shape, y_dtype, y_values, valid): each aspect is broken
    with probability 1/4, so about a third of the cases are valid and must succeed."""
    broken = {k: draw(st.sampled_from([False, False, False, True]))
              for k in ("x_shape", "x_dtype", "x_values", "y_shape", "y_dtype", "y_values")}
    x_shape = draw(st.sampled_from(BAD_X if broken["x_shape"] else GOOD_X))
    x_dtype = draw(st.sampled_from(ints + odd if broken["x_dtype"] else floats))
    x_values = draw(NON_FINITE if broken["x_values"] else FINITE)
    y_shape = draw(st.sampled_from(BAD_Y)) if broken["y_shape"] else (x_shape[0] if x_shape else 4,)
    y_dtype = draw(st.sampled_from(floats + odd if broken["y_dtype"] else ints))
    y_values = draw(BAD_LABELS if broken["y_values"] else LABELS)
    valid = not any(broken.values()) or (
        # "broken" values that happen to be fine
        not any(v for k, v in broken.items() if k != "y_values") and all(0 <= v <= 9 for v in y_values))
    return x_shape, x_dtype, x_values, y_shape, y_dtype, y_values, valid


@pytest.fixture
def native(tmp_path):
    path = tmp_path / "native.pt"
    path.write_bytes(NATIVE)
    return path


def _fill(shape, values):
    """An array of ``shape`` cycling through ``values`` (float64)."""
    size = int(np.prod(shape))
    return np.resize(np.asarray(values, dtype=np.float64), size).reshape(shape) if size else np.zeros(shape)


def _numpy(shape, dtype, values):
    if dtype == "object":
        return np.array([None] * int(np.prod(shape)), dtype=object).reshape(shape)
    if dtype == "<U3":
        return np.full(shape, "ab", dtype="<U3")
    with np.errstate(all="ignore"):
        return _fill(shape, values).astype(dtype)


@SETTINGS
@given(case=datasets(NUMPY_FLOATS, NUMPY_INTS, NUMPY_ODD), loss=st.sampled_from(["ce", "mse"]))
def test_random_npz_shapes_and_dtypes(native, tmp_path, capsys, case, loss):
    x_shape, x_dtype, x_values, y_shape, y_dtype, y_values, valid = case
    np.savez(tmp_path / "d.npz", x=_numpy(x_shape, x_dtype, x_values), y=_numpy(y_shape, y_dtype, y_values))
    code = check(capsys, ["measure", native, "--data", f"npz:{tmp_path / 'd.npz'}", "--loss", loss, "--quiet"])
    if valid:
        assert code == 0


@SETTINGS
@given(case=datasets(TORCH_FLOATS, TORCH_INTS, TORCH_ODD), as_tuple=st.booleans(), batch=st.integers(1, 5))
def test_random_tensor_files(native, tmp_path, capsys, case, as_tuple, batch):
    x_shape, x_dtype, x_values, y_shape, y_dtype, y_values, valid = case
    with np.errstate(all="ignore"):
        x = torch.from_numpy(_fill(x_shape, x_values)).to(x_dtype)
        y = torch.from_numpy(_fill(y_shape, y_values)).to(y_dtype)
    torch.save((x, y) if as_tuple else {"x": x, "y": y}, tmp_path / "d.pt")
    code = check(capsys, ["measure", native, "--data", f"tensors:{tmp_path / 'd.pt'}",
                          "--batch-size", batch, "--quiet"])
    if valid:
        assert code == 0


@SETTINGS
@given(data=st.one_of(st.binary(max_size=300), st.builds(
    lambda d, protocol: pickle.dumps(d, protocol=protocol),
    st.dictionaries(st.sampled_from([b"data", b"labels", "data", b"x"]),
                    st.one_of(st.integers(), st.lists(st.integers(-2, 12), max_size=4), st.binary(max_size=8),
                              st.builds(lambda n: np.zeros((n, 3072), np.uint8), st.integers(0, 3))),
                    max_size=3),
    st.integers(0, 5))))
def test_random_cifar_batch_files(native, tmp_path, capsys, data):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    (folder / "test_batch").write_bytes(data)
    check(capsys, ["measure", native, "--data", f"cifar10:{tmp_path}", "--split", "test", "--quiet"])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # hidden=[0]
@SETTINGS
@given(kwargs=st.dictionaries(st.sampled_from(["in_features", "hidden", "num_classes", "activation", "bogus"]),
                              st.one_of(st.integers(-2, 70), st.lists(st.integers(-1, 4), max_size=2),
                                        st.sampled_from(["tanh", "relu", "rct:n=1,alpha=3", "nope", ""]),
                                        st.none()),
                              max_size=4))
def test_random_model_kwargs(tmp_path, capsys, kwargs):
    path = tmp_path / "sd.pt"
    torch.save(_state(), path)
    check(capsys, ["measure", path, "--model", "hessdiag.models:mlp", "--model-kwargs", json.dumps(kwargs),
                   *FEW, "--quiet"])
