"""The fast step's CPU path for the toy MLP: its forward and backward written out, its weights flat.

On a small CPU a toy step (:class:`~flowmatch.models.mlp.MLPVelocity` of width 64, batch 256)
spends more time dispatching tensor operations than computing: autograd's graph, a module call per
layer, and AdamW, clipping and the EMA launched once per parameter tensor cost about twice the
arithmetic (``flowmatch speed --sections train``). This step does the same arithmetic in about 80
tensor operations, draws included:

- the MLP's forward (``addmm`` and the activation per layer) and its backward (``mm`` for the
  weight and input gradients, the activation's own ATen backward, a column sum for the bias), with
  the gradient of the L2 flow-matching loss ``mean_i mean_d (v - u)^2`` in closed form,
  ``2 (v - u) / (B D)``; everything runs under ``no_grad``, no graph is built; the activations
  and their gradients are written into buffers made once per batch size (the same memory every
  step), and the input ``[x, cos, sin]`` is one concatenation;
- the parameters, their gradients and the EMA's copies are views into one flat buffer each, so
  clipping is one norm and one scale, the EMA one ``lerp_``, and AdamW is the kernel of
  ``torch.optim.AdamW(fused=True)`` called on one flat parameter.

The draws (coupling, times, path noise), the time embedding, the per-sample loss and its t-bins,
the schedule and the EMA's decay are the autograd step's own code, so a fused run sees the same
batches; its numbers agree with the plain step's to float rounding (sums taken in another order,
fused AdamW; over 30 steps of the tests' toy runs the losses differ by at most 2e-7 relative under
ATEN_CPU_CAPABILITY=default, avx2 and avx512, and which steps differ depends on the host's vector
width: never compare the two bit for bit). Checkpoints keep the per-parameter AdamW state of the other modes (converted on save
and on load), so a run moves between the modes on resume.

:class:`FusedMLPStep` is this implementation behind the step interface of
:class:`~flowmatch.training.step.TrainStep`, for the l2 velocity-regression objectives
(:class:`~flowmatch.training.objectives.CFM` with one term and no labels,
:class:`~flowmatch.training.objectives.OneStepDistill`): it takes the objective's draws and computes
its loss written out. The plan (:func:`~flowmatch.training.plan.resolve_plan`) picks it where
:func:`fused_mlp_reason` and the objective find nothing against it: the CPU, an ``MLPVelocity`` whose
activation is in :data:`FUSED_ACTIVATIONS`, fp32, one process, ``grad_accum`` 1, no compilation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.optim.adamw import adamw as _adamw

from flowmatch.training.step import StepOutput, TBins
from flowmatch.types import LossOutput

# the kernel behind ``torch.optim.adamw.adamw(..., fused=True)``; where a torch lacks it, that
# function is called instead
_fused_adamw_op = getattr(torch, "_fused_adamw_", None)

__all__ = ["FUSED_ACTIVATIONS", "fused_mlp_reason", "FlatMLP", "FusedMLPStep"]

# the activations whose backward is written out here (the ATen op autograd itself calls)
FUSED_ACTIVATIONS = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Tanh: "tanh", nn.GELU: "gelu"}


def fused_mlp_reason(model: nn.Module) -> Optional[str]:
    """Why the fused step cannot run ``model`` (``None``: it can): an ``MLPVelocity`` of biased Linear
    layers and activations of :data:`FUSED_ACTIVATIONS`, fp32. What else it needs (the CPU, one
    process, one micro-batch, no compilation, an l2 regression objective) the plan checks."""
    from flowmatch.models.mlp import MLPVelocity

    if not isinstance(model, MLPVelocity):
        return f"the model is {type(model).__name__}, not the MLP"
    if any(not p.requires_grad for p in model.parameters()):
        return "it trains every parameter, and this model has frozen ones (an adapter on a frozen base)"
    layers = list(model.net)
    for i, m in enumerate(layers):
        if i % 2 == 0 and not isinstance(m, nn.Linear):
            return f"layer {i} of the MLP is {type(m).__name__}, not Linear"
        if i % 2 == 1 and type(m) not in FUSED_ACTIVATIONS:
            return f"activation {type(m).__name__} has no written-out backward"
    linear_params = {id(p) for m in layers[::2] for p in m.parameters()}
    if {id(p) for p in model.parameters()} != linear_params or any(m.bias is None for m in layers[::2]):
        return "the MLP has parameters outside its biased Linear layers"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "it is fp32 only"
    return None


_aten = torch.ops.aten


def _activation_fns(kind: str, module: nn.Module):
    """``(forward, backward)`` of an activation, each writing into a given tensor: ``forward(a, out)``
    its output (the module's own op), ``backward(grad, pre, post)`` the gradient at its input ``pre``
    from ``grad`` at its output ``post``, by the ATen backward autograd calls for it, written over
    ``grad``."""
    if kind == "silu":
        return (lambda a, out: _aten.silu.out(a, out=out),
                lambda g, pre, post: _aten.silu_backward.grad_input(g, pre, grad_input=g))
    if kind == "relu":  # ATen's relu is clamp_min(x, 0)
        return (lambda a, out: torch.clamp_min(a, 0, out=out),
                lambda g, pre, post: _aten.threshold_backward.grad_input(g, post, 0, grad_input=g))
    if kind == "tanh":
        return (lambda a, out: torch.tanh(a, out=out),
                lambda g, pre, post: _aten.tanh_backward.grad_input(g, post, grad_input=g))
    approximate = module.approximate
    return (lambda a, out: _aten.gelu.out(a, approximate=approximate, out=out),
            lambda g, pre, post: _aten.gelu_backward.grad_input(g, pre, approximate=approximate, grad_input=g))


class FlatMLP:
    """An ``MLPVelocity`` and its EMA copy re-seated on flat buffers, with the step's forward and
    backward (see the module docstring). ``param`` is the flat parameter the optimiser updates (its
    ``grad`` the flat gradient); the model's own parameters and gradients are views into them, so
    the module, its ``state_dict`` and ``load_state_dict`` work as before. ``ema`` is the EMA
    model's flat buffer."""

    def __init__(self, model: nn.Module, ema_model: nn.Module):
        self.model = model
        linears = [m for m in model.net if isinstance(m, nn.Linear)]
        # (forward, backward) of each activation
        self.acts = [_activation_fns(FUSED_ACTIVATIONS[type(m)], m) for m in list(model.net)[1::2]]
        # the time features' cosine and sine halves, concatenated with x in one step
        self._time_parts = getattr(model.time_embed, "parts", None)
        self.params = list(model.parameters())
        ema_params = list(ema_model.parameters())
        if len(ema_params) != len(self.params):
            raise ValueError(f"the EMA holds {len(ema_params)} parameters, the model {len(self.params)}")
        p0 = self.params[0]
        n = sum(p.numel() for p in self.params)
        self.param = nn.Parameter(torch.empty(n, dtype=p0.dtype, device=p0.device))
        self.param.grad = torch.zeros_like(self.param)
        self.ema = torch.empty(n, dtype=p0.dtype, device=p0.device)
        # (EMA buffer, model buffer): the EMA copies buffers every step
        self.buffers = list(zip(ema_model.buffers(), model.buffers()))
        self.slices: list[slice] = []
        o = 0
        with torch.no_grad():
            for p, q in zip(self.params, ema_params):
                k = p.numel()
                s = slice(o, o + k)
                self.param[s].copy_(p.reshape(-1))
                self.ema[s].copy_(q.reshape(-1))
                p.data = self.param.data[s].view_as(p)
                p.grad = self.param.grad[s].view_as(p)
                q.data = self.ema[s].view_as(q)
                self.slices.append(s)
                o += k
        # (weight, its transpose, bias, weight gradient, bias gradient) of each layer: views into the
        # flat buffers, made once
        self.layers = [(lin.weight.data, lin.weight.data.t(), lin.bias.data, lin.weight.grad, lin.bias.grad)
                       for lin in linears]
        self._work: Optional[tuple] = None  # the step's activation buffers, for one batch size

    def _buffers(self, batch: int) -> tuple:
        """``(batch, pre, post, grad)``: per hidden layer, its pre-activation, its output and the
        gradient at its pre-activation, ``[batch, width]`` each; made once per batch size, so every
        step writes to the same memory."""
        if self._work is None or self._work[0] != batch:
            w0 = self.layers[0][0]
            made = [[torch.empty(batch, w.shape[0], dtype=w0.dtype, device=w0.device) for w, *_ in self.layers[:-1]]
                    for _ in range(3)]
            self._work = (batch, *made)
        return self._work

    # ------------------------------------------------------------------ the step

    def loss_and_grads(self, xt: torch.Tensor, t: torch.Tensor, ut: torch.Tensor) -> LossOutput:
        """The L2 flow-matching loss of the model at ``(xt, t)`` against ``ut`` with its per-sample
        values (as :func:`~flowmatch.training.losses.cfm_loss` returns them); the gradients are written
        into the flat gradient (every element: nothing needs clearing first). Call it, and the other
        methods of the step, under ``torch.no_grad()``."""
        if self._time_parts is not None:
            h = torch.cat([xt, *self._time_parts(t)], dim=1)
        else:
            h = torch.cat([xt, self.model.time_embed(t).to(xt.dtype)], dim=1)
        layers, acts = self.layers, self.acts
        _, pres, posts, grads = self._buffers(h.shape[0])
        inputs = [h]
        for (_, wt, b, _, _), (forward, _), a, out in zip(layers, acts, pres, posts):
            h = forward(torch.addmm(b, h, wt, out=a), out)
            inputs.append(h)
        _, wt, b, gw, gb = layers[-1]
        v = torch.addmm(b, h, wt)
        err = (v - ut).reshape(v.shape[0], -1)
        per_sample = err.pow(2).mean(dim=1)
        loss = per_sample.mean()
        g = err * (2.0 / err.numel())  # d loss / d v
        torch.mm(g.t(), h, out=gw)
        torch.sum(g, 0, out=gb)
        for i in range(len(acts) - 1, -1, -1):
            g = acts[i][1](torch.mm(g, layers[i + 1][0], out=grads[i]), pres[i], inputs[i + 1])
            _, _, _, gw, gb = layers[i]
            torch.mm(g.t(), inputs[i], out=gw)
            torch.sum(g, 0, out=gb)
        return LossOutput(loss=loss, per_sample=per_sample)

    def clip_(self, max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` on the flat gradient: scale it to norm ``max_norm`` when above; returns
        the norm before clipping."""
        g = self.param.grad
        total = torch.linalg.vector_norm(g)
        if math.isfinite(max_norm):
            # clip_grad_norm_'s max_norm / (total + 1e-6), which torch computes as the reciprocal times
            # max_norm: the same operations, in place, without the Python operator
            g.mul_((total + 1e-6).reciprocal_().mul_(max_norm).clamp_(max=1.0))
        return total

    def adamw_step(self, opt: torch.optim.Optimizer) -> None:
        """``opt.step()`` for the AdamW over :attr:`param`, by the function it calls
        (``torch.optim.adamw.adamw``, fused) on its own state and group settings: the same update
        without the optimiser's per-call bookkeeping. The first step (which creates the state) and
        amsgrad go through ``opt.step()``."""
        group = opt.param_groups[0]
        st = opt.state.get(self.param)
        if not st or group["amsgrad"] or len(opt.param_groups) != 1:
            opt.step()
            return
        beta1, beta2 = group["betas"]
        kw = dict(amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=group["maximize"])
        if _fused_adamw_op is None:
            _adamw([self.param], [self.param.grad], [st["exp_avg"]], [st["exp_avg_sq"]], [], [st["step"]],
                   fused=True, **kw)
            return
        # what that function does for one CPU tensor, without its grouping by device and dtype:
        # count the step, then the fused kernel
        st["step"].add_(1)
        _fused_adamw_op([self.param], [self.param.grad], [st["exp_avg"]], [st["exp_avg_sq"]], [], [st["step"]],
                        grad_scale=None, found_inf=None, **kw)

    # ------------------------------------------------------------------ optimiser state

    def optimizer_state_to_params(self, state: dict) -> dict:
        """The flat optimiser's ``state_dict`` as the per-parameter one of the other modes."""
        groups = [{**g, "params": list(range(len(self.params)))} for g in state["param_groups"]]
        flat = state["state"].get(0)
        per: dict = {}
        if flat is not None:
            for i, (p, s) in enumerate(zip(self.params, self.slices)):
                per[i] = {k: (v[s].view_as(p) if torch.is_tensor(v) and v.shape == self.param.shape else
                              (v.clone() if torch.is_tensor(v) else v)) for k, v in flat.items()}
        return {"state": per, "param_groups": groups}

    def optimizer_state_from_params(self, state: dict) -> dict:
        """A per-parameter AdamW ``state_dict`` (any mode's checkpoint) as the flat optimiser's."""
        if len(state["param_groups"]) != 1:
            raise ValueError(f"expected one parameter group, got {len(state['param_groups'])}")
        groups = [{**state["param_groups"][0], "params": [0]}]
        per = state["state"]
        if not per:
            return {"state": {}, "param_groups": groups}
        if len(per) != len(self.params):
            raise ValueError(f"the optimiser state holds {len(per)} parameters, the model {len(self.params)}")
        first = per[min(per)]
        merged = {}
        for k, v in first.items():
            if torch.is_tensor(v) and v.dim() > 0:
                merged[k] = torch.cat([per[i][k].reshape(-1) for i in sorted(per)])
            else:
                merged[k] = v.clone() if torch.is_tensor(v) else v
        return {"state": {0: merged}, "param_groups": groups}


class FusedMLPStep:
    """One optimiser step of an l2 velocity-regression objective on a :class:`FlatMLP`: the objective's
    draws, the loss and gradients written out, clipping, AdamW (fused, on the flat parameter), the
    schedule and the EMA (one ``lerp_``), all under ``no_grad``. The interface of
    :class:`~flowmatch.training.step.TrainStep`."""

    def __init__(self, objective, flat: FlatMLP, generator: torch.Generator, ema, optimizer, scheduler,
                 max_norm: float, bins: TBins):
        self.objective, self.flat, self.gen, self.ema = objective, flat, generator, ema
        self.opt, self.sched, self.max_norm, self.bins = optimizer, scheduler, max_norm, bins

    def accumulate(self, step: int = 0) -> tuple[torch.Tensor, None]:
        """Draw and compute the loss and the gradients (into the flat gradient); nothing is updated."""
        with torch.no_grad():
            batch = self.objective.draw(self.gen)
            out = self.flat.loss_and_grads(batch.xt, batch.t, batch.ut)
            self.bins.add(out.per_sample, batch.t)
        return out.loss, None

    def __call__(self, step: int) -> StepOutput:
        loss, _ = self.accumulate(step)
        with torch.no_grad():
            grad_norm = self.flat.clip_(self.max_norm)
            lr = self.sched.get_last_lr()[0]
            self.flat.adamw_step(self.opt)
            self.sched.step()
            self.ema.update_flat(self.flat.ema, self.flat.param, self.flat.buffers)
        return StepOutput(loss, grad_norm, lr)
