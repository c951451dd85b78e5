// facemark.js: 68-point face landmarks in the browser (or Node) from the file `facemark export` writes.
//
// The same pipeline as the Python runtime (facemark.runtime.FaceLandmarker), step for step:
//   OpenCV's Haar cascade (OpenCV.js: the same cascade file and settings), or a CNN detector (CenterFace,
//   FaceBoxesV2: the file `facemark detectors fetch` caches, on ONNX Runtime) -> the detector calibration (Haar's
//   read from the model's metadata, a CNN detector's from the runtime's table) -> the crop contract read from the model's metadata (square box, one affine warp,
//   grayscale, normalisation: facemark/contract.py) -> ONNX Runtime -> points mapped back to image pixels ->
//   presence threshold and duplicate faces removed.
// The folder's facemark-web.json (written by `facemark web` from the Python runtime's own settings) names the
// model, the cascade file and the detector / pipeline settings; nothing is restated here by hand.
//
// Usage (browser, ES module):
//   import { loadBrowserRuntimes, FaceLandmarker } from "./facemark.js";
//   const { ort, cv } = await loadBrowserRuntimes({ threads: 1 });
//   const landmarker = await FaceLandmarker.create({ ort, cv });    // reads ./facemark-web.json
//   const result = await landmarker.detectImageData(imageData);     // ImageData (RGBA) of the photo
//   result.faces[i].landmarks: 68 [x, y] in image pixels; .score, .landmark_scores, .box; result.times (ms)
// Node: pass onnxruntime-node as `ort`, OpenCV.js as `cv`, and `fetchBytes` (a path -> Uint8Array reader).

export const CONFIG_FILE = "facemark-web.json";
const METADATA_PREFIX = "facemark.";
const ONNX_METADATA_PROPS_FIELD = 14; // ModelProto.metadata_props (onnx.proto3)

// ---------------------------------------------------------------------------------------------------------
// Loading the runtimes (browser)

/** ONNX Runtime Web (WebAssembly) and OpenCV.js from this folder (no CDN). threads > 1 needs
 *  crossOriginIsolated (the COOP/COEP headers, docs/WEB.md); without it ONNX Runtime Web falls back to 1. */
export async function loadBrowserRuntimes({ base = new URL(".", import.meta.url).href, threads = 1 } = {}) {
  const ort = await import(new URL("ort/ort.wasm.min.mjs", base).href);
  ort.env.wasm.wasmPaths = new URL("ort/", base).href;
  ort.env.wasm.numThreads = threads;
  const cv = await loadOpenCvScript(new URL("opencv/opencv.js", base).href);
  return { ort, cv };
}

async function loadOpenCvScript(url) {
  if (!globalThis.cv) {
    await new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = url;
      script.async = true;
      script.onload = resolve;
      script.onerror = () => reject(new Error(`${url}: could not load OpenCV.js`));
      document.head.appendChild(script);
    });
  }
  return readyOpenCv(globalThis.cv);
}

/** OpenCV.js's module object once its WebAssembly is initialised (it is a promise in some builds). */
export async function readyOpenCv(cv) {
  if (cv instanceof Promise) cv = await cv;
  if (!cv.Mat) await new Promise((resolve) => (cv.onRuntimeInitialized = resolve));
  return cv;
}

async function fetchBytesHttp(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

// ---------------------------------------------------------------------------------------------------------
// Model metadata: ModelProto.metadata_props, read from the file's protobuf (ONNX Runtime Web does not expose it)

function readVarint(bytes, state) {
  let value = 0;
  let shift = 1;
  for (;;) {
    const byte = bytes[state.pos++];
    if (byte === undefined) throw new Error("truncated protobuf");
    value += (byte & 0x7f) * shift;
    if (byte < 0x80) return value;
    shift *= 128;
  }
}

function protobufFields(bytes, start, end, visit) {
  const state = { pos: start };
  while (state.pos < end) {
    const key = readVarint(bytes, state);
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 0) readVarint(bytes, state);
    else if (wire === 1) state.pos += 8;
    else if (wire === 5) state.pos += 4;
    else if (wire === 2) {
      const length = readVarint(bytes, state);
      visit(field, state.pos, state.pos + length);
      state.pos += length;
    } else throw new Error(`unsupported protobuf wire type ${wire}`);
  }
  if (state.pos !== end) throw new Error("malformed protobuf");
}

/** The model's metadata_props as {key: value} (every key, facemark's among them). */
export function readOnnxMetadata(bytes) {
  const decoder = new TextDecoder();
  const props = {};
  protobufFields(bytes, 0, bytes.length, (field, start, end) => {
    if (field !== ONNX_METADATA_PROPS_FIELD) return;
    let key = "";
    let value = "";
    protobufFields(bytes, start, end, (inner, s, e) => {
      if (inner === 1) key = decoder.decode(bytes.subarray(s, e));
      if (inner === 2) value = decoder.decode(bytes.subarray(s, e));
    });
    props[key] = value;
  });
  return props;
}

/** The crop contract and detector calibration from facemark metadata (facemark/metadata.py's keys). */
export function parseModelInfo(props, keys, source) {
  if (!(keys.contract in props)) {
    throw new Error(`${source}: not a facemark model (no '${keys.contract}' in its metadata)`);
  }
  const contract = JSON.parse(props[keys.contract]);
  const calibration = props[keys.detector_calibration] ? JSON.parse(props[keys.detector_calibration]) : null;
  return { contract, calibration, precision: props[keys.precision] || "fp32" };
}

// ---------------------------------------------------------------------------------------------------------
// Numbers as Python and OpenCV round them

/** Python's round() and numpy's rint: halves to even. */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function rounded(value, digits) {
  const scale = 10 ** digits;
  return roundHalfEven(value * scale) / scale;
}

// ---------------------------------------------------------------------------------------------------------
// The crop contract (facemark/contract.py)

/** CropContract.crop_matrix: image -> crop, 2x3 as [a, b, c, d, e, f] (rows). */
export function cropMatrix(contract, box) {
  const [x, y, w, h] = box;
  const side = contract.scale * Math.max(w, h, 1.0);
  const s = contract.size / side;
  const cx = x + w / 2.0;
  const cy = y + h / 2.0;
  return [s, 0.0, -s * (cx - side / 2.0) - 0.5, 0.0, s, -s * (cy - side / 2.0) - 0.5];
}

/** cv2.invertAffineTransform. */
export function invertAffine(m) {
  const [a, b, c, d, e, f] = m;
  let det = a * e - b * d;
  det = det !== 0 ? 1.0 / det : 0.0;
  const A11 = e * det;
  const A22 = a * det;
  const A12 = -b * det;
  const A21 = -d * det;
  return [A11, A12, -A11 * c - A12 * f, A21, A22, -A21 * c - A22 * f];
}

export function applyAffine(m, x, y) {
  return [m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]];
}

function matrixMat(cv, m) {
  return cv.matFromArray(2, 3, cv.CV_64F, m);
}

/** CropContract.warp: the gray uint8 cv.Mat warped by `m` to size x size (bilinear, constant border), first
 *  shrunk with INTER_AREA where the crop shrinks the source by more than max_linear_shrink. Returns a cv.Mat. */
export function warpCrop(cv, gray, contract, m) {
  const out = contract.size;
  const shrink = 1.0 / Math.max(Math.sqrt(Math.abs(m[0] * m[4] - m[1] * m[3])), 1e-12);
  let source = gray;
  let matrix = m;
  let owned = null;
  if (shrink > contract.max_linear_shrink) {
    const pre = preshrink(cv, gray, m, shrink, out);
    if (pre) ({ small: owned, matrix } = pre);
    if (owned) source = owned;
  }
  const crop = new cv.Mat();
  const mat = matrixMat(cv, matrix);
  cv.warpAffine(source, crop, mat, new cv.Size(out, out), cv.INTER_LINEAR, cv.BORDER_CONSTANT,
    new cv.Scalar(contract.border_value, contract.border_value, contract.border_value, contract.border_value));
  mat.delete();
  if (owned) owned.delete();
  return crop;
}

/** contract._preshrink: only the source region the crop needs, shrunk with INTER_AREA; M adjusted to match. */
function preshrink(cv, gray, m, shrink, out) {
  const inv = invertAffine(m);
  const corners = [[-1, -1], [out, -1], [-1, out], [out, out]].map(([u, v]) => applyAffine(inv, u, v));
  const xs = corners.map((p) => p[0]);
  const ys = corners.map((p) => p[1]);
  const x0 = Math.max(Math.floor(Math.min(...xs)), 0);
  const y0 = Math.max(Math.floor(Math.min(...ys)), 0);
  const x1 = Math.min(Math.ceil(Math.max(...xs)) + 1, gray.cols);
  const y1 = Math.min(Math.ceil(Math.max(...ys)) + 1, gray.rows);
  if (x1 - x0 < 2 || y1 - y0 < 2) return null;
  const factor = 1.0 / shrink;
  const roiWidth = x1 - x0;
  const roiHeight = y1 - y0;
  const rw = Math.max(roundHalfEven(roiWidth * factor), 1);
  const rh = Math.max(roundHalfEven(roiHeight * factor), 1);
  const roi = gray.roi(new cv.Rect(x0, y0, roiWidth, roiHeight));
  const small = new cv.Mat();
  cv.resize(roi, small, new cv.Size(rw, rh), 0, 0, cv.INTER_AREA);
  roi.delete();
  const fx = rw / roiWidth;
  const fy = rh / roiHeight;
  // small pixel (u, v) <- roi pixel ((u + 0.5) / f - 0.5): M composed with that map
  const t = [0.5 / fx - 0.5 + x0, 0.5 / fy - 0.5 + y0];
  const matrix = [
    m[0] / fx, m[1] / fy, m[0] * t[0] + m[1] * t[1] + m[2],
    m[3] / fx, m[4] / fy, m[3] * t[0] + m[4] * t[1] + m[5],
  ];
  return { small, matrix };
}

/** CropContract.normalize of one crop, written into `target` (Float32Array) at `offset`. */
export function normalizeInto(contract, crop, target, offset) {
  const pixels = crop.data;
  const mean = Math.fround(contract.mean);
  const std = Math.fround(contract.std);
  for (let i = 0; i < pixels.length; i++) {
    target[offset + i] = Math.fround(Math.fround(Math.fround(pixels[i]) / 255) - mean) / std;
  }
}

/** CropContract.decode_points: normalised output (68 x 2 from `flat` at `offset`) -> image points. */
export function decodePoints(contract, flat, offset, count, m) {
  const inv = invertAffine(m);
  const points = [];
  for (let k = 0; k < count; k++) {
    const u = (flat[offset + 2 * k] + 0.5) * contract.size;
    const v = (flat[offset + 2 * k + 1] + 0.5) * contract.size;
    points.push(applyAffine(inv, u, v));
  }
  return points;
}

/** BoxCalibration.apply (identity when there is none). */
export function calibrate(calibration, box) {
  if (!calibration) return box;
  const [x, y, w, h] = box;
  const cx = x + w / 2 + calibration.dx * w;
  const cy = y + h / 2 + calibration.dy * h;
  const nw = calibration.sw * w;
  const nh = calibration.sh * h;
  return [cx - nw / 2, cy - nh / 2, nw, nh];
}

export function boxFromLandmarks(points) {
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const x = Math.min(...xs);
  const y = Math.min(...ys);
  return [x, y, Math.max(...xs) - x, Math.max(...ys) - y];
}

export function boxIou(a, b) {
  const ix = Math.max(0, Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]));
  const iy = Math.max(0, Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]));
  const inter = ix * iy;
  const union = a[2] * a[3] + b[2] * b[3] - inter;
  return union > 0 ? inter / union : 0;
}

/** contract.non_max_suppression: indices kept, highest score first (ties: the earlier box). */
export function nonMaxSuppression(boxes, scores, maxIou) {
  const order = boxes.map((_, i) => i).sort((i, j) => scores[j] - scores[i] || i - j);
  const kept = [];
  for (const i of order) if (kept.every((k) => boxIou(boxes[i], boxes[k]) < maxIou)) kept.push(i);
  return kept;
}

// ---------------------------------------------------------------------------------------------------------
// The Haar detector (facemark/runtime/detector.py's HaarDetector with OpenCV.js's CascadeClassifier)

export class HaarDetector {
  color = false; // detects on the gray image

  constructor(cv, cascadeBytes, settings) {
    if (settings.octaves) throw new Error("the octave search (octaves=true) is not available in the browser");
    this.cv = cv;
    this.settings = settings;
    const file = `facemark-cascade-${Math.random().toString(36).slice(2)}.xml`;
    cv.FS_createDataFile("/", file, cascadeBytes, true, false, false);
    this.cascade = new cv.CascadeClassifier();
    if (!this.cascade.load(file) || this.cascade.empty()) throw new Error("not a loadable OpenCV cascade file");
    cv.FS_unlink("/" + file);
    this.window = settings.window; // the cascade's window side (getOriginalWindowSize is not in OpenCV.js)
  }

  /** HaarDetector.copy_factor */
  copyFactor(width, height) {
    const s = this.settings;
    let factor = 1.0;
    if (s.max_side !== null && Math.max(height, width) > s.max_side) factor = s.max_side / Math.max(height, width);
    const smallestFace = s.min_face_fraction * Math.min(height, width);
    if (s.min_face_windows !== null && smallestFace > 0) {
      const wanted = Math.max(s.min_face_windows * this.window / smallestFace, this.window / Math.min(height, width));
      factor = Math.min(factor, wanted);
    }
    return factor;
  }

  /** HaarDetector.detect: [{box, score}] in the gray cv.Mat's pixels, most confident first. */
  detect(gray) {
    const width = gray.cols;
    const height = gray.rows;
    if (Math.min(height, width) < this.window) return [];
    const factor = this.copyFactor(width, height);
    const copySide = factor >= 1.0 ? Math.min(height, width) : Math.max(1, roundHalfEven(Math.min(height, width) * factor));
    return this.scan(gray, factor, roundHalfEven(this.settings.min_face_fraction * copySide));
  }

  /** HaarDetector._scan over the whole image */
  scan(gray, factor, minSide) {
    const cv = this.cv;
    let small = gray;
    if (factor < 1.0) {
      small = new cv.Mat();
      const size = new cv.Size(Math.max(1, roundHalfEven(gray.cols * factor)), Math.max(1, roundHalfEven(gray.rows * factor)));
      cv.resize(gray, small, size, 0, 0, cv.INTER_AREA);
    }
    try {
      if (Math.min(small.rows, small.cols) < this.window) return [];
      const side = Math.max(this.window, minSide);
      const found = this.cascadeOnce(small, side).map(([[x, y, w, h], score]) => ({
        box: [x / factor, y / factor, w / factor, h / factor], score,
      }));
      const kept = this.settings.min_score === null ? found : found.filter((d) => d.score >= this.settings.min_score);
      return kept.sort((a, b) => b.score - a.score);
    } finally {
      if (small !== gray) small.delete();
    }
  }

  /** HaarDetector._cascade_once: OpenCV's pyramid; at min_neighbors 0 every group of raw hits is a face. */
  cascadeOnce(image, minSide) {
    const neighbours = this.settings.min_neighbors;
    const hits = this.rawHits(image, minSide, neighbours);
    if (neighbours === 0) return groupHits(hits, 0);
    return hits.rects.map((r, i) => [r, hits.weights[i]]);
  }

  rawHits(image, minSide, minNeighbors) {
    const cv = this.cv;
    const objects = new cv.RectVector();
    const levels = new cv.IntVector();
    const weights = new cv.DoubleVector();
    try {
      this.cascade.detectMultiScale3(image, objects, levels, weights, this.settings.scale_factor, minNeighbors, 0,
        new cv.Size(minSide, minSide), new cv.Size(0, 0), true);
      const rects = [];
      const levelList = [];
      const weightList = [];
      for (let i = 0; i < objects.size(); i++) {
        const r = objects.get(i);
        rects.push([r.x, r.y, r.width, r.height]);
        levelList.push(levels.get(i));
        weightList.push(weights.get(i));
      }
      return { rects, levels: levelList, weights: weightList };
    } finally {
      objects.delete();
      levels.delete();
      weights.delete();
    }
  }

  delete() {
    this.cascade.delete();
  }
}

/** detector.group_hits: OpenCV's groupRectangles with reject levels, float32 arithmetic as OpenCV's. */
export function groupHits({ rects, levels, weights }, minNeighbors, eps = 0.2) {
  const n = rects.length;
  if (n === 0) return [];
  const f = Math.fround;
  const eps32 = f(eps);
  const near = (i, j) => {
    const [ax, ay, aw, ah] = rects[i];
    const [bx, by, bw, bh] = rects[j];
    const delta = f(f(eps32 * f(Math.min(aw, bw) + Math.min(ah, bh))) * 0.5);
    return Math.abs(ax - bx) <= delta && Math.abs(ay - by) <= delta
      && Math.abs(ax + aw - (bx + bw)) <= delta && Math.abs(ay + ah - (by + bh)) <= delta;
  };
  const labels = new Array(n).fill(-1);
  let label = 0;
  for (let start = 0; start < n; start++) {
    if (labels[start] >= 0) continue;
    labels[start] = label;
    const frontier = [start];
    while (frontier.length) {
      const node = frontier.pop();
      for (let other = 0; other < n; other++) {
        if (labels[other] < 0 && near(node, other)) {
          labels[other] = label;
          frontier.push(other);
        }
      }
    }
    label++;
  }
  const groups = [];
  for (let g = 0; g < label; g++) {
    const members = labels.flatMap((l, i) => (l === g ? [i] : []));
    const deepest = Math.max(...members.map((i) => levels[i]));
    const best = Math.max(...members.filter((i) => levels[i] === deepest).map((i) => weights[i]));
    const inverse = f(1.0 / members.length);
    const box = [0, 1, 2, 3].map((k) => roundHalfEven(f(f(members.reduce((s, i) => s + rects[i][k], 0)) * inverse)));
    groups.push({ box, score: best, hits: members.length });
  }
  const kept = [];
  groups.forEach(({ box, score, hits }, i) => {
    if (hits <= minNeighbors) return;
    const inside = groups.some((other, j) => {
      if (j === i || other.hits <= minNeighbors) return false;
      const [ox, oy, ow, oh] = other.box;
      const dx = roundHalfEven(ow * eps);
      const dy = roundHalfEven(oh * eps);
      return box[0] >= ox - dx && box[1] >= oy - dy && box[0] + box[2] <= ox + ow + dx
        && box[1] + box[3] <= oy + oh + dy && (other.hits > Math.max(3, hits) || hits < 3);
    });
    if (!inside) kept.push([box, score]);
  });
  return kept;
}

// ---------------------------------------------------------------------------------------------------------
// The CNN detectors (facemark/runtime/cnn_detector.py: CenterFace, FaceBoxesV2) on ONNX Runtime

/** cnn_detector.non_max_suppression_xyxy: indices kept, best score first. */
export function nonMaxSuppressionXyxy(boxes, scores, maxIou) {
  let order = scores.map((_, i) => i).sort((i, j) => scores[j] - scores[i]);
  const area = (b) => Math.max(b[2] - b[0], 0) * Math.max(b[3] - b[1], 0);
  const kept = [];
  while (order.length) {
    const best = order[0];
    kept.push(best);
    const a = boxes[best];
    order = order.slice(1).filter((i) => {
      const b = boxes[i];
      const inter = Math.max(Math.min(a[2], b[2]) - Math.max(a[0], b[0]), 0)
        * Math.max(Math.min(a[3], b[3]) - Math.max(a[1], b[1]), 0);
      return inter / Math.max(area(a) + area(b) - inter, 1e-9) < maxIou;
    });
  }
  return kept;
}

/** cnn_detector.faceboxes_priors: [cx, cy, w, h] per prior, in the network's output order. */
export function faceboxesPriors(height, width, anchors) {
  const priors = [];
  for (const [step, sizes] of anchors) {
    const rows = Math.ceil(height / step);
    const cols = Math.ceil(width / step);
    for (let y = 0; y < rows; y++) {
      for (let x = 0; x < cols; x++) {
        for (const [size, dense] of sizes) {
          const shifts = dense > 1 ? Array.from({ length: dense }, (_, k) => k / dense) : [0.5];
          for (const dy of shifts) for (const dx of shifts) priors.push([(x + dx) * step, (y + dy) * step, size, size]);
        }
      }
    }
  }
  return priors;
}

const DECODERS = {
  /** cnn_detector.decode_faceboxes: `loc` offsets and softmaxed `conf` -> xyxy boxes and scores. */
  faceboxes(outputs, height, width, threshold, settings) {
    const [loc, conf] = outputs;
    const priors = faceboxesPriors(height, width, settings.anchors);
    const [centreVariance, sizeVariance] = settings.variance;
    const boxes = [];
    const scores = [];
    priors.forEach(([px, py, pw, ph], p) => {
      const score = conf.data[2 * p + 1];
      if (!(score > threshold)) return;
      const l = loc.data.subarray(4 * p, 4 * p + 4);
      const cx = px + l[0] * centreVariance * pw;
      const cy = py + l[1] * centreVariance * ph;
      const w = pw * Math.exp(l[2] * sizeVariance);
      const h = ph * Math.exp(l[3] * sizeVariance);
      boxes.push([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]);
      scores.push(score);
    });
    return { boxes, scores };
  },
  /** cnn_detector.decode_centerface: stride-4 heatmap, log-scale (h, w) and offset (y, x) maps. */
  centerface(outputs, _height, _width, threshold) {
    const [heatmap, scale, offset] = outputs;
    const [rows, cols] = heatmap.dims.slice(2);
    const plane = rows * cols;
    const limit = Math.fround(threshold); // numpy compares the float32 map with a float32 threshold
    const boxes = [];
    const scores = [];
    for (let y = 0; y < rows; y++) {
      for (let x = 0; x < cols; x++) {
        const i = y * cols + x;
        if (!(heatmap.data[i] > limit)) continue;
        const h = Math.fround(Math.fround(Math.exp(scale.data[i])) * 4);
        const w = Math.fround(Math.fround(Math.exp(scale.data[plane + i])) * 4);
        const cx = (x + offset.data[plane + i] + 0.5) * 4;
        const cy = (y + offset.data[i] + 0.5) * 4;
        boxes.push([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]);
        scores.push(heatmap.data[i]);
      }
    }
    return { boxes, scores };
  },
};

export class CnnDetector {
  color = true; // the Python runtime gives it the colour image

  constructor(cv, ort, session, settings) {
    if (!(settings.decoder in DECODERS)) throw new Error(`no decoder for the ${settings.decoder} detector`);
    Object.assign(this, { cv, ort, session, settings });
  }

  /** cnn_detector.network_input: the colour image scaled so its longer side is input_side, padded at the bottom
   *  and right to multiples of the stride with the mean (0 once it is subtracted), channels in the network's order. */
  networkInput(rgba) {
    const cv = this.cv;
    const s = this.settings;
    const scale = s.input_side / Math.max(rgba.rows, rgba.cols);
    const width = Math.max(1, roundHalfEven(rgba.cols * scale));
    const height = Math.max(1, roundHalfEven(rgba.rows * scale));
    const colour = new cv.Mat();
    cv.cvtColor(rgba, colour, s.rgb ? cv.COLOR_RGBA2RGB : cv.COLOR_RGBA2BGR);
    const small = new cv.Mat();
    cv.resize(colour, small, new cv.Size(width, height), 0, 0, scale < 1 ? cv.INTER_AREA : cv.INTER_LINEAR);
    colour.delete();
    const rows = Math.ceil(height / s.stride_multiple) * s.stride_multiple;
    const cols = Math.ceil(width / s.stride_multiple) * s.stride_multiple;
    const blob = new Float32Array(3 * rows * cols);
    const pixels = small.data;
    for (let c = 0; c < 3; c++) {
      const mean = Math.fround(s.mean[c]);
      for (let y = 0; y < height; y++) {
        for (let x = 0; x < width; x++) blob[c * rows * cols + y * cols + x] = pixels[(y * width + x) * 3 + c] - mean;
      }
    }
    small.delete();
    return { blob, rows, cols, scale };
  }

  /** CnnDetector.detect: [{box, score}] in the image's pixels, most confident first. */
  async detect(rgba) {
    const s = this.settings;
    const { blob, rows, cols, scale } = this.networkInput(rgba);
    const feeds = { [s.input_name]: new this.ort.Tensor("float32", blob, [1, 3, rows, cols]) };
    const results = await this.session.run(feeds);
    const outputs = this.session.outputNames.map((name) => results[name]);
    const decoded = DECODERS[s.decoder](outputs, rows, cols, s.min_score, s);
    const top = decoded.scores.map((_, i) => i).sort((i, j) => decoded.scores[j] - decoded.scores[i])
      .slice(0, s.max_candidates);
    const boxes = top.map((i) => decoded.boxes[i].map((v) => v / scale));
    const scores = top.map((i) => decoded.scores[i]);
    return nonMaxSuppressionXyxy(boxes, scores, s.nms_iou).map((i) => {
      const [x0, y0, x1, y1] = boxes[i];
      return { box: [x0, y0, x1 - x0, y1 - y0], score: scores[i] };
    });
  }

  delete() {
    this.session.release?.();
  }
}

// ---------------------------------------------------------------------------------------------------------
// The pipeline (runtime/landmarker.py + facemark/inference.py)

export class FaceLandmarker {
  /** config: the folder's facemark-web.json; modelBytes: the ONNX file; cascadeBytes: the Haar cascade XML. */
  constructor({ ort, cv, config, session, info, detector, modelBytes }) {
    Object.assign(this, { ort, cv, config, session, info, detector, modelBytes });
    this.contract = info.contract;
    const own = config.detector.calibration || null;
    const modelCalibration = info.calibration;
    // runtime.detectors.calibration_for: the model's when fitted for this detector, else the detector's own
    this.calibration = modelCalibration && modelCalibration.detector === config.detector.name
      ? modelCalibration : own || modelCalibration;
  }

  /** Loads the folder's config, model and cascade. `base`: the folder's URL (default: beside this module). */
  static async create({ ort, cv, base = new URL(".", import.meta.url).href, fetchBytes = fetchBytesHttp,
    sessionOptions = {} }) {
    const at = (name) => (base.endsWith("/") ? base + name : `${base}/${name}`);
    const config = JSON.parse(new TextDecoder().decode(await fetchBytes(at(CONFIG_FILE))));
    const modelBytes = await fetchBytes(at(config.model.file));
    const info = parseModelInfo(readOnnxMetadata(modelBytes), config.metadata_keys, config.model.file);
    const session = await ort.InferenceSession.create(modelBytes, { executionProviders: ["wasm"], ...sessionOptions });
    if (config.pipeline.tta !== "none") throw new Error(`test-time augmentation ${config.pipeline.tta} is not built in`);
    const detector = config.detector.kind === "haar"
      ? new HaarDetector(cv, await fetchBytes(at(config.detector.cascade_file)), config.detector.settings)
      : new CnnDetector(cv, ort, await ort.InferenceSession.create(await fetchBytes(at(config.detector.file)),
        { executionProviders: ["wasm"], ...sessionOptions }), config.detector.settings);
    return new FaceLandmarker({ ort, cv, config, session, info, detector, modelBytes });
  }

  /** Gray cv.Mat of an RGBA ImageData (OpenCV's weights: the Python runtime's BGR -> gray). */
  grayOf(imageData) {
    const rgba = this.cv.matFromImageData(imageData);
    const gray = new this.cv.Mat();
    this.cv.cvtColor(rgba, gray, this.cv.COLOR_RGBA2GRAY);
    rgba.delete();
    return gray;
  }

  /** All faces of an RGBA ImageData: {width, height, faces, times: {detect, landmarks} ms}. */
  async detectImageData(imageData) {
    const rgba = this.cv.matFromImageData(imageData);
    try {
      return await this.detectMats(rgba);
    } finally {
      rgba.delete();
    }
  }

  /** All faces of an RGBA cv.Mat, in landmarker.FACE_ORDER, as FaceLandmarker.detect_full (the image entry's faces):
   *  the landmarks on its gray copy, the detector on gray (Haar) or colour (CNN). */
  async detectMats(rgba) {
    const gray = new this.cv.Mat();
    this.cv.cvtColor(rgba, gray, this.cv.COLOR_RGBA2GRAY);
    try {
      return await this.detectGray(gray, rgba);
    } finally {
      gray.delete();
    }
  }

  /** detectMats on a gray cv.Mat (and its RGBA original, which a colour detector needs). */
  async detectGray(gray, rgba = null) {
    if (this.detector.color && !rgba) throw new Error(`the ${this.config.detector.name} detector needs the colour image`);
    const t0 = performance.now();
    const detections = await this.detector.detect(this.detector.color ? rgba : gray);
    const t1 = performance.now();
    const predicted = await this.predictFaces(gray, detections.map((d) => calibrate(this.calibration, d.box)));
    const pipeline = this.config.pipeline;
    let faces = predicted.map((p, i) => ({ ...p, detector_score: detections[i].score, detector_box: detections[i].box }))
      .filter((face) => face.finite);
    if (pipeline.min_score !== null) faces = faces.filter((face) => face.score !== null && face.score >= pipeline.min_score);
    if (this.session.outputNames.includes(this.config.outputs.face_score)) {
      // landmarker.distinct_faces: two boxes on one face converge to the same landmarks
      const kept = nonMaxSuppression(faces.map((face) => boxFromLandmarks(face.landmarks)),
        faces.map((face) => face.score || 0), pipeline.duplicate_iou);
      faces = kept.sort((a, b) => a - b).map((i) => faces[i]);
    }
    // landmarker.FACE_ORDER: by presence score at the JSON's precision (landmarker.presence_rank) when the model's
    // is trusted (a stable sort keeps the detector's order among equal ones), else the detector's order
    if (pipeline.face_order === "presence") {
      const rank = (score) => Math.floor(score * 10 ** pipeline.score_digits + 0.5);
      faces.sort((a, b) => rank(b.score) - rank(a.score));
    }
    const t2 = performance.now();
    return { width: gray.cols, height: gray.rows, faces, times: { detect: t1 - t0, landmarks: t2 - t1 } };
  }

  /** The network input (N, 1, S, S) of boxes on a gray cv.Mat, with each crop's matrix. */
  prepare(gray, boxes) {
    const size = this.contract.size;
    const input = new Float32Array(boxes.length * size * size);
    const matrices = boxes.map((box, i) => {
      const m = cropMatrix(this.contract, box);
      const crop = warpCrop(this.cv, gray, this.contract, m);
      normalizeInto(this.contract, crop, input, i * size * size);
      crop.delete();
      return m;
    });
    return { input, matrices };
  }

  async run(input, count) {
    const size = this.contract.size;
    const feeds = { [this.config.outputs.input]: new this.ort.Tensor("float32", input, [count, 1, size, size]) };
    return this.session.run(feeds);
  }

  /** inference.predict_faces (refine passes on the landmark box of the previous pass; no test-time flip). */
  async predictFaces(gray, boxes) {
    if (boxes.length === 0) return [];
    const names = this.config.outputs;
    let outputs;
    let points;
    for (let step = 0; step <= this.config.pipeline.refine; step++) {
      const { input, matrices } = this.prepare(gray, boxes);
      outputs = await this.run(input, boxes.length);
      const flat = outputs[names.landmarks].data;
      const count = flat.length / boxes.length / 2;
      points = matrices.map((m, i) => decodePoints(this.contract, flat, i * count * 2, count, m));
      if (step < this.config.pipeline.refine) boxes = points.map(boxFromLandmarks);
    }
    const perPoint = outputs[names.landmark_scores]?.data;
    const presence = outputs[names.face_score]?.data;
    return points.map((landmarks, i) => {
      const count = landmarks.length;
      const scores = perPoint ? Array.from(perPoint.subarray(i * count, (i + 1) * count)) : null;
      const score = presence ? presence[i] : null;
      const values = [...landmarks.flat(), ...(scores || []), ...(score === null ? [] : [score])];
      return { box: boxes[i], landmarks, score, landmark_scores: scores, finite: values.every(Number.isFinite) };
    });
  }

  /** The image entry of `facemark schema image` for one result. */
  static imageEntry(path, result) {
    const round = (v, d) => (v === null || v === undefined ? null
      : Array.isArray(v) ? v.map((x) => round(x, d)) : rounded(v, d));
    return {
      path, width: result.width, height: result.height, error: null,
      faces: result.faces.map((face) => ({
        box: round(face.box, 2), landmarks: round(face.landmarks, 2), score: round(face.score, 4),
        detector_score: round(face.detector_score, 4), detector_box: round(face.detector_box, 2),
        landmark_scores: round(face.landmark_scores, 3),
      })),
    };
  }

  delete() {
    this.detector.delete();
    this.session.release?.();
  }
}
