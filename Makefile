# The two set-up commands of the README. Each creates .venv when missing and installs the project
# (torch first, pinned to 2.13.0 so CPU machines take the local CPU wheel), then does its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install demo test
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(BIN)/oneranker up

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The peer library of `oneranker bench quality` (RecBole SASRec) in its own environment, so it never
# becomes a dependency of the project: torch==2.13.0 first (the local CPU wheel; pip must never pull
# another torch), then recbole --no-deps (its ray pin is only for hyper-parameter tuning) and the
# dependencies it imports, pinned in trainer/peer/requirements-recbole.txt.
PEER_VENV := .venv-recbole
PEER_STAMP := $(PEER_VENV)/.installed-$(shell cat trainer/peer/requirements-recbole.txt | sha1sum | cut -c1-12)
.PHONY: peer-venv
peer-venv: $(PEER_STAMP)

$(PEER_STAMP): trainer/peer/requirements-recbole.txt
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip --disable-pip-version-check --quiet install torch==2.13.0
	grep -v '^recbole' trainer/peer/requirements-recbole.txt > $(PEER_VENV)/requirements-deps.txt
	$(PEER_VENV)/bin/python -m pip --disable-pip-version-check --quiet install torch==2.13.0 -r $(PEER_VENV)/requirements-deps.txt
	$(PEER_VENV)/bin/python -m pip --disable-pip-version-check --quiet install --no-deps $$(grep '^recbole' trainer/peer/requirements-recbole.txt)
	$(PEER_VENV)/bin/python -c "import torch, numpy, recbole; print('recbole', recbole.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"
	rm -f $(PEER_VENV)/.installed-* && touch $@
