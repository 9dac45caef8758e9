"""Development tools that ship with the package (throwaway PostgreSQL, the old system's
statements and trainer, ...): for the tests, the bench and the demo, never the worker itself.

Each module keeps its heavy imports inside its functions.
"""
