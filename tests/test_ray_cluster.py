"""A Ray node lost mid-job: two nodes on this machine (ray.cluster_utils.Cluster); the worker node that runs
the pool's actors is removed while batches are in flight, and every batch still gets its answers."""

import sys

import pytest

ray = pytest.importorskip("ray")


def test_a_lost_node_costs_no_answers():
    from ray.cluster_utils import Cluster

    from densify.engines.ray_pool import RayPoolEngine

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import test_ray_pool as T  # its seeded truth and batches (shipped to the actors by value)

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes()
        pool = RayPoolEngine(T.PROFILE, engine="simulated", engine_options={"truth": T.TRUTH}, num_actors=2, num_cpus_per_actor=1,
                             max_in_flight_per_actor=1, max_retries=3, split_min_queries=0)  # whole batches in flight
        batches = [T.make_batch(700 + i, n=3000) for i in range(12)]
        got = {}
        for b, c in pool.stream(batches):
            got[b.tag] = c
            if len(got) == 1:  # the node goes away mid-job; a new one joins
                cluster.remove_node(worker)
                cluster.add_node(num_cpus=2)
        stats = dict(pool.stats)
        pool.close()
        local = T.SimulatedEngine(T.PROFILE, truth=T.TRUTH)
        assert len(got) == 12 and stats["actor_failures"] >= 1 and stats["failed_batches"] == 0
        for b in batches:
            assert [c.text for c in got[b.tag]] == [c.text for c in local.generate(b)]
    finally:
        ray.shutdown()
        cluster.shutdown()
