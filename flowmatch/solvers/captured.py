"""Fixed-step integration prepared once and replayed for repeated solves of one shape.

A fixed-step solve of a small model is launch-bound on a GPU: each of the ``nfe`` forward passes
is a handful of tiny kernels, and the solver adds a few more per step. :class:`CapturedSolve`
records the whole solve once and replays it:

- ``mode="cuda_graph"``: the solve from a static input buffer is captured as one CUDA graph
  (after warm-up on a side stream); a call copies ``x0`` into the buffer, replays the graph and
  returns a copy of the output. Same kernels, same numbers as the eager solve.
- ``mode="compile"``: the solve is wrapped in ``torch.compile`` (inductor fuses the solver's
  element-wise updates with the model's); numbers agree with eager to float rounding.
- ``mode="eager"``: the plain solve, under ``torch.inference_mode`` (the reference).
- ``mode="auto"``: ``cuda_graph`` on a CUDA device, else ``eager``.

The model must not change between calls (weights are read in place by the replay; load new
weights with ``copy_`` into the same parameters, or build a new :class:`CapturedSolve`).
"""

from __future__ import annotations

from typing import Optional

import torch

from flowmatch.errors import ConfigError
from flowmatch.solvers.base import Field, Solver

__all__ = ["CapturedSolve", "CAPTURE_MODES"]

CAPTURE_MODES = ("auto", "cuda_graph", "compile", "eager")


class CapturedSolve:
    """``CapturedSolve(v, solver, grid, example)(x0) -> x1`` for ``x0`` shaped like ``example``.

    ``solver`` is a fixed-step :class:`Solver` (or its name), ``grid`` the ``[K + 1]`` time grid,
    ``example`` a ``[B, *D]`` tensor giving the batch shape, dtype and device of every call.
    ``nfe`` is the evaluations per call, counted on the warm-up solve.
    """

    def __init__(self, v: Field, solver: Solver | str, grid: torch.Tensor, example: torch.Tensor, *,
                 mode: str = "auto", compile_mode: Optional[str] = None, warmup: int = 2):
        if isinstance(solver, str):
            from flowmatch.solvers import get_solver

            solver = get_solver(solver)
        if solver.adaptive:
            raise ConfigError(f"CapturedSolve needs a fixed-step solver; {solver.name!r} is adaptive")
        if mode not in CAPTURE_MODES:
            raise ConfigError(f"unknown capture mode {mode!r}; valid: {', '.join(CAPTURE_MODES)}")
        dev = example.device
        if mode == "auto":
            mode = "cuda_graph" if dev.type == "cuda" else "eager"
        if mode == "cuda_graph" and dev.type != "cuda":
            raise ConfigError(f"mode='cuda_graph' needs a CUDA tensor; the example is on {dev}")
        self.v, self.solver, self.mode = v, solver, mode
        self.grid = torch.as_tensor(grid, dtype=example.dtype, device=dev)
        self.shape, self.dtype, self.device = tuple(example.shape), example.dtype, dev
        self.nfe = 0

        def run(x0: torch.Tensor) -> torch.Tensor:
            tr = self.solver.integrate(self.v, x0, self.grid)
            self.nfe = tr.nfe
            return tr.x1

        self._run = run
        self._fn = torch.compile(run, mode=compile_mode, dynamic=False) if mode == "compile" else run
        self._graph = None
        if mode == "cuda_graph":
            self._capture(example, warmup)
        else:
            with torch.inference_mode():
                for _ in range(max(1, warmup if mode == "compile" else 1)):
                    self._fn(example.clone())

    def _capture(self, example: torch.Tensor, warmup: int) -> None:
        self._static_in = example.detach().clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(max(1, warmup)):  # warm-up outside the graph (allocator, cuBLAS handles)
                self._run(self._static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self._graph):
            self._static_out = self._run(self._static_in)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if tuple(x0.shape) != self.shape or x0.dtype != self.dtype or x0.device != self.device:
            raise ValueError(f"CapturedSolve was prepared for {self.shape} {self.dtype} on {self.device}; "
                             f"got {tuple(x0.shape)} {x0.dtype} on {x0.device}")
        if self._graph is not None:
            self._static_in.copy_(x0)
            self._graph.replay()
            return self._static_out.clone()
        with torch.inference_mode():
            return self._fn(x0)

    def __repr__(self) -> str:
        return f"CapturedSolve({self.solver.name}, steps={self.grid.numel() - 1}, mode={self.mode}, shape={self.shape})"
