# `make demo` and `make test` set everything up on first use (a .venv with the CPU torch).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= results/demo
# Where pip finds torch. Empty = pip's own configuration (on this project's machines a local
# CPU wheel). Elsewhere use the CPU index, or it may fetch a multi-GB CUDA build:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: demo test test-fast lab venv clean
venv: $(VENV)/.installed

# torch first, pinned, so pip never resolves a multi-GB CUDA build; then the package.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	@! $(BIN)/pip show torchvision >/dev/null 2>&1 || (echo "torchvision got installed; it breaks diffusers here" && exit 1)
	touch $@

demo: venv
	$(BIN)/splitcontrol compare --out $(OUT)

# the teaching lab: JupyterLab on lab/ (the notebooks also run in VS Code or plain Jupyter with .venv's kernel)
lab: venv
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[lab]"
	$(BIN)/jupyter lab lab/

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info
