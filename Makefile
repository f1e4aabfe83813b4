# Two entry points, both self-contained on a fresh machine:
#   make demo   set up .venv and run lora-convert on the example adapter in examples/
#   make test   set up .venv and run the whole test suite
# and, for development:
#   make test-fast  the unit layer only (no slow, peft, engine or gpu tests): under a minute on 2 cores
#   make lock       re-resolve the locked environment (requirements/constraints.txt) and run the suite on it
#   make screenshot rewrite docs/images/fleet-page.png (the fleet page in headless Chromium)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch (the [smoke] extra) is pinned to the CPU wheel that lies on this workplace's disk; installing it before the
# project keeps pip from resolving the open `torch>=2.4` requirement to a multi-GB CUDA build. Real users keep the
# open range.
TORCH_PIN ?= torch==2.13.0
EXTRAS    := test,proof,smoke,ray,mlx,gguf
PIP_INSTALL = -m pip install -q --disable-pip-version-check
# The test/proof/demo environment, every package pinned (transitive ones too): a fresh clone gets exactly what the
# suite last passed with. Only `make lock` changes it; the library's own ranges in pyproject.toml stay open.
LOCK      := requirements/constraints.txt
LOCK_VENV ?= /tmp/lora-convert-lock-venv
# The unit layer: everything but the slow tests, the PEFT proof, the engine proof and the GPU tests.
FAST_MARKERS := not slow and not peft and not engine and not gpu and not gguf

.PHONY: demo test test-fast lock setup clean readme docs screenshot proof-cache proof-truth llama-cpp

setup: $(STAMP) proof-cache

$(STAMP): pyproject.toml tests/engine_proof/requirements.txt $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP_INSTALL) -c $(LOCK) $(TORCH_PIN)
	$(BIN)/python $(PIP_INSTALL) -c $(LOCK) -e '.[$(EXTRAS)]'
	# The engine proof (tests/test_proof_*.py) runs the engines' own LoRA loaders on the CPU. Their wheels come from
	# PyPI WITHOUT dependencies (their pins pull CUDA builds); the file lists the few pure-Python packages their LoRA
	# code imports. GPU-only imports are stubbed by the harnesses in tests/engine_proof/.
	$(BIN)/python $(PIP_INSTALL) -c $(LOCK) --no-deps -r tests/engine_proof/requirements.txt
	touch $(STAMP)

# Refresh the lock on purpose: a throwaway venv resolves the extras WITHOUT the lock (torch first, as above), its
# pip freeze (less the project itself) becomes the lock (its leading comment kept), and the suite runs there. Commit
# the new lock only if the suite passed.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python $(PIP_INSTALL) $(TORCH_PIN)
	$(LOCK_VENV)/bin/python $(PIP_INSTALL) -e '.[$(EXTRAS)]'
	$(LOCK_VENV)/bin/python $(PIP_INSTALL) --no-deps -r tests/engine_proof/requirements.txt
	grep '^#' $(LOCK) > $(LOCK).new
	$(LOCK_VENV)/bin/python -m pip freeze --all --exclude lora-convert --exclude pip >> $(LOCK).new
	mv $(LOCK).new $(LOCK)
	$(LOCK_VENV)/bin/python tests/engine_proof/releases.py
	$(LOCK_VENV)/bin/python tests/gguf_proof/llama_cpp_build.py
	LORA_CONVERT_REQUIRE_PROOF=1 $(LOCK_VENV)/bin/pytest -q

demo: $(STAMP)
	bash examples/demo.sh

# llama.cpp (the GGUF proof's) is built beside the suite, not before it: see the llama-cpp target.
test: $(STAMP) proof-cache
	$(BIN)/python tests/gguf_proof/llama_cpp_build.py --background
	$(BIN)/pytest -q

# The engine proof runs every release with a rule file (lora_convert/engines/<engine>-<version>.json); the installed
# one from site-packages, every other from its wheel's Python package, fetched once from PyPI (`pip download
# --no-deps`) and extracted into $$LORA_CONVERT_PROOF_CACHE (default ~/.cache/lora-convert-proof). Cheap when cached:
# a new rule file is picked up by the next `make test`.
proof-cache: $(STAMP)
	$(BIN)/python tests/engine_proof/releases.py

# The GGUF proof (tests/test_gguf_proof.py) runs llama.cpp itself through llama-cpp-python, which PyPI ships for Linux
# only as an sdist: built once per machine (cmake + a C++ compiler; several minutes on 2 cores) into
# $$LORA_CONVERT_PROOF_CACHE/llama-cpp/ with llama.cpp's own converters beside it; a no-op when cached. `make test`
# starts the same build in the background at low priority instead (the suite is one process, leaving a core idle),
# and the GGUF tests, which run last, wait for it.
llama-cpp: $(STAMP)
	$(BIN)/python tests/gguf_proof/llama_cpp_build.py

# Re-run every release's proof and rewrite its recorded truth (tests/engine_proof/truth/, compared with the live run
# by tests/test_proof_*.py) and the proof table of docs/engine-layouts.md (tests/test_proof_table.py checks it).
proof-truth: proof-cache
	$(BIN)/python tests/engine_proof/runs.py --record
	$(BIN)/python tests/engine_proof/proof_table.py --write docs/engine-layouts.md

test-fast: $(STAMP)
	$(BIN)/pytest -q -n auto --maxprocesses 4 -m '$(FAST_MARKERS)'

# Re-run the README's sample commands and rewrite their outputs (tests/test_readme_samples.py checks them).
readme: $(STAMP)
	$(BIN)/python tests/readme_samples.py --write

# Regenerate the codes section of docs/validate.md from the registry (tests/test_codes.py checks it) and the
# per-release engine tables of docs/engine-layouts.md from the rule files (tests/test_engine_profiles.py checks it),
# and the stages and modules of docs/architecture.md from the layering table and the docstrings
# (tests/test_architecture_doc.py checks it), and the proof table of docs/engine-layouts.md from the recorded truth
# (tests/test_proof_table.py checks it).
docs: $(STAMP)
	$(BIN)/python -m lora_convert.codes --write docs/validate.md
	$(BIN)/python -m lora_convert.engines.table --write docs/engine-layouts.md
	$(BIN)/python tests/architecture_map.py --write docs/architecture.md
	$(BIN)/python tests/engine_proof/proof_table.py --write docs/engine-layouts.md

# Rewrite docs/images/fleet-page.png (the README's picture of the fleet page) from the browser test's seeded records;
# needs Debian's chromium and chromium-driver (`.ci/run` installs them; as root: apt-get install chromium chromium-driver).
screenshot: $(STAMP)
	LORA_CONVERT_REQUIRE_BROWSER=1 LORA_CONVERT_WRITE_SCREENSHOT=1 $(BIN)/pytest -q tests/test_fleet_page_browser.py -k screenshot

clean:
	rm -rf $(VENV) demo-out
