"""Development tooling shipped with the package (throwaway PostgreSQL, ...): used by the bench,
the tests and the demo, never by the worker itself."""
