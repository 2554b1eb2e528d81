# Two commands set up a fresh machine:  `make demo`  and  `make test`.
# Install recipe (see ../shared/NOTES.md): torch==2.13.0 first and alone (CPU
# wheel on disk), then pinned requirements, then torchrec/recbole with --no-deps
# (torchrec's declared fbgemm-gpu is a CUDA build; fbgemm-gpu-cpu provides it).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SPARK_STAMP := $(VENV)/.installed-spark
FAISS  ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Bytecode speeds up importing torchrec/mlflow twice over; this environment
# disables it by default.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install spark demo test bench clean-venv

install: $(STAMP)

# the faiss flavour is part of the install: `make install FAISS=gpu` on an
# installed venv swaps it (a marker per flavour makes the stamp stale)
FAISS_MARK := $(VENV)/.faiss-$(FAISS)

$(FAISS_MARK):
	@mkdir -p $(VENV) && rm -f $(VENV)/.faiss-* && touch $@

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml $(FAISS_MARK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(FAISS)" != "gpu" ]; then $(PY) -m pip uninstall -y -q faiss-gpu 2>/dev/null || true; fi
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	@if [ "$(FAISS)" = "gpu" ]; then $(PY) -m pip uninstall -y -q faiss-cpu && $(PY) -m pip install -q faiss-gpu==1.15.1; fi
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Optional: the Spark engine of the feature jobs (pyspark, ~490 MB, ~50 s;
# Java 17+ at run time). `make test` installs it so the Spark tests run in CI.
spark: $(SPARK_STAMP)

$(SPARK_STAMP): requirements-spark.txt $(STAMP)
	$(PY) -m pip install -q -r requirements-spark.txt
	@touch $(SPARK_STAMP)

# The whole chain on MovieLens-100K (features -> teachers -> distill -> match
# features -> the A/B experiment -> compare table), tracked in ./mlflow.
demo: $(STAMP)
	$(VENV)/bin/recsys data describe --source movielens100k
	$(VENV)/bin/recsys experiment run experiments/ab_match_features.yaml
	@echo
	@echo "Every run is in MLflow (./mlflow): start the UI with  .venv/bin/recsys ui  and open http://127.0.0.1:5000"

test: $(STAMP) $(SPARK_STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) -m recsys.bench all

clean-venv:
	rm -rf $(VENV)

# A real browser for the UI test (tests/integration/test_ui_browser.py):
# Debian's chromium from apt-get (root, or sudo), driven by Playwright
# (pinned in requirements.txt) through executable_path=$(CHROMIUM), since
# Playwright's own browser download cannot work offline. `.ci/run` calls it
# before `make test`; where it cannot install the browser, the UI test fails.
CHROMIUM ?= /usr/bin/chromium
.PHONY: browser
browser: $(STAMP)
	@test -x $(CHROMIUM) || { SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }
	$(CHROMIUM) --headless --no-sandbox --version
