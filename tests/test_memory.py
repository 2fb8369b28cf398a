"""malloc settings (seminar_ray/memory.py): a serving thread and a training step stop faulting in the pages they
freed a moment ago. Each runs in a fresh process, whose malloc is untouched."""

from __future__ import annotations

import subprocess
import sys
import textwrap

FAULTS_PER_REQUEST = textwrap.dedent("""
    import resource, sys, threading
    import numpy as np
    from seminar_ray.memory import keep_freed_memory

    def faults_per_request(n=50):  # a request's arrays, allocated in a thread as Serve runs user code
        out = []
        def work():
            np.zeros(1 << 16)  # the thread's malloc arena exists before counting
            f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            for _ in range(n):
                np.argpartition(np.ones((100, 2000), np.float32), 1900, axis=1)
            out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0) / n)
        t = threading.Thread(target=work)
        t.start()
        t.join()
        return out[0]

    before = faults_per_request()
    kept = keep_freed_memory()
    print(before, faults_per_request(), kept)
""")


def test_keep_freed_memory_stops_a_threads_arena_refaulting_its_pages():
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_REQUEST], capture_output=True, text=True, check=True)
    before, after, kept = out.stdout.split()
    assert kept == "True"
    assert float(after) * 2 < float(before), out.stdout  # glibc's defaults give the pages back every request


TRAINING_STEP_FAULTS = textwrap.dedent("""
    import resource
    import statistics
    import torch
    from seminar_ray.train.loop import setup_training_process

    def faults_per_step(n=20):  # a step's activations at L = 2,000 exceed glibc's 32 MB mmap ceiling
        x = torch.ones(16, 1024, 64)
        counts = []
        for _ in range(n):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            rows = x.repeat(4, 4, 1)  # 64 MB
            float(rows[-1, -1, -1])
            del rows
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return statistics.median(counts)  # the heap may grow once or twice on the way: the median is the step

    before = faults_per_step()
    setup_training_process(1)
    print(before, faults_per_step(), torch.get_num_threads())
""")


def test_training_process_keeps_a_steps_freed_activations_instead_of_refaulting_them():
    out = subprocess.run([sys.executable, "-c", TRAINING_STEP_FAULTS], capture_output=True, text=True, check=True)
    before, after, threads = out.stdout.split()
    assert float(before) > 10_000, out.stdout  # 64 MB = 16,384 pages of 4 KiB, mapped afresh each step
    assert float(after) * 100 < float(before), out.stdout
    assert threads == "1"
