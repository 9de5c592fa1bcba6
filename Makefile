# `make test` and `make demo` are the two commands the README promises; `make train` retrains
# the SynthHR mini from synthhr/configs/mini.toml (resumes from runs/mini when stopped). The demo: the trained
# SynthHR mini through the RSVQA job (flexattn against lowres), then the caption job, then
# the caption job chipping one georeferenced scene (GeoParquet and a scene map).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo train install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so pip takes the local CPU wheel instead of a CUDA build
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,gs]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

train: $(STAMP)
	$(PY) -m synthhr.train --config synthhr/configs/mini.toml --out runs/mini --export models/synthhr-mini

demo: $(STAMP)
	$(PY) jobs/synthhr_demo.py
	$(PY) jobs/caption_remote_sensing.py
	$(PY) jobs/caption_remote_sensing.py --input samples/scenes --chip-size 1008 \
		--output outputs/caption_scenes --save-scene-maps 1

clean:
	rm -rf $(VENV) outputs
