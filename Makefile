# The README's two Quick start commands are `make demo` and `make test`; each
# installs what it needs first (.ci/setup skips what is already there).
PYTHON ?= python3
export LIBTORCH_USE_PYTORCH := 1

.PHONY: setup demo test lint rust-test py-test notebooks stress clean

setup:
	./.ci/setup

demo: setup
	grouploss train

test: setup lint rust-test py-test

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --release --features python --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy.stubtest grouploss._native

rust-test:
	cargo test

# The shared data (glyphs) sits beside the checkout; a clone made elsewhere
# finds it beside the repository it was cloned from.
SHARED_DATA := $(firstword $(wildcard $(CURDIR)/../shared/data) \
	$(wildcard $(shell git config --get remote.origin.url 2>/dev/null)/../shared/data))

py-test:
	GROUPLOSS_DATA=$${GROUPLOSS_DATA:-$(SHARED_DATA)} $(PYTHON) -m pytest -q

# The notebooks executed in place at their own budgets (each notebook's
# `parameters` cell; about 5 minutes here, 2 CPU cores), so that they show
# their outputs on a code host; commit them afterwards. `make test` re-runs
# them on small budgets without writing them.
notebooks: setup
	GROUPLOSS_DATA=$${GROUPLOSS_DATA:-$(SHARED_DATA)} $(PYTHON) notebooks/execute.py

# Longer fuzzing, more kills and more property examples than `make test`
# (RELIABILITY.md lists what each tries); about 30 minutes here.
stress: setup
	GROUPLOSS_FUZZ_SECONDS=60 cargo test --release --lib fuzz -- --nocapture
	GROUPLOSS_STRESS_KILLS=12 GROUPLOSS_HYPOTHESIS_EXAMPLES=500 $(PYTHON) -m pytest -q \
		tests/test_crash_safety.py tests/test_properties.py tests/test_faults.py \
		tests/test_long_runs.py tests/test_concurrency.py

clean:
	cargo clean
	rm -f python/grouploss/_native*.so
