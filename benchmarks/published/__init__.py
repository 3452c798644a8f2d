"""``gradckpt plan`` against memory figures their authors measured on real GPUs and published.

``measurements.json`` is the table (source, exact setup, measured value and what it is:
allocated, reserved, active or capacity); ``run.py`` estimates every row with matching settings
and writes the error per row. Run: ``python -m benchmarks.published``.
"""
