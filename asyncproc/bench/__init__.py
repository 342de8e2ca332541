"""`asyncproc bench`: starts the real service and measures it against in-run references."""
