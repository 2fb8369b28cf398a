"""SEMINAR (arXiv 2407.10714) on Ray: data, models, retrieval, training and serving."""

__version__ = "0.1.0"
