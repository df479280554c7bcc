"""Every benchmark, on one harness (benchmarks/harness.py). `ponder bench` runs benchmarks/engine.py;
the others run as `python -m benchmarks.NAME` from the repo root. Benchmarks may import any package
here but tests; nothing but the `ponder` command and tests imports them."""
