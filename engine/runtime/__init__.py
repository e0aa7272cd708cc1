"""What keeps a multi-process run alive, and what a user should not need to open: the process group and the
launcher's environment (``distributed.py``), the run directory and which checkpoint to resume (``rundir.py``), the
ranks' periodic agreement (``agreement.py``), the watchdog for a stuck rank (``watchdog.py``), stop signals and exit
codes (``preemption.py``), the local process spawner of scripts, benchmarks and tests (``spawn.py``), the test
suite's fault injection (``faults.py``, through the ``debug.*`` keys: docs/testing.md), and the collective counter
tests and benchmarks measure with (``comm_debug.py``, never imported by a run)."""
