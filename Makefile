# qcal: every target sets itself up (virtual environment, pinned installs) on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo lite0 test lint install clean train-embedded vendor-data ort-venv

demo: $(STAMP)  ## main job on the embedded default: float32 and int8 variants of the embedded models
	$(BIN)/qcal sweep configs/fmnist-embedded.yaml

lite0: $(STAMP)  ## the ImageNet-trained EfficientNet-Lite0 on the 20 labelled images + 240 crops
	$(BIN)/qcal sweep configs/efficientnet-lite0.yaml

test: $(STAMP)  ## the whole test suite (what .ci/run calls)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/python -m flake8 qcal scripts tests
	$(BIN)/python -m isort --check-only --quiet qcal scripts tests

install: $(STAMP)

# pip silently upgrades numpy without the constraints file: always install through it.
$(STAMP): setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]' flake8 isort==9.0.2
	touch $(STAMP)

# ONNX Runtime as a speed peer (scripts/bench.py --ort-python $(ORT_VENV)/bin/python): its own
# environment, since its quantizer needs a newer onnx than MXNet's exporter (requirements-ort.txt).
ORT_VENV ?= .venv-ort
ort-venv: $(ORT_VENV)/.installed
$(ORT_VENV)/.installed: requirements-ort.txt
	$(PYTHON) -m venv $(ORT_VENV)
	$(ORT_VENV)/bin/pip install -q --upgrade pip
	$(ORT_VENV)/bin/pip install -q --no-deps -r requirements-ort.txt
	touch $@

# One-offs that produced the shipped files (see their PROVENANCE.md); tests and the demo never run them.
vendor-data: $(STAMP)
	$(BIN)/python scripts/vendor_fmnist.py

train-embedded: $(STAMP)
	for m in fmnist_vgg11_bn fmnist_resnet20_v1 fmnist_resnet56_v2; do \
		$(BIN)/python scripts/train_fmnist.py --model $$m --epochs 4 --seed 0 || exit 1; done

clean:
	rm -rf $(VENV) $(ORT_VENV) .qcal-cache results build *.egg-info
