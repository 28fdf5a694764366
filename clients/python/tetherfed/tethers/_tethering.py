"""Tethered layers: ``W_eff = W ⊙ T`` through ``torch.nn.utils.parametrize``.

``tether(model, mode=...)`` registers a :class:`TetherParametrization` on the ``weight`` of every
selected ``nn.Linear`` / ``nn.Conv{1,2,3}d``. The raw weight stays the trainable parameter
(``module.parametrizations.weight.original``); ``module.weight`` is recomputed as ``W ⊙ T`` on every
access, so the tether never compounds across steps and autograd sees the true product.

Modes:

* ``static``: ``T`` is a buffer drawn from U[0,1) by a CPU ``torch.Generator`` seeded with ``seed``
  (one generator, layers in module order, so CPU and CUDA models get identical tethers). It changes
  only through :func:`set_tether_` (federation decisions).
* ``learned``: ``T = sigmoid(logits)`` with ``logits`` a trainable parameter, initialised so that
  ``T`` equals the static draw. Build the optimizer *after* calling :func:`tether`.
* ``importance``: ``T`` is a buffer refreshed every ``importance_every`` observed steps from an EMA
  of ``|W ⊙ ∂L/∂W|`` divided by its maximum. The training loop calls :func:`update_importance`
  after ``loss.backward()`` and before ``optimizer.zero_grad()``. The raw and effective spaces give
  the same score: ``W ⊙ ∂L/∂W = W_eff ⊙ ∂L/∂W_eff``. Until the first refresh ``T`` is the static
  draw.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, TypedDict, cast, get_args

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

TetherMode = Literal["static", "learned", "importance"]
TETHER_MODES: tuple[str, ...] = get_args(TetherMode)
TETHERABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

ROOT_LAYER = "<root>"  # the name of a tethered root module (its qualified name is empty)
# Attributes under which wrappers hold the wrapped model: torch.compile, FSDP, checkpointing.
WRAPPER_ATTRIBUTES = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_EPS = 1e-4  # learned-mode logits are initialised from T clamped to (eps, 1 - eps)
_RANGE_TOL = 1e-5  # values this far outside [0, 1] (float rounding) are clamped, not rejected


class LayerInfo(TypedDict):
    """One row of :func:`layer_table`: a tethered layer as the federation publishes it."""

    name: str
    shape: list[int]
    dtype: str


class TetherParametrization(nn.Module):
    """Parametrization ``W -> W ⊙ T`` holding one layer's tether.

    State (all in ``state_dict``): ``tether`` buffer (static, importance), ``logits`` parameter
    (learned), and for importance mode the ``ema`` buffer and the ``steps`` counter.
    """

    def __init__(
        self,
        mode: TetherMode,
        initial: Tensor,
        importance_every: int = 50,
        importance_decay: float = 0.9,
    ) -> None:
        super().__init__()
        _check_mode(mode)
        self.mode: TetherMode = mode
        self.importance_every = importance_every
        self.importance_decay = importance_decay
        if mode == "learned":
            self.logits = nn.Parameter(_logit(initial))
        else:
            self.register_buffer("tether", initial.clone())
        if mode == "importance":
            self.register_buffer("ema", torch.zeros_like(initial))
            self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=initial.device))
        # Host-side mirror of `steps`, so observe() does not sync with the device every step.
        self._seen: int | None = None
        cast(Any, self).register_load_state_dict_post_hook(_forget_seen)  # untyped in torch

    def forward(self, weight: Tensor) -> Tensor:
        """Return the effective weight ``W ⊙ T``."""
        return weight * self.current()

    def current(self) -> Tensor:
        """The tether ``T`` in [0, 1]; differentiable in learned mode."""
        if self.mode == "learned":
            # A NaN logit (a NaN gradient reached the optimizer) reads as 0.5, never as NaN.
            return torch.sigmoid(torch.nan_to_num(self.logits, nan=0.0))
        return cast(Tensor, self.tether)

    def storage(self) -> Tensor:
        """The tensor that holds the tether's state (``logits`` or ``tether``)."""
        return self.logits if self.mode == "learned" else cast(Tensor, self.tether)

    @torch.no_grad()
    def set_(self, value: Tensor) -> None:
        """Overwrite ``T`` in place (learned mode writes ``logit(clamp(T))``)."""
        target = self.storage()
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"tether shape mismatch: expected {tuple(target.shape)}, got {tuple(value.shape)}"
            )
        value = _checked_unit(value.to(device=target.device, dtype=target.dtype))
        target.copy_(_logit(value) if self.mode == "learned" else value)

    @torch.no_grad()
    def observe(self, weight: Tensor, grad: Tensor) -> bool:
        """Fold ``|W ⊙ ∂L/∂W|`` into the EMA; every K calls set ``T = ema / max(ema)``.

        Returns True when this call refreshed the tether. Only meaningful in importance mode.
        """
        if self.mode != "importance":
            raise ValueError(f"observe() needs importance mode, this tether is {self.mode!r}")
        ema, steps = cast(Tensor, self.ema), cast(Tensor, self.steps)
        score = (weight.detach() * grad.detach()).abs().to(ema.dtype)
        # A non-finite gradient (NaN loss, overflow) adds nothing: the EMA stays finite.
        score = torch.nan_to_num(score, nan=0.0, posinf=0.0)
        ema.mul_(self.importance_decay).add_(score, alpha=1.0 - self.importance_decay)
        if self._seen is None:
            self._seen = int(steps.item())
        steps.add_(1)
        self._seen += 1
        if self._seen % self.importance_every != 0:
            return False
        peak = ema.max()
        if not torch.isfinite(peak) or peak <= 0:
            return False
        cast(Tensor, self.tether).copy_(ema / peak)
        return True

    def extra_repr(self) -> str:
        """Show the mode (and the importance schedule) in ``print(model)``."""
        if self.mode == "importance":
            return f"mode=importance, every={self.importance_every}, decay={self.importance_decay}"
        return f"mode={self.mode}"


def tether(
    model: nn.Module,
    mode: TetherMode = "static",
    *,
    layers: Iterable[str] | None = None,
    seed: int = 0,
    importance_every: int = 50,
    importance_decay: float = 0.9,
) -> nn.Module:
    """Add a tether to every selected Linear/Conv layer of ``model`` (in place) and return it.

    ``layers=None`` tethers every ``nn.Linear`` and ``nn.Conv1d/2d/3d``; otherwise give qualified
    module names (as in ``model.named_modules()``, or as :func:`tethered_layers` names them).
    Unknown or untetherable names, and layers that already carry a tether, raise ``ValueError``.
    Initial tethers are U[0,1) draws from a CPU generator seeded by ``seed``, one per selected layer
    in module order.
    """
    _check_mode(mode)
    _check_importance(importance_every, importance_decay)
    selected = _select(model, layers)
    generator = torch.Generator().manual_seed(seed)
    for module in selected.values():
        weight = cast(Tensor, module.weight)
        draw = torch.rand(weight.shape, generator=generator, dtype=torch.float32)
        # Built on CPU, then moved: learned logits are then bit-identical on every device.
        tp = TetherParametrization(mode, draw.to(weight.dtype), importance_every, importance_decay)
        tp.to(weight.device)
        parametrize.register_parametrization(module, "weight", tp)
    return model


def tethered_layers(model: nn.Module) -> dict[str, TetherParametrization]:
    """Tethers of ``model`` by layer name, in module order.

    A layer's name is its qualified module name (e.g. ``"fc2"``) as the unwrapped model names it:
    the attributes wrappers add are skipped (``_orig_mod`` of ``torch.compile``, ``module`` of
    ``DataParallel`` / ``DistributedDataParallel``, FSDP's ``_fsdp_wrapped_module`` and
    activation checkpointing's ``_checkpoint_wrapped_module``), so a compiled, a DDP and a plain
    copy of one model publish the same names. A tethered root module is named ``ROOT_LAYER``.
    """
    return {name: tp for name, _, tp in _iter_tethered(model)}


def get_tether(layer: nn.Module) -> Tensor:
    """The current tether ``T`` (detached, in [0, 1]) of a tethered module or its parametrization.

    In static and importance mode this is a view of the stored buffer: clone it to keep a copy.
    """
    return _resolve(layer).current().detach()


def set_tether_(layer: nn.Module, value: Tensor) -> None:
    """Set the tether of a tethered module (or its parametrization) in place, under no_grad."""
    _resolve(layer).set_(value)


def layer_table(model: nn.Module) -> list[LayerInfo]:
    """Name, shape and dtype of every tethered layer, in module order."""
    return [
        LayerInfo(name=name, shape=list(tp.storage().shape), dtype=_dtype_name(tp.storage()))
        for name, tp in tethered_layers(model).items()
    ]


def load_plain_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True
) -> Any:
    """Load weights saved from the *untethered* model (``fc.weight``) into a tethered one.

    A tethered layer keeps its raw weight as ``fc.parametrizations.weight.original``, so a plain
    ``load_state_dict(..., strict=False)`` silently loads only the biases. Here each plain
    ``<layer>.weight`` goes to that raw weight, the tethers keep their current values, and the
    load is strict: a missing or unexpected key raises ``RuntimeError`` as torch does. Returns
    torch's ``_IncompatibleKeys``.
    """
    tethered = {name for name, module in model.named_modules() if _find(module) is not None}
    renamed: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        raw = leaf == "weight" and module in tethered
        renamed[_join(module, "parametrizations.weight.original") if raw else key] = value
    for key, value in model.state_dict().items():
        if ".weight.0." in f".{key}" and "parametrizations" in key:  # tether state: kept
            renamed.setdefault(key, value)
    return model.load_state_dict(renamed, strict=strict)


def untether(model: nn.Module) -> nn.Module:
    """A plain copy of a tethered model with ``W ⊙ T`` baked into each weight (``model`` is left
    as it is): what to export, serve, or load where tetherfed is not installed."""
    plain = copy.deepcopy(model)
    for module in [m for m in plain.modules() if _find(m) is not None]:
        baked = cast(Tensor, module.weight).detach().clone()
        # Not parametrize.remove_parametrizations: it edits the generated class, which the copy
        # shares with `model`, and would strip `model`'s own `weight`.
        module.__class__ = module.__class__.__bases__[0]
        del module._modules["parametrizations"]
        module.weight = nn.Parameter(baked)
    return plain


def update_importance(model: nn.Module) -> list[str]:
    """Feed the current gradients to every importance-mode tether; call after ``backward()``.

    Layers whose raw weight has no gradient are skipped. Returns the names of the layers whose
    tether was refreshed by this call.
    """
    refreshed = []
    for name, module, tp in _iter_tethered(model):
        original = _original(module)
        grad = original.grad
        if tp.mode == "importance" and grad is not None and tp.observe(original, grad):
            refreshed.append(name)
    return refreshed


def _iter_tethered(model: nn.Module) -> Iterator[tuple[str, nn.Module, TetherParametrization]]:
    for name, module in _unwrapped_modules(model):
        tp = _find(module)
        if tp is not None:
            yield name or ROOT_LAYER, module, tp


def _unwrapped_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Like ``named_modules()`` (each module once, pre-order), with wrapper attributes skipped."""
    seen: set[int] = set()
    stack = [(prefix, module)]
    while stack:
        name, current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield name, current
        children = [
            (name if _is_wrapper(current, child_name) else _join(name, child_name), child)
            for child_name, child in current.named_children()
        ]
        stack.extend(reversed(children))


def _is_wrapper(parent: nn.Module, attribute: str) -> bool:
    if attribute in WRAPPER_ATTRIBUTES:
        return True
    # DataParallel and DistributedDataParallel hold the model as `module`.
    return attribute == "module" and isinstance(parent, nn.DataParallel | DistributedDataParallel)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _original(module: nn.Module) -> Tensor:
    return cast(Tensor, cast(nn.ModuleDict, module.parametrizations)["weight"].original)


def _forget_seen(module: nn.Module, incompatible_keys: object) -> None:
    # After load_state_dict the `steps` buffer is the truth again.
    if isinstance(module, TetherParametrization):
        module._seen = None


def _find(module: nn.Module) -> TetherParametrization | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for candidate in cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)["weight"]):
        if isinstance(candidate, TetherParametrization):
            return candidate
    return None


def _resolve(layer: nn.Module) -> TetherParametrization:
    if isinstance(layer, TetherParametrization):
        return layer
    tp = _find(layer)
    if tp is None:
        raise ValueError(f"{type(layer).__name__} carries no tether; call tether(model) first")
    return tp


def _select(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    modules = {name or ROOT_LAYER: module for name, module in _unwrapped_modules(model)}
    if layers is None:
        wanted = [name for name, m in modules.items() if isinstance(m, TETHERABLE)]
    else:
        # Names as the wrapped model spells them (``_orig_mod.fc``) mean the unwrapped layer.
        canonical = {id(module): name for name, module in modules.items()}
        spelled = {name: canonical[id(m)] for name, m in model.named_modules() if name}
        wanted = list(dict.fromkeys(spelled.get(name, name) for name in layers))
        unknown = [name for name in wanted if name not in modules]
        if unknown:
            raise ValueError(f"unknown layers: {', '.join(unknown)}")
        bad = [name for name in wanted if not isinstance(modules[name], TETHERABLE)]
        if bad:
            raise ValueError(f"not Linear or Conv layers, cannot tether: {', '.join(bad)}")
    already = [name for name in wanted if _find(modules[name]) is not None]
    if already:
        raise ValueError(f"layers already tethered: {', '.join(already)}")
    chosen = set(wanted)
    return {name: module for name, module in modules.items() if name in chosen}


def _check_mode(mode: str) -> None:
    if mode not in TETHER_MODES:
        raise ValueError(f"unknown tether mode {mode!r}; known: {', '.join(TETHER_MODES)}")


def _check_importance(every: int, decay: float) -> None:
    if every < 1:
        raise ValueError(f"importance_every must be >= 1, got {every}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"importance_decay must be in [0, 1), got {decay}")


def _checked_unit(value: Tensor) -> Tensor:
    if not bool(torch.isfinite(value).all()):
        raise ValueError("tether values must be finite")
    if bool((value < -_RANGE_TOL).any()) or bool((value > 1 + _RANGE_TOL).any()):
        raise ValueError("tether values must lie in [0, 1]")
    return value.clamp(0.0, 1.0)


def _logit(value: Tensor) -> Tensor:
    # In float32 so that 1 - eps is representable for half-precision layers.
    return torch.logit(value.detach().float().clamp(_EPS, 1.0 - _EPS)).to(value.dtype)


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")
