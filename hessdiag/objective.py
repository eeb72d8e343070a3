"""The measured objective: the model, the loss, the data pass, and its curvature operators.

Given a model f(·; θ), a loss ℓ and N examples, the objective is (docs/index.md, "What is measured")

    L(θ) = (1/N) Σₙ ℓ(f(xₙ; θ), yₙ),

evaluated with the model in ``eval()`` mode, θ = all parameters with
``requires_grad=True`` in ``named_parameters()`` order, or the subset that ``params``
selects (:mod:`hessdiag.selection`; the other parameters are held fixed). Data arrive in
batches; each batch contributes its batch-mean loss weighted by ``n_b / N`` so that the
result does not depend on the batch size beyond float rounding.

Vectors in parameter space are dicts ``{name: Tensor}``. Stacks of K vectors carry a
leading probe dimension: ``{name: Tensor[K, *shape]}``. The curvature matrices H, G (GGN)
and R = H − G are linear operators on such stacks, ``objective.hessian``, ``objective.ggn``
and ``objective.residual`` (:mod:`hessdiag.operators`): each product is accumulated over
*all* measured data for the same vectors in one pass over the data
(:meth:`Objective.accumulate`; the vectors are chunked so memory is bounded by
``chunk_size × batch_size × activations``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .compat import quiet_jit_deprecation, twice_differentiable
from .distributed import SINGLE, World
from .errors import ObjectiveError
from .losses import Loss, LossSpec, resolve_loss
from .operators import GGNOperator, HessianOperator, ResidualOperator
from .selection import ParamSpec, select_parameters
from .types import ParamDict

Batch = tuple[Tensor, Tensor]


HVP_ROUTES: tuple[str, ...] = ("auto", "func", "autograd")
"""How ``objective.hessian`` forms Hessian-vector products
(:meth:`hessdiag.operators.HessianOperator.batch_product`)."""


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make ``dtype`` torch's default dtype (floating dtypes only).

    For libraries that create tensors in the default dtype and then mix them with ours
    (BackPACK's pooling derivatives, PyHessian's probes) when computing in float64.
    """
    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class BatchSource:
    """Re-iterable view of the data as ``(x, y)`` batches.

    Accepts an ``(x, y)`` pair of tensors (split into ``batch_size`` chunks), a
    ``DataLoader`` or any re-iterable of batches, or a one-shot iterator (materialized
    once, since every estimator passes over the data several times).

    With a ``world`` of several ranks it yields this rank's shard only
    (:mod:`hessdiag.distributed`): a contiguous slice of the examples of a tensor pair, or
    every K-th batch of any other source.
    """

    def __init__(self, data: object, batch_size: int | None = 256, world: World = SINGLE) -> None:
        self.world = world
        self.checksum: float | None
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, Tensor) for t in data
        ):
            x, y = data
            if x.shape[0] != y.shape[0]:
                raise ObjectiveError(
                    f"inputs and targets differ in length ({x.shape[0]} vs {y.shape[0]})"
                )
            if x.shape[0] == 0:
                raise ObjectiveError("the data are empty")
            size = x.shape[0] if batch_size is None else int(batch_size)
            if size < 1:
                raise ObjectiveError(f"batch size must be positive, got {batch_size}")
            # Ranks must hold the same data before taking their shards: this sum says so.
            self.checksum = float(x.double().sum()) + float(y.double().sum()) if world.distributed else None
            shard = world.shard(x.shape[0])
            x, y = x[shard], y[shard]
            self._sharded = True  # the examples are split already; every batch is this rank's
            self._batches: Iterable[Batch] = [
                (x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)
            ]
        elif isinstance(data, Iterable):
            self.checksum = None  # a loader's batches are not all at hand
            self._sharded = not world.distributed
            self._batches = list(data) if iter(data) is data else data  # type: ignore[arg-type]
        else:
            raise ObjectiveError(
                "data must be an (x, y) pair of tensors, a DataLoader or an iterable of (x, y) batches"
            )

    def __iter__(self) -> Iterator[Batch]:
        for index, batch in enumerate(self._batches):
            if not (self._sharded or self.world.owns_batch(index)):
                continue
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ObjectiveError("each batch must be an (x, y) pair")
            yield batch[0], batch[1]

    def __len__(self) -> int:
        total = len(self._batches)  # type: ignore[arg-type]
        return total if self._sharded else len(range(self.world.rank, total, self.world.size))


class Objective:
    """Functional view of L(θ) for one model, loss and data set.

    The model's own tensors are never modified: parameters are detached copies in the
    requested dtype/device, passed in through ``torch.func.functional_call``.

    Args:
        model: any ``nn.Module``; its trainable parameters define θ, unless ``params`` is given.
        data: see :class:`BatchSource`.
        loss: a name of :data:`~hessdiag.losses.LOSSES`, a :class:`~hessdiag.losses.Loss`, a
            torch loss module or a callable ``loss(output, target)`` returning the batch mean
            (:func:`hessdiag.losses.resolve_loss`). A class-weighted loss is adjusted here to
            the labels of all the data (one pass over them), so that L is torch's weighted mean.
        dtype: compute dtype (e.g. ``torch.float64``); default: the parameters' dtype.
        device: compute device; default: the parameters' device.
        batch_size: batch size used when ``data`` is an ``(x, y)`` pair.
        chunk_size: probes per vmapped HVP call; bounds the peak memory.
        hvp_route: ``"auto"`` (default), ``"func"`` or ``"autograd"``: how ``hessian``
            forms its products (:meth:`hessdiag.operators.HessianOperator.batch_product`).
            After the first product, ``hvp_route_used`` says which route ran and ``hvp_fallback`` why ``"auto"``
            left ``"func"`` (``None`` if it did not).
        params: the parameters that form θ (names, glob patterns or ``Parameter`` objects;
            :func:`hessdiag.selection.select_parameters`); default: those with
            ``requires_grad=True``. The others are constants, so every estimator sees the
            principal sub-block of the Hessian for the selection. ``selection`` records it
            (``None`` by default).
        world: the ranks measuring together (:mod:`hessdiag.distributed`); this rank's
            passes cover its shard of the data, and :meth:`mean_over_examples` adds the
            shards. Default: one process.

    Every forward pass runs under :func:`hessdiag.compat.twice_differentiable`, so that
    Hardswish, fused attention and RNN kernels can be differentiated twice.
    """

    def __init__(
        self,
        model: nn.Module,
        data: object,
        loss: LossSpec = "ce",
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        batch_size: int | None = 256,
        chunk_size: int = 32,
        hvp_route: str = "auto",
        params: ParamSpec | None = None,
        world: World = SINGLE,
    ) -> None:
        if hvp_route not in HVP_ROUTES:
            raise ObjectiveError(
                f"unknown HVP route {hvp_route!r}; choose one of {', '.join(HVP_ROUTES)}")
        # θ is chosen here and only here: every estimator reads it from self.params, and
        # every other parameter joins the constants (so the model's flags are never touched).
        names, self.selection = select_parameters(model, params)
        every = dict(model.named_parameters())
        trainable = [(n, every[n]) for n in names]
        if not trainable:
            raise ObjectiveError("the model has no trainable parameters")
        first = trainable[0][1]
        self.dtype = dtype or first.dtype
        self.device = torch.device(device) if device is not None else first.device
        self.model = model
        self.chunk_size = max(1, int(chunk_size))
        self.world = world
        self.data = BatchSource(data, batch_size, world)
        self.loss: Loss = resolve_loss(loss)
        # A lazy generator: only a class-weighted loss consumes it (one pass over this rank's
        # labels). On several ranks the totals are added in settle_loss_weights(), a collective.
        self._loss_totals = self.loss.weight_totals(y for _, y in self.data)
        if not world.distributed:
            self.settle_loss_weights()
        self.params: ParamDict = {
            n: p.detach().to(self.device, self.dtype).clone() for n, p in trainable
        }
        frozen = {n: p for n, p in every.items() if n not in self.params}
        self.constants: ParamDict = {
            n: self._cast(t.detach()) for n, t in {**frozen, **dict(model.named_buffers())}.items()
        }
        self.shapes = {n: p.shape for n, p in self.params.items()}
        self.numels = {n: p.numel() for n, p in self.params.items()}
        self.num_params = sum(self.numels.values())
        self.hvp_route = hvp_route
        # The record of the second-order products that ran, written by the operators.
        self.hvp_route_used: str | None = None  # "func" or "autograd" once a product ran
        self.hvp_fallback: str | None = None  # why "auto" switched to "autograd"
        self.num_examples: int | None = None  # N over all ranks; known after the first pass
        self.shard_examples: int | None = None  # this rank's share of N
        self.hessian = HessianOperator(self)
        self.ggn = GGNOperator(self)
        self.residual = ResidualOperator(self)

    # -- data ---------------------------------------------------------------------------

    def _cast(self, t: Tensor) -> Tensor:
        t = t.to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def batches(self) -> Iterator[tuple[Tensor, Tensor, int]]:
        """Yield this rank's ``(x, y, n_b)`` on the compute device/dtype, counting them as it
        goes (N itself on one process; see :meth:`count_examples` for several)."""
        count = 0
        for x, y in self.data:
            n = int(x.shape[0])
            if n == 0:
                continue
            count += n
            yield self._cast(x), y.to(self.device), n
        if count == 0:
            if self.world.distributed:
                raise ObjectiveError(f"rank {self.world.rank} of {self.world.size} has no examples to "
                                     "measure: the data have fewer examples (or batches) than ranks")
            raise ObjectiveError("the data are empty")
        if self.shard_examples is not None and self.shard_examples != count:
            raise ObjectiveError(
                f"the data changed between passes ({self.shard_examples} then {count} examples)"
            )
        self.shard_examples = count
        if not self.world.distributed:
            self.num_examples = count

    def count_examples(self) -> list[int]:
        """The examples of every rank's shard, in rank order, after one pass over this
        rank's; sets :attr:`num_examples` to their sum. A collective on several ranks."""
        if self.shard_examples is None:
            for _ in self.batches():
                pass
        assert self.shard_examples is not None  # counted by the pass above
        counts = self.world.agree(None, count=self.shard_examples)
        self.num_examples = sum(counts)
        self.settle_loss_weights()
        return counts

    def settle_loss_weights(self) -> None:
        """Rescale a class-weighted loss by N / Σₙ w_{yₙ} over all ranks' labels, so that L
        is torch's weighted mean over the whole data (docs/math.md, "The loss"); a no-op
        for any other loss or once done. A collective on several ranks: every rank calls it
        at the same point, after the input checks agreed (:func:`hessdiag.measure`)."""
        if self._loss_totals is None:
            return
        self.world.all_reduce_([self._loss_totals])
        self.loss = self.loss.rescaled(self._loss_totals)
        self._loss_totals = None

    def mean_over_examples(self, *sums: ParamDict) -> None:
        """Turn sums over this rank's examples into means over all N examples, in place.

        Every rank's sums are added (an all-reduce on several ranks, a no-op on one), then
        divided by N: what docs/index.md, "What is measured", averages. Call it on every
        rank at the same point, after a full pass.
        """
        self.world.all_reduce_(t for part in sums for t in part.values())
        if self.num_examples is None:
            self.count_examples()
        assert self.num_examples is not None  # counted by the pass above
        for part in sums:
            for tensor in part.values():
                tensor.div_(self.num_examples)

    # -- functional loss ----------------------------------------------------------------

    def forward(self, params: ParamDict, x: Tensor) -> Tensor:
        """Model output f(x; params) with the constants (buffers, frozen parameters) bound.

        Parameters tied in the model (one tensor in several modules, listed once by
        ``named_parameters()``) stay tied: ``functional_call``'s ``tie_weights=True``
        substitutes the one entry of ``params`` everywhere, so derivatives are taken
        with respect to the shared tensor.
        """
        with twice_differentiable():
            return self.model_forward(params, x)

    def model_forward(self, params: ParamDict, x: Tensor) -> Tensor:
        """:meth:`forward` without the :func:`~hessdiag.compat.twice_differentiable` layer:
        every operation reaches an enclosing :class:`~torch.overrides.TorchFunctionMode` as
        the model calls it (Hardswish as Hardswish), for the recorders of
        :mod:`hessdiag.structure` and :mod:`hessdiag.curvature_tape`, which need only first
        derivatives."""
        return functional_call(self.model, {**params, **self.constants}, (x,))

    def batch_loss(self, params: ParamDict, x: Tensor, y: Tensor) -> Tensor:
        """Batch-mean loss ℓ̄_b(params); a scalar."""
        return self.loss.batch_mean(self.forward(params, x), y)

    def loss_value(self) -> float:
        """L(θ) over all measured data."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with evaluation_mode(self.model), torch.no_grad():
            for x, y, n in self.batches():
                total += n * self.batch_loss(self.params, x, y).double()
        self.mean_over_examples({"loss": total})
        return float(total)

    # -- the data pass of curvature products ---------------------------------------------

    def accumulate(
        self,
        vectors: ParamDict,
        batch_product: Callable[[ParamDict, Tensor, Tensor], ParamDict],
        chunk_size: int | None,
    ) -> ParamDict:
        """Σ_b (n_b/N) · batch_product(V, x_b, y_b) for a stack ``{name: [K, *shape]}``, in one
        data pass, the K vectors in chunks of ``chunk_size`` (default: the objective's): the
        data pass every curvature operator (:mod:`hessdiag.operators`) shares."""
        num = next(iter(vectors.values())).shape[0]
        step = chunk_size or self.chunk_size
        out = {n: torch.zeros_like(v) for n, v in vectors.items()}
        with evaluation_mode(self.model), quiet_jit_deprecation():
            for x, y, n in self.batches():
                for start in range(0, num, step):
                    chunk = {k: v[start : start + step] for k, v in vectors.items()}
                    product = batch_product(chunk, x, y)
                    for k in out:
                        out[k][start : start + step].add_(product[k], alpha=n)
        self.mean_over_examples(out)
        return out

    # -- stateful copies for libraries that need a module -------------------------------

    def model_copy(self) -> nn.Module:
        """A deep copy of the model in the compute dtype/device with θ = :attr:`params`.

        For libraries that work on a stateful module (BackPACK, PyHessian) and would
        otherwise install hooks on, switch the mode of, or write ``.grad`` into the user's
        model. Parameters outside θ are frozen; the copy is in eval mode (docs/index.md) and
        carries no ``.grad`` fields.
        """
        import copy

        net = copy.deepcopy(self.model).to(device=self.device, dtype=self.dtype)
        net.eval()
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.grad = None
                if name in self.params:
                    p.copy_(self.params[name])
                    p.requires_grad_(True)
                else:
                    p.requires_grad_(False)
            for name, b in net.named_buffers():
                if name in self.constants:
                    b.copy_(self.constants[name])
        return net

    # -- flat <-> dict ------------------------------------------------------------------

    def flatten(self, vectors: ParamDict) -> Tensor:
        """``{name: [K, *shape]}`` → ``[K, P]`` in ``named_parameters()`` order."""
        return torch.cat([vectors[n].reshape(vectors[n].shape[0], -1) for n in self.params], 1)

    def unflatten(self, flat: Tensor) -> ParamDict:
        """``[K, P]`` → ``{name: [K, *shape]}``."""
        out, start = {}, 0
        for n, shape in self.shapes.items():
            size = math.prod(shape)
            out[n] = flat[:, start : start + size].reshape(flat.shape[0], *shape)
            start += size
        return out
