"""One XLA compilation cache for the whole test session.

Many tests compile the same programs in different processes: the pytest-xdist workers, and the
subprocesses that tests start (the CLI, SIGKILL and resume, fake device counts, two processes).
On this CPU compiling is most of their time. The session points JAX's persistent compilation
cache at one fresh directory, which the workers and every subprocess inherit through the
environment, and deletes it at the end: each session starts cold, so nothing outlives a run.
A cached executable is the program XLA compiled, so results are those of an uncached run (the
tests that compare runs bit for bit hold either way). A cache directory already set in the
environment is used as it is and kept.
"""

import os
import shutil
import tempfile

_CREATED = None


def pytest_configure(config):
    global _CREATED
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _CREATED = tempfile.mkdtemp(prefix="kd_jax_tests_xla_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _CREATED
    # Cache every program, however quick to compile or small: the tests repeat small ones.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    import jax  # after the environment is set; the explicit updates cover an earlier import

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_unconfigure(config):
    # Only the process that made the directory removes it (xdist's workers inherit it).
    if _CREATED is not None:
        shutil.rmtree(_CREATED, ignore_errors=True)
