"""The asyncproc worker: a Procrastinate worker that runs ledger tasks."""
