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


# -- npz ----------------------------------------------------------------------------------

import numpy as np  # noqa: E402


def test_npz_spec_reads_arrays_without_pickle(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 2, 3)).astype(np.float32)
    y = np.arange(6) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y, extra=np.zeros(1))
    a, b = load_data(f"npz:{tmp_path / 'd.npz'}", max_examples=4)
    assert torch.equal(a, torch.from_numpy(x[:4])) and torch.equal(b, torch.from_numpy(y[:4]))
    assert b.dtype == torch.int64


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((3, 2))}, "lacks the array.*y"),
        ({"x": np.array([{"a": 1}] * 3, dtype=object), "y": np.zeros(3)}, "cannot read arrays"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(4)}, "3 examples but y has 4"),
        ({"x": np.zeros((3, 2), np.complex64), "y": np.zeros(3)}, "unsupported dtype"),
        ({"x": np.zeros(()), "y": np.zeros(())}, "scalar"),
    ],
)
def test_bad_npz_files(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataSpecError, match=message):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def test_npz_that_is_not_an_archive(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DataSpecError, match="cannot read arrays"):
        load_data(f"npz:{tmp_path / 'junk.npz'}")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataSpecError, match="single .npy array"):
        load_data(f"npz:{tmp_path / 'one.npy'}")


# -- CIFAR pickle batches -----------------------------------------------------------------

import pickle  # noqa: E402

from hessdiag.io.cifar import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402


def _write_batch(path, rows, labels, label_key=b"labels", protocol=2):
    doc = {b"batch_label": b"fake", b"data": rows, label_key: labels,
           b"filenames": [b"img%d.png" % i for i in range(len(labels))]}
    path.write_bytes(pickle.dumps(doc, protocol=protocol))


def fake_cifar10(root, per_batch=3):
    """cifar-10-batches-py/ with 5 train batches and a test batch of ``per_batch`` images each."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        _write_batch(folder / name, rows, [(i + j) % 10 for j in range(per_batch)], protocol=2 + i % 3)
    return folder


def fake_cifar100(root, n=4):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, offset in (("train", 0), ("test", 50)):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        doc = {b"data": rows, b"fine_labels": [offset + 7 * j for j in range(n)], b"coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(doc, protocol=2))
    return folder


def test_cifar10_fake_folder_layout_splits_and_normalization(tmp_path):
    folder = fake_cifar10(tmp_path)
    x, y = load_data(f"cifar10:{tmp_path}", split="train")  # the parent folder works ...
    x2, y2 = load_data(f"cifar10:{folder}", split="train")  # ... and so does the folder itself
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # pixel (channel c, row r, col k) is byte c*1024 + r*32 + k of the row, scaled and normalized
    first = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
    raw = first[b"data"][1]
    for c, r, k in [(0, 0, 0), (1, 5, 7), (2, 31, 31)]:
        expected = (raw[c * 1024 + r * 32 + k] / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert float(x[1, c, r, k]) == pytest.approx(expected, rel=1e-5)
    assert y[:3].tolist() == [0, 1, 2] and y[3:6].tolist() == [1, 2, 3]
    xt, yt = load_data(f"cifar10:{tmp_path}", split="test")
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == [5, 6, 7]
    assert load_data(f"cifar10:{tmp_path}", split="all")[0].shape[0] == 18
    xm, _ = load_data(f"cifar10:{tmp_path}", max_examples=4)
    assert torch.equal(xm, x[:4])


def test_cifar10_reads_only_the_batches_it_needs(tmp_path):
    folder = fake_cifar10(tmp_path)
    (folder / "data_batch_5").unlink()
    assert load_data(f"cifar10:{folder}", max_examples=5)[0].shape[0] == 5
    with pytest.raises(DataSpecError, match="batch file missing.*data_batch_5"):
        load_data(f"cifar10:{folder}")


def test_cifar100_fine_labels(tmp_path):
    fake_cifar100(tmp_path)
    x, y = load_data(f"cifar100:{tmp_path}", split="test")
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [50, 57, 64, 71]
    assert load_data(f"cifar100:{tmp_path}", split="all")[1].shape == (8,)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:100]), "cannot read CIFAR batch"),
        (lambda f: f.write_bytes(b"garbage"), "cannot read CIFAR batch"),
        (lambda f: f.write_bytes(pickle.dumps([1, 2, 3])), "not a CIFAR batch"),
        (lambda f: f.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})), "lacks the keys"),
        (lambda f: f.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})),
         "3072 pixels"),
        (lambda f: f.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})),
         "labels must lie in 0..9"),
        (lambda f: f.write_bytes(pickle.dumps({b"data": _Marker(f.parent / "pwned"), b"labels": [0]})),
         "refusing to load pathlib"),
    ],
)
def test_damaged_cifar_batches(tmp_path, damage, message):
    folder = fake_cifar10(tmp_path)
    damage(folder / "test_batch")
    with pytest.raises(DataSpecError, match=message):
        load_data(f"cifar10:{tmp_path}", split="test")
    assert not (folder / "pwned").exists()


def test_missing_cifar_folder(tmp_path):
    with pytest.raises(DataSpecError, match="CIFAR folder not found"):
        load_data(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(DataSpecError, match="holds no data_batch_1"):
        load_data(f"cifar10:{tmp_path}")
    with pytest.raises(DataSpecError, match="holds no train"):
        load_data(f"cifar100:{tmp_path}")


def test_cifar_unpickler_does_not_allocate_for_huge_memo_indices(tmp_path):
    """A 10-byte pickle naming memo index 2³²−16 makes the C unpickler allocate ~64 GB.

    Run in a child process whose address space may grow by 2 GB only, so a regression
    shows as a failure (MemoryError), not as the test machine running out of memory.
    """
    import subprocess
    import sys
    import textwrap

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"\x80\x02}r\xf0\xff\xff\xff.")  # {} stored at memo[2**32-16]
    script = textwrap.dedent(f"""
        import resource
        from hessdiag.io import DataSpecError, load_data
        # 2 GB above what the process (torch included) has mapped already
        with open("/proc/self/status") as status:
            mapped = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 2 * 2**30, resource.RLIM_INFINITY))
        try:
            load_data("cifar10:{tmp_path}", split="test")
        except DataSpecError as err:
            print("refused:", err)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert done.returncode == 0, done.stderr[-500:]
    assert "refused:" in done.stdout and "lacks the keys data and labels" in done.stdout


class _HugeArray:
    """Unpickles as numpy's _reconstruct(ndarray, (10¹², ), 'b'): 1 TB from a tiny file."""

    def __reduce__(self):
        from numpy._core import multiarray

        return (multiarray._reconstruct, (np.ndarray, (10**12,), b"b"))


def _newobj_array_pickle():
    """{"data": ndarray.__new__(ndarray, (10¹²,)), "labels": []} written opcode by opcode
    (pickle.dumps will not emit NEWOBJ for a class other than the object's own)."""
    size = pickle.encode_long(10**12)
    key = lambda text: b"X" + len(text).to_bytes(4, "little") + text.encode()  # noqa: E731
    return (b"\x80\x02}(" + key("data") + b"cnumpy\nndarray\n" + b"\x8a" + bytes([len(size)]) + size
            + b"\x85\x85\x81" + key("labels") + b"]u.")


@pytest.mark.parametrize("payload", [lambda: pickle.dumps({b"data": _HugeArray(), b"labels": [0]}, protocol=2),
                                     _newobj_array_pickle], ids=["reconstruct", "newobj"])
def test_cifar_pickle_cannot_ask_for_huge_arrays(tmp_path, payload):
    folder = fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(payload())
    with pytest.raises(DataSpecError, match="cannot read CIFAR batch.*(refusing|not a type|NEWOBJ|__new__)"):
        load_data(f"cifar10:{tmp_path}", split="test")


def test_cifar_numpy_scalars_and_object_free_arrays_still_load(tmp_path):
    folder = fake_cifar10(tmp_path)
    rows = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    labels = [np.int64(3), np.int64(4)]  # numpy scalars pickle through multiarray.scalar
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": rows, b"labels": labels}, protocol=2))
    x, y = load_data(f"cifar10:{tmp_path}", split="test")
    assert y.tolist() == [3, 4] and x.shape == (2, 3, 32, 32)
