"""Speed benchmarks of icrt (run with ``python scripts/benchmark.py``).

Not part of the installed library: they import icrt like any user code would, and need the
``bench`` extra (transformers, h5py) and, for ``sim``, a trained checkpoint.
"""
