"""The divergences between two softmax rows, each named once: its parameters and their checks, its kernels' id
and parameter (divergence_with_logits_fwd; csrc/divergences.h, triton_kernels/divergences.py), its float64
reference, and the parameters at which it is the KL (then the KL op's kernels run, exactly). Every entry point
that takes a divergence by name reads this table: the row losses, linear_distillation_loss, the vocab-parallel
losses, the benchmarks and the cross-cutting tests (which iterate it)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

from kl_ext import reference


def _unit(name: str, closed_right: bool, meaning: str) -> Callable[[float], None]:
    """A check that the parameter is a number in [0, 1] ([0, 1) unless closed_right)."""
    def check(value) -> None:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and \
            0 <= value and (value <= 1 if closed_right else value < 1)
        if not ok:
            raise ValueError(f"kl_ext: {name} must be a number in [0, {1 if closed_right else '1)'}"
                             f"{']' if closed_right else ''} ({meaning}), got {value!r}")
    return check


@dataclasses.dataclass(frozen=True)
class Divergence:
    """One divergence D(p || q) between the teacher p and the student q = softmax(input / T).

    params: its parameters' names and defaults (None: no default, the caller must give it); checks: per
    parameter. kernel: divergence_with_logits_fwd's name for it; kernel_param(params) its one float parameter.
    kl(params): "forward" / "reverse" where it equals KL(p || q) / KL(q || p), else None. reference(**params)
    the float64-capable reference with its parameters bound. functional: (the kl_ext function of its row loss,
    the arguments that select it there). sparse: whether a top-k teacher is supported."""
    name: str
    params: dict
    checks: dict
    kernel: str
    kernel_param: Callable[[dict], float]
    kl: Callable[[dict], Optional[str]]
    reference: Callable[..., Callable]
    functional: tuple
    sparse: bool = False


_beta = _unit("beta", True, "the teacher's weight in the mixture m: 0 is KL(teacher || student), 1 KL(student || "
              "teacher), 0.5 the symmetric JSD")
_alpha = _unit("alpha", False, "the mixture's weight on the loss's own side: the teacher's for the skew KL "
               "(direction='forward'), the student's for the skew reverse KL; 0 is the KL")

REGISTRY = {d.name: d for d in (
    # KL(p || q), the distillation loss
    Divergence("kl", {}, {}, "jsd", lambda a: 0.0, lambda a: "forward",
               lambda: functools.partial(reference.kl_div_with_logits, direction="forward"),
               ("kl_div_with_logits", {"direction": "forward"}), sparse=True),
    # KL(q || p), mode-seeking
    Divergence("reverse_kl", {}, {}, "jsd", lambda a: 1.0, lambda a: "reverse",
               lambda: functools.partial(reference.kl_div_with_logits, direction="reverse"),
               ("kl_div_with_logits", {"direction": "reverse"})),
    # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
    Divergence("jsd", {"beta": 0.5}, {"beta": _beta}, "jsd", lambda a: a["beta"],
               lambda a: {0: "forward", 1: "reverse"}.get(a["beta"]),
               lambda beta: functools.partial(reference.jsd_with_logits, beta=beta), ("jsd_with_logits", {})),
    # 1/2 sum |p - q|
    Divergence("tvd", {}, {}, "tvd", lambda a: 0.0, lambda a: None, lambda: reference.tvd_with_logits,
               ("tvd_with_logits", {})),
    # KL(p || alpha p + (1 - alpha) q)
    Divergence("skew_kl", {"alpha": 0.1}, {"alpha": _alpha}, "skew_forward", lambda a: a["alpha"],
               lambda a: "forward" if a["alpha"] == 0 else None,
               lambda alpha: functools.partial(reference.skew_kl_div_with_logits, alpha=alpha, direction="forward"),
               ("skew_kl_div_with_logits", {"direction": "forward"})),
    # KL(q || alpha q + (1 - alpha) p)
    Divergence("skew_reverse_kl", {"alpha": 0.1}, {"alpha": _alpha}, "skew_reverse", lambda a: a["alpha"],
               lambda a: "reverse" if a["alpha"] == 0 else None,
               lambda alpha: functools.partial(reference.skew_kl_div_with_logits, alpha=alpha, direction="reverse"),
               ("skew_kl_div_with_logits", {"direction": "reverse"})),
)}
NAMES = tuple(REGISTRY)


@dataclasses.dataclass(frozen=True)
class Bound:
    """A divergence with its parameters checked: what the kernels and the reference take."""
    name: str
    params: tuple  # ((name, value), ...), in the registry's order
    kernel: str
    param: float
    kl: Optional[str]  # the KL direction it equals, or None

    def op(self, temperature: float):
        """(op name, its options after target_type): the KL op where the divergence is the KL, exactly."""
        if self.kl is not None:
            return "kl_div_with_logits_fwd", (temperature, self.kl)
        return "divergence_with_logits_fwd", (temperature, self.kernel, self.param)

    def reference(self) -> Callable:
        return REGISTRY[self.name].reference(**dict(self.params))

    def functional(self) -> Callable:
        """Its public row loss, e.g. kl_ext.jsd_with_logits with beta bound."""
        import kl_ext
        name, fixed = REGISTRY[self.name].functional
        return functools.partial(getattr(kl_ext, name), **fixed, **dict(self.params))


def bind(name: str, **given) -> Bound:
    """The divergence `name` with its parameters (those in `given` that it takes; a None value: its default),
    checked. Parameters it does not take are ignored (linear_distillation_loss passes both alpha and beta)."""
    # Per call on small losses: the checks run once per distinct setting. A plain dict (Dynamo traces into
    # functools.lru_cache wrappers, with a warning), looked up without hash() (which Dynamo on torch 2.11 cannot
    # trace).
    key = (name, *sorted((k, type(v), v) for k, v in given.items()))
    try:
        return _BOUND[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable value: checked (and refused) below
        return _bind(name, given)
    if len(_BOUND) >= 256:
        _BOUND.clear()
    _BOUND[key] = bound = _bind(name, given)
    return bound


_BOUND: dict = {}


def _bind(name, given):
    d = REGISTRY.get(name)
    if d is None:
        raise ValueError(f"kl_ext: divergence must be one of {', '.join(repr(n) for n in NAMES)}; got {name!r}")
    values = {}
    for p, default in d.params.items():
        v = given.get(p)
        if v is None:
            v = default
        if v is None:
            raise ValueError(f"kl_ext: divergence {name!r} needs {p}=")
        d.checks[p](v)
        values[p] = float(v)
    return Bound(name, tuple(values.items()), d.kernel, float(d.kernel_param(values)), d.kl(values))


def kernel_bound(kernel: str, param: float) -> Bound:
    """The Bound of divergence_with_logits_fwd's (divergence, param) as DivergenceWithLogitsFunction takes them."""
    for d in REGISTRY.values():
        if d.kernel == kernel and len(d.params) == 1:
            (p,) = d.params
            return bind(d.name, **{p: param})
    if kernel == "tvd":
        return bind("tvd")
    raise ValueError(f"kl_ext: divergence must be one of 'jsd', 'tvd', 'skew_forward', 'skew_reverse'; got "
                     f"{kernel!r}")
