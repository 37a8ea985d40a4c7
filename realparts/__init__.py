"""Real parts that tests and the bench both run: a Redis server and `celery worker` processes (servers.py), and an
HTTP(S) origin on loopback that injects faults and records what it receives (origin.py). Neither imports tests/
nor bench/; only what the tests alone need stays in tests/support/."""
