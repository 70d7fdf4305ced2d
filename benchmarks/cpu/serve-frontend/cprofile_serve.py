"""`pagedllm serve` with the event loop thread (the main thread) under cProfile, timed by that thread's CPU time,
not wall time: waits for the GIL (the engine loop thread holds it while it processes a step) are not charged to
whatever the event loop was doing. The stats go to $PROFILE_OUT when the server exits.
Usage: PROFILE_OUT=FILE.prof python cprofile_serve.py serve MODEL [FLAGS...]"""

import cProfile
import os
import sys
import time

from pagedllm.entrypoints.cli import main

if __name__ == "__main__":  # the engine core process is spawned: it imports this module again
    profiler = cProfile.Profile(time.thread_time)
    sys.argv = ["pagedllm", *sys.argv[1:]]
    try:
        profiler.runcall(main)
    except SystemExit:
        pass
    finally:
        profiler.dump_stats(os.environ["PROFILE_OUT"])
