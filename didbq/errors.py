"""Errors a user can fix: the CLI prints them as one line and exits with code 2 (no traceback unless --debug)."""
from __future__ import annotations


class DidbqError(Exception):
    """Bad input or an unsupported model: the message names the problem and the fix."""

    exit_code = 2


class RecipeError(DidbqError):
    """A recipe that cannot be read or validated; the message names the file, line and key path."""


class UnsupportedModelError(DidbqError):
    """A model or attention class that didbq cannot convert (in strict mode)."""


class ConversionCheckError(DidbqError):
    """The post-swap check found a binary layer that never ran, or non-finite outputs."""


class StudyError(DidbqError):
    """A study file that cannot be read or validated, or a study folder that does not match it."""
