"""A randomized history checker in the spirit of Jepsen/Elle (tests/faults/test_history.py).

ops.py is loaded by the workers and the API (ASYNCPROC_OPERATIONS_MODULE), so
it imports nothing of the test machinery; driver.py injects the faults and
checker.py judges the recorded history.
"""
