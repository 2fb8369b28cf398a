"""Readers of public input formats (FORMATS.md) into the tables of DESIGN §3."""
