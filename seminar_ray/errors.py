"""The project's own error types: what a user can fix from the command line, as opposed to a bug.

`seminar_ray.runtime.run_cli` prints an `InputError` (or a missing input file) as one line and exits 2; any other
exception is a bug here or in a dependency and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input a user can fix: a flag, a path, a config value, a checkpoint that does not fit the data."""
