"""Runtime defaults chosen by measurement on the 300-W validation split (docs/MODEL.md, "Detector and presence
score (runtime defaults)" and the sections after it).

A light module (no onnxruntime) so the CLI can show them in --help.
"""

# Extra passes re-cropped on the previous pass's landmarks (facemark.inference). 0 = one landmark pass per face:
# the shipped model was trained on the crops of the calibrated Haar boxes themselves; its one pass scores the
# same mean NME end to end as its two passes (3.77 %, two passes only lower the failure rate) at about half the
# landmark time (docs/MODEL.md, "One pass on the real first-pass boxes"); `--preset accurate` adds a pass and
# test-time flip (3.68 %).
DEFAULT_REFINE = 0
# Faces whose presence score is below this are dropped (models with a presence head).
# 0.99: with the permissive detector (single cascade hits kept) the shipped model scores its validation faces
# 1.0 but two (0.69, 0.89, lost at any threshold above 0.9), so every threshold from 0.9 to 0.999 keeps the same
# faces; false boxes score 0.78, 0.90, 0.98 (a dog photo) and one 1.0. 0.99 clears all but the last.
DEFAULT_MIN_SCORE = 0.99
# Video: every third periodic detection scans the whole frame (with --detect-every 10: every 30 frames, one
# second at 30 fps, for faces that enter); the others search around the tracked faces only (runtime.video).
DEFAULT_FULL_SCAN_EVERY = 3

# `facemark serve` (runtime.serving.server): the SIGTERM drain and what one request may hold, sized for 2 cores
# and a few GB (a full dynamic batch of 16 requests at the pixel limit decodes to about 16 x 72 MB of BGR pixels).
DEFAULT_GRACE_S = 30
DEFAULT_MAX_REQUEST_MB = 32.0  # encoded bytes of a request's images
DEFAULT_MAX_IMAGES = 8  # images per request
DEFAULT_MAX_MEGAPIXELS = 24.0  # decoded, the request's images together (one 6000x4000 photo)
