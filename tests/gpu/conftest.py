"""``memcheck_kernel.py`` is a script for compute-sanitizer runs (see README.md), not a pytest module."""

collect_ignore = ["memcheck_kernel.py"]
