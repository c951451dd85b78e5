"""`facemark web`: a static folder that runs the landmark pipeline in the browser (docs/WEB.md).

The folder holds the model file, ONNX Runtime Web and OpenCV.js (pinned in web/package.json, copied from
node_modules: no CDN at run time), the Haar cascade of the Python runtime, `facemark.js` (the pipeline as an ES
module: the same detector settings, calibration and crop contract as facemark.runtime) and `index.html` (a
demo page; `index.html?image=URL` writes the image entry of `facemark schema image` into `<pre id="result">`).
"""
