"""One error type for bad input data; its message names the file, column or row that was wrong."""

from seminar_ray.errors import InputError


class DataError(InputError):
    """Raised for input that cannot become the tables of docs/design.md, Data model."""
