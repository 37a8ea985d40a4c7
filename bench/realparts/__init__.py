"""Real parts that tests and the bench both run: a Redis server and `celery worker` processes (servers.py), and an
HTTP(S) origin on loopback that injects faults and records what it receives (origin.py). They import nothing
of tests/ or the rest of bench/, so tests use them without the bench; what only tests need stays in tests/support/."""
