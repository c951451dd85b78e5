"""facemark.export: checkpoint -> ONNX (opset 17) with verified parity, fp16 and int8 variants.

Import `facemark.export.exporter.export_model` for the library API; this package imports nothing heavy itself,
so `facemark.export.cli` stays light.
"""
