# Two entry points, both self-contained on a fresh machine:
#   make demo   set up .venv and run lora-convert on the example adapter in examples/
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch (the [smoke] extra) is pinned to the CPU wheel that lies on this workplace's disk; installing it before the
# project keeps pip from resolving the open `torch>=2.4` requirement to a multi-GB CUDA build. Real users keep the
# open range.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test setup clean readme docs

setup: $(STAMP)

$(STAMP): pyproject.toml tests/engine_proof/requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,proof,smoke,ray]'
	# The engine proof (tests/test_proof_*.py) runs the engines' own LoRA loaders on the CPU. Their wheels come from
	# PyPI WITHOUT dependencies (their pins pull CUDA builds); the file lists the few pure-Python packages their LoRA
	# code imports. GPU-only imports are stubbed by the harnesses in tests/engine_proof/.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r tests/engine_proof/requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	bash examples/demo.sh

test: $(STAMP)
	$(BIN)/pytest -q

# Re-run the README's sample commands and rewrite their outputs (tests/test_readme_samples.py checks them).
readme: $(STAMP)
	$(BIN)/python tests/readme_samples.py --write

# Regenerate the codes section of docs/validate.md from the registry (tests/test_codes.py checks it) and the
# per-release engine tables of docs/engine-layouts.md from the rule files (tests/test_engine_profiles.py checks it).
docs: $(STAMP)
	$(BIN)/python -m lora_convert.codes --write docs/validate.md
	$(BIN)/python -m lora_convert.engines.table --write docs/engine-layouts.md

clean:
	rm -rf $(VENV) demo-out
