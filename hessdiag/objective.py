"""The measured objective and the Hessian-vector-product plumbing every estimator shares.

Given a model f(·; θ), a loss ℓ and N examples, the objective is (docs/index.md, "What is measured")

    L(θ) = (1/N) Σₙ ℓ(f(xₙ; θ), yₙ),

evaluated with the model in ``eval()`` mode, θ = all parameters with
``requires_grad=True`` in ``named_parameters()`` order, or the subset that ``params``
selects (:mod:`hessdiag.selection`; the other parameters are held fixed). Data arrive in
batches; each batch contributes its batch-mean loss weighted by ``n_b / N`` so that the
result does not depend on the batch size beyond float rounding.

Vectors in parameter space are dicts ``{name: Tensor}``. Stacks of K vectors carry a
leading probe dimension: ``{name: Tensor[K, *shape]}``. :meth:`Objective.hvp` returns
H·V for such a stack, accumulated over *all* measured data for the same probes, in one
pass over the data (the probes are chunked so memory is bounded by
``chunk_size × batch_size × activations``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from .compat import (double_backward_unsupported_reason, func_unsupported_reason, quiet_jit_deprecation,
                     twice_differentiable)
from .distributed import SINGLE, World
from .errors import HessdiagError
from .selection import ParamSpec, select_parameters

LossName = Literal["ce", "mse"]
LOSSES: tuple[str, ...] = ("ce", "mse")
ParamDict = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]


GGN_MEMORY_NUMBERS = 10_000_000
"""The exact GGN diagonal holds examples × C × P numbers at once; by default it vmaps
examples·P ≈ this many (64 examples for the digits MLP, 1 for ResNet-18)."""

HVP_ROUTES: tuple[str, ...] = ("auto", "func", "autograd")
"""How :meth:`Objective.hvp` forms Hessian-vector products (see :meth:`Objective.batch_hvp`)."""


class ObjectiveError(HessdiagError):
    """The model, data or loss cannot form the objective (bad user input)."""


def loss_target(loss: str, output: Tensor, target: Tensor) -> Tensor:
    """The target as the loss consumes it: class indices for ``ce``; for ``mse`` a float
    tensor shaped like ``output`` (integer labels one-hot encoded)."""
    if loss != "mse":
        return target
    if not target.is_floating_point():
        target = F.one_hot(target.long(), output.shape[-1])
    return target.to(output.dtype).reshape(output.shape)


def batch_mean_loss(loss: str, output: Tensor, target: Tensor) -> Tensor:
    """Mean loss over one batch, written so torch.func transforms can differentiate it twice.

    ``ce``: ``cross_entropy(reduction="mean")`` with integer class targets.
    ``mse``: mean over batch *and* outputs of (f − y)², written out explicitly because
    ``F.mse_loss`` fails under ``jvp(grad(·))`` (docs/index.md). Integer targets for a
    multi-output model are one-hot encoded.
    """
    if loss == "ce":
        return F.cross_entropy(output, target)
    if loss == "mse":
        return ((output - loss_target(loss, output, target)) ** 2).mean()
    raise ObjectiveError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def loss_hessian_factor(loss: str, output: Tensor, target: Tensor) -> Tensor:
    """Q with Q Qᵀ = ∇²_f ℓ(f, y) for ONE example's output f ∈ R^C; shape [C, C].

    ``ce``: Λ = diag(p) − p pᵀ with p = softmax(f); Q = diag(√p) − p √pᵀ.
    ``mse`` (mean over the C outputs): Λ = (2/C) I; Q = √(2/C) I.
    The generalized Gauss–Newton matrix of the mean loss is (1/N) Σₙ Jₙᵀ Qₙ Qₙᵀ Jₙ.
    """
    num = output.shape[-1]
    if loss == "ce":
        p = torch.softmax(output, -1)
        root = p.sqrt()
        return torch.diag(root) - p.unsqueeze(-1) * root.unsqueeze(-2)
    if loss == "mse":
        return torch.eye(num, dtype=output.dtype, device=output.device) * math.sqrt(2.0 / num)
    raise ObjectiveError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


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
        loss: ``"ce"`` or ``"mse"`` (docs/index.md, "What is measured").
        dtype: compute dtype (e.g. ``torch.float64``); default: the parameters' dtype.
        device: compute device; default: the parameters' device.
        batch_size: batch size used when ``data`` is an ``(x, y)`` pair.
        chunk_size: probes per vmapped HVP call; bounds the peak memory.
        hvp_route: ``"auto"`` (default), ``"func"`` or ``"autograd"``: how :meth:`hvp`
            forms its products (:meth:`batch_hvp`). After the first product,
            ``hvp_route_used`` says which route ran and ``hvp_fallback`` why ``"auto"``
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
        loss: str = "ce",
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        batch_size: int | None = 256,
        chunk_size: int = 32,
        hvp_route: str = "auto",
        params: ParamSpec | None = None,
        world: World = SINGLE,
    ) -> None:
        if loss not in LOSSES:
            raise ObjectiveError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
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
        self.loss = loss
        self.chunk_size = max(1, int(chunk_size))
        self.world = world
        self.data = BatchSource(data, batch_size, world)
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
        self.hvp_route_used: str | None = None  # "func" or "autograd" once a product ran
        self.hvp_fallback: str | None = None  # why "auto" switched to "autograd"
        self.num_examples: int | None = None  # N over all ranks; known after the first pass
        self.shard_examples: int | None = None  # this rank's share of N

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
        return counts

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
        return batch_mean_loss(self.loss, self.forward(params, x), y)

    def loss_value(self) -> float:
        """L(θ) over all measured data."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with evaluation_mode(self.model), torch.no_grad():
            for x, y, n in self.batches():
                total += n * self.batch_loss(self.params, x, y).double()
        self.mean_over_examples({"loss": total})
        return float(total)

    # -- Hessian-vector products --------------------------------------------------------

    def hvp(self, vectors: ParamDict, chunk_size: int | None = None) -> ParamDict:
        """H·V for a stack of K vectors ``{name: [K, *shape]}`` over all measured data.

        One pass over the data; within each batch the K probes are processed in chunks
        of ``chunk_size`` (default: the objective's) by :meth:`batch_hvp`, on the route
        ``hvp_route`` selects. Larger chunks amortize per-call overhead at the price of
        ``chunk × batch``-sized activations.
        """
        return self._accumulate(vectors, self.batch_hvp, chunk_size)

    def _accumulate(
        self,
        vectors: ParamDict,
        batch_product: Callable[[ParamDict, Tensor, Tensor], ParamDict],
        chunk_size: int | None,
    ) -> ParamDict:
        """Σ_b (n_b/N) · batch_product(V, x_b, y_b), in one data pass, probes in chunks."""
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

    def batch_hvp(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        """H_b·V for one batch's mean loss ℓ̄_b and a chunk of probes ``{name: [k, *shape]}``.

        Two routes give the same product up to rounding: ``"func"``, ``vmap(jvp(grad))``
        (forward-over-reverse, the chunk's tangents batched), and ``"autograd"``, double
        backward sharing one ``create_graph`` gradient among the chunk's probes. The
        route is fixed, never chosen by timing, so the same inputs and seed give the same
        bits in every run:

        - ``"auto"`` (default) runs ``"func"``: on 2 CPU cores about 10× faster than
          double backward on a small MLP, where per-call overhead dominates, and within
          about 1.3× of it (either way) on ResNet-18 (``docs/benchmarks.md``); no model
          property we know of predicts double backward to win clearly, so there is no
          second rule. Only when torch.func refuses the model with one of the errors of
          :data:`hessdiag.compat.FUNC_UNSUPPORTED_MESSAGES` (an operator without a
          forward-mode derivative or batching rule, a custom ``autograd.Function``
          without ``jvp``, a buffer written in forward, ...) does it switch to
          ``"autograd"`` for good, with one ``RuntimeWarning`` naming the reason, kept
          in ``hvp_fallback``. Any other error, out-of-memory included, propagates.
        - ``"func"``: torch.func only; a model it refuses is an :class:`ObjectiveError`.
        - ``"autograd"``: double backward only.

        A model that double backward cannot differentiate twice either (an operator
        without a second derivative) is an :class:`ObjectiveError` naming the operator.
        """
        if self.hvp_route == "autograd" or self.hvp_fallback is not None:
            return self._double_backward(chunk, x, y)
        try:
            product = self._func_hvp(chunk, x, y)
        except (RuntimeError, NotImplementedError) as err:
            reason = func_unsupported_reason(err)
            if reason is None:
                raise
            if self.hvp_route == "func":
                raise ObjectiveError(
                    f"hvp_route 'func': torch.func cannot differentiate this model ({reason[:160]}); "
                    "use hvp_route 'auto' or 'autograd'"
                ) from err
            self._fall_back(reason)
            return self._double_backward(chunk, x, y)
        self.hvp_route_used = "func"
        return product

    def _fall_back(self, reason: str) -> None:
        warnings.warn(
            f"torch.func HVPs are not supported for this model ({reason[:160]}); "
            "falling back to double backward",
            RuntimeWarning,
            stacklevel=5,
        )
        self.hvp_fallback = reason

    def _double_backward(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        try:
            product = self._autograd_hvp(chunk, x, y)
        except (RuntimeError, NotImplementedError) as err:
            reason = double_backward_unsupported_reason(err)
            if reason is None:
                raise
            func = f"; torch.func: {self.hvp_fallback[:120]}" if self.hvp_fallback else ""
            raise ObjectiveError(
                f"this model cannot be differentiated twice (double backward: {reason[:160]}{func})"
            ) from err
        self.hvp_route_used = "autograd"
        return product

    def _func_hvp(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        gradient: Callable[[ParamDict], ParamDict] = grad(lambda p: self.batch_loss(p, x, y))

        def single(v: ParamDict) -> ParamDict:
            return jvp(gradient, (self.params,), (v,))[1]

        return vmap(single)(chunk)

    def _autograd_hvp(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        params = {k: p.detach().requires_grad_(True) for k, p in self.params.items()}
        names = list(params)
        with torch.enable_grad():
            g = torch.autograd.grad(self.batch_loss(params, x, y), [params[k] for k in names],
                                    create_graph=True)
            num = chunk[names[0]].shape[0]
            rows = []
            for i in range(num):
                hv = torch.autograd.grad(g, [params[k] for k in names],
                                         grad_outputs=[chunk[k][i] for k in names],
                                         retain_graph=i < num - 1, allow_unused=True)
                rows.append([torch.zeros_like(params[k]) if h is None else h.detach()
                             for k, h in zip(names, hv)])
        return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}

    # -- generalized Gauss–Newton --------------------------------------------------------

    def ggn_vp(self, vectors: ParamDict, chunk_size: int | None = None) -> ParamDict:
        """G·V = (1/N) Σ_b n_b J_bᵀ Λ_b J_b V for a stack ``{name: [K, *shape]}``.

        J_b is the Jacobian of the batch's outputs, Λ_b the Hessian of the batch-mean
        loss with respect to them; per probe one JVP, one loss-HVP and one VJP. Same
        chunking and single data pass as :meth:`hvp`.
        """
        product = self._accumulate(vectors, self._batch_ggn_vp, chunk_size)
        self.hvp_route_used = "func"  # this product has no double-backward route
        return product

    def _batch_ggn_vp(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        output, pullback = vjp(lambda p: self.forward(p, x), self.params)  # type: ignore[misc]  # 2 without aux
        loss_grad = grad(lambda o: batch_mean_loss(self.loss, o, y))

        def single(v: ParamDict) -> ParamDict:
            jv = jvp(lambda p: self.forward(p, x), (self.params,), (v,))[1]
            return pullback(jvp(loss_grad, (output,), (jv,))[1])[0]

        return vmap(single)(chunk)

    def residual_vp(self, vectors: ParamDict, chunk_size: int | None = None) -> ParamDict:
        """(H − G)·V in one fused product per probe, same conventions as :meth:`hvp`.

        The residual is the Hessian of θ ↦ (1/N) Σₙ rₙᵀ f(xₙ; θ) with rₙ = ∇_f ℓₙ held
        fixed (docs/math.md), so each probe costs one forward-over-reverse product of a
        linear-in-outputs function — the price of one HVP, not of an HVP plus a GGN-VP.
        """
        product = self._accumulate(vectors, self._batch_residual_vp, chunk_size)
        self.hvp_route_used = "func"  # this product has no double-backward route
        return product

    def _batch_residual_vp(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        with torch.no_grad():
            output = self.forward(self.params, x)
        # ∇_f of the batch-mean loss: one per batch, shared by all probes of the chunk.
        weights = grad(lambda o: batch_mean_loss(self.loss, o, y))(output).detach()
        gradient = grad(lambda p: (self.forward(p, x) * weights).sum())

        def single(v: ParamDict) -> ParamDict:
            return jvp(gradient, (self.params,), (v,))[1]

        return vmap(single)(chunk)

    def ggn_diagonal(self, examples_per_chunk: int | None = None) -> ParamDict:
        """Exact diag(G) = (1/N) Σₙ Σ_ρ (Jₙᵀ q_{n,ρ})², q_{n,ρ} the columns of Qₙ.

        One VJP per example and output class (C per example), vmapped over examples in
        chunks of ``examples_per_chunk`` (default: sized by :data:`GGN_MEMORY_NUMBERS`);
        memory O(examples_per_chunk · C · P). Works for
        any model torch.func can differentiate (BatchNorm in eval mode included).
        """
        if examples_per_chunk is None:
            examples_per_chunk = max(1, min(64, GGN_MEMORY_NUMBERS // self.num_params))
        total = {n: torch.zeros_like(p) for n, p in self.params.items()}

        def per_example(xi: Tensor, yi: Tensor) -> ParamDict:
            out, pullback = vjp(lambda p: self.forward(p, xi.unsqueeze(0))[0], self.params)  # type: ignore[misc]
            factor = loss_hessian_factor(self.loss, out.detach(), yi)
            columns = vmap(pullback)(factor.transpose(0, 1).contiguous())[0]
            return {k: c.pow(2).sum(0) for k, c in columns.items()}

        with evaluation_mode(self.model):
            for x, y, _ in self.batches():
                for start in range(0, x.shape[0], examples_per_chunk):
                    part = vmap(per_example)(x[start : start + examples_per_chunk],
                                             y[start : start + examples_per_chunk])
                    for k in total:
                        total[k].add_(part[k].sum(0))
        self.mean_over_examples(total)
        return total

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
