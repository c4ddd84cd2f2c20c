"""Options of (IA)^3 (``method=ia3``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError, check, opt


def check_module_names(value: list[str] | str | None, key: str, *, allow_empty: bool) -> list[str] | str | None:
    """Validate a target list (names or one regex string); returns a list copy or the string.

    Raises:
        ConfigError: ``value`` is not a list of non-empty strings or a non-empty string (or is empty when
            ``allow_empty`` is False).
    """
    if value is None or isinstance(value, str):
        check(value is None or bool(value.strip()), key, "must not be empty")
        return value
    names_ok = isinstance(value, (list, tuple)) and all(isinstance(t, str) and t for t in value)
    if not names_ok or (not value and not allow_empty):
        raise ConfigError(f"{key}: expected a {'' if allow_empty else 'non-empty '}list of names (e.g. [k, v, down]) "
                          f"or a regex string, got {value!r}")
    return list(value)


@dataclass
class IA3Config:
    target_modules: list[str] | str = opt(
        ["k", "v", "down"],
        "layers to rescale: canonical q k v o gate up down (GPT-2 q/k/v are slices of c_attn), module-name suffixes "
        "(c_attn, k_proj, ...), or one regex string; default: keys, values and the FFN down projection's input",
    )
    feedforward_modules: list[str] | str | None = opt(
        None,
        "targets whose INPUT is rescaled (a whole layer, a subset of target_modules, as PEFT's feedforward_modules); "
        "the others have their output rescaled; null: the FFN down projection (down) when it is targeted",
    )

    def __post_init__(self) -> None:
        self.target_modules = check_module_names(self.target_modules, "method.target_modules", allow_empty=False)
        check(self.target_modules is not None, "method.target_modules", "must not be null")
        self.feedforward_modules = check_module_names(self.feedforward_modules, "method.feedforward_modules",
                                                      allow_empty=True)
