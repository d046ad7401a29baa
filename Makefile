# `make fit`: set up, then train the CSR dictionaries on the embedded defaults.
# `make test`: set up, then run the test suite (what .ci/run calls).
PYTHON ?= python3

.PHONY: setup fit test
setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

fit: setup
	lightning fit --config configs/llama.yaml

test: setup
	$(PYTHON) -m pytest -q
