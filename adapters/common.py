"""What every family's self-attention sites share: the per-model context, the processor base and
the install handle.

A family adapter supplies three things: the list of `(layer_index, attention_module)` sites, a
processor class derived from `SiteProcessor`, and a function that reads one model forward's inputs
and fills the `SiteContext` (geometry, and for HunyuanVideo the text key lengths).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..strategies.geometry import VideoGeometry


@dataclass
class SiteContext:
    """State of the current forward, shared by all processors of one installed model."""

    controller: Any
    geometry: VideoGeometry | None = None
    sigma: float | None = None  # pinned by `InstalledSites.begin_step`; else from the timestep
    sigma_pinned: bool = False
    kv_len: torch.Tensor | None = None  # int32 [B] valid key count per sample, or None = all valid
    trim_to: int | None = None  # batch-1 HunyuanVideo: valid sequence length (padded text cut off)
    warned: set = field(default_factory=set)

    def warn_once(self, key: str, message: str) -> None:
        """Emit `message` as a warning the first time `key` is seen by this installed model."""
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


class SiteProcessor:
    """Base of the per-layer processors: hands q/k/v to the controller, falls back to dense.

    Subclasses implement diffusers' processor `__call__` for their family and call `attend`.
    """

    # diffusers' `set_attention_backend` writes these on processors; the dense path honours them.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, context: SiteContext):
        self.layer = layer
        self.context = context

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: str,
        dense: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        kv_len: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the controller on q/k/v with this forward's geometry; on missing geometry, a length
        mismatch or a ValueError from the controller, warn once and return `dense(q, k, v)`."""
        ctx = self.context
        geometry = ctx.geometry
        if geometry is None:
            ctx.warn_once("no-geometry", "sparse_vdit: no video geometry for this forward; attention runs dense")
            return dense(q, k, v)
        seq_len = q.shape[2] if layout == "bhld" else q.shape[1]
        try:
            geometry.check_seq_len(seq_len)
            return ctx.controller.attention(
                q, k, v, layer=self.layer, sigma=ctx.sigma, geometry=geometry, layout=layout, dense=dense, kv_len=kv_len
            )
        except ValueError as error:
            ctx.warn_once("mismatch", f"sparse_vdit: layer {self.layer} runs dense ({error}); further mismatches are silent")
            return dense(q, k, v)


def bind_forward_args(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Name the arguments of one `model.forward` call (positional ones included)."""
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    return dict(bound.arguments)


def sigma_from_timestep(timestep: torch.Tensor, num_train_timesteps: int = 1000) -> float:
    """The sigma used when no sampling loop pinned one: the largest timestep over the train steps
    (exact for flow-matching schedulers, a normalised timestep for CogVideoX; the largest, since
    Wan2.2 TI2V image conditioning gives its first-frame tokens timestep 0)."""
    return float(timestep.max()) / num_train_timesteps


class InstalledSites:
    """Handle of an installed controller: `begin_step` before each step, `remove` to restore.

    Usable as a context manager (`with install(model, controller): ...`).
    """

    def __init__(self, model: torch.nn.Module, context: SiteContext, stock: dict, hook):
        self.model = model
        self.context = context
        self._stock = stock
        self._hook = hook

    def begin_step(self, sigma: float, step: int) -> None:
        """Pin the current sigma for the coming forwards and tell the controller, if it listens."""
        self.context.sigma = float(sigma)
        self.context.sigma_pinned = True
        begin = getattr(self.context.controller, "begin_step", None)
        if begin is not None:
            begin(float(sigma), step)

    def remove(self) -> None:
        """Restore the stock processors and drop the forward hook (idempotent)."""
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        self.model.set_attn_processor(dict(self._stock))  # diffusers pops from the dict

    def __enter__(self) -> "InstalledSites":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def install_sites(
    model: torch.nn.Module,
    controller: Any,
    sites: Iterable[tuple[int, torch.nn.Module]],
    processor_cls: type[SiteProcessor],
    read_forward: Callable[[SiteContext, dict[str, Any]], None],
) -> InstalledSites:
    """Give each site its own `processor_cls(layer, context)` and read every forward's inputs
    with `read_forward(context, named_args)` before the model runs."""
    if not callable(getattr(controller, "attention", None)):
        raise ValueError(f"controller {type(controller).__name__} has no attention(q, k, v, ...) method")
    if any(isinstance(p, SiteProcessor) for p in model.attn_processors.values()):
        raise ValueError("a sparse_vdit controller is already installed on this model; remove() it first")
    stock = dict(model.attn_processors)
    context = SiteContext(controller=controller)
    for layer, module in sites:
        processor = processor_cls(layer, context)
        stock_processor = module.processor
        processor._attention_backend = getattr(stock_processor, "_attention_backend", None)
        processor._parallel_config = getattr(stock_processor, "_parallel_config", None)
        module.set_processor(processor)

    def pre_hook(module, args, kwargs):
        named = bind_forward_args(module, args, kwargs)
        read_forward(context, named)
        if not context.sigma_pinned and named.get("timestep") is not None:
            context.sigma = sigma_from_timestep(named["timestep"])

    hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return InstalledSites(model, context, stock, hook)


class DenseController:
    """The controller that always runs the site's stock dense attention (parity and overhead checks)."""

    def attention(self, q, k, v, *, layer, sigma, geometry, layout, dense, kv_len=None):
        return dense(q, k, v)
