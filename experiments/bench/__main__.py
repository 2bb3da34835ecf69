"""``python -m experiments.bench [--quick]``: see `experiments.bench.run`."""

from experiments.bench.run import main

main()
