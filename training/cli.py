"""Command-line conventions: bad input ends in one `error: ...` line and exit status 2."""

from __future__ import annotations

import functools
import sys

from model.artifact import ArtifactError
from training.data import DataError

USER_ERRORS = (DataError, ArtifactError, ValueError, FileNotFoundError, PermissionError)


def one_line_errors(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def parse_int_list(text: str) -> list[int]:
    """'64,32,16,8' or '[64, 32, 16, 8]' (SageMaker hyperparameters arrive as strings)."""
    try:
        return [int(x) for x in text.strip().strip("[]").replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
