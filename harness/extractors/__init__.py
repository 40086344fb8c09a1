"""Model-family feature extractors sharing the protocol in `engine/base.py`."""
