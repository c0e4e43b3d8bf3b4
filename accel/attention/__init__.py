"""Attention accelerators: block-sparse attention with an online pattern search (AdaSpa, `sparse.py`, `search.py`)."""
