"""The session Ray cluster works inside the test sandbox: tasks, fractional-CPU actors and Ray Data."""
import numpy as np


def test_ray_task_actor_and_data(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0.25)
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, k: int) -> int:
            self.n += k
            return self.n

    counters = [Counter.remote() for _ in range(8)]  # 8 × 0.25 CPU fit in the 4 logical CPUs
    assert ray.get([c.add.remote(i) for i, c in enumerate(counters)]) == list(range(8))
    ds = ray.data.range(1000).map_batches(lambda b: {"id": b["id"] * 2}, num_cpus=0.25)
    assert int(np.sum([row["id"] for row in ds.take_all()])) == 2 * sum(range(1000))
