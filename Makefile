# bitnet-run: the two commands of the README, plus helpers for development.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
PROMPT ?= Once upon a time

.PHONY: run test install install-test demo clean

# The main job: install, then generate with the bundled demo model.
run: install
	bitnet-run run -p "$(PROMPT)" -n 64

# Install with the test extra (torch + transformers as the reference) and run the tests.
test: install-test
	$(PYTHON) -m pytest -q

install:
	$(PIP) install -q .

install-test:
	$(PIP) install -q -e ".[test]"

# Re-convert the bundled demo checkpoint into the packed file the main command uses.
demo: install
	bitnet-run convert models/demo -o models/demo/demo.bnr

clean:
	rm -rf build *.egg-info bitnet_run/_bitnet*.so bitnet_run/_bitnet.c .pytest_cache
