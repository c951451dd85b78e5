"""Serving on Triton (docs/DESIGN.md section 8): `server` runs `facemark serve` (PyTriton), `protocol` is the wire
format both sides share (models, tensors, packing), `client` is `runtime predict --server` (tritonclient).

Nothing is imported here: each side loads only its own dependencies."""
