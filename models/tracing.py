"""Forward hooks that record what flows through a live model: the shape of every watched call.

Nothing here knows a module by its place in a hand-written list: the caller picks modules from
`named_modules()` at run time (by name or class), so the tracer keeps working when a model is
split into other files or gains blocks. Used by tasks/explain.py (`soraflow explain`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F


def tensor_shapes(obj: Any) -> list[tuple[int, ...]]:
    """Shapes of every tensor in obj (a tensor, tuple/list, dict or a transformers ModelOutput), in order."""
    if isinstance(obj, torch.Tensor):
        return [tuple(obj.shape)]
    if isinstance(obj, dict) or hasattr(obj, "to_tuple"):  # ModelOutput is a dict subclass, kept for clarity
        return [s for v in obj.values() for s in tensor_shapes(v)]
    if isinstance(obj, (tuple, list)):
        return [s for v in obj for s in tensor_shapes(v)]
    return []


@dataclass
class Call:
    """One recorded forward call of a watched module."""

    name: str  # module path in its model, e.g. "blocks.0.attn_temp"
    kind: str  # the module's class name
    inputs: list[tuple[int, ...]]  # tensor shapes of the positional and keyword arguments
    output: list[tuple[int, ...]]  # tensor shapes of the output
    index: int  # 0 for the module's first call, 1 for the second, ...


@dataclass
class Tracer:
    """Records calls of watched modules; optionally keeps their inputs/outputs (`capture`)."""

    calls: list[Call] = field(default_factory=list)
    captured: dict[str, list[tuple[tuple, dict, Any]]] = field(default_factory=dict)  # name -> [(args, kwargs, output)]
    _counts: dict[str, int] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def watch(self, module: torch.nn.Module, name: str, record_calls: int = 1, capture: bool = False,
              on_call: Callable[[tuple, dict, Any], None] | None = None) -> None:
        """Record the first `record_calls` calls of `module` (all if < 0); capture or pass on every call."""

        def hook(mod, args, kwargs, output):
            k = self._counts.get(name, 0)
            self._counts[name] = k + 1
            if record_calls < 0 or k < record_calls:
                self.calls.append(
                    Call(
                        name, type(mod).__name__, tensor_shapes(args) + tensor_shapes(kwargs), tensor_shapes(output), k
                    )
                )
            if capture:
                detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
                self.captured.setdefault(name, []).append(
                    (tuple(detach(a) for a in args), {key: detach(v) for key, v in kwargs.items()}, detach(output)))
            if on_call is not None:
                on_call(args, kwargs, output)

        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def first(self, name: str) -> Call:
        """The first recorded call of `name` (KeyError naming the watched modules if it never ran)."""
        for c in self.calls:
            if c.name == name:
                return c
        raise KeyError(f"module {name!r} was not called; recorded: {sorted({c.name for c in self.calls})}")

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cross_attention_weights(
    q: torch.Tensor, kv: torch.Tensor, num_heads: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention of video tokens over text tokens, from a cross-attention's projections.

    q (B, N, D) is the q_linear output, kv (B, L, 2D) the kv_linear output (rows [k; v], each
    head-major, as models/stdit.py MultiHeadCrossAttention lays them out), mask (B, L) with True
    for real tokens. Returns (B, heads, N, L): what scaled_dot_product_attention weighs v with.
    """
    b, n, d = q.shape
    dh = d // num_heads
    qh = q.view(b, n, num_heads, dh).transpose(1, 2)  # (B, heads, N, Dh)
    k = kv.view(b, kv.shape[1], 2, num_heads, dh)[:, :, 0].transpose(1, 2)  # (B, heads, L, Dh)
    logits = qh @ k.transpose(-1, -2) / math.sqrt(dh)  # (B, heads, N, L)
    if mask is not None:
        logits = logits.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return F.softmax(logits.float(), dim=-1)
