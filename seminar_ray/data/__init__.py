"""Data layer: the Parquet tables of docs/design.md (Data model), their readers and generator, splits and the Ray Data
pipeline."""
