# The README's first two commands:  make run   (set up + the main job on its samples)
#                                   make test  (set up + the test suite; .ci/run calls it)
.PHONY: setup run test bench clean
setup:
	@scripts/setup.sh

run: setup
	.venv/bin/python -m runner

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/bench_embed.py && .venv/bin/python bench/bench_scheduling.py

clean:
	rm -rf outputs multirun .pytest_cache
