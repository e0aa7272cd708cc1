"""The math of global-batch BatchNorm: per-rank moments, their exact combination over ranks (one collective), the
running-statistics update, and the autograd function with its backward collective. No module state lives here.

``torch.nn.SyncBatchNorm`` only synchronises CUDA (and a few accelerator) tensors and raises on CPU once a process
group exists; this works on every device and backend, with exactly one collective in forward and one in backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

VALID_COLLECTIVES = ("auto", "all_gather", "all_reduce")


def check_at_least_2d(input: Tensor) -> None:
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def active_group(process_group: Any) -> tuple[Any, int] | None:
    """(group, size) when statistics must be synchronised; None without a group, size 1, or not a member."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    size = dist.get_world_size(group)  # -1 on a rank that is not a member of ``group``
    return (group, size) if size > 1 else None


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 accumulate in fp32 (their range and precision are too small for sums); fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def count_step(bn: _BatchNorm) -> float | Tensor:
    """Advance ``num_batches_tracked`` as ``_BatchNorm.forward`` does and return the running-stats factor: the
    momentum, or for ``momentum=None`` the cumulative-average factor 1/count, kept a tensor (no host read)."""
    if not bn.track_running_stats or bn.num_batches_tracked is None:
        return 0.0 if bn.momentum is None else bn.momentum
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return bn.num_batches_tracked.to(torch.float64).reciprocal()
    return bn.momentum


def _all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    """Sum over the group. Traced by torch.compile: a functional collective (dynamo keeps it in the graph); eager:
    the plain in-place call, which skips the functional form's async wrapper (about 1 ms a layer on CPU)."""
    if torch.compiler.is_compiling():
        return funcol.all_reduce(t, "sum", group)
    dist.all_reduce(t, group=group)
    return t


_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer name first


def all_gather_rows(t: Tensor, group: Any, world_size: int) -> Tensor:
    """Every rank's 1-D ``t`` as the rows of a (world_size, len) tensor, in one collective (as above)."""
    if torch.compiler.is_compiling():
        return funcol.all_gather_single(t, 0, group).view(world_size, -1)
    out = t.new_empty(world_size, t.numel())
    _gather_into_tensor(out.view(-1), t, group=group)
    return out


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


# --------------------------------------------------------------------------------------------- the math


def choose_collective(collective: str, world_size: int) -> str:
    """``"auto"``: the forward collective that moves fewer bytes per rank at this world size.

    Per statistic, the all-gather receives W-1 fp32 values on each rank; a ring all-reduce of one fp64 value sends
    and receives 2(W-1)/W of it, i.e. 16(W-1)/W bytes against 4(W-1): equal at W=4, so from W=4 up ``all_reduce``.
    Above a few ranks the all-gather's message grows with W and the all-reduce's stays O(C) (and can use
    in-network reduction).
    """
    if collective not in VALID_COLLECTIVES:
        raise ValueError(f"SyncBatchNorm: collective must be one of {', '.join(VALID_COLLECTIVES)}; got {collective!r}")
    if collective != "auto":
        return collective
    return "all_reduce" if world_size >= 4 else "all_gather"


def _reduce_dtype(device: torch.device) -> torch.dtype:
    """fp64 for the all-reduce's sums wherever the device has it (MPS has not: fp32 there, with the shared shift)."""
    return torch.float32 if device.type == "mps" else torch.float64


def local_moments(x: Tensor, stat_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's (count, mean, M2) per channel; an empty rank has count 0 and zeros, which the combine ignores.

    Mean and sum of squared deviations (not sum and sum of squares) keep a large common offset from cancelling.
    """
    channels = x.size(1)
    count = x.numel() // channels
    if count == 0:
        zeros = x.new_zeros(channels, dtype=stat_dtype)
        return zeros.new_zeros(()), zeros, zeros
    # the fused single-pass (Welford) kernel BatchNorm itself uses: ~3x faster than var_mean on CPU, as stable
    mean, var = torch.batch_norm_update_stats(x.to(stat_dtype), None, None, 0.0)
    return mean.new_full((), float(count)), mean, var * count


def _gathered_moments(x: Tensor, stat_dtype: torch.dtype, group: Any, world_size: int) -> tuple[Tensor, ...]:
    """All-gather every rank's (count, mean, M2), combined by Chan's parallel formula: (W-1)(2C+1) values received.

    Every rank runs the same ops on the same gathered tensor, so the result (and hence the running buffers) is
    identical everywhere and DDP's buffer broadcast is unnecessary.
    """
    count, mean, m2 = local_moments(x, stat_dtype)
    channels = mean.numel()
    rows = all_gather_rows(torch.cat([count.view(1), mean, m2]), group, world_size)
    counts, means, m2s = rows[:, :1], rows[:, 1 : 1 + channels], rows[:, 1 + channels :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total.clamp(min=1)
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


def _reduced_moments(x: Tensor, stat_dtype: torch.dtype, shift: Tensor | None, group: Any) -> tuple[Tensor, ...]:
    """One all-reduce (SUM) of 2C+1 values, whatever the world size: ``[n, n(mean-K), M2 + n(mean-K)^2]`` in fp64.

    Summed over ranks these are N, N(mean_g - K) and M2_g + N(mean_g - K)^2, so the global mean and M2 follow
    exactly. ``K`` must be the same on every rank: the running mean (identical on every rank under SyncBN, and
    close to the batch mean once training has begun, which keeps the subtraction small even in fp32), or 0 without
    running statistics (fp64 holds a 1e4 offset on unit variance to ~1e-8 relative).
    """
    count, mean, m2 = local_moments(x, stat_dtype)
    rd = _reduce_dtype(x.device)
    k = shift.detach().to(rd) if shift is not None else mean.new_zeros(mean.shape, dtype=rd)
    n, d = count.to(rd), mean.to(rd) - k
    sums = _all_reduce_sum(torch.cat([n.view(1), n * d, m2.to(rd) + n * d * d]), group)
    channels = mean.numel()
    total, s1, s2 = sums[0], sums[1 : 1 + channels], sums[1 + channels :]
    shifted_mean = s1 / total.clamp(min=1)
    m2 = (s2 - s1 * shifted_mean).clamp(min=0)
    return total.to(stat_dtype), (k + shifted_mean).to(stat_dtype), m2.to(stat_dtype)


def update_running_stats(bn: _BatchNorm, mean: Tensor, m2: Tensor, count: Tensor, factor: float | Tensor) -> None:
    """Running mean and unbiased variance, with no host read: a global count of 0 or 1 leaves them unchanged."""
    with torch.no_grad():
        rm, rv = bn.running_mean, bn.running_var
        f = torch.where(count > 1, torch.as_tensor(factor, dtype=rm.dtype, device=rm.device), 0.0).to(rm.dtype)
        rm.mul_(1 - f).add_(mean.to(rm.dtype) * f)
        rv.mul_(1 - f).add_((m2 / (count - 1).clamp(min=1)).to(rv.dtype) * f)


def _affine_of_x(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias per channel, through BatchNorm's own fused inference kernel.

    One pass over ``x`` in its dtype and layout (channels_last stays channels_last), accumulating in the statistics
    dtype; its precision is that of local BatchNorm on the same device, because it is the same kernel.
    """
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


class SyncBatchNormFunction(torch.autograd.Function):
    """Global-batch BatchNorm: one collective forward (all-gather or all-reduce of 2C+1 moments), one all-reduce of
    2C sums backward; returns (output, global mean, global M2, global count), the last three non-differentiable.

    Every full-size pass runs one of BatchNorm's fused kernels, so apart from its two collectives the layer costs
    what local BatchNorm costs: statistics (one pass) and normalisation (one pass) forward; the local sums (one
    pass) and dx (two passes) backward. Parameters and statistics are handed to the kernels in the statistics
    dtype, which is also how BatchNorm runs a bf16/fp16 input with fp32 parameters. The collectives are functional
    collectives and nothing is read on the host, so dynamo traces the layer whole (``fullgraph=True``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor | None,
        eps: float,
        group: Any,
        world_size: int,
        collective: str,
        kept: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd = statistics_dtype(x.dtype)
        if kept is not None:  # a checkpoint's replay: the first forward's global (count, mean, M2), no collective
            count, mean, m2 = kept
        elif collective == "all_reduce":
            count, mean, m2 = _reduced_moments(x, sd, shift, group)
        else:
            count, mean, m2 = _gathered_moments(x, sd, group, world_size)
        var = m2 / count.clamp(min=1)  # biased; a global count of 1 gives 0, never NaN
        weight_sd = None if weight is None else weight.to(sd)
        ctx.save_for_backward(x, weight, mean, var, count)  # the parameter itself: a second derivative reaches it
        ctx.group, ctx.eps = group, eps
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, m2, count)
        out = _affine_of_x(x, mean, var, weight_sd, None if bias is None else bias.to(sd), eps)
        return out, mean, m2, count

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:
        # Autograd calls this on an empty rank too (its output is part of the loss graph, with an empty grad), so
        # every rank enters the all-reduce. Whether the input needs a grad is decided by the graph, not the data,
        # so all ranks skip it together when it does not (then only the local parameter grads are needed).
        if torch.is_grad_enabled():  # backward(create_graph=True): this gradient will itself be differentiated
            return _differentiable_backward(ctx, grad_out)
        x, weight, mean, var, count = ctx.saved_tensors
        weight = None if weight is None else weight.to(mean.dtype)
        if x.numel() > 0:
            # with the global statistics as "running" stats, the inference backward's parameter grads are exactly
            # this rank's sum(dy * xhat) and sum(dy), in one fused pass (also without a weight)
            # (empty save_mean/save_invstd mean "use the running stats"; CUDA asserts they are defined)
            empty = mean.new_empty(0)
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight, mean, var, empty, empty, False, ctx.eps, [False, True, True]
            )
        else:
            sum_dy_xhat, sum_dy = torch.zeros_like(mean), torch.zeros_like(mean)
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = _all_reduce_sum(torch.cat([sum_dy, sum_dy_xhat]), ctx.group)
            mean_dy, mean_dy_xhat = (sums / count.clamp(min=1)).chunk(2)
            scale = torch.rsqrt(var + ctx.eps)
            scale = scale if weight is None else scale * weight
            # dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)): an affine map of x, plus dy * scale
            grad_x = _affine_of_x(x, mean, var, -scale * mean_dy_xhat, -scale * mean_dy, ctx.eps)
            grad_x = grad_x.addcmul_(grad_out, _per_channel(scale, x.dim()))
        return grad_x, *_parameter_grads(ctx, sum_dy_xhat, sum_dy), None, None, None, None, None, None


def _parameter_grads(ctx: Any, sum_dy_xhat: Tensor, sum_dy: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(weight grad, bias grad): this rank's sums, in the parameters' dtypes, where the graph needs them."""
    need_w, need_b = ctx.needs_input_grad[1:3]
    grad_weight = sum_dy_xhat.to(ctx.weight_dtype) if need_w and ctx.weight_dtype is not None else None
    grad_bias = sum_dy.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
    return grad_weight, grad_bias


def _differentiable_backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """The same gradients as :meth:`SyncBatchNormFunction.backward`, built from differentiable ops, for a backward
    whose result is differentiated again (a gradient penalty: WGAN-GP, R1). The fused kernels and the in-place
    all-reduce have no derivative, and the saved global statistics hold none of their dependence on every rank's
    input; so the statistics are recomputed from ``x`` through all-reduces that carry gradients (their backward is
    an all-reduce too), shifted by the forward's mean to stay exact. Costs one more all-reduce of 2C values."""
    all_reduce = _DifferentiableAllReduce.apply
    x, weight, mean, _, count = ctx.saved_tensors
    weight = None if weight is None else weight.to(mean.dtype)
    dims = [d for d in range(x.dim()) if d != 1]
    n = count.clamp(min=1)
    shifted = x.to(mean.dtype) - _per_channel(mean.detach(), x.dim())
    s1, s2 = all_reduce(torch.cat([shifted.sum(dims), (shifted * shifted).sum(dims)]), ctx.group).chunk(2)
    offset = s1 / n  # the global mean minus the forward's (0 up to rounding, but differentiable)
    invstd = torch.rsqrt((s2 / n - offset * offset).clamp(min=0) + ctx.eps)
    xhat = (shifted - _per_channel(offset, x.dim())) * _per_channel(invstd, x.dim())
    dy = grad_out.to(mean.dtype)
    sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
    grad_x = None
    if ctx.needs_input_grad[0]:
        mean_dy, mean_dy_xhat = (all_reduce(torch.cat([sum_dy, sum_dy_xhat]), ctx.group) / n).chunk(2)
        scale = invstd if weight is None else invstd * weight
        dx = dy - _per_channel(mean_dy, x.dim()) - xhat * _per_channel(mean_dy_xhat, x.dim())
        grad_x = (dx * _per_channel(scale, x.dim())).to(x.dtype)
    return grad_x, *_parameter_grads(ctx, sum_dy_xhat, sum_dy), None, None, None, None, None, None


class _DifferentiableAllReduce(torch.autograd.Function):
    """A sum over the group whose gradient is the sum of the gradients over the group (the adjoint of a sum that
    every rank receives), itself differentiable the same way."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return _all_reduce_sum(t.clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _DifferentiableAllReduce.apply(grad, ctx.group), None
