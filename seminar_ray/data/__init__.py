"""Data layer: the Parquet tables of DESIGN §3, their readers and generator, splits and the Ray Data pipeline."""
