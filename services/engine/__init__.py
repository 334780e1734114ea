"""The inference engine: SGLang in production; here, the CPU engine that speaks the same
subset of SGLang's native HTTP API (DESIGN.md 3): ``server`` (HTTP), ``runtime`` (the batching
decode thread and weight swaps), ``decode``, ``sampling``, ``tiny_model`` (a local model)."""
