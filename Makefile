# lowmemws - every set-up step lives here, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
NATIVE := $(wildcard src/lowmemws/*.c src/lowmemws/*.h) src/lowmemws/_build_native.py setup.py pyproject.toml
# Every C file is kept in the .clang-format style (checked by `make lint`).
C_FILES := $(wildcard src/lowmemws/*.c src/lowmemws/*.h fuzz/*.c fuzz/atheris/*.c benchmarks/*.c)
FUZZ_SECONDS ?= 8

.PHONY: all build demo test lint typecheck docs pytest sysdeps fuzz fuzz-smoke bench compliance clean

all: build

$(VENV)/.venv-ok:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	touch $@

# The compiled module is rebuilt whenever a C file, the header or the build script changes.
$(VENV)/.build-ok: $(VENV)/.venv-ok $(NATIVE)
	$(PIP) install -e '.[test]'
	touch $@

build: $(VENV)/.build-ok

demo: build
	$(PY) examples/mailnotify.py

# System packages the tests need; installed only when missing (root, Debian).
sysdeps:
	@need=""; \
	command -v redis-server >/dev/null || need="$$need redis-server"; \
	command -v chromium >/dev/null || need="$$need chromium"; \
	command -v clang >/dev/null || need="$$need clang libclang-rt-14-dev"; \
	command -v clang-format >/dev/null || need="$$need clang-format"; \
	[ -e /usr/include/openssl/ssl.h ] || need="$$need libssl-dev"; \
	command -v openssl >/dev/null || need="$$need openssl"; \
	if [ -n "$$need" ]; then \
	  echo "installing system packages:$$need"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null) \
	    || { echo "could not install$$need (needs root and Debian's apt)"; [ "$$CI" != true ] || exit 1; }; \
	fi

# clang-format missing: skipped on a developer's machine, a failure under CI=true.
lint: build
	$(PY) -m ruff check src tests benchmarks examples compliance fuzz docs
	$(PY) -m ruff format --check src tests benchmarks examples compliance fuzz docs
	@if command -v clang-format >/dev/null; then \
	  echo "clang-format --dry-run --Werror $(C_FILES)"; \
	  clang-format --dry-run --Werror $(C_FILES); \
	elif [ "$$CI" = true ]; then \
	  echo "clang-format is not installed (make sysdeps installs it)"; exit 1; \
	else \
	  echo "skipped the C formatting check: clang-format is not installed (make sysdeps)"; \
	fi

typecheck: build
	$(PY) -m mypy

# The API reference (docs/api/), built from the docstrings: any Sphinx warning fails it.
docs: build
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

pytest: build
	$(PY) -m pytest -q tests

test: sysdeps build lint typecheck docs fuzz-smoke pytest

# Fuzzing with AddressSanitizer and UBSan: libFuzzer on the C parsers and atheris on every
# C entry point (RedisBus's framing too): the smoke run gives each target FUZZ_SECONDS, `make fuzz` 10 minutes.
fuzz-smoke: sysdeps
	$(MAKE) -C fuzz run SECONDS=$(FUZZ_SECONDS) PYTHON=$(PYTHON)

fuzz: sysdeps
	$(MAKE) -C fuzz run SECONDS=600 PYTHON=$(PYTHON)

compliance: build
	bash compliance/setup.sh
	$(PY) compliance/run.py

bench: build
	$(PIP) install -e '.[test,bench]'
	$(PY) -m pytest -q benchmarks/test_codec_bench.py --benchmark-enable --benchmark-columns=min,median,mean,ops
	$(PY) benchmarks/codec_bench.py --runs 9
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build dist docs/_build src/*.egg-info src/lowmemws/_lowmemws*.so src/lowmemws/_lowmemws.c fuzz/build
