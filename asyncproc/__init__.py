"""asyncproc: a task-processing service whose only queue is PostgreSQL."""

__version__ = "0.1.0"
