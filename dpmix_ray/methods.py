"""The methods, in one table: what each implies and requires of the per-example group, what it reads.

Read by config validation (implied counts, refusals), the sweep plan (what a group fixes, which
searched keys it ignores) and the trainer (whether it self-augments). ``dpsgd``, ``augmult``,
``dpmix_self`` and ``dpmix_diff`` are one code path with different counts (K self-augmentations,
m self-mixups, n diffusion-mixups); ``nonprivate`` is the reference ceiling.

Pure: no torch, no pydantic, no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

MethodName = Literal["nonprivate", "dpsgd", "augmult", "dpmix_self", "dpmix_diff"]

K, M, N = "mix.aug_multiplicity", "mix.self_mix", "mix.diff_mix"
_SELF_MIX_KEYS = ("mix.alpha",)
_DIFF_MIX_KEYS = ("mix.synthetic", "mix.diff_pairing")


@dataclass(frozen=True)
class Method:
    """One method's rules.

    ``fixed``: counts the method pins; a config that leaves them unset gets them, one that sets another
    value is refused (``hint`` says what to use instead). ``at_least``: counts it needs at or above a
    floor. ``ignores``: config keys (or prefixes) it never reads, so a sweep does not search them for it.
    ``augments``: whether examples are self-augmented (crops, flips) before the group is formed.
    """

    name: MethodName
    private: bool
    fixed: Mapping[str, int] = field(default_factory=dict)
    at_least: Mapping[str, int] = field(default_factory=dict)
    ignores: tuple[str, ...] = ()
    augments: bool = True
    hint: str = ""

    def problems(self, counts: Mapping[str, int]) -> str | None:
        """Why ``counts`` (K, m, n by dotted key) do not fit this method, in one line; None when they do."""
        wrong = {k: v for k, v in self.fixed.items() if counts[k] != v}
        if wrong:
            need = ", ".join(f"{k}={v}" for k, v in self.fixed.items())
            return f"method {self.name} needs {need}" + (f" ({self.hint})" if self.hint else "")
        short = [f"{k} >= {v}" for k, v in self.at_least.items() if counts[k] < v]
        if short:
            return f"method {self.name} needs {', '.join(short)}" + (f" ({self.hint})" if self.hint else "")
        return None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        # The reference ceiling: no clipping, no noise, so nothing under privacy.* is read.
        Method("nonprivate", private=False, ignores=("privacy.",)),
        # Plain DP-SGD on the raw images, as in Opacus and the literature: one augmented view without
        # multiplicity only adds variance (De et al. 2022).
        Method("dpsgd", private=True, fixed={K: 1, M: 0, N: 0}, ignores=(K, M, N, *_SELF_MIX_KEYS, *_DIFF_MIX_KEYS),
               augments=False, hint="use augmult for K>1"),
        Method("augmult", private=True, fixed={M: 0, N: 0}, ignores=(M, N, *_SELF_MIX_KEYS, *_DIFF_MIX_KEYS),
               hint="use dpmix_self / dpmix_diff"),
        Method("dpmix_self", private=True, fixed={N: 0}, ignores=(N, *_DIFF_MIX_KEYS), hint="use dpmix_diff"),
        Method("dpmix_diff", private=True, at_least={N: 1}),
    )
}
if tuple(METHODS) != get_args(MethodName):  # the Literal (for the schema) and the table name the same methods
    raise RuntimeError("methods.METHODS and methods.MethodName disagree")


def get(name: str) -> Method:
    return METHODS[name]


def ignores(name: str, key: str) -> bool:
    """Whether method ``name`` never reads config key ``key``."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in METHODS[name].ignores)
