"""Tethered layers: ``W_eff = W ⊙ T`` through ``torch.nn.utils.parametrize``.

``tether(model, mode=...)`` registers a :class:`TetherParametrization` on every selected weight
parameter. By default these are the weights of the registered layer types (see
:func:`register_tetherable`; built in: ``nn.Linear``, ``nn.Bilinear``, ``nn.Conv{1,2,3}d``,
``nn.ConvTranspose{1,2,3}d``, ``nn.Embedding``, ``nn.EmbeddingBag``, ``nn.MultiheadAttention``'s
``in_proj_weight`` or ``q/k/v_proj_weight`` (its ``out_proj`` is an ``nn.Linear``), every
``weight_ih_l*`` / ``weight_hh_l*`` / ``weight_hr_l*`` of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``,
``weight_ih`` / ``weight_hh`` of the RNN cells, and Hugging Face's
``transformers.pytorch_utils.Conv1D`` (matched by qualified class name, transformers is not
imported)); ``layers=`` selects by name or predicate instead, any parameter of any module.
The raw weight stays the trainable parameter (``module.parametrizations.<param>.original``);
``module.<param>`` is recomputed as ``W ⊙ T`` on every access, so the tether never compounds
across steps and autograd sees the true product.

Layer names: a module's qualified name when the parameter is ``weight`` (``"fc1"``, ``ROOT_LAYER``
for a tethered root), ``"<module>.<param>"`` otherwise (``"attn.in_proj_weight"``,
``"lstm.weight_hh_l0"``). A parameter held by several modules (tied weights: GPT-2's token
embedding and LM head) gets one tether, registered on every holder, so the tie holds for ``W`` and
for ``W ⊙ T``; the layer is named after its first holder in module order.

Other parametrizations: a tether registered after ``torch.nn.utils.parametrizations.weight_norm``
(or any parametrization) multiplies its output: ``W_eff = weight_norm(g, v) ⊙ T``. "The weight"
(importance scores, diagnostics) is then the weight before the tether (:func:`pre_tether_weight`).
The legacy ``torch.nn.utils.weight_norm`` / ``spectral_norm`` hooks recompute ``weight`` as a
plain attribute before every forward; such weights cannot be tethered (selected by name: a
``ValueError``; by default: skipped, with the reason in :func:`tether_coverage`).

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

import contextlib
import copy
import fnmatch
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypedDict, cast, get_args

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

from tether_protocol.frame import part_name

from ._heap import keep_freed_memory

log = logging.getLogger("tetherfed.tethers")

TetherMode = Literal["static", "learned", "importance"]
MergeScope = Literal["tethers", "weights", "model"]  # tether_protocol.messages.Policy.merge_scope
# The worker meta key under which a Federation registers `init_digest(model)` at construction.
INIT_DIGEST_KEY = "init_digest"
TETHER_MODES: tuple[str, ...] = get_args(TetherMode)
# Selects parameters by (layer name, module, parameter name); see tether().
LayerPredicate = Callable[[str, nn.Module, str], bool]

ROOT_LAYER = "<root>"  # the name of a tethered root module (its qualified name is empty)
# Attributes under which wrappers hold the wrapped model: torch.compile, FSDP, checkpointing.
WRAPPER_ATTRIBUTES = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_EPS = 1e-4  # learned-mode logits are initialised from T clamped to (eps, 1 - eps)
_RANGE_TOL = 1e-5  # values this far outside [0, 1] (float rounding) are clamped, not rejected
# Forward pre-hooks of torch.nn.utils.weight_norm / spectral_norm (the pre-parametrize API).
_LEGACY_HOOKS = frozenset({"WeightNorm", "SpectralNorm"})
# Whether nn.RNNBase's forward reads stale `_flat_weights` (torch without _update_flat_weights).
_RNN_NEEDS_HOOK = not hasattr(nn.RNNBase, "_update_flat_weights")

# Layer type (a class, or its qualified name "module.QualName") -> its weight parameters' names
# (fnmatch patterns; names the module lacks or holds as None are ignored).
_REGISTRY: dict[type[nn.Module] | str, tuple[str, ...]] = {}


def register_tetherable(cls: type[nn.Module] | str, params: Iterable[str] = ("weight",)) -> None:
    """Make ``tether(model)`` tether the parameters ``params`` of every ``cls`` module.

    ``cls`` is a module class (subclasses match too) or its qualified name, e.g.
    ``"transformers.pytorch_utils.Conv1D"``, to match a class without importing its package.
    ``params`` are parameter names or ``fnmatch`` patterns (``"weight_ih_l*"``); a name the module
    lacks (or registers as ``None``) is ignored. Registering a class again replaces its names; the
    most derived registered class of a module decides. Raises ``ValueError`` on an empty ``params``
    or a ``cls`` that is neither an ``nn.Module`` subclass nor a dotted name.
    """
    names = (params,) if isinstance(params, str) else tuple(params)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"params must name at least one parameter, got {params!r}")
    if isinstance(cls, str):
        if "." not in cls:
            raise ValueError(f"a class name must be qualified (package.module.Class), got {cls!r}")
    elif not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"cls must be an nn.Module subclass or a qualified name, got {cls!r}")
    _REGISTRY[cls] = names


for _cls in (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.EmbeddingBag,
    "transformers.pytorch_utils.Conv1D",  # GPT-2's "Conv1D": a Linear with a transposed weight
):
    register_tetherable(_cls)
register_tetherable(
    nn.MultiheadAttention, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
)
register_tetherable(nn.RNNBase, ("weight_ih_l*", "weight_hh_l*", "weight_hr_l*"))
register_tetherable(nn.RNNCellBase, ("weight_ih", "weight_hh"))
del _cls


class LayerInfo(TypedDict):
    """One row of :func:`layer_table`: a tethered layer as the federation publishes it."""

    name: str
    shape: list[int]
    dtype: str


@dataclass(frozen=True)
class SkippedModules:
    """Modules of one type and one reason that carry no tether (a row of :class:`Coverage`)."""

    type: str  # the module's class name (``LayerNorm``; qualified for non-torch classes)
    modules: int  # how many such modules
    parameters: int  # their parameters' elements (a parameter shared with others counted once)
    reason: str  # why they carry no tether


@dataclass(frozen=True)
class Coverage:
    """How much of a model its tethers cover (see :func:`tether_coverage`).

    Counts are parameter *elements*; a tied parameter is counted once, and the tethers' own
    state (learned-mode logits) is not counted.
    """

    layers: int  # tethered layers (one per tether; tied holders share one)
    tethered: int  # elements of the tethered weights (the tethers' elements)
    total: int  # elements of every parameter of the model
    untethered_in_tethered: int  # the rest of the tethered modules (biases, untethered weights)
    skipped: tuple[SkippedModules, ...]  # modules without any tether, by type and reason

    @property
    def share(self) -> float:
        """``tethered / total`` (0 for a model without parameters)."""
        return self.tethered / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the fields, ``share``, and ``skipped`` as a list of dicts."""
        fields = asdict(self)
        return {**fields, "skipped": list(fields["skipped"]), "share": round(self.share, 6)}

    def summary(self) -> str:
        """One line for the log: what is tethered, and what is not, by type."""
        text = (
            f"tethered {self.layers} layers, {self.tethered:,} of {self.total:,} parameters "
            f"({self.share:.1%})"
        )
        if not self.skipped:
            return text
        rows = [f"{s.type} x{s.modules} ({s.parameters:,}: {s.reason})" for s in self.skipped]
        return f"{text}; without a tether: {', '.join(rows)}"


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
        # Importance mode behind another parametrization (weight_norm): the weight this tether
        # multiplies is computed, not a leaf, so its gradient is gathered here in backward.
        self._capture_grad = False
        self._pre_grad: Tensor | None = None
        cast(Any, self).register_load_state_dict_post_hook(_forget_seen)  # untyped in torch

    def forward(self, weight: Tensor) -> Tensor:
        """Return the effective weight ``W ⊙ T``."""
        if self._capture_grad and weight.requires_grad and weight.grad_fn is not None:
            cast(Any, weight).register_hook(self._gather_grad)  # untyped in torch
        return weight * self.current()

    def _gather_grad(self, grad: Tensor) -> None:
        grad = grad.detach()
        self._pre_grad = grad.clone() if self._pre_grad is None else self._pre_grad + grad

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
    layers: Iterable[str] | LayerPredicate | None = None,
    seed: int = 0,
    importance_every: int = 50,
    importance_decay: float = 0.9,
) -> nn.Module:
    """Add a tether to every selected weight of ``model`` (in place) and return it.

    ``layers=None`` tethers the weights of every registered layer type (the module docstring lists
    the built-in ones; :func:`register_tetherable` adds more). Otherwise ``layers`` is either

    * names: a module's qualified name (as in ``model.named_modules()``, or as
      :func:`tethered_layers` names layers) selects its registered weights; ``"<module>.<param>"``
      (``"encoder.layers.0.self_attn.in_proj_weight"``) selects that parameter of any module;
    * or a predicate ``(name, module, param) -> bool``, asked for every parameter of every module
      with the name the layer would get (``"fc1"`` for ``fc1.weight``, ``"fc1.bias"``).

    A parameter tied to other modules is tethered in all of them, with one tether. Initial
    tethers are U[0,1) draws from a CPU generator seeded by ``seed``, one per layer in module
    order. The coverage (what is tethered, what is not and why) is logged at INFO on
    ``tetherfed.tethers``; :func:`tether_coverage` returns it.

    When a tethered weight is on the CPU, this also calls :func:`keep_freed_memory` (glibc only:
    the per-step products then reuse heap pages instead of faulting in fresh ones, which took the
    tethering overhead of a ResNet-18 step from +27 % to +11 %; a process-wide setting that
    ``MALLOC_MMAP_THRESHOLD_`` in the environment overrides).

    Raises ``ValueError`` (and changes nothing) for unknown names, modules of an unregistered type
    named without a parameter, parameters that are not floating-point ``nn.Parameter``s (e.g.
    ``weight`` under the legacy ``torch.nn.utils.weight_norm`` hook), layers that already carry a
    tether, and uninitialised lazy modules (``nn.LazyLinear``: run one forward pass first).
    """
    _check_mode(mode)
    _check_importance(importance_every, importance_decay)
    groups = _select(model, layers)
    generator = torch.Generator().manual_seed(seed)
    for holders in groups:
        _, first, param = holders[0]
        weight = cast(Tensor, getattr(first, param))
        draw = torch.rand(weight.shape, generator=generator, dtype=torch.float32)
        # Built on CPU, then moved: learned logits are then bit-identical on every device.
        tp = TetherParametrization(mode, draw.to(weight.dtype), importance_every, importance_decay)
        tp.to(weight.device)
        for _, module, name in holders:
            parametrize.register_parametrization(module, name, tp)
            plist = _plist(module, name)
            if mode == "importance" and (len(plist) > 1 or not plist.is_tensor):
                tp._capture_grad = True
            if isinstance(module, nn.RNNBase):
                _refresh_rnn_weights(module)
    if any(cast(Tensor, getattr(g[0][1], g[0][2])).device.type == "cpu" for g in groups):
        keep_freed_memory()
    log.info("%s", tether_coverage(model).summary())
    return model


def tethered_layers(model: nn.Module) -> dict[str, TetherParametrization]:
    """Tethers of ``model`` by layer name, in module order.

    A layer's name is its qualified module name (e.g. ``"fc2"``) when the tethered parameter is
    ``weight``, else ``"<module>.<param>"`` (``"attn.in_proj_weight"``), as the unwrapped model
    names it: the attributes wrappers add are skipped (``_orig_mod`` of ``torch.compile``,
    ``module`` of ``DataParallel`` / ``DistributedDataParallel``, FSDP's ``_fsdp_wrapped_module``
    and activation checkpointing's ``_checkpoint_wrapped_module``), so a compiled, a DDP and a
    plain copy of one model publish the same names. A tethered root module's ``weight`` is named
    ``ROOT_LAYER``. A tether shared by tied holders appears once, under its first holder.
    """
    return {name: tp for name, _, _, tp in _iter_tethered(model)}


def tetherable_weights(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every tethered weight and every weight ``tether(model)`` would tether, in module order.

    Layer name (as :func:`tethered_layers` names it) -> (module, parameter name). Tied weights
    appear once, under their first holder. Uninitialised lazy modules are left out.
    """
    out: dict[str, tuple[nn.Module, str]] = {}
    seen: set[int] = set()
    for module_name, module in _unwrapped_modules(model):
        tethered = set(_tethers_of(module))
        for param in _tensor_names(module):
            if param not in tethered and not _is_registered(module, param):
                continue
            key = id(_tether_of(module, param) or _stored(module, param))
            if key in seen or _uninitialised(module, param):
                continue
            seen.add(key)
            out[_layer_name(module_name, param)] = (module, param)
    return out


def pre_tether_weight(module: nn.Module, param: str = "weight") -> Tensor:
    """The weight ``module.<param>`` before its tether: the raw parameter ``W``, not ``W ⊙ T``.

    Under parametrizations registered before the tether (``weight_norm``) it is their output,
    computed now (differentiable; wrap in ``torch.no_grad()`` to read it); without a tether,
    the weight as the module uses it. Same shape as ``module.<param>``.
    """
    if not parametrize.is_parametrized(module, param):
        return cast(Tensor, getattr(module, param))
    plist = _plist(module, param)
    stop = next(
        (i for i, p in enumerate(plist) if isinstance(p, TetherParametrization)), len(plist)
    )
    if stop == len(plist):
        return cast(Tensor, getattr(module, param))
    if stop == 0:
        return cast(Tensor, plist.original)
    if plist.is_tensor:
        x = plist[0](plist.original)
    else:
        x = plist[0](*(getattr(plist, f"original{i}") for i in range(plist.ntensors)))
    for parametrization in list(plist)[1:stop]:
        x = parametrization(x)
    return cast(Tensor, x)


def tether_coverage(model: nn.Module) -> Coverage:
    """What the tethers of ``model`` cover: tethered layers and parameters against the total,
    and the modules with parameters but no tether, by type and reason. See :class:`Coverage`."""
    tethers = tethered_layers(model)
    own = {id(p) for tp in tethers.values() for p in tp.parameters()}
    unique = {id(p): p for p in model.parameters() if id(p) not in own}
    counted: set[int] = set(own)
    seen_tethers: set[int] = set()
    rest = 0
    skipped: dict[tuple[str, str], list[int]] = {}
    for _, module in _unwrapped_modules(model):
        params = [p for p in _own_parameters(module) if id(p) not in counted]
        counted.update(id(p) for p in params)
        size = sum(p.numel() for p in params)
        if tethers_here := _tethers_of(module):
            fresh = [tp for tp in tethers_here.values() if id(tp) not in seen_tethers]
            seen_tethers.update(id(tp) for tp in fresh)
            rest += max(size - sum(tp.storage().numel() for tp in fresh), 0)
            continue
        if not params:
            continue
        key = (_type_name(module), _skip_reason(module))
        row = skipped.setdefault(key, [0, 0])
        row[0], row[1] = row[0] + 1, row[1] + size
    tethered = sum(tp.storage().numel() for tp in tethers.values())
    return Coverage(
        layers=len(tethers),
        tethered=tethered,
        total=sum(p.numel() for p in unique.values()),
        untethered_in_tethered=rest,
        skipped=tuple(
            SkippedModules(type=t, modules=n, parameters=size, reason=reason)
            for (t, reason), (n, size) in skipped.items()
        ),
    )


def get_tether(layer: nn.Module, param: str | None = None) -> Tensor:
    """The current tether ``T`` (detached, in [0, 1]) of a tethered module or its parametrization.

    ``param`` names the tethered parameter of a module with several (an ``nn.LSTM``, an
    ``nn.MultiheadAttention`` with separate projections); otherwise ``weight``, or the only one.
    In static and importance mode this is a view of the stored buffer: clone it to keep a copy.
    Raises ``ValueError`` when ``layer`` carries no (such) tether.
    """
    return _resolve(layer, param).current().detach()


def set_tether_(layer: nn.Module, value: Tensor, param: str | None = None) -> None:
    """Set the tether of a tethered module (or its parametrization) in place, under no_grad.

    ``param`` as for :func:`get_tether`. Raises ``ValueError`` on a shape mismatch or values
    outside [0, 1] (changing nothing)."""
    _resolve(layer, param).set_(value)


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

    A tethered parameter is kept as ``fc.parametrizations.weight.original``, so a plain
    ``load_state_dict(..., strict=False)`` silently loads only the biases. Here each plain
    ``<module>.<param>`` of a tethered parameter goes to that raw parameter (under another
    parametrization such as ``weight_norm`` the plain state already names its originals), the
    tethers keep their current values, and the load is strict: a missing or unexpected key raises
    ``RuntimeError`` as torch does. Returns torch's ``_IncompatibleKeys``.
    """
    raw: set[str] = set()  # "<module>.<param>" held as parametrizations.<param>.original
    kept: list[str] = []  # state-dict prefixes of the tethers' own state
    for name, module in model.named_modules():
        for param in _tethers_of(module):
            plist = _plist(module, param)
            index = next(i for i, p in enumerate(plist) if isinstance(p, TetherParametrization))
            kept.append(_join(name, f"parametrizations.{param}.{index}."))
            if plist.is_tensor:
                raw.add(_join(name, param))
    renamed: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        target = _join(module, f"parametrizations.{leaf}.original") if key in raw else key
        renamed[target] = value
    for key, value in model.state_dict().items():
        if key.startswith(tuple(kept)):  # tether state: kept
            renamed.setdefault(key, value)
    return model.load_state_dict(renamed, strict=strict)


def untether(model: nn.Module) -> nn.Module:
    """A plain copy of a tethered model with ``W ⊙ T`` baked into each weight (``model`` is left
    as it is): what to export, serve, or load where tetherfed is not installed.

    Every parametrized tensor of a tethered module is baked (a ``weight_norm`` under a tether too:
    the copy's weights equal the effective ones); tied weights stay tied (one baked parameter)."""
    plain = copy.deepcopy(model)
    baked: dict[int, nn.Parameter] = {}  # by the tether (tied holders share one)
    for module in [m for m in plain.modules() if _tethers_of(m)]:
        plists = cast(nn.ModuleDict, module.parametrizations)
        values: dict[str, nn.Parameter] = {}
        for name in list(plists):
            tp = _tether_of(module, name)
            key = id(tp) if tp is not None else id(plists[name])
            if key not in baked:
                baked[key] = nn.Parameter(cast(Tensor, getattr(module, name)).detach().clone())
            values[name] = baked[key]
        # Not parametrize.remove_parametrizations: it edits the generated class, which the copy
        # shares with `model`, and would strip `model`'s own weights.
        module.__class__ = module.__class__.__bases__[0]
        del module._modules["parametrizations"]
        for name, value in values.items():
            setattr(module, name, value)
    return plain


@contextlib.contextmanager
def without_tethers(model: nn.Module) -> Iterator[nn.Module]:
    """Take the tethers off ``model`` for the block, then put them back, keeping their state.

    Inside, every tethered weight is its plain raw parameter again (the same ``nn.Parameter``, so
    the optimizer still holds it, and tied weights are one parameter), which is what code that
    reaches for ``module.weight`` as a parameter needs: Hugging Face's ``tie_weights()`` and
    ``resize_token_embeddings()``, or any surgery that replaces modules. After it, each tether
    goes back on the module now at its place (looked up by qualified name, so a replaced module
    is tethered), with its state (values, learned logits, importance EMA) as it was; a weight
    whose shape changed gets a tether of the new shape holding the old values where the two
    overlap and ``T = 1`` elsewhere (new rows act as initialised; a learned tether's logits
    clamp it to 1 − 10⁻⁴), and a layer table that
    changed means a federation must be joined anew. Tied weights share one tether again.

    >>> with tetherfed.without_tethers(model):
    ...     model.resize_token_embeddings(len(tokenizer))

    To export, use :func:`untether` (``untether(model).save_pretrained(path)`` writes ``W ⊙ T``,
    ties kept); inside the block ``save_pretrained`` writes the raw weights. Raises
    ``ValueError`` (changing nothing) for a tether stacked with another parametrization
    (``weight_norm``), which torch cannot remove alone, and ``RuntimeError`` after the block
    when a tethered weight no longer exists (the tethers that could be put back are)."""
    sites: list[tuple[str, str, TetherParametrization]] = []
    for path, module in model.named_modules():
        for param, tp in _tethers_of(module).items():
            if len(_plist(module, param)) != 1:
                raise ValueError(
                    f"layer {_layer_name(path, param) or ROOT_LAYER!r}: its tether is stacked "
                    "with another parametrization, which torch cannot take off alone"
                )
            sites.append((path, param, tp))
    for path, param, _ in sites:
        parametrize.remove_parametrizations(
            model.get_submodule(path), param, leave_parametrized=False
        )
    try:
        yield model
    finally:
        _put_back(model, sites)


def _put_back(model: nn.Module, sites: list[tuple[str, str, TetherParametrization]]) -> None:
    """Register each site's tether again (resized where its weight's shape changed; holders of
    one tether share the resized one)."""
    resized: dict[tuple[int, tuple[int, ...]], TetherParametrization] = {}
    missing = []
    for path, param, tp in sites:
        try:
            module = model.get_submodule(path)
            weight = cast(Tensor, getattr(module, param))
        except AttributeError:
            missing.append(_layer_name(path, param) or ROOT_LAYER)
            continue
        shape, put = tuple(weight.shape), tp
        if shape != tuple(tp.storage().shape):
            put = resized.setdefault((id(tp), shape), _resized(tp, weight))
        parametrize.register_parametrization(module, param, put)
        if isinstance(module, nn.RNNBase):
            _refresh_rnn_weights(module)
    if missing:
        raise RuntimeError(f"tethered weights gone after without_tethers(): {missing}")


def _resized(tp: TetherParametrization, weight: Tensor) -> TetherParametrization:
    """A tether of `weight`'s shape: `tp`'s values where the shapes overlap, 1 elsewhere."""
    old = tp.current().detach()
    value = torch.ones(weight.shape, dtype=old.dtype, device=old.device)
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, weight.shape, strict=True))
    value[overlap] = old[overlap]
    fresh = TetherParametrization(tp.mode, value, tp.importance_every, tp.importance_decay)
    if tp.mode == "importance":
        cast(Tensor, fresh.ema)[overlap] = cast(Tensor, tp.ema)[overlap]
        cast(Tensor, fresh.steps).copy_(cast(Tensor, tp.steps))
    return fresh.to(weight.device)


def update_importance(model: nn.Module) -> list[str]:
    """Feed the current gradients to every importance-mode tether; call after ``backward()``.

    The score uses the weight before the tether and its gradient (see :func:`pre_tether_weight`).
    Layers whose weight has no gradient are skipped. Returns the names of the layers whose tether
    was refreshed by this call.
    """
    refreshed = []
    for name, module, param, tp in _iter_tethered(model):
        if tp.mode != "importance":
            continue
        plist = _plist(module, param)
        if plist.is_tensor and plist[0] is tp:
            weight = cast(Tensor, plist.original)
            grad = weight.grad
        else:
            grad, tp._pre_grad = tp._pre_grad, None
            with torch.no_grad():
                weight = pre_tether_weight(module, param)
        if grad is not None and tp.observe(weight, grad):
            refreshed.append(name)
    return refreshed


@dataclass(frozen=True, eq=False)
class LayerPart:
    """One tensor a merge or drift of ``layer`` moves besides its tether (``merge_scope``
    weights or model): the raw weight, the bias, or an untethered parameter or buffer.

    ``part`` is ``weight`` (or ``weight:<original>`` for each original of a parametrization with
    several, e.g. ``weight_norm``'s ``original0`` and ``original1``), ``bias`` (likewise), or
    ``model:<path>`` with ``path`` the tensor's qualified name in the (unwrapped) model; the
    frame entry is ``name``, ``<layer>@<part>`` (``tether_protocol.frame``). The tensor is
    looked up on ``holder`` (a module, or the ``ParametrizationList`` holding an original) on
    every access, so ``model.to(device)`` (which replaces buffers) is followed.
    """

    layer: str
    part: str
    holder: nn.Module
    attr: str

    @property
    def name(self) -> str:
        """The frame entry name, ``<layer>@<part>``."""
        return part_name(self.layer, self.part)

    def tensor(self) -> Tensor:
        """The tensor as stored (a parameter, an original, or a buffer): read it, never assign."""
        found = self.holder._parameters.get(self.attr)
        return found if found is not None else cast(Tensor, self.holder._buffers[self.attr])

    @torch.no_grad()
    def write_(self, value: Tensor) -> None:
        """Copy ``value`` (same shape; cast to the tensor's dtype and device) into the tensor,
        in place under ``no_grad``: optimizers and tied holders keep seeing the same tensor.
        Raises ``ValueError`` on a shape mismatch (the tensor unchanged)."""
        target = self.tensor()
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{self.name} shape mismatch: expected {list(target.shape)}, "
                f"got {list(value.shape)}"
            )
        target.copy_(value)


def layer_parts(model: nn.Module, scope: MergeScope) -> dict[str, list[LayerPart]]:
    """What a merge or drift of each tethered layer moves besides its tether, by layer (in
    :func:`tethered_layers` order), for ``Policy.merge_scope``:

    * ``tethers``: nothing (every list empty);
    * ``weights``: the tethered parameter's raw weight (the trainable original under the tether,
      ``parametrizations.<param>.original``, or each ``original<i>`` of a multi-tensor
      parametrization such as ``weight_norm``) and the layer's bias: the parameter of the same
      module named like the weight with ``weight`` replaced by ``bias`` (``bias`` of a Linear or
      Conv, ``in_proj_bias`` of ``in_proj_weight``, ``bias_ih_l0`` of ``weight_ih_l0``), if
      present;
    * ``model``: also every other floating-point parameter and buffer of the model (norms,
      untethered embeddings, BatchNorm running statistics; not integer buffers such as
      ``num_batches_tracked``, nor a tether's own state: its ``tether``/``logits``/``ema``),
      each carried by exactly one layer: **the nearest tethered layer before it in module
      order** (``named_modules()`` pre-order, wrappers skipped; within a module, its parameters
      then its buffers, in registration order, a tethered parameter switching the carrier);
      tensors before the first tethered layer go to the first. A tensor held by several
      modules (tied) is carried once, by its first holder. So when every layer merges with the
      same partner, every floating-point tensor of the model is averaged exactly once.

    Two workers with one architecture get the same parts under the same names. Raises
    ``ValueError`` for a module path containing ``@`` (it cannot be named in a frame).
    """
    tethered = list(_iter_tethered(model))
    parts: dict[str, list[LayerPart]] = {name: [] for name, _, _, _ in tethered}
    if scope == "tethers":
        return parts
    claimed: set[int] = set()  # tensors already carried, or a tether's own state
    layer_of: dict[int, str] = {}
    for layer, _, _, tp in tethered:
        layer_of[id(tp)] = layer
        claimed.update(id(t) for t in (*tp.parameters(), *tp.buffers()))

    def add(layer: str, part: str, holder: nn.Module, attr: str) -> None:
        found = LayerPart(layer, part, holder, attr)
        key = id(found.tensor())
        if key not in claimed:
            claimed.add(key)
            parts[layer].append(found)

    for layer, module, param, _ in tethered:
        for holder, attr, suffix in _stored_tensors(module, param):
            add(layer, f"weight{suffix}", holder, attr)
        bias = param.replace("weight", "bias")
        if bias != param and bias in _tensor_names(module):
            for holder, attr, suffix in _stored_tensors(module, bias):
                add(layer, f"bias{suffix}", holder, attr)
    if scope == "model":
        _carry_the_rest(model, parts, claimed, layer_of, add)
    return parts


def _stored_tensors(module: nn.Module, param: str) -> list[tuple[nn.Module, str, str]]:
    """(holder, attribute, part suffix) of the tensors storing ``module.<param>``: the
    parameter itself, or its parametrization's original(s) (suffix ``:original<i>`` when
    several)."""
    if not parametrize.is_parametrized(module, param):
        return [(module, param, "")]
    plist = _plist(module, param)
    if plist.is_tensor:
        return [(plist, "original", "")]
    return [(plist, f"original{i}", f":original{i}") for i in range(plist.ntensors)]


def _carry_the_rest(
    model: nn.Module,
    parts: dict[str, list[LayerPart]],
    claimed: set[int],
    layer_of: Mapping[int, str],
    add: Callable[[str, str, nn.Module, str], None],
) -> None:
    """Assign every unclaimed floating-point tensor of ``model`` to the nearest preceding
    tethered layer (see :func:`layer_parts`)."""
    first = next(iter(parts), None)
    if first is None:
        return
    carrier: str | None = None
    early: list[tuple[str, nn.Module, str]] = []  # before the first tethered layer
    for tp, path, holder, attr in _tensor_slots(model):
        if tp is not None:
            carrier = layer_of[id(tp)]
            continue
        found = holder._parameters.get(attr)
        tensor = found if found is not None else holder._buffers.get(attr)
        if tensor is None or not tensor.is_floating_point() or id(tensor) in claimed:
            continue
        if carrier is None:
            early.append((path, holder, attr))
        else:
            add(carrier, f"model:{path}", holder, attr)
    for path, holder, attr in early:
        add(first, f"model:{path}", holder, attr)


def _tensor_slots(
    model: nn.Module,
) -> Iterator[tuple[TetherParametrization | None, str, nn.Module, str]]:
    """Every tensor of ``model`` in module order (pre-order, wrappers skipped; per module its
    parameters, then its buffers, then the state of its non-tether parametrizations), as
    (tether, "", module, param) for a tethered parameter, else (None, qualified path, holder,
    attribute)."""
    for module_name, module in _unwrapped_modules(model):
        tethers = _tethers_of(module)
        for param in _tensor_names(module):
            if param in tethers:
                yield tethers[param], "", module, param
                continue
            for holder, attr, _ in _stored_tensors(module, param):
                inner = f"parametrizations.{param}.{attr}" if holder is not module else param
                yield None, _join(module_name, inner), holder, attr
        for buffer in module._buffers:
            yield None, _join(module_name, buffer), module, buffer
        yield from _parametrization_state(module_name, module)


def _parametrization_state(
    module_name: str, module: nn.Module
) -> Iterator[tuple[None, str, nn.Module, str]]:
    """The parameters and buffers of a module's parametrizations other than tethers (their
    originals excluded: the module's own tensors)."""
    if not parametrize.is_parametrized(module):
        return
    for param, plist in cast(nn.ModuleDict, module.parametrizations).items():
        for index, inner in enumerate(cast(nn.ModuleList, plist)):
            if isinstance(inner, TetherParametrization):
                continue
            for sub_name, sub in inner.named_modules():
                base = _join(f"parametrizations.{param}.{index}", sub_name)
                for attr in (*sub._parameters, *sub._buffers):
                    yield None, _join(module_name, _join(base, attr)), sub, attr


def init_digest(model: nn.Module) -> str:
    """A fingerprint of the tethered layers' raw weights (the ``weight`` parts of
    :func:`layer_parts`: the trainable weights before their tethers): the first 16 hex digits of
    the SHA-256 of each layer's name, then each weight tensor's name, shape and float32 bytes,
    in layer order. Equal on CPU and CUDA; two workers started from one init (same seed, same
    architecture) get the same digest, independently initialised ones (almost surely) differ."""
    digest = hashlib.sha256()
    for layer, found in layer_parts(model, "weights").items():
        digest.update(layer.encode() + b"\x00")
        for part in found:
            if not part.part.startswith("weight"):
                continue
            value = part.tensor().detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{part.part}{list(value.shape)}".encode() + b"\x00")
            digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:16]


def _iter_tethered(
    model: nn.Module,
) -> Iterator[tuple[str, nn.Module, str, TetherParametrization]]:
    seen: set[int] = set()
    for module_name, module in _unwrapped_modules(model):
        for param, tp in _tethers_of(module).items():
            if id(tp) not in seen:
                seen.add(id(tp))
                yield _layer_name(module_name, param), module, param, tp


def _unwrapped_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Like ``named_modules()`` (each module once, pre-order), with wrapper attributes and
    parametrization internals skipped."""
    seen: set[int] = set()
    stack = [(prefix, module)]
    while stack:
        name, current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield name, current
        inner = parametrize.is_parametrized(current)
        children = [
            (name if _is_wrapper(current, child_name) else _join(name, child_name), child)
            for child_name, child in current.named_children()
            if not (inner and child_name == "parametrizations")
        ]
        stack.extend(reversed(children))


def _is_wrapper(parent: nn.Module, attribute: str) -> bool:
    if attribute in WRAPPER_ATTRIBUTES:
        return True
    # DataParallel and DistributedDataParallel hold the model as `module`.
    return attribute == "module" and isinstance(parent, nn.DataParallel | DistributedDataParallel)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _layer_name(module_name: str, param: str) -> str:
    if param == "weight":
        return module_name or ROOT_LAYER
    return _join(module_name, param)


def _plist(module: nn.Module, param: str) -> Any:
    """The ``ParametrizationList`` of a parametrized tensor (typed loosely: torch's is private)."""
    return cast(nn.ModuleDict, module.parametrizations)[param]


def _tensor_names(module: nn.Module) -> list[str]:
    """Names of the module's own parameters, parametrized ones included (module order)."""
    hooked = tuple(f"{name}_" for name in _legacy_names(module))  # weight_g, weight_orig
    names = [
        name
        for name, p in module._parameters.items()
        if p is not None and not (hooked and name.startswith(hooked))
    ]
    if parametrize.is_parametrized(module):
        names += [n for n in cast(nn.ModuleDict, module.parametrizations) if n not in names]
    return names


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The module's own parameters, with the originals of its parametrized tensors."""
    params = [p for p in module._parameters.values() if p is not None]
    if parametrize.is_parametrized(module):
        for plist in cast(nn.ModuleDict, module.parametrizations).values():
            params += [
                p for name, p in plist.named_parameters(recurse=False) if name.startswith("orig")
            ]
    return params


def _stored(module: nn.Module, param: str) -> Tensor:
    """The tensor that stores ``module.<param>``: the parameter, or its parametrization's
    (first) original. Tied holders share it."""
    if parametrize.is_parametrized(module, param):
        plist = _plist(module, param)
        return cast(Tensor, plist.original if plist.is_tensor else plist.original0)
    return cast(Tensor, module._parameters[param])


def _tethers_of(module: nn.Module) -> dict[str, TetherParametrization]:
    if not parametrize.is_parametrized(module):
        return {}
    found = {}
    for param, plist in cast(nn.ModuleDict, module.parametrizations).items():
        for candidate in cast(nn.ModuleList, plist):
            if isinstance(candidate, TetherParametrization):
                found[param] = candidate
                break
    return found


def _tether_of(module: nn.Module, param: str) -> TetherParametrization | None:
    return _tethers_of(module).get(param)


def _registered_patterns(module: nn.Module) -> tuple[str, ...]:
    for klass in type(module).__mro__:
        for key in (klass, f"{klass.__module__}.{klass.__qualname__}"):
            if key in _REGISTRY:
                return _REGISTRY[key]
    return ()


def _is_registered(module: nn.Module, param: str) -> bool:
    return any(fnmatch.fnmatchcase(param, pattern) for pattern in _registered_patterns(module))


def _uninitialised(module: nn.Module, param: str) -> bool:
    return isinstance(module._parameters.get(param), nn.parameter.UninitializedParameter)


def _legacy_hooks(module: nn.Module) -> list[Any]:
    return [
        hook
        for hook in module._forward_pre_hooks.values()
        if type(hook).__name__ in _LEGACY_HOOKS and type(hook).__module__.startswith("torch.")
    ]


def _legacy_names(module: nn.Module) -> list[str]:
    """Tensors a legacy weight_norm / spectral_norm hook recomputes (``weight``)."""
    return [str(getattr(hook, "name", "weight")) for hook in _legacy_hooks(module)]


def _legacy_hook(module: nn.Module) -> str | None:
    for hook in _legacy_hooks(module):
        return f"{getattr(hook, 'name', 'weight')} under the legacy {type(hook).__name__} hook"
    return None


def _skip_reason(module: nn.Module) -> str:
    legacy = _legacy_hook(module)
    if legacy is not None:
        return f"{legacy} (use torch.nn.utils.parametrizations)"
    names = [n for n in _tensor_names(module) if _is_registered(module, n)]
    if any(_uninitialised(module, n) for n in names):
        return "uninitialised lazy module"
    if names:
        return "not selected"
    return "no registered weight"


def _type_name(module: nn.Module) -> str:
    klass = type(module)
    if parametrize.is_parametrized(module):
        klass = klass.__bases__[0]
    if klass.__module__.startswith("torch."):
        return klass.__qualname__
    return f"{klass.__module__}.{klass.__qualname__}"


def _refresh_rnn_weights(module: nn.Module) -> None:
    """Make an RNN's forward read its parametrized weights (``W ⊙ T``).

    ``nn.RNNBase`` keeps its weights in ``_flat_weights``; torch versions with
    ``_update_flat_weights`` re-read them every forward (the parametrized attribute is a new
    tensor on each access). Older ones get a forward pre-hook that does it."""
    if not _RNN_NEEDS_HOOK:
        return
    if _read_flat_weights not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_read_flat_weights)


def _read_flat_weights(module: nn.Module, _args: Any) -> None:
    names = cast(list[str], module._flat_weights_names)
    weights = [getattr(module, n) if hasattr(module, n) else None for n in names]
    cast(Any, module)._flat_weights = weights


def _forget_seen(module: nn.Module, incompatible_keys: object) -> None:
    # After load_state_dict the `steps` buffer is the truth again.
    if isinstance(module, TetherParametrization):
        module._seen = None


def _resolve(layer: nn.Module, param: str | None = None) -> TetherParametrization:
    if isinstance(layer, TetherParametrization):
        return layer
    found = _tethers_of(layer)
    if param is not None:
        if param not in found:
            raise ValueError(f"{type(layer).__name__}.{param} carries no tether")
        return found[param]
    if not found:
        raise ValueError(f"{type(layer).__name__} carries no tether; call tether(model) first")
    if "weight" in found:
        return found["weight"]
    if len(found) == 1:
        return next(iter(found.values()))
    raise ValueError(
        f"{type(layer).__name__} carries several tethers ({', '.join(found)}); pass param="
    )


Site = tuple[str, nn.Module, str]  # (module name, module, parameter name)


def _select(model: nn.Module, layers: Iterable[str] | LayerPredicate | None) -> list[list[Site]]:
    """The parameters to tether, each with every holder of the same tensor (tied weights), in
    module order of their first holder. Raises ValueError as tether() documents."""
    modules = list(_unwrapped_modules(model))
    by_name = {name or ROOT_LAYER: module for name, module in modules}
    if layers is None:
        wanted = [
            (name, module, param)
            for name, module in modules
            for param in _tensor_names(module)
            if _is_registered(module, param)
        ]
    elif callable(layers):
        predicate = layers
        wanted = [
            (name, module, param)
            for name, module in modules
            for param in _tensor_names(module)
            if predicate(_layer_name(name, param), module, param)
        ]
    else:
        wanted = _named_sites(model, by_name, [layers] if isinstance(layers, str) else layers)
    lazy = [_layer_name(n, p) for n, m, p in wanted if _uninitialised(m, p)]
    if lazy:
        raise ValueError(
            f"uninitialised lazy layers: {', '.join(lazy)}; run one forward pass (e.g. "
            "model(example_batch)) before tether() so that their shapes are known"
        )
    bad = [
        _layer_name(n, p)
        for n, m, p in wanted
        if not (isinstance(_stored(m, p), nn.Parameter) and _stored(m, p).is_floating_point())
    ]
    if bad:
        raise ValueError(f"not floating-point parameters, cannot tether: {', '.join(bad)}")
    holders: dict[int, list[Site]] = {}
    for name, module in modules:
        for param in _tensor_names(module):
            holders.setdefault(id(_stored(module, param)), []).append((name, module, param))
    groups: dict[int, list[Site]] = {}
    for _, module, param in wanted:
        key = id(_stored(module, param))
        groups.setdefault(key, holders[key])
    already = [
        _layer_name(n, p) for group in groups.values() for n, m, p in group if _tether_of(m, p)
    ]
    if already:
        raise ValueError(f"layers already tethered: {', '.join(dict.fromkeys(already))}")
    order = {id(module): i for i, (_, module) in enumerate(modules)}
    return sorted(groups.values(), key=lambda group: order[id(group[0][1])])


def _named_sites(
    model: nn.Module, by_name: dict[str, nn.Module], layers: Iterable[str]
) -> list[Site]:
    # Names as the wrapped model spells them (``_orig_mod.fc``) mean the unwrapped layer.
    canonical = {id(module): name for name, module in by_name.items()}
    spelled = {
        name: canonical[id(m)] for name, m in model.named_modules() if name and id(m) in canonical
    }
    sites: list[Site] = []
    unknown, untetherable = [], []
    for given in dict.fromkeys(layers):
        name = spelled.get(given, given)
        if name in by_name:
            module = by_name[name]
            params = [p for p in _tensor_names(module) if _is_registered(module, p)]
            if not params:
                legacy = _legacy_hook(module)
                untetherable.append(f"{given} ({legacy or 'no registered weight'})")
            module_name = "" if name == ROOT_LAYER else name
            sites += [(module_name, module, p) for p in params]
            continue
        owner, _, param = name.rpartition(".")
        owner = spelled.get(owner, owner) or ROOT_LAYER
        module_or_none = by_name.get(owner)
        if module_or_none is None:
            unknown.append(given)
        elif param in _tensor_names(module_or_none):
            sites.append(("" if owner == ROOT_LAYER else owner, module_or_none, param))
        elif (legacy := _legacy_hook(module_or_none)) is not None:
            untetherable.append(f"{given} ({legacy})")
        else:
            unknown.append(given)
    if unknown:
        raise ValueError(f"unknown layers: {', '.join(unknown)}")
    if untetherable:
        raise ValueError(
            f"cannot tether: {', '.join(untetherable)}; name a parameter ('<module>.<param>'), "
            "pass a predicate, or register_tetherable() the type"
        )
    return list(dict.fromkeys(sites))


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
