"""Readers of public input formats into the tables of docs/design.md, Data model."""
