"""Errors that reach users as one clear message instead of a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input from the user (config, paths, names, data). The CLI prints it and exits 2."""

    exit_code = 2


class TrainingDiverged(UserError):
    """Training produced a non-finite loss or gradients (``run.on_nonfinite``); nothing of the
    bad step was applied or saved. The CLI prints it and exits 3."""

    exit_code = 3


def unknown_name(kind: str, name: str, choices: Iterable[str], hint: str = "") -> UserError:
    """A ``UserError`` for an unregistered ``name`` that lists close matches and all choices."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(str(name), choices, n=3)
    msg = f"unknown {kind} {name!r}."
    if close:
        msg += f" Did you mean: {', '.join(close)}?"
    msg += f" Registered {kind}s: {', '.join(choices)}."
    if hint:
        msg += " " + hint
    return UserError(msg)
