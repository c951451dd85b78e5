"""Accuracy per millisecond: the landmark settings of one model side by side, in one run of `facemark bench`.

Each row is one setting of the same exported model (input size and precision are the file's; passes = 1 +
`refine`; test-time flip doubles every pass): validation NME end to end with the detection rate
(`facemark.runtime.evaluation.evaluate_pipeline`, the runtime's defaults otherwise), the landmark stage's ms per
face and the whole photo's fps on the composed 640x480 one-face scene at each thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from facemark.benchmarks import pipeline as pipeline_mod
from facemark.data import FaceRecord
from facemark.runtime.evaluation import evaluate_pipeline
from facemark.runtime.landmarker import FaceLandmarker

# (refine, flip): one pass, two, three, flip on one and two passes, and four passes with flip (eight model runs
# per face), the most accurate setting of the earlier models (docs/MODEL.md).
SETTINGS: tuple[tuple[int, bool], ...] = ((0, False), (1, False), (2, False), (0, True), (1, True), (3, True))


def frontier_rows(model: Path, records: Sequence[FaceRecord], threads: Sequence[int], scene_dir: Path,
                  repeats: int = 20, progress: Callable[[str], None] = lambda _m: None) -> list[dict]:
    scene = pipeline_mod.compose_scene(640, 480, 1, scene_dir)
    rows = []
    for refine, flip in SETTINGS:
        label = f"passes {refine + 1}, tta {'flip' if flip else 'none'}"
        progress(f"frontier: {label}")
        row: dict = {"passes": refine + 1, "refine": refine, "tta": "flip" if flip else "none"}
        for t in threads:
            landmarker = FaceLandmarker(model, device="cpu", threads=t, refine=refine, tta=row["tta"])
            row.setdefault("input", landmarker.contract.size)
            row.setdefault("precision", landmarker.info.precision)
            timed = pipeline_mod.time_pipeline(landmarker, scene, repeats)
            row[f"ms_per_face@{t}"] = timed["landmarks_ms"] / max(timed["faces_found"], 1)
            row[f"fps@{t}"] = timed["fps"]
        if records:
            summary = evaluate_pipeline(landmarker, records).summary(min_score=landmarker.min_score)
            row.update(nme=summary["nme"], detection_rate=summary["detection_rate"], faces=summary["annotated_faces"])
        rows.append(row)
    return rows
