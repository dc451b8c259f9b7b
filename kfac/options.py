"""The choices the KFAC rules read (:class:`RuleOptions`), and how rules of other module types add their own.

kfac's own options are ``position_norm`` and ``kfac_approx`` (see :mod:`kfac.statistics`). A package that
registers rules for its module types (:func:`kfac.rules.register_rule`) registers the options those rules
read with :func:`register_option`; they are then accepted by :func:`kfac.fit_kfac` / :func:`kfac.kfac_batch`
as keyword options, checked against their choices, and read by the rules as attributes of
:class:`RuleOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass

POSITION_NORMS = ("used", "all")
KFAC_APPROXES = ("expand", "reduce")


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    """Raise a ValueError naming ``what`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class RuleOption:
    """One choice the rules read: its ``name`` (the keyword option), allowed ``choices`` and ``default``.

    ``kron_value``: the value under which every block of the rules that read this option is one Kronecker
    product (laplace-torch's ``KronLaplace`` needs that; its backends in :mod:`kfac.laplace_backend` use this
    value and reject any other), or ``None`` when every value gives such blocks.
    """

    name: str
    choices: tuple[str, ...]
    default: str
    kron_value: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.default, self.choices, f"the default of option {self.name}")
        if self.kron_value is not None:
            check_choice(self.kron_value, self.choices, f"the kron_value of option {self.name}")


_OPTIONS: dict[str, RuleOption] = {}


def register_option(option: RuleOption) -> None:
    """Make ``option`` a keyword option of the rules (registering the same option again changes nothing;
    another option under a registered name is a ValueError)."""
    known = _OPTIONS.get(option.name)
    if known is not None and known != option:
        raise ValueError(f"a different KFAC option {option.name!r} is already registered: {known}")
    _OPTIONS[option.name] = option


def registered_options() -> tuple[RuleOption, ...]:
    """Every registered option, in registration order (kfac's own first)."""
    return tuple(_OPTIONS.values())


class RuleOptions:
    """The values of every registered option (:func:`registered_options`), as attributes: the given ``values``,
    each registered option's default otherwise.

    Raises TypeError for a name no option is registered under (the options of a package's rules are registered
    when the package is imported), ValueError for a value outside an option's choices.
    """

    def __init__(self, **values: str) -> None:
        unknown = sorted(set(values) - set(_OPTIONS))
        if unknown:
            raise TypeError(
                f"unknown KFAC option(s) {unknown}; the registered options are {sorted(_OPTIONS)} (the options "
                "of other module types' rules are registered when the package defining those rules is imported)"
            )
        for name, option in _OPTIONS.items():
            value = values.get(name, option.default)
            check_choice(value, option.choices, name)
            setattr(self, name, value)

    def __repr__(self) -> str:
        return f"RuleOptions({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


register_option(RuleOption("position_norm", POSITION_NORMS, "used"))
register_option(RuleOption("kfac_approx", KFAC_APPROXES, "expand"))
