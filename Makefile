# The README's first two commands:  make run   (set up + the main job on its samples)
#                                   make test  (set up + the test suite; .ci/run calls it)
.PHONY: setup run test bench clean
setup:
	@scripts/setup.sh

run: setup
	.venv/bin/python -m runner

# the suite's wall time on the last line; make's exit status stays pytest's
test: setup
	@echo .venv/bin/python -m pytest -q; start=$$(date +%s); \
	.venv/bin/python -m pytest -q; status=$$?; \
	echo "test suite wall time: $$(( $$(date +%s) - start )) s"; exit $$status

bench: setup
	.venv/bin/python bench/bench_embed.py && .venv/bin/python bench/bench_scheduling.py

clean:
	rm -rf outputs multirun .pytest_cache
