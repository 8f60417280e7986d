"""Skip the interpreter's final garbage collections over the run's heap when the process exits.

At exit CPython clears every module and runs full cyclic collections over whatever is still
alive. A process that has run a phase holds torch, transformers, scikit-learn, Dagster and the
run's objects (about two thousand modules); those collections took 2.1-2.3 s after ``RUN_SUCCESS``
of a phase-2 run on 2 cores, 8% of its wall time (``benchmarks/bench_demo.py``). Moving the
surviving objects to the permanent generation (``gc.freeze``) in an exit handler makes the
collector skip them: the process then ends about 0.3 s after the run.

Nothing is lost. Every atexit handler still runs (logging flushes its handlers, ``weakref.finalize``
callbacks delete temporary directories, Dagster's storage has committed every event), and objects
that die by reference count are still finalised; only ``__del__`` of objects kept alive by
reference cycles is skipped, which Python never guarantees at exit ("It is not guaranteed that
``__del__()`` methods are called for objects that still exist when the interpreter exits",
Python data model).
"""

from __future__ import annotations

import atexit
import gc

_registered = False


def freeze_heap_at_exit() -> bool:
    """Register ``gc.freeze`` to run at interpreter exit (once); True when this call registered it.

    Exit handlers run last-registered first, so handlers registered before this one (logging,
    ``weakref.finalize``) run after the freeze, unaffected.
    """
    global _registered
    if _registered:
        return False
    atexit.register(gc.freeze)
    _registered = True
    return True
