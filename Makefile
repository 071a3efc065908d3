# The README's two Quick start commands are `make demo` and `make test`; each
# installs what it needs first (.ci/setup skips what is already there).
PYTHON ?= python3
export LIBTORCH_USE_PYTORCH := 1

.PHONY: setup demo test lint rust-test py-test stress bench clean

setup:
	./.ci/setup

demo: setup
	grouploss train

test: setup lint rust-test py-test

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --release --features python --all-targets -- -D warnings
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

rust-test:
	cargo test

py-test:
	$(PYTHON) -m pytest -q

clean:
	cargo clean
	rm -f python/grouploss/_native*.so
