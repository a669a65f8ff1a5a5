"""Thin typed Flyte tasks over the ``qloraflow`` library: policy in ``policy.py``, one module per stage."""
