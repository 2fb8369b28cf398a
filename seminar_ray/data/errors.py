"""One error type for bad input data; its message names the file, column or row that was wrong."""


class DataError(ValueError):
    """Raised for input that cannot become the tables of docs/design.md, Data model."""
