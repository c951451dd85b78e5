// The browser module's crop, decode and Haar detector without a browser: facemark.js on onnxruntime-node and
// OpenCV.js in Node. tests/test_web.py feeds it gray images and boxes and compares every answer with the Python
// runtime (CropContract.prepare, LandmarkModel, HaarDetector).
//
//   node web/test/node_check.mjs FOLDER < cases.json > answers.json
// FOLDER: a `facemark web` folder. cases.json: {"images": [{"width", "height", "gray": base64 bytes,
// "boxes": [[x, y, w, h], ...]}]}. answers.json: per image, each box's crop (base64), network input sum,
// decoded points, scores; and the image's Haar detections and calibrated boxes.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const require = createRequire(import.meta.url);
const folder = resolve(process.argv[2]);
const { FaceLandmarker, readyOpenCv, calibrate } = await import(pathToFileURL(join(folder, "facemark.js")).href);
const ort = require("onnxruntime-node");
const cv = await readyOpenCv(require("@techstark/opencv-js"));

const landmarker = await FaceLandmarker.create({
  ort, cv, base: folder, fetchBytes: async (path) => new Uint8Array(readFileSync(path)),
  sessionOptions: { executionProviders: ["cpu"], intraOpNumThreads: 1 },
});
const cases = JSON.parse(readFileSync(0, "utf8"));
const size = landmarker.contract.size;
const answers = [];
for (const image of cases.images) {
  const gray = new cv.Mat(image.height, image.width, cv.CV_8UC1);
  gray.data.set(Buffer.from(image.gray, "base64"));
  const crops = [];
  const { input, matrices } = landmarker.prepare(gray, image.boxes);
  for (let i = 0; i < image.boxes.length; i++) {
    const crop = input.subarray(i * size * size, (i + 1) * size * size);
    crops.push({ input: Buffer.from(crop.buffer, crop.byteOffset, crop.byteLength).toString("base64"), matrix: matrices[i] });
  }
  const predicted = await landmarker.predictFaces(gray, image.boxes);
  const detections = landmarker.detector.detect(gray);
  answers.push({
    crops,
    faces: predicted.map((p) => ({ landmarks: p.landmarks, score: p.score, landmark_scores: p.landmark_scores })),
    detections: detections.map((d) => ({ box: d.box, score: d.score, calibrated: calibrate(landmarker.calibration, d.box) })),
    pipeline: FaceLandmarker.imageEntry("gray", await landmarker.detectGray(gray)).faces,
  });
  gray.delete();
}
process.stdout.write(JSON.stringify({ precision: landmarker.info.precision, contract: landmarker.contract, answers }));
landmarker.delete();
