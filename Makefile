# The two set-up commands of the README:
#   make reproduce   install, then run the paper's experiments on the embedded default (report in fvtrust-report/)
#   make test        install with test tools, then run every test (fast and slow)
VENV ?= $(HOME)/.venvs/fvtrust
OUT ?= fvtrust-report

.PHONY: install install-test reproduce test test-fast

install:
	FVTRUST_VENV=$(VENV) bash scripts/install.sh

install-test:
	FVTRUST_VENV=$(VENV) bash scripts/install.sh --test

reproduce: install
	$(VENV)/bin/fvtrust reproduce --quick --out $(OUT)
	@echo "open $(OUT)/index.html"

test: install-test
	FVTRUST_REQUIRE_RAY=1 $(VENV)/bin/python -m pytest -m "slow or not slow" -p no:cacheprovider

test-fast: install-test
	$(VENV)/bin/python -m pytest
