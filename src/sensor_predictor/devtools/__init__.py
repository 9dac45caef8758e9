"""Development tools that ship with the package: for the tests, the bench and the demo.

Nothing here runs in the worker. Each module keeps its heavy imports inside its functions.
"""
