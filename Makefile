# spatial-ssrl — the README's commands.
CARGO ?= cargo
SSRL  := ./target/release/ssrl

.PHONY: demo test mpi fast-jpeg gpu-check nvrtc ort fixture real-3b bench lint fuzz clean help

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

demo: ort ## the whole recipe on the bundled data: tasks → rollouts → SFT cold start → merged package → GRPO → checkpoint → exported package → eval
	$(CARGO) build --release --locked $(JPEG_FEATURES)
	rm -rf demo-out
	$(SSRL) tasks --images fixtures/photos --rgbd fixtures/rgbd --out demo-out --per-image 2 --seed 0
	$(SSRL) tasks --images fixtures/official --rgbd fixtures/official --out demo-out/val --per-image 1 --seed 1
	$(SSRL) inspect --model models/tiny
	$(SSRL) rollout --model models/tiny --data demo-out/data/part-00000.parquet --group 5 \
	                --max-new-tokens 32 --limit 16 --out demo-out/rollouts.jsonl
	$(SSRL) sft --config configs/demo-sft.toml
	$(SSRL) export --model models/tiny --adapter demo-out/sft/checkpoints/global_step_80 --out demo-out/tiny-sft
	$(SSRL) train --config configs/demo.toml
	$(SSRL) export --model demo-out/tiny-sft --adapter demo-out/run/checkpoints/global_step_24 \
	               --out demo-out/tiny-grpo --optimize
	$(SSRL) inspect --model demo-out/tiny-grpo
	$(SSRL) eval --model models/tiny --data demo-out/val/data/part-00000.parquet --limit 8 \
	             --max-new-tokens 24 --out demo-out/eval-base
	$(SSRL) eval --model demo-out/tiny-sft --data demo-out/val/data/part-00000.parquet --limit 8 \
	             --max-new-tokens 24 --out demo-out/eval-sft
	$(SSRL) eval --model demo-out/tiny-grpo --data demo-out/val/data/part-00000.parquet --limit 8 \
	             --max-new-tokens 24 --out demo-out/eval-grpo
	$(SSRL) eval --compare demo-out/eval-base demo-out/eval-sft
	$(SSRL) eval --compare demo-out/eval-sft demo-out/eval-grpo
	$(SSRL) eval --model models/tiny --bench whatsup --images fixtures/photos --max-new-tokens 16 \
	             --data tests/fixtures/bench/whatsup/data/controlled_images_dataset.json \
	             --out demo-out/eval-whatsup

NVRTC_WHEEL := nvidia-cuda-nvrtc==13.5.37
NVRTC_DIR   := vendor/nvrtc

ORT_WHEEL := onnxruntime==1.31.1
ORT_DIR   := vendor/ort
export ORT_DYLIB_PATH ?= $(CURDIR)/$(ORT_DIR)/libonnxruntime.so

# Data parallel (MPI) is built and its two-rank tests run where an MPI library is installed
# (`mpicc` found: Open MPI or MPICH, with libclang for the bindings); elsewhere they say SKIP.
MPI_FEATURES := $(if $(shell command -v mpicc 2>/dev/null),--features mpi,)
# ssrl tasks writes JPEG through libjpeg-turbo's SIMD encoder where nasm is installed (`make
# fast-jpeg`), through the pure-Rust encoder elsewhere (about 2.8× slower to encode).
JPEG_FEATURES := $(if $(shell command -v nasm 2>/dev/null),--features fast-jpeg,)

test: nvrtc ort ## build and run every test (what CI runs)
	LD_LIBRARY_PATH="$(CURDIR)/$(NVRTC_DIR):$$LD_LIBRARY_PATH" $(CARGO) test --locked $(MPI_FEATURES) $(JPEG_FEATURES)

mpi: ## install Open MPI and libclang (Debian/Ubuntu, as root), for `cargo build --release --features mpi`
	apt-get install -y -q openmpi-bin libopenmpi-dev libclang-dev

fast-jpeg: ## install nasm (Debian/Ubuntu, as root), for `cargo build --release --features fast-jpeg`
	apt-get install -y -q nasm

gpu-check: nvrtc ## on an NVIDIA server: the GPU tests, failing where they would skip (ORT_DYLIB_PATH: onnxruntime-gpu's library)
	SSRL_REQUIRE_GPU=1 LD_LIBRARY_PATH="$(CURDIR)/$(NVRTC_DIR):$$LD_LIBRARY_PATH" $(CARGO) test --locked --test kernels_cuda
	SSRL_REQUIRE_GPU=1 LD_LIBRARY_PATH="$(CURDIR)/$(NVRTC_DIR):$$LD_LIBRARY_PATH" $(CARGO) test --locked --test rollout -- cuda
	SSRL_REQUIRE_GPU=1 LD_LIBRARY_PATH="$(CURDIR)/$(NVRTC_DIR):$$LD_LIBRARY_PATH" $(CARGO) test --locked --test cli -- rollout_writes
	$(if $(MPI_FEATURES),SSRL_REQUIRE_GPU=1 LD_LIBRARY_PATH="$(CURDIR)/$(NVRTC_DIR):$$LD_LIBRARY_PATH" $(CARGO) test --locked $(MPI_FEATURES) --test parallel -- nccl,@echo "no mpicc: the NCCL check needs make mpi")

# ONNX Runtime's shared library from the PyPI wheel (ssrl loads it at run time; nothing links it).
ort: $(ORT_DIR)/.done
$(ORT_DIR)/.done:
	@mkdir -p $(ORT_DIR)/wheel
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
	  --platform manylinux_2_28_x86_64 $(ORT_WHEEL) -d $(ORT_DIR)/wheel
	python3 -m zipfile -e $(ORT_DIR)/wheel/*.whl $(ORT_DIR)/wheel/x
	cp $(ORT_DIR)/wheel/x/onnxruntime/capi/libonnxruntime.so.* $(ORT_DIR)/
	cp $(ORT_DIR)/wheel/x/onnxruntime/capi/libonnxruntime_providers_shared.so $(ORT_DIR)/
	cd $(ORT_DIR) && ln -sf libonnxruntime.so.1.* libonnxruntime.so
	rm -rf $(ORT_DIR)/wheel && touch $@

# The CUDA runtime compiler from PyPI (no GPU needed) lets the tests compile kernels/*.cu.
# Best effort: offline, the CUDA tests print SKIP instead.
nvrtc: $(NVRTC_DIR)/.done
$(NVRTC_DIR)/.done:
	@mkdir -p $(NVRTC_DIR)/wheel
	-@python3 -m pip download -q --no-deps --only-binary=:all: $(NVRTC_WHEEL) -d $(NVRTC_DIR)/wheel \
	  && python3 -m zipfile -e $(NVRTC_DIR)/wheel/*.whl $(NVRTC_DIR)/wheel/x \
	  && cp $(NVRTC_DIR)/wheel/x/nvidia/cu13/lib/libnvrtc* $(NVRTC_DIR)/ \
	  && rm -rf $(NVRTC_DIR)/wheel && touch $@ \
	  || echo "note: $(NVRTC_WHEEL) unavailable; CUDA compile checks will SKIP"

bench: ## task-generation throughput: samples/s per core at 640x480, then per official input against the official scripts
	$(CARGO) bench --locked --bench tasks $(JPEG_FEATURES)

EXPORT_VENV ?= .venv-export

$(EXPORT_VENV)/.done: models/requirements.txt
	python3 -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/pip install -q -r models/requirements.txt
	touch $@

# The test packages' LoRA: small, on q and v (the exporter's default is EasyR1's recipe).
TINY_LORA := --lora-rank 8 --lora-alpha 16 --lora-targets q_proj,v_proj

fixture: $(EXPORT_VENV)/.done ## regenerate the tiny model package and the goldens (needs torch; not run by CI)
	rm -rf models/tiny
	$(EXPORT_VENV)/bin/python models/export.py --tiny --out models/tiny $(TINY_LORA) --verify --goldens
	rm -rf models/tiny-fp16
	$(EXPORT_VENV)/bin/python models/export.py models/tiny/hf --dtype fp16 --out models/tiny-fp16 $(TINY_LORA) \
	    --verify --goldens
	rm -rf models/tiny-vision-lora
	$(EXPORT_VENV)/bin/python models/export.py models/tiny/hf --out models/tiny-vision-lora --lora-rank 8 \
	    --lora-alpha 16 --lora-targets q_proj,v_proj,vision --verify --goldens
	rm -rf models/tiny-qwen3-vl
	$(EXPORT_VENV)/bin/python models/export.py --tiny --family qwen3_vl --out models/tiny-qwen3-vl --lora-rank 8 \
	    --lora-alpha 16 --lora-targets q_proj,v_proj --verify --goldens
	rm -rf models/tiny-qwen3-vl-vision-lora
	$(EXPORT_VENV)/bin/python models/export.py models/tiny-qwen3-vl/hf --out models/tiny-qwen3-vl-vision-lora \
	    --lora-rank 8 --lora-alpha 16 --lora-targets q_proj,v_proj,vision --verify --goldens
	$(EXPORT_VENV)/bin/python models/make_processor_goldens.py
	$(EXPORT_VENV)/bin/python models/make_pil_goldens.py
	$(EXPORT_VENV)/bin/python models/make_rope_goldens.py
	rm -rf models/tiny-genai-decoder.partial && $(EXPORT_VENV)/bin/python -m onnxruntime_genai.models.builder \
	    -m models/tiny/hf -i models/tiny/hf -o models/tiny-genai-decoder.partial -p fp32 -e cpu \
	    --extra_options exclude_embeds=true
	mv -f models/tiny-genai-decoder.partial/model.onnx models/tiny-genai-decoder.partial/model.onnx.data \
	    models/tiny-genai-decoder/
	rm -rf models/tiny-genai-decoder.partial
	rm -rf models/tiny-genai-decoder-fp16.partial && $(EXPORT_VENV)/bin/python -m onnxruntime_genai.models.builder \
	    -m models/tiny/hf -i models/tiny/hf -o models/tiny-genai-decoder-fp16.partial -p fp16 -e cuda \
	    --extra_options exclude_embeds=true
	mv -f models/tiny-genai-decoder-fp16.partial/model.onnx models/tiny-genai-decoder-fp16.partial/model.onnx.data \
	    models/tiny-genai-decoder-fp16/
	rm -rf models/tiny-genai-decoder-fp16.partial
	$(EXPORT_VENV)/bin/python models/make_half_embedding.py

REAL_3B := real/qwen2.5-vl-3b-l2

real-3b: $(EXPORT_VENV)/.done ## Qwen2.5-VL-3B's real widths, 2 text layers and 2 vision blocks, random weights (2.2 GB, not committed): CPU measurements at the real geometry
	rm -rf $(REAL_3B)
	$(EXPORT_VENV)/bin/python models/export.py --random-init qwen2.5-vl-3b --text-layers 2 --vision-depth 2 \
	    --out $(REAL_3B) --verify

lint: ## formatting and clippy, warnings as errors
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fuzz: ## fuzz the reward parser (needs: cargo install cargo-fuzz, a nightly toolchain)
	cd fuzz && cargo +nightly fuzz run reward -- -max_total_time=60

clean:
	rm -rf demo-out target/bench-tasks
