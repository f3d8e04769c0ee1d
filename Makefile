# spatial-ssrl — the README's commands.
CARGO ?= cargo
SSRL  := ./target/release/ssrl

.PHONY: demo test bench lint fuzz clean help

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

demo: ## build, then generate all five tasks from the bundled photos and RGB-D frames into ./demo-out
	$(CARGO) build --release --locked
	rm -rf demo-out
	$(SSRL) tasks --images fixtures/photos --images fixtures/official \
	              --rgbd fixtures/rgbd --rgbd fixtures/official \
	              --out demo-out --per-image 2 --seed 0

test: ## build and run every test (what CI runs)
	$(CARGO) test --locked

bench: ## task-generation throughput (samples/s per core at 640x480)
	$(CARGO) bench --locked --bench tasks

lint: ## formatting and clippy, warnings as errors
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fuzz: ## fuzz the reward parser (needs: cargo install cargo-fuzz, a nightly toolchain)
	cd fuzz && cargo +nightly fuzz run reward -- -max_total_time=60

clean:
	rm -rf demo-out target/bench-tasks
