"""Model-family feature extractors sharing the protocol in `base.py`."""
