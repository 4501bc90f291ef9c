"""Runnable demos of fastpref's losses (``make demo``); each is ``python -m fastpref.demos.<name>``."""
