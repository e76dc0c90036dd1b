# lavis_plugins: the two commands are `make demo` and `make test`; both run `make setup` first.
PY        ?= python3
VENV      := .venv
VPY       := $(VENV)/bin/python
UV        := $(PY) -m uv
UV_VER    := 0.13.9
STAMP     := $(VENV)/.lavis_plugins_stamp
# Python 3.10 has its own lock (altair 6.3, ipython 9 and a few others need 3.11); 3.11 and 3.12
# share env/requirements.lock; 3.13 has no torchvision 0.20.1 wheel
LOCK      := $(shell $(PY) -c 'import sys; print("env/requirements-py310.lock" if sys.version_info < (3, 11) else "env/requirements.lock")')
PYTEST_ARGS ?=

.PHONY: setup test lint test-all demo demo-capfilt lock bench bench-env gpu-wheels clean-venv

# Creates or updates the project-local environment; does nothing when it is current.
setup: $(STAMP)

$(STAMP): $(LOCK) setup.py
	@$(UV) --version >/dev/null 2>&1 || $(PY) -m pip install -q "uv==$(UV_VER)"
	@test -x $(VPY) || $(UV) venv -q --python $(PY) $(VENV)
	$(UV) pip sync -q --python $(VPY) $(LOCK)
	$(UV) pip install -q --python $(VPY) --no-deps -e .
	@$(VPY) -c "import torchvision, lavis, lavis_plugins" 2>/dev/null \
		|| { echo "setup: the environment does not import torchvision/lavis/lavis_plugins"; exit 1; }
	@touch $(STAMP)

# Regenerates both locks from env/requirements.in and env/overrides.txt (3.11-3.12, and 3.10).
lock:
	$(UV) pip compile -q --python-version 3.11 env/requirements.in --override env/overrides.txt \
		--python-platform x86_64-manylinux_2_28 -o env/requirements.lock
	$(UV) pip compile -q --python-version 3.10 env/requirements.in --override env/overrides.txt \
		--python-platform x86_64-manylinux_2_28 -o env/requirements-py310.lock
	$(UV) pip compile -q --python-version 3.11 env/bench-lavis.in \
		--python-platform x86_64-manylinux_2_28 -o env/bench-lavis.lock

# The default suite: offline, CPU-only, tiny models (slow and gpu tests are deselected).
test: setup
	$(VPY) -m pytest -q $(PYTEST_ARGS) tests

# pyflakes checks and 100-character lines (ruff.toml); CI runs it after the tests.
lint: setup
	$(VENV)/bin/ruff check lavis_plugins tests benchmarks

# Everything except GPU tests.
test-all: setup
	$(VPY) -m pytest -q -m "not gpu" $(PYTEST_ARGS) tests

# The main job on the embedded default (see README).
demo: setup
	$(VPY) -m lavis_plugins.demo

# CapFilt on the shapes data: corrupted captions, filtered, stage 1 retrained (README "CapFilt").
demo-capfilt: setup
	$(VPY) -m lavis_plugins.demo_capfilt

# The LAVIS side of the benchmarks in LAVIS's own supported environment (transformers 4.26,
# env/bench-lavis.lock, Python 3.11-3.12): a second venv that benchmarks/ run LAVIS in.
BENCH_VENV := .venv-lavis
BENCH_STAMP := $(BENCH_VENV)/.bench_stamp
bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): env/bench-lavis.lock
	@$(UV) --version >/dev/null 2>&1 || $(PY) -m pip install -q "uv==$(UV_VER)"
	@test -x $(BENCH_VENV)/bin/python || $(UV) venv -q --python $(PY) $(BENCH_VENV)
	$(UV) pip sync -q --python $(BENCH_VENV)/bin/python env/bench-lavis.lock
	@$(BENCH_VENV)/bin/python -c "import lavis.models, transformers; assert transformers.__version__.startswith('4.26')" \
		|| { echo "bench-env: $(BENCH_VENV) does not import LAVIS under transformers 4.26"; exit 1; }
	@touch $(BENCH_STAMP)

# Every benchmark's default comparison, one after the other, and their tables (about an hour on
# a 2-core CPU; the LAVIS side runs in both environments, so bench-env comes first).
bench: setup bench-env
	$(VPY) benchmarks/run_all.py

# The wheels benchmarks/gpu/run.sh installs on the GPU machine (Python 3.12): into .whl/, carried
# with the working tree (see README, "GPU check").
gpu-wheels:
	$(PY) benchmarks/gpu/wheels.py

clean-venv:
	rm -rf $(VENV) $(BENCH_VENV)
