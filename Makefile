# radpretrain -- two entry points: `make demo` and `make test`.
# Each creates .venv when missing and installs the package with everything it needs
# (idempotent: a stamp file skips the install when pyproject.toml has not changed).

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
DEMO_OUT ?= demo-output

.PHONY: demo test venv orthanc clean-demo

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

# Orthanc + DICOMweb plugin for the PACS tests (installed as root when missing).
orthanc:
	@bash scripts/install_orthanc.sh

demo: $(STAMP)
	$(VENV)/bin/radpretrain demo --out $(DEMO_OUT)

test: $(STAMP) orthanc
	$(VENV)/bin/python -m pytest -q

clean-demo:
	rm -rf $(DEMO_OUT)
