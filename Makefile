# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU build of torch that lies on this machine's disk; never let pip resolve a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench clean llamacpp llamacpp-convert

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-data.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps -r requirements-data.txt
	touch $@

# The main job on built-in defaults: fine-tune minilm-l6 on tweets-sentiment, classify a few sentences, evaluate
# on the test split, then summarize and answer with SmolLM2-Instruct. Each step prints its name and a rough ETA:
# the fine-tuning takes 2-3 minutes on 2 idle AVX-512 cores (6.3 on an AVX2-only Zen 1), more on a busy machine.
DEMO_RUN ?= runs/demo-classify
demo: install
	@echo "--- [1/5] fine-tune minilm-l6 on tweets-sentiment (8000 rows): ETA 2-3 min on 2 idle AVX-512 cores, about 6 on AVX2-only ones, more on a busy machine"
	$(VENV)/bin/lmforge classify train --output $(DEMO_RUN) --overwrite
	@echo "--- [2/5] classify three sentences with the fine-tuned model: ETA under a minute"
	$(VENV)/bin/lmforge classify predict --model $(DEMO_RUN) \
		"I love this new phone, the battery lasts forever" \
		"The train was late again and nobody told us why" \
		"The meeting is scheduled for 3pm on Thursday"
	@echo "--- [3/5] evaluate on 2000 test tweets (accuracy, macro-F1, confusion matrix): ETA about a minute"
	$(VENV)/bin/lmforge classify eval --model $(DEMO_RUN) --data tweets-sentiment --limit 2000
	@echo "--- [4/5] summarize examples/article.txt with smollm2-135m-instruct: ETA under a minute"
	$(VENV)/bin/lmforge summarize examples/article.txt --max-new-tokens 80 --verbose
	@echo "--- [5/5] answer a question about examples/context.txt: ETA under a minute"
	$(VENV)/bin/lmforge ask --context examples/context.txt "How tall is the Eiffel Tower?" --verbose

# CI runs the fast tests, the slow real-weight tests marked `ci` (MiniLM, SmolLM2) and the llama.cpp comparisons
# (marked `llamacpp`; they skip, with the reason printed by -rs, without llama-cpp-python or llama.cpp's converter).
test: install
	$(PY) -m pytest -q -rs -m "not slow or ci or llamacpp" $(PYTEST_ARGS)

# llama-cpp-python (compiles llama.cpp: about 8 minutes on 2 cores; a portable build, not tuned to this CPU).
llamacpp: install
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q "llama-cpp-python>=0.3"

# llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py), and its
# tokenizer test vocabularies (models/ggml-vocab-*.gguf with the ids transformers gives for a set of test strings)
# and real chat templates (models/templates/*.jinja), taken from the pinned llama-cpp-python source release into
# .cache/llama.cpp/ (nothing compiled, about 60 MB kept); the GGUF family tests (tests/test_gguf_families.py) and
# the real-tokenizer tests (tests/test_real_tokenizers.py), marker llamacpp, use them and skip without them.
LLAMACPP_CONVERT_VERSION ?= 0.3.36
LLAMACPP_CONVERT_DIR := .cache/llama.cpp
LLAMACPP_SRC := $(LLAMACPP_CONVERT_DIR)/llama_cpp_python-$(LLAMACPP_CONVERT_VERSION)/vendor/llama.cpp
llamacpp-convert: install
	@test -f $(LLAMACPP_SRC)/convert_hf_to_gguf.py -a -f $(LLAMACPP_SRC)/models/ggml-vocab-qwen2.gguf.out || { \
		mkdir -p $(LLAMACPP_CONVERT_DIR) && \
		$(PIP) download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMACPP_CONVERT_VERSION)" \
			-d $(LLAMACPP_CONVERT_DIR) && \
		tar -xzf $(LLAMACPP_CONVERT_DIR)/llama_cpp_python-$(LLAMACPP_CONVERT_VERSION).tar.gz -C $(LLAMACPP_CONVERT_DIR) \
			--wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
			'*/vendor/llama.cpp/gguf-py/*' '*/vendor/llama.cpp/models/ggml-vocab-*' \
			'*/vendor/llama.cpp/models/templates/*' && \
		rm $(LLAMACPP_CONVERT_DIR)/llama_cpp_python-$(LLAMACPP_CONVERT_VERSION).tar.gz; }
	@ls $(LLAMACPP_SRC)/convert_hf_to_gguf.py $(LLAMACPP_SRC)/models/ggml-vocab-qwen2.gguf

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check lmforge tests benchmarks

# Benchmarks need a quiet machine; each prints a table and writes benchmarks/results/*.json.
bench: install
	$(PIP) install -q -e ".[bench]"
	$(PY) benchmarks/forward.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/classify.py

clean:
	rm -rf $(VENV) .pytest_cache
