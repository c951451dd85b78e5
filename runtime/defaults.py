"""Runtime defaults chosen by measurement on the 300-W validation split (docs/MODEL.md "Runtime defaults").

A light module (no onnxruntime) so the CLI can show them in --help.
"""

# Extra passes re-cropped on the previous pass's landmarks (facemark.inference).
DEFAULT_REFINE = 1
# Faces whose presence score is below this are dropped (models with a presence head).
DEFAULT_MIN_SCORE = 0.93
# Video: every third periodic detection scans the whole frame (with --detect-every 10: every 30 frames, one
# second at 30 fps, for faces that enter); the others search around the tracked faces only (runtime.video).
DEFAULT_FULL_SCAN_EVERY = 3
