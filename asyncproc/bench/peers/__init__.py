"""`asyncproc bench --peers`: asyncproc beside the queues a user would pick instead.

Each peer runs from a virtualenv of its own (venvs.py) as `python -m
asyncproc.bench.peers.<peer>`, a module that imports only the standard library,
its own queue library and common.py, so that it runs under the peer's Python.
"""
