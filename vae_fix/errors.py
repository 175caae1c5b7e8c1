"""The two exception types the engine raises on bad input.

Both subclass ValueError so callers that only know Python's conventions still catch them.
Messages always name the input, what was wrong and what was expected.
"""


def short(text: str, limit: int = 120) -> str:
    """A key or value as a message quotes it: whole when short, else its start and length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class VAEFixError(ValueError):
    """Base class of every error the engine raises on purpose."""


class VAELoadError(VAEFixError):
    """A VAE file or folder could not be loaded: unreadable, not a VAE, or not matching its layout."""

    def __init__(self, path, problem: str, expected: str = "", keys=()):
        keys = list(keys)
        parts = [f"Cannot load VAE '{path}': {problem}."]
        if keys:
            shown = ", ".join(short(str(k)) for k in keys[:5])
            more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
            parts.append(f"First offending keys: {shown}{more}.")
        if expected:
            parts.append(f"Expected {expected}.")
        super().__init__(" ".join(parts))
        self.path, self.problem, self.expected, self.keys = str(path), problem, expected, keys


class InputError(VAEFixError):
    """An argument (image, latent, mask, option) is not what the function needs."""

    def __init__(self, name: str, problem: str, expected: str = ""):
        msg = f"Invalid {name}: {problem}."
        if expected:
            msg += f" Expected {expected}."
        super().__init__(msg)
        self.name, self.problem, self.expected = name, problem, expected


def check_rules(settings, rules) -> None:
    """Raise for the first `(field name, ok, expected)` of `rules` that is not ok, naming the field's value."""
    for name, ok, expected in rules:
        if not ok:
            raise InputError(name, f"{getattr(settings, name)!r}", expected)
