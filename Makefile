# Every target installs first (idempotent: a stamp file records the installed requirements).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORK   ?= work
DATASET ?= synthetic
DATA_ROOT ?= data
ENCODERS ?=
ANNOTATIONS ?=
VIDEOS ?=
FRAMES ?=
WORKERS ?= 2
QFORMER ?=
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 0

.PHONY: install test test-faults browser demo compare extract bench bench-gpu gpu-wheels clean-work help

help:
	@echo "make demo                 set up and run the synthetic benchmark end to end [QFORMER='steps=2000 batch_size=32 ...']"
	@echo "make test                 set up and run the test suite"
	@echo "make test-faults          the crash tests at every kill point (tests/test_faults.py; CI runs 3 of each)"
	@echo "make compare [STORE=zarr] train meanP / seqTransf / clip2video on the demo store, one test table"
	@echo "make extract DATASET=name [DATA_ROOT=data ANNOTATIONS=dir VIDEOS=dir ENCODERS='clip-b32 eva-g14' FRAMES=n WORK=dir PRECISION=auto|bf16|fp16|fp32 BATCH=n]"
	@echo "make bench                extraction throughput benchmark"
	@echo "make bench-gpu            encode / decode / full-job figures per encoder, MFU on a GPU (bench/extract_gpu.py)"
	@echo "make gpu-wheels           fetch the wheels bench/gpu_check.sh installs on a GPU machine without a registry"

$(STAMP): requirements.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# the report's browser test needs headless chromium: installed here when missing and we are root (CI);
# elsewhere the test installs it itself if it can, or is skipped saying why
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null \
		&& { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver \
		  || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; }; } \
		|| echo "chromium not installed (needs root and apt-get): the browser test will be skipped"; }

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --dist worksteal

demo: $(STAMP)
	$(PY) cli.py demo --work-dir $(WORK) $(foreach o,$(QFORMER),--qformer-option $(o))

compare: $(STAMP)
	$(PY) cli.py compare-stage-one --work-dir $(WORK) $(if $(STORE),--store $(STORE)) $(if $(HEADS),--heads $(HEADS))

extract: $(STAMP)
	$(PY) cli.py extract --dataset $(DATASET) --work-dir $(WORK) --data-root $(DATA_ROOT) --workers $(WORKERS) \
		$(if $(PRECISION),--precision $(PRECISION)) $(if $(BATCH),--batch-size $(BATCH)) \
		$(if $(FRAMES),--frames $(FRAMES)) $(if $(ANNOTATIONS),--annotations $(ANNOTATIONS)) \
		$(if $(VIDEOS),--videos $(VIDEOS)) $(foreach e,$(ENCODERS),--encoder $(e))

bench: $(STAMP)
	$(PY) bench/extract.py

bench-gpu: $(STAMP)
	$(PY) bench/extract_gpu.py $(if $(OUT),--json $(OUT)/extract_gpu.json)

gpu-wheels:
	bash bench/gpu_wheels.sh wheels

clean-work:
	rm -rf $(WORK)

test-faults: $(STAMP)
	CROSSTVR_FAULT_SPREAD=all HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_faults.py
