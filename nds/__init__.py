"""Neural Data Server: find the public source data that helps a small target task.

The library is importable without Prefect; `flows/` orchestrates it.
"""

__version__ = "0.1.0"
