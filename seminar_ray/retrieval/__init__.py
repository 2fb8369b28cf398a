"""Multi-modal product-quantization retrieval of the GSU top-K (paper §3.3.3; docs/design.md, Retrieval)."""
