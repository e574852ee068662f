"""Spec dataclasses, their registry and string form, and the reversible ``apply`` context manager.

The shape follows torchao's ``quantize_(model, Config())``: every technique is a frozen dataclass
that validates itself in ``__post_init__`` and is registered by name; a separate handler installs
it. Installing follows lm-evaluation-harness' steering hooks: every hook handle, module swap and
weight edit is recorded and undone in ``finally``, so the model is bit-identical afterwards.

Spec strings: ``name`` or ``name:key=value,key=value``; parts compose with ``+``
(``noise:site=up,dist=gaussian,std=0.05 + teal:sparsity=0.5``); presets such as ``paper:iron``
expand to their parts. ``str(config)`` is the canonical form and parses back to an equal config.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from quada.approx.draws import DRAW_SCHEME, key64, uniform_bits
from quada.approx.rows import Rows, rows_of_forward, rows_of_shape
from quada.errors import QuadaError, check_seed, warn

# --------------------------------------------------------------------------- layer selections


@dataclass(frozen=True)
class LayerSelection:
    """Decoder layers to approximate: a slice ``start:stop`` (negatives count from the end, either
    bound may be omitted) or explicit indices. String forms: ``0:4``, ``-4:``, ``3``, ``[0,2,5]``."""

    start: int | None = None
    stop: int | None = None
    indices: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.indices is not None:
            if self.start is not None or self.stop is not None:
                raise QuadaError("a layer selection is either a slice or a list of indices, not both")
            if not self.indices:
                raise QuadaError("a layer list must name at least one layer, e.g. layers=[0,2]")
            object.__setattr__(self, "indices", tuple(sorted(set(self.indices))))
        elif self.start is not None and self.stop is not None and (self.start >= 0) == (self.stop >= 0):
            if self.start >= self.stop:
                raise QuadaError(f"empty layer slice {self}; the start must be below the stop, e.g. 0:4")

    @classmethod
    def parse(cls, text: str) -> LayerSelection:
        text = text.strip()
        try:
            if text.startswith("[") and text.endswith("]"):
                return cls(indices=tuple(int(part) for part in text[1:-1].split(",") if part.strip()))
            if ":" in text:
                start, stop = text.split(":")
                return cls(start=int(start) if start.strip() else None, stop=int(stop) if stop.strip() else None)
            return cls(indices=(int(text),))
        except ValueError:
            raise QuadaError(
                f"bad layer selection {text!r}; write a slice like 0:4 or -4:, one index like 3, "
                "or a list like [0,2,5]"
            ) from None

    @classmethod
    def coerce(cls, value: Any) -> LayerSelection | None:
        """Accept None (all layers), a selection, a string, an int, a range, a slice or ints."""
        if value is None or isinstance(value, LayerSelection):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, int):
            return cls(indices=(value,))
        if isinstance(value, (range, slice)) and value.step in (None, 1):
            return cls(start=value.start, stop=value.stop)
        if isinstance(value, Iterable):
            return cls(indices=tuple(int(i) for i in value))
        raise QuadaError(f"cannot read {value!r} as layers; use a range, a slice string like '0:4' or a list of ints")

    def resolve(self, num_layers: int) -> tuple[int, ...]:
        """The selected indices for a model with ``num_layers`` decoder layers (validated)."""
        bounds = [i for i in (self.indices or ()) + (self.start,) if i is not None]
        bad = [i for i in bounds if not -num_layers <= i < num_layers]
        if self.stop is not None and not -num_layers <= self.stop <= num_layers:
            bad.append(self.stop)
        if bad:
            raise QuadaError(
                f"layer {bad[0]} in layers={self} is out of range for a model with {num_layers} decoder "
                f"layers; use indices 0..{num_layers - 1} (or negatives from the end)"
            )
        if self.indices is not None:
            return tuple(sorted({i % num_layers for i in self.indices}))
        chosen = tuple(range(num_layers)[slice(self.start, self.stop)])
        if not chosen:
            raise QuadaError(f"layers={self} selects no layer of a model with {num_layers} decoder layers")
        return chosen

    def __str__(self) -> str:
        if self.indices is not None:
            return str(self.indices[0]) if len(self.indices) == 1 else "[" + ",".join(map(str, self.indices)) + "]"
        return ("" if self.start is None else str(self.start)) + ":" + ("" if self.stop is None else str(self.stop))


# --------------------------------------------------------------------------- configs and registry

REGISTRY: dict[str, type[ApproxConfig]] = {}
PRESETS: dict[str, tuple[str, str]] = {}  # name -> (description, spec text)


def register(name: str, description: str, example: str | None = None):
    """Class decorator: make a config class reachable by ``name`` in spec strings."""

    def decorate(cls):
        cls.name, cls.description, cls.example = name, description, example or name
        REGISTRY[name] = cls
        return cls

    return decorate


def register_preset(name: str, description: str, spec: str) -> None:
    """Name a composed spec (e.g. the paper's Table-1 rows)."""
    PRESETS[name] = (description, spec)


@dataclass(frozen=True, kw_only=True)
class ApproxConfig:
    """Base of every technique's config: the layers it applies to (None = the ``apply`` default).

    ``order`` sorts installation: module swaps (order 0) go before hooks and weight edits (1), so
    hooks find the modules that will actually run. Otherwise parts install in the order given.
    ``per_call`` marks a technique whose rule reads how many tokens a forward pass holds (TEAL's
    "last half"): for it, splitting a sequence over several forward passes (a reused KV cache)
    changes the result.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    example: ClassVar[str] = ""
    order: ClassVar[int] = 1
    replaces: ClassVar[str] = ""  # what a module swap replaces in a layer ("" = nothing); once per layer
    per_call: ClassVar[bool] = False
    layers: LayerSelection | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", LayerSelection.coerce(self.layers))
        for name, hint in typing.get_type_hints(type(self)).items():
            value = getattr(self, name, None)
            if float not in (hint, *typing.get_args(hint)) or isinstance(value, bool):
                continue
            if isinstance(value, int):  # 1 -> 1.0: one canonical key
                object.__setattr__(self, name, float(value))
            elif isinstance(value, float) and not math.isfinite(value):
                raise QuadaError(f"option {name}={value} of {self.name} must be a finite number")

    def parts(self) -> tuple[ApproxConfig, ...]:
        return (self,)

    def without_layers(self) -> ApproxConfig:
        """The same technique on all layers: the key under which calibrations are cached."""
        return dataclasses.replace(self, layers=None)

    def with_option(self, name: str, value: float) -> ApproxConfig:
        """The same technique with the numeric option ``name`` set to ``value``, typed like the
        field (4.0 sets an int option to 4) and checked again: how a sweep derives its points."""
        return dataclasses.replace(self, **{name: _number_option(type(self), name, value)})

    def __str__(self) -> str:
        options = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.name != "layers" and (required or value != f.default):
                options.append(f"{f.name}={_format(value)}")
        if self.layers is not None:
            options.append(f"layers={self.layers}")
        return self.name + (":" + ",".join(options) if options else "")


@dataclass(frozen=True)
class ComposedConfig:
    """Several configs applied together, in order; canonical form joins them with `` + ``."""

    configs: tuple[ApproxConfig, ...]

    def parts(self) -> tuple[ApproxConfig, ...]:
        return self.configs

    def __str__(self) -> str:
        return " + ".join(map(str, self.configs))


Spec = ApproxConfig | ComposedConfig


def _format(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value).replace("e+", "e")  # 1e16, not 1e+16: a '+' joins the parts of a spec
    return str(value)


def _coerce(text: str, hint: Any, option: str) -> Any:
    """Read one option value from a spec string according to the field's type hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.lower() == "none":
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if hint is int:
            return int(text)
        if hint is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        raise QuadaError(f"option {option}={text!r} must be a finite {hint.__name__}") from None
    if hint is LayerSelection:
        return LayerSelection.parse(text)
    return text


def _exponent_sign(text: str, i: int) -> bool:
    """Whether ``text[i]`` is the sign of a number's exponent, as in ``std=1e+16``."""
    return (text[i] == "+" and 2 <= i < len(text) - 1 and text[i - 1] in "eE"
            and (text[i - 2].isdigit() or text[i - 2] == ".") and text[i + 1].isdigit())


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside square brackets (layer lists contain commas) and exponents."""
    parts, depth, current = [], 0, []
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0 and not _exponent_sign(text, i):
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _option_hint(cls: type[ApproxConfig], key: str) -> Any:
    """The type hint of option ``key`` of technique ``cls``; a user error when it has none such."""
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        raise QuadaError(f"unknown option {key!r} for {cls.name}; valid options: {', '.join(names)}")
    return typing.get_type_hints(cls)[key]


def _number_option(cls: type[ApproxConfig], key: str, value: float) -> int | float:
    """``value`` as the number option ``key`` of ``cls`` takes: a float, or an int when whole."""
    kinds = (hint := _option_hint(cls, key), *typing.get_args(hint))
    if float in kinds:
        return float(value)
    if int in kinds:
        if not float(value).is_integer():
            raise QuadaError(f"option {key}={value!r} of {cls.name} must be a whole number")
        return int(value)
    raise QuadaError(f"option {key} of {cls.name} is not a number and cannot be set to {value!r}")


def _read_part(text: str) -> tuple[type[ApproxConfig], dict[str, Any]]:
    """The technique that one part ``name:key=value,...`` names, and the options it gives, typed."""
    name, _, options = text.partition(":")
    name = name.strip()
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY) + sorted(PRESETS))
        raise QuadaError(f"unknown approximation {text!r}; choose one of: {known} (see `quada approx list`)")
    cls = REGISTRY[name]
    kwargs: dict[str, Any] = {}
    for item in _split_top_level(options, ",") if options.strip() else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise QuadaError(f"option {item!r} of {name} must look like key=value")
        hint = _option_hint(cls, key)
        if key in kwargs:
            raise QuadaError(f"option {key!r} is given twice in {text!r}")
        kwargs[key] = _coerce(value.strip(), hint, key)
    return cls, kwargs


def _build(cls: type[ApproxConfig], options: dict[str, Any]) -> ApproxConfig:
    try:
        return cls(**options)
    except TypeError as err:  # a required option is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in options and f.default is dataclasses.MISSING]
        raise QuadaError(f"{cls.name} needs the option(s) {', '.join(missing)}, e.g. {cls.example}") from err


def _parse_part(text: str) -> tuple[ApproxConfig, ...]:
    if text in PRESETS:
        return parse_spec(PRESETS[text][1]).parts()
    return (_build(*_read_part(text)),)


def parse_spec(text: str, num_layers: int | None = None) -> Spec:
    """Parse a spec string; with ``num_layers`` also check its layers against that depth (see
    :func:`resolve_layers`)."""
    if not isinstance(text, str) or not text.strip():
        raise QuadaError("empty approximation spec; see `quada approx list` for the choices")
    parts = _split_top_level(text, "+")
    if not all(parts):
        raise QuadaError(
            f"the approximation spec {text!r} has an empty part around '+'; join whole specs with '+', "
            "e.g. bolt + teal:sparsity=0.5"
        )
    configs = tuple(c for part in parts for c in _parse_part(part))
    if num_layers is not None:
        resolve_layers(configs, num_layers)
    return compose(configs)


def compose(configs: Sequence[ApproxConfig]) -> Spec:
    """One config, or several applied together. A part given twice (the same technique with the same
    options on the same layers) is refused: it would apply the same approximation twice."""
    configs = tuple(configs)
    for i, config in enumerate(configs):
        if config in configs[:i]:
            raise QuadaError(
                f"the approximation {' + '.join(map(str, configs))} applies {config} twice; give each part once "
                "(for a stronger approximation, raise its strength instead)"
            )
    return configs[0] if len(configs) == 1 else ComposedConfig(configs)


def parse_technique(text: str, name: str, value: float) -> ApproxConfig:
    """One technique from spec text that leaves out its numeric option ``name``, completed with
    ``value``: the spec of a sweep (``noise:site=up,dist=gaussian`` swept over ``std``) parsed once,
    whose points then come from :meth:`ApproxConfig.with_option`."""
    parts = _split_top_level(text, "+") if isinstance(text, str) and text.strip() else []
    if not parts:
        parse_spec(text)  # the error for an empty spec
    if len(parts) > 1 or parts[0] in PRESETS:
        raise QuadaError(f"{text!r} is not one technique; give one technique, without '+' or a preset, "
                         "e.g. noise:site=up,dist=gaussian")
    cls, options = _read_part(parts[0])
    if name in options:
        raise QuadaError(f"leave {name}= out of {text!r}: the sweep sets it")
    return _build(cls, {**options, name: _number_option(cls, name, value)})


def resolve_layers(configs: Sequence[ApproxConfig], num_layers: int, default: LayerSelection | None = None) -> list[tuple[int, ...]]:
    """Each part's decoder indices in a model with ``num_layers`` layers: its own ``layers``, else
    ``default``, else all. Fails on a layer out of range, and on two parts that replace the same
    module of one layer (the second would find the first's replacement, not the original). Two
    techniques on one layer apply in a fixed order, which the user is told (a warning)."""
    chosen = []
    for config in configs:
        selection = config.layers or default
        chosen.append(selection.resolve(num_layers) if selection else tuple(range(num_layers)))
    mixed = None
    for i, (first, first_layers) in enumerate(zip(configs, chosen)):
        for second, second_layers in zip(configs[i + 1 :], chosen[i + 1 :]):
            shared = sorted(set(first_layers) & set(second_layers))
            if first.replaces and first.replaces == second.replaces and shared:
                raise QuadaError(
                    f"{first.name} and {second.name} cannot be composed on layer {shared[0]}: both replace its "
                    f"{first.replaces}, which can be replaced only once; keep one of them, or give them disjoint layers="
                )
            if first.name != second.name and shared and mixed is None:
                mixed = (first, second, shared[0])
    if mixed is not None:
        first, second, layer = mixed
        applied = sorted(configs, key=lambda c: c.order)
        warn(
            f"{' + '.join(map(str, configs))}: {first.name} and {second.name} both change layer {layer}, and the parts "
            "of an approximation apply in a fixed order, module swaps first, then the others as written, each on the "
            f"activations the one before it left: here {', then '.join(map(str, applied))}. Write the parts in another "
            "order for another composition"
        )
    return chosen


def as_spec(spec: Spec | str | Sequence[Spec | str]) -> Spec:
    """Normalise a config, a spec string or a list of either into one spec."""
    if isinstance(spec, str):
        return parse_spec(spec)
    if isinstance(spec, (ApproxConfig, ComposedConfig)):
        return spec
    if isinstance(spec, Sequence) and spec:
        return compose([c for item in spec for c in as_spec(item).parts()])
    raise QuadaError(f"cannot read {spec!r} as an approximation spec; pass a config, a string or a list of them")


def list_specs() -> list[tuple[str, str]]:
    """Every registered technique and preset as ``(name, one-line description)``."""
    return [(name, cls.description) for name, cls in REGISTRY.items()] + [
        (name, description) for name, (description, _) in PRESETS.items()
    ]


def spec_label(spec: str) -> str:
    """A short name for a canonical spec string: the preset it expands to (``paper:bolt``), else
    the spec itself. Stores key conditions by the full spec; tables and plots show this."""
    for name, (_, text) in PRESETS.items():
        if str(parse_spec(text)) == spec:
            return name
    return spec


def short_label(spec: str) -> str:
    """A condition's name for a chart or a table cell: the preset's name, else each part's technique
    with its numeric options and layers (``noise std=0.3``, ``teal sparsity=0.5 layers=0:4``); the
    reports give the full spec beside it. Text that is no spec (a deployment) is returned as it is."""
    label = spec_label(spec)
    if label != spec:
        return label
    try:
        parts = parse_spec(spec).parts()
    except QuadaError:
        return spec
    names = []
    for part in parts:
        numbers = [f"{f.name}={_format(getattr(part, f.name))}" for f in dataclasses.fields(part)
                   if f.name != "layers" and isinstance(getattr(part, f.name), (int, float))
                   and not isinstance(getattr(part, f.name), bool) and getattr(part, f.name) != f.default]
        layers = [f"layers={part.layers}"] if part.layers is not None else []
        names.append(" ".join([part.name, *numbers, *layers]))
    return " + ".join(names)


# --------------------------------------------------------------------------- installation



class Installation:
    """Records every change made to a model so that ``undo`` restores it exactly.

    Also holds what the installed techniques share: the rows of the decoder's current forward pass
    and the keyed random draws made from them (:meth:`draws`), the per-(layer, site) zero counters
    behind the sparsity report, and the input scales folded into weights (the profiler multiplies
    them back to compare activations in original coordinates).

    ``lifted()`` takes the changes off for the duration of a block and puts them back, so a
    nested ``apply`` calibrates on the clean model.
    """

    def __init__(self, seed: int):
        check_seed(seed)
        self.seed = seed
        self.counters: dict[tuple[int, str], torch.Tensor] = {}
        self.input_scales: dict[tuple[int, str], torch.Tensor] = {}
        self._undo: list[Callable[[], None]] = []
        self._edits: list[tuple[Callable[[], None], Callable[[], None]]] = []  # (redo, undo) of swaps and data
        self._lifted = False
        self._rows: Rows | None = None
        self._rows_on: dict[torch.device, Rows] = {}
        self._part = ("", 0)

    def track_rows(self, base: nn.Module) -> None:
        """Read which prompt and position every row and token holds from each forward call of the
        decoder ``base`` (see :mod:`quada.approx.rows`). The rows stay until the next call, so a
        layer recomputed for the backward pass (gradient checkpointing) draws what it drew forward."""

        def read(_module, args, kwargs):
            self._rows, self._rows_on = rows_of_forward(args, kwargs), {}

        self._undo.append(base.register_forward_pre_hook(read, with_kwargs=True).remove)

    def rows_for(self, x: torch.Tensor) -> Rows:
        """The rows of ``x``, a (batch, seq, ...) activation of the current forward pass, on its
        device."""
        rows = self._rows or rows_of_shape(x)
        if x.dim() < 3 or tuple(x.shape[:2]) != tuple(rows.positions.shape):
            raise QuadaError(
                f"an approximation met an activation of shape {tuple(x.shape)} where the forward pass has "
                f"{tuple(rows.positions.shape)} (batch, tokens); it cannot tell which prompt and position its "
                "entries belong to. Approximations hook (batch, tokens, ...) activations of decoder layers"
            )
        if x.device not in self._rows_on:
            self._rows_on[x.device] = rows.to(x.device)
        return self._rows_on[x.device]

    def begin_part(self, config: ApproxConfig, occurrence: int) -> None:
        """The next hooks belong to ``config``, the ``occurrence``-th part of the spec with its form."""
        self._part = (str(config.without_layers()), occurrence)

    def stream(self, layer: int, site: str) -> int:
        """The stream key of the current part's draws at ``site`` of decoder ``layer``: fixed by
        the draw scheme, the seed, the part (without its layers, so a layer gets the same draws
        whichever other layers the part covers), the layer and the site."""
        part, occurrence = self._part
        return key64(DRAW_SCHEME, self.seed, part, occurrence, layer, site)

    def draws(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """32-bit draws shaped like ``x`` (batch, seq, ...), each a pure function of (``stream``,
        the row's prompt, the token's position, the channel: the index among a token's entries);
        see :mod:`quada.approx.draws`."""
        rows = self.rows_for(x)
        return uniform_bits(stream, rows.keys, rows.positions, x[0, 0].numel()).reshape(x.shape)

    def transform_output(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], prepend: bool = False):
        """Replace ``module``'s output ``y`` with ``fn(y)`` (a forward hook)."""
        hook = lambda _m, _args, out: None if self._lifted else fn(out)  # noqa: E731  (None keeps the output)
        self._undo.append(module.register_forward_hook(hook, prepend=prepend).remove)

    def transform_input(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], prepend: bool = False):
        """Replace ``module``'s first positional input ``x`` with ``fn(x)`` (a forward pre-hook)."""
        hook = lambda _m, args: None if self._lifted else (fn(args[0]), *args[1:])  # noqa: E731
        self._undo.append(module.register_forward_pre_hook(hook, prepend=prepend).remove)

    def swap(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        """Replace the child module ``parent.name``; the original object comes back on undo."""
        old = getattr(parent, name)
        self._edit(lambda: setattr(parent, name, new), lambda: setattr(parent, name, old))

    def replace_data(self, param: torch.Tensor, new: torch.Tensor) -> None:
        """Point a parameter at new data; the untouched original tensor comes back on undo."""
        old = param.data
        new = new.to(old.dtype)
        self._edit(lambda: setattr(param, "data", new), lambda: setattr(param, "data", old))

    def _edit(self, redo: Callable[[], None], undo: Callable[[], None]) -> None:
        redo()
        self._edits.append((redo, undo))
        self._undo.append(undo)

    @contextmanager
    def lifted(self) -> Iterator[None]:
        """Inside the block the model runs as if nothing were installed: hooks pass their tensor
        through, swaps and weight edits are reverted; all of it is back on exit. Hooks stay
        registered, so their order among other hooks is kept."""
        self._lifted = True
        for _, undo in reversed(self._edits):
            undo()
        try:
            yield
        finally:
            for redo, _ in self._edits:
                redo()
            self._lifted = False

    def counter(self, layer: int, site: str, device: torch.device) -> torch.Tensor:
        """A ``[zeroed, total]`` count that sparsifying hooks add to, on the layer's ``device`` (so
        counting never waits for the device)."""
        return self.counters.setdefault((layer, site), torch.zeros(2, dtype=torch.long, device=device))

    def undo(self) -> None:
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as err:  # keep undoing the rest, then re-raise the first
                errors.append(err)
        if errors:
            raise errors[0]


@dataclass
class Applied:
    """What ``apply`` yields: the installed parts with their resolved layers, and live reports."""

    parts: tuple[tuple[ApproxConfig, tuple[int, ...]], ...]
    installation: Installation = field(repr=False)

    def __str__(self) -> str:
        """Canonical spec with every part's layers made explicit (a key for results)."""
        return " + ".join(str(dataclasses.replace(c, layers=_as_selection(ls))) for c, ls in self.parts)

    def sparsity(self) -> dict[tuple[int, str], float]:
        """Fraction of activations zeroed so far, per (layer, site), by sparsifying parts."""
        return {key: float(c[0] / c[1]) if c[1] else 0.0 for key, c in sorted(self.installation.counters.items())}


def _as_selection(layers: tuple[int, ...]) -> LayerSelection:
    if len(layers) > 1 and layers == tuple(range(layers[0], layers[-1] + 1)):
        return LayerSelection(start=layers[0], stop=layers[-1] + 1)
    return LayerSelection(indices=layers)


Handler = Callable[..., None]
Preparer = Callable[..., Any]
HANDLERS: dict[type, tuple[Handler, Preparer | None]] = {}
# The installations of the ``apply`` blocks open on each model, outermost first.
ACTIVE_INSTALLATIONS: weakref.WeakKeyDictionary[nn.Module, list[Installation]] = weakref.WeakKeyDictionary()


def installs(config_cls: type, prepare: Preparer | None = None):
    """Decorator registering ``install(config, target, layers, ctx, prepared)`` for a config class
    (and its subclasses). ``prepare(config, target, calibration)`` runs first, on the clean model
    (enclosing ``apply`` blocks lifted), for techniques that calibrate."""

    def decorate(fn: Handler) -> Handler:
        HANDLERS[config_cls] = (fn, prepare)
        return fn

    return decorate


def _handler(config: ApproxConfig) -> tuple[Handler, Preparer | None]:
    for cls in type(config).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    raise QuadaError(f"no installer is registered for {type(config).__name__}")


@contextmanager
def apply(
    model: nn.Module,
    spec: Spec | str | Sequence[Spec | str],
    layers: Any = None,
    seed: int = 0,
    tokenizer: Any = None,
    calibration_prompts: Sequence[str] | None = None,
) -> Iterator[Applied]:
    """Run ``model`` under an activation approximation inside a ``with`` block.

    ``spec``: a config, a spec string or a list of them (composed in order). ``layers``: the
    decoder layers for parts that do not name their own (a range, a slice string like "0:4", a
    list of ints; None = all). ``seed`` keys every random draw, together with the technique, the
    layer, the site, the prompt of the row, the token's position and the channel (see
    :mod:`quada.approx.draws` and :mod:`quada.approx.rows`): a prompt draws the same noise in any
    batch and on any device. Calibrated
    techniques (TEAL, CATS, SmoothQuant, OmniQuant) need ``tokenizer``; they calibrate on
    ``calibration_prompts`` (default: bundled benign prompts) and cache the result per model.
    Calibration always sees the clean model: inside another ``apply`` block on the same model,
    that block's changes are lifted while calibrating. On exit, also by exception, every hook,
    swap and weight edit is undone and the model is bit-identical to before.
    """
    from quada.approx.activation_stats import CalibrationSet
    from quada.approx.sites import resolve_decoder

    configs = sorted(as_spec(spec).parts(), key=lambda c: c.order)
    decoder = resolve_decoder(model)
    resolved = resolve_layers(configs, len(decoder.layers), LayerSelection.coerce(layers))
    calibration = CalibrationSet.of(tokenizer, calibration_prompts)
    active = ACTIVE_INSTALLATIONS.setdefault(decoder.model, [])
    prepared = []
    with ExitStack() as lifts:  # calibrate on the clean model: enclosing blocks lifted, nothing installed yet
        for outer in reversed(active):
            lifts.enter_context(outer.lifted())
        for config in configs:
            _, prepare = _handler(config)
            prepared.append(prepare(config, decoder, calibration) if prepare else None)
    ctx = Installation(seed)
    active.append(ctx)
    try:
        ctx.track_rows(decoder.base)
        forms = []
        for config, chosen, state in zip(configs, resolved, prepared):
            form = str(config.without_layers())
            ctx.begin_part(config, forms.count(form))
            forms.append(form)
            install, _ = _handler(config)
            install(config, decoder, chosen, ctx, state)
        yield Applied(tuple(zip(configs, resolved)), ctx)
    finally:
        active.remove(ctx)
        ctx.undo()
