"""Fused AdamW: a drop-in for ``torch.optim.AdamW`` with clipping, grad-scaler and master
weights fused into a few multi-tensor launches per step.

Same constructor, param groups, state keys (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``) and state_dict as ``torch.optim.AdamW``, so a checkpoint moves both ways
between the two. On top of it:

- ``max_grad_norm``: the global gradient norm (that of ``clip_grad_norm_`` over every
  parameter with a gradient) is reduced deterministically and the clip factor applied inside
  the update; it is kept on the device as ``last_grad_norm``. A non-finite norm skips the
  step instead of writing NaN into the weights.
- ``torch.amp.GradScaler``: the optimizer declares ``_step_supports_amp_scaling``, so the
  scaler hands it ``grad_scale`` and ``found_inf``; gradients are unscaled inside the update
  (never twice: after ``scaler.unscale_(opt)`` the scaler passes no scale) and a step with
  inf/NaN gradients leaves every parameter and every state untouched, step counters included.
- ``master_weights=True``: bf16/fp16 parameters get an fp32 copy (state key
  ``master_param``, saved in the state_dict) that receives the update; the low-precision
  parameter is rewritten from it in the same pass. Their moments are kept in fp32 too.
- lr and the step counters live on the device: nothing in ``step()`` waits for the host,
  and with a tensor ``lr`` (updated in place) the step can be captured in a CUDA graph.

CUDA tensors run the Triton kernels of ``fastlab.kernels.adamw``; CPU tensors (and dtypes
the kernels do not cover, float64) run :func:`adamw_ref`, the plain-PyTorch oracle.
"""
import itertools
from typing import Dict, List, Optional

import torch
from torch.optim import Optimizer

from fastlab.kernels import adamw as K
from fastlab.ops._dispatch import use_triton

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
#: Addresses the kernels stream with 16-byte vectors must be aligned to this many bytes.
_VECTOR_BYTES = 16
_COLUMNS = int(K.COLUMNS)


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"lr as a tensor must hold one floating-point value, got "
                             f"shape {tuple(lr.shape)} and dtype {lr.dtype}")
        # construction-time check of a tensor lr: a host read, outside every step
        lr_value = float(lr.detach().reshape(()).cpu())
    elif isinstance(lr, (int, float)):
        lr_value = float(lr)
    else:
        raise TypeError(f"lr must be a float or a one-element tensor, got {type(lr).__name__}")
    if not lr_value >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr_value}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) for b in betas)):
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be a float >= 0, got {weight_decay!r}")


def _is_dense(t: torch.Tensor) -> bool:
    """True when ``t`` covers a gap-free block of memory (any permutation of dims)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(t: torch.Tensor):
    """Strides of the non-trivial dims: equal layouts make flat elementwise indexing agree."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n != 1)


def _empty_like(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """State storage for ``p``: its layout when dense (so flat indices match), else contiguous."""
    return torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)


def grad_norm_ref(grads: List[torch.Tensor], inv_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm over all gradients, each first unscaled by ``inv_scale``, in fp32."""
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for g in grads:
        g = g.float() if inv_scale is None else g.float() * inv_scale
        total = total + (g * g).sum()
    return total.sqrt()


def adamw_ref(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, *,
              lr, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
              maximize: bool, inv_scale=None, clip_coef=None, skip=None) -> None:
    """One AdamW step in plain PyTorch, in place; the oracle of the fused kernel.

    Math in fp32 (fp64 for fp64 params) with torch.optim.AdamW's operation order; bias
    corrections in float64 from ``steps`` (already advanced). ``masters[i]``, when not None,
    is the fp32 copy that is updated and then rounded into ``params[i]``. ``inv_scale``/``clip_coef`` (0-dim fp32
    tensors) multiply the gradient; ``skip`` (0-dim bool tensor) keeps every tensor as it was.
    Nothing here reads a value back to the host.
    """
    for i, param in enumerate(params):
        compute = torch.promote_types(param.dtype, torch.float32)
        g = grads[i].to(compute)
        if inv_scale is not None:
            g = g * inv_scale
        if clip_coef is not None:
            g = g * clip_coef
        if maximize:
            g = -g
        weights = masters[i] if masters[i] is not None else param
        t = steps[i].double()
        lr_t = torch.as_tensor(lr, dtype=torch.float64, device=param.device)
        bias_correction1 = 1 - beta1 ** t
        bias_correction2_sqrt = (1 - beta2 ** t).sqrt()
        p = weights.to(compute, copy=True).mul_((1 - lr_t * weight_decay).to(compute))
        m = exp_avgs[i].to(compute).lerp(g, 1 - beta1)
        v = exp_avg_sqs[i].to(compute).mul(beta2).addcmul_(g, g, value=1 - beta2)
        v_hat = v
        if amsgrad:
            v_hat = torch.maximum(max_exp_avg_sqs[i].to(compute), v)
        denom = (v_hat.sqrt() / bias_correction2_sqrt.to(compute)).add_(eps)
        p = p + (-lr_t / bias_correction1).to(compute) * (m / denom)

        updates = [(exp_avgs[i], m), (exp_avg_sqs[i], v), (param, p)]
        if amsgrad:
            updates.append((max_exp_avg_sqs[i], v_hat))
        if masters[i] is not None:
            updates.append((masters[i], p))
        for dst, new in updates:
            new = new.to(dst.dtype)
            dst.copy_(new if skip is None else torch.where(skip, dst, new))


class _Launch:
    """One multi-tensor launch: the tensors of one (param group, dtype, alignment) bucket."""

    def __init__(self, group_index, param_dtype, aligned, n_rows, n_chunks):
        self.group_index = group_index
        self.param_dtype = param_dtype
        self.aligned = aligned
        self.n_rows = n_rows
        self.n_chunks = n_chunks
        self.table = self.chunks = self.partials = None


class _Plan:
    """Everything the kernels of one device need.

    Device buffer layout: ``[step addresses | address tables of every launch | chunk tables
    of every launch]``. The chunk tables depend only on the tensors' sizes; the prefix holds
    the addresses, re-uploaded alone (one copy) when gradients move to new memory.
    """

    def __init__(self, structure, addresses, buckets, launches, buffer, scalars, partials,
                 staged):
        self.structure = structure  # which tensors, in which groups: a change rebuilds all
        self.addresses = addresses  # where they are: a change re-uploads the prefix
        self.buckets = buckets      # launch key of every tensor, in order
        self.launches = launches
        self.buffer = buffer        # int64, on the device
        self.scalars = scalars      # fp32 [SCALARS]: written by the finalize kernel
        self.partials = partials    # fp32 [chunks]: per-chunk sums of squares
        self.staged = staged        # [(param, param buffer or None, grad buffer or None)]
        self.steps = buffer[:len(buckets)]
        self.moved = False          # gradients moved during a capture: tables not yet written


class AdamW(Optimizer):
    """AdamW with torch.optim.AdamW's interface, fused into a few launches per step.

    Args beyond torch's: ``max_grad_norm`` (clip the global gradient norm to this value,
    inside the step; ``last_grad_norm`` holds the norm on the device), ``master_weights``
    (fp32 master copies for bf16/fp16 parameters). ``foreach``, ``capturable`` and ``fused``
    are accepted and stored for compatibility: this optimizer is always fused and capturable.
    After ``step()``, ``last_step_skipped`` (fp32 0-dim, device) is 1 when inf/NaN gradients
    skipped it.

    Master weights are the source of truth: writing into a low-precision parameter from
    outside the optimizer (e.g. loading a model checkpoint alone) is overwritten by the
    next step unless the optimizer state is loaded with it.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, max_grad_norm=None, master_weights=False):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if differentiable:
            raise ValueError("differentiable=True is not supported by fastlab.optim.AdamW")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be None or a float > 0, got {max_grad_norm!r}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.master_weights = bool(master_weights)
        self.last_grad_norm: Optional[torch.Tensor] = None
        self.last_step_skipped: Optional[torch.Tensor] = None
        self._plans: Dict[torch.device, _Plan] = {}
        self._lr_buffers: Dict[tuple, tuple] = {}
        self._staging: Dict[torch.Tensor, tuple] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=False, fused=fused,
                        decoupled_weight_decay=True)
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- param groups, state
    def add_param_group(self, param_group: dict) -> None:
        names = ("lr", "betas", "eps", "weight_decay")
        if any(name in param_group for name in names):
            _check_hyperparameters(**{n: param_group.get(n, self.defaults[n]) for n in names})
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise TypeError(f"complex parameters are not supported by fastlab.optim.AdamW "
                                f"(got a {p.dtype} parameter of shape {tuple(p.shape)})")
        super().add_param_group(param_group)
        self._plans.clear()

    def _uses_master(self, dtype: torch.dtype) -> bool:
        return self.master_weights and dtype in _LOW_PRECISION

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if self._uses_master(p.dtype) else p.dtype

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """Create the missing state of ``p`` (lazily, as torch does, at its first gradient)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        dtype = self._state_dtype(p)
        for key in _MOMENTS if group["amsgrad"] else _MOMENTS[:2]:
            if key not in state:
                state[key] = _empty_like(p, dtype).zero_()
        if self._uses_master(p.dtype) and "master_param" not in state:
            state["master_param"] = _empty_like(p, torch.float32).copy_(p.detach())
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, then each state tensor re-laid out as this optimizer keeps it.

        torch casts every floating state tensor to its parameter's dtype, which would round
        fp32 moments and master weights to bf16; they are copied again here from the saved
        values, and the step counters are moved to the parameter's device in fp32 so that no
        step ever reads them from the host.
        """
        saved = state_dict["state"]
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        super().load_state_dict(state_dict)
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            state = self.state[p]
            for key, value in saved[pid].items():
                if key == "step":
                    state[key] = torch.as_tensor(value).detach().to(
                        device=p.device, dtype=torch.float32).reshape(()).clone()
                elif key in _MOMENTS:
                    state[key] = _empty_like(p, self._state_dtype(p)).copy_(value)
                elif key == "master_param":
                    if self._uses_master(p.dtype):
                        state[key] = _empty_like(p, torch.float32).copy_(value)
                    else:
                        del state[key]
        self._plans.clear()

    # ---------------------------------------------------------------------------- step
    @torch.compiler.disable  # addresses and cached tables: this runs eagerly, not traced
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None):
        """One AdamW step over every parameter with a gradient; returns ``closure()``'s loss.

        ``grad_scale`` (0-dim device tensor): every gradient is divided by it inside the
        update, before clipping. ``found_inf`` (0-dim device tensor): when non-zero the step
        leaves every parameter and state as it was. Both stay on the device, so a trainer
        can skip a step without a host sync. Without them, the values ``torch.amp.
        GradScaler.step`` sets on optimizers that support amp scaling are used.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # no scale means the gradients were already unscaled (scaler.unscale_) and stay so
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        by_device = self._params_with_grads()
        if self.max_grad_norm is not None and len(by_device) > 1:
            raise ValueError("max_grad_norm needs every parameter on one device, got "
                             f"{sorted(str(d) for d in by_device)}")
        self.last_grad_norm = self.last_step_skipped = None
        for device, entries in by_device.items():
            scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
            inf = None if found_inf is None else found_inf.to(device, non_blocking=True)
            kernel = (use_triton(entries[0][1])
                      and all(p.dtype in K.TL_DTYPES for _, p, _ in entries))
            if kernel:
                self._step_kernels(device, entries, scale, inf)
            else:
                self._step_reference(entries, scale, inf)
        return loss

    def finish_capture(self) -> None:
        """Write the address tables for gradients that a CUDA graph capture allocated.

        Capturing a whole step with the gradients freed first (``zero_grad(set_to_none=
        True)``, then backward and ``step()`` inside ``torch.cuda.graph``) lets the captured
        backward write the gradients into the graph's memory pool instead of zero-filling
        and accumulating into buffers kept outside it. Their addresses are known only once
        the backward is recorded, so ``step()`` records kernels that read the tables at
        replay, and this call, after the capture and before the first replay, uploads
        them. Nothing happens when no gradient moved.
        """
        for device, entries in self._params_with_grads().items():
            plan = self._plans.get(device)
            if plan is None or not plan.moved:
                continue
            if self._plan(device, entries) is not plan:  # tables rewritten in place
                raise RuntimeError("fastlab.optim.AdamW: the parameters changed after the "
                                   "capture; capture the step again")
            plan.moved = False

    def _params_with_grads(self):
        """{device: [(group index, param, grad)]} in param-group order, gradients checked."""
        by_device: Dict[torch.device, list] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.layout is not torch.strided:
                    raise TypeError("fastlab.optim.AdamW does not support sparse gradients "
                                    f"(got layout {g.layout}); use torch.optim.SparseAdam")
                by_device.setdefault(p.device, []).append((gi, p, g))
        return by_device

    def _step_reference(self, entries, scale, found_inf) -> None:
        inv_scale = None if scale is None else scale.double().reciprocal().float().reshape(())
        skip = None if found_inf is None else (found_inf.reshape(()) != 0)
        clip_coef = None
        states = [self._init_state(p, self.param_groups[gi]) for gi, p, _ in entries]
        if self.max_grad_norm is not None:
            norm = grad_norm_ref([g for _, _, g in entries], inv_scale)
            clip_coef = (self.max_grad_norm / (norm + K.CLIP_EPS.value)).clamp(max=1.0)
            skip = ~norm.isfinite() if skip is None else skip | ~norm.isfinite()
            self.last_grad_norm = norm
        advance = 1.0 if skip is None else 1.0 - skip.float()
        for state in states:
            state["step"].add_(advance)
        for gi, group in enumerate(self.param_groups):
            members = [(p, g, s) for (i, p, g), s in zip(entries, states) if i == gi]
            if not members:
                continue
            amsgrad = group["amsgrad"]
            adamw_ref(
                [p for p, _, _ in members], [g for _, g, _ in members],
                [s["exp_avg"] for _, _, s in members], [s["exp_avg_sq"] for _, _, s in members],
                [s["max_exp_avg_sq"] if amsgrad else None for _, _, s in members],
                [s.get("master_param") for _, _, s in members],
                [s["step"] for _, _, s in members],
                lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=amsgrad,
                maximize=group["maximize"], inv_scale=inv_scale, clip_coef=clip_coef, skip=skip,
            )
        self.last_step_skipped = (torch.zeros((), device=entries[0][1].device)
                                  if skip is None else skip.float())

    # ------------------------------------------------------------------ kernel path
    def _step_kernels(self, device, entries, scale, found_inf) -> None:
        plan = self._plan(device, entries)
        for param, param_buffer, grad_buffer in plan.staged:
            if param_buffer is not None:
                param_buffer.copy_(param)
            if grad_buffer is not None:
                grad_buffer.copy_(param.grad)
        clipping = self.max_grad_norm is not None
        if clipping:
            for launch in plan.launches:
                K.grad_sumsq(launch.table, launch.chunks, launch.partials, scale,
                             launch.param_dtype, launch.aligned)
        K.finalize(plan.partials if clipping else None, found_inf, scale, plan.steps,
                   plan.scalars, self.max_grad_norm)
        for launch in plan.launches:
            group = self.param_groups[launch.group_index]
            master = self._uses_master(launch.param_dtype)
            K.adamw_update(
                launch.table, launch.chunks, self._lr_on(device, launch.group_index),
                plan.scalars, beta1=group["betas"][0], beta2=group["betas"][1],
                eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                maximize=group["maximize"], master=master, param_dtype=launch.param_dtype,
                state_dtype=torch.float32 if master else launch.param_dtype,
                aligned=launch.aligned,
            )
        for param, param_buffer, _ in plan.staged:
            if param_buffer is not None:
                param.copy_(param_buffer)
        self.last_grad_norm = plan.scalars[int(K.NORM)] if clipping else None
        self.last_step_skipped = plan.scalars[int(K.SKIP)]

    def _lr_on(self, device: torch.device, group_index: int) -> torch.Tensor:
        """The group's lr as an fp32 device scalar; a float lr is copied only when it changes."""
        lr = self.param_groups[group_index]["lr"]
        if (isinstance(lr, torch.Tensor) and lr.device == device and lr.dtype == torch.float32
                and lr.numel() == 1):
            return lr
        cache_key = (group_index, device)
        value, buffer = self._lr_buffers.get(cache_key, (None, None))
        if buffer is None:
            buffer = torch.empty(1, dtype=torch.float32, device=device)
        if isinstance(lr, torch.Tensor):
            buffer.copy_(lr.reshape(1), non_blocking=True)
        elif lr != value:
            buffer.fill_(lr)
        self._lr_buffers[cache_key] = (None if isinstance(lr, torch.Tensor) else lr, buffer)
        return buffer

    def _plan(self, device, entries) -> _Plan:
        """The cached plan of ``device``, refreshed or rebuilt when tensors changed."""
        structure = tuple((gi, id(p)) for gi, p, _ in entries)
        structure += tuple(bool(group["amsgrad"]) for group in self.param_groups)
        addresses = tuple((p.data_ptr(), g.data_ptr()) for _, p, g in entries)
        plan = self._plans.get(device)
        if plan is not None and plan.structure == structure and plan.addresses == addresses:
            return plan
        rows, buckets, staged = self._rows(entries)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            if plan is None or plan.structure != structure or plan.buckets != buckets:
                raise RuntimeError(
                    "the parameters of fastlab.optim.AdamW, or the alignment of their "
                    "gradients, changed while a CUDA graph was being captured; run one "
                    "step eagerly with the same parameters before capturing")
            # gradients allocated by the captured backward (in the graph's pool): the
            # captured kernels read the address tables at replay, and finish_capture()
            # writes them once the capture is over
            plan.staged, plan.moved = staged, True
            return plan
        if plan is not None and plan.structure == structure and plan.buckets == buckets:
            # same tensors in the same launches, only the gradients moved: new addresses
            prefix = self._pinned(self._host_prefix(rows, buckets, plan.launches), device)
            plan.buffer[:prefix.numel()].copy_(prefix, non_blocking=True)
            plan.addresses, plan.staged, plan.moved = addresses, staged, False
        else:
            plan = self._build_plan(device, structure, addresses, rows, buckets, staged)
            self._plans[device] = plan
        return plan

    def _rows(self, entries):
        """Address-table row and launch key of every tensor; staging buffers where needed."""
        rows, buckets, staged = [], [], []
        for gi, p, g in entries:
            group = self.param_groups[gi]
            state = self._init_state(p, group)
            work_p, work_g, buffers = self._working_tensors(p, g)
            if buffers is not None:
                staged.append((p,) + buffers)
            row = [0] * _COLUMNS
            row[K.PARAM], row[K.GRAD] = work_p.data_ptr(), work_g.data_ptr()
            row[K.EXP_AVG] = state["exp_avg"].data_ptr()
            row[K.EXP_AVG_SQ] = state["exp_avg_sq"].data_ptr()
            if group["amsgrad"]:
                row[K.MAX_EXP_AVG_SQ] = state["max_exp_avg_sq"].data_ptr()
            if self._uses_master(p.dtype):
                row[K.MASTER] = state["master_param"].data_ptr()
            row[K.STEP], row[K.NUMEL] = state["step"].data_ptr(), p.numel()
            aligned = all(a % _VECTOR_BYTES == 0 for a in row[:K.STEP])
            rows.append(row)
            buckets.append((gi, p.dtype, aligned))
        return rows, buckets, staged

    @staticmethod
    def _host_prefix(rows, buckets, launches) -> torch.Tensor:
        """``[step addresses | each launch's rows]`` as one int64 host tensor."""
        host = [row[K.STEP] for row in rows]
        for launch in launches:
            key = (launch.group_index, launch.param_dtype, launch.aligned)
            host.extend(itertools.chain.from_iterable(
                row for row, bucket in zip(rows, buckets) if bucket == key))
        return torch.tensor(host, dtype=torch.int64)

    @staticmethod
    def _pinned(host: torch.Tensor, device) -> torch.Tensor:
        """``host`` in pinned memory when bound for a GPU, so its upload is asynchronous."""
        return host.pin_memory() if device.type == "cuda" else host

    def _build_plan(self, device, structure, addresses, rows, buckets, staged) -> _Plan:
        """Launches, chunk tables and address tables of ``device``, uploaded in one copy."""
        launches = []
        for key in dict.fromkeys(buckets):
            numels = [row[K.NUMEL] for row, bucket in zip(rows, buckets) if bucket == key]
            launches.append((_Launch(*key, len(numels), 0), K.chunk_table(numels)))
        prefix = self._host_prefix(rows, buckets, [launch for launch, _ in launches])
        chunks = list(itertools.chain.from_iterable(
            itertools.chain.from_iterable(table) for _, table in launches))
        host = torch.cat([prefix, torch.tensor(chunks, dtype=torch.int64)])
        buffer = self._pinned(host, device).to(device, non_blocking=True)
        n_partials = len(chunks) // 2
        partials = torch.zeros(max(n_partials, 1), dtype=torch.float32, device=device)
        table_at, chunk_at, partial_at = len(rows), prefix.numel(), 0
        for launch, table in launches:
            launch.n_chunks = len(table)
            launch.table = buffer[table_at:table_at + launch.n_rows * _COLUMNS]
            launch.chunks = buffer[chunk_at:chunk_at + 2 * launch.n_chunks].view(-1, 2)
            launch.partials = partials[partial_at:partial_at + launch.n_chunks]
            table_at += launch.n_rows * _COLUMNS
            chunk_at += 2 * launch.n_chunks
            partial_at += launch.n_chunks
        scalars = torch.zeros(int(K.SCALARS), dtype=torch.float32, device=device)
        return _Plan(structure, addresses, buckets, [launch for launch, _ in launches], buffer,
                     scalars, partials[:n_partials], staged)

    def _working_tensors(self, p, g):
        """Tensors the kernel may index flat: ``p`` and ``g`` themselves when they are dense
        with one layout (the state follows ``p``'s), else persistent contiguous buffers that
        are copied in before the kernels and back out after them."""
        if _is_dense(p) and _is_dense(g) and _layout(g) == _layout(p):
            return p, g, None
        param_buffer, grad_buffer = self._staging.get(p, (None, None))
        if param_buffer is None and not _is_dense(p):
            param_buffer = torch.empty(p.shape, dtype=p.dtype, device=p.device)
        work_p = p if param_buffer is None else param_buffer
        same = _is_dense(g) and _layout(g) == _layout(work_p)
        if same:
            grad_buffer = None
        elif grad_buffer is None:
            grad_buffer = torch.empty_like(work_p)
        self._staging[p] = (param_buffer, grad_buffer)
        return work_p, g if same else grad_buffer, (param_buffer, grad_buffer)
