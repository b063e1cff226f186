"""Framework overhead of `densify label`: synthetic images through the whole job, simulated engine on CPU actors.

    python -m benchmarks.label_bench [--images 1000] [--count 3072] [--actors N] [--no-ray] [--out DIR]
    python -m benchmarks.label_bench --images 100 --engine-rate 7200 --actors 2 --cpu-workers 1 --no-resume

Writes N small textured images (320x240 by default) with a ground-truth depth .npy beside each and a JSONL
manifest with intrinsics, runs the label job over them (answer store on, outputs on) and reports images/s,
simulated queries/s and where the time goes. It then reruns the job with every result.json removed, so
every answer comes from the store, and times the simulated engine alone on the same batches. Results go
to benchmarks/results/label_bench_<date>.json.

The simulated engine burns CPU too (on the same cores as the framework), so queries/s through the job is
a lower bound on what the framework sustains. The CPU time of the driver and of the actors is measured as
well: `framework_us_per_query` is the job's CPU time per answer minus the simulated engine's own (timed
alone), i.e. what the framework adds to each answer of a real (GPU) engine, and `projected_queries_per_s_2_cores`
the rate two otherwise idle cores would sustain (the machine may be shared: see `machine.load_avg`).

`--engine-rate Q` throttles the simulated engines to Q answers/s in all (Q / actors each: the engine option
`answers_per_s`, sleeping, so a paced actor stands in for a GPU engine of that rate) and asks whether the job
keeps up (`rate`: achieved/asked >= 0.9). The benchmark then starts Ray itself (logical CPUs: at least
actors + cpu_workers) and samples, every 0.25 s, the CPU time (user + system, psutil) of every process of
the job: the driver (less the sampler thread's own), the engine actors, the Ray CPU-task workers (every
other `ray::` process) and Ray's own daemons (raylet, gcs_server, agents). CPU seconds and busy cores are
reported over the job's run (after startup, interpolated between samples), with `cores_per_900qps`: busy
cores per 900 answered q/s, i.e. per GPU engine of that rate, and the same less the simulated engine's own
answer computation (timed alone; a real engine's host CPU is not modelled).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def make_dataset(folder: Path, n: int, width: int = 320, height: int = 240, seed: int = 0) -> Path:
    """n textured images with a smooth depth map (a tilted plane plus a box) and a JSONL manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fx = 0.5 * width / np.tan(np.radians(60) / 2)
    lines = []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        small = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
        img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        img = cv2.add(img, (rng.random((height, width, 3)) * 40).astype(np.uint8))
        a, b, c = rng.uniform(1.5, 4.0), rng.uniform(-1, 1), rng.uniform(-1, 1)
        depth = a + b * (xx / width - 0.5) + c * (yy / height - 0.5)
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        depth[y0:y0 + height // 3, x0:x0 + width // 3] *= 0.6
        cv2.imwrite(str(folder / f"img_{i:05d}.png"), img[..., ::-1])
        np.save(folder / f"img_{i:05d}.depth.npy", depth.astype(np.float32))
        lines.append(json.dumps({"image": f"img_{i:05d}.png", "intrinsics": [fx, fx, width / 2, height / 2]}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def engine_alone(manifest: Path, cfg, n: int) -> dict:
    """The simulated engine's own speed, in this process, on the first n images' batches."""
    from densify.sim.engine import SimulatedEngine
    from densify.stages.depth import DepthStage
    from densify.stages.label import iter_manifest

    eng = SimulatedEngine(cfg.profile, cfg.engine.options.model_copy(update={"answers_per_s": None}))  # unpaced
    stage = DepthStage(cfg, eng)
    t_prep = t_gen = 0.0
    q = 0
    for k, src in enumerate(iter_manifest(str(manifest))):
        if k >= n:
            break
        t0 = time.perf_counter()
        _, batch = stage.prepare(src)
        t1 = time.perf_counter()
        eng.generate(batch)
        t_gen += time.perf_counter() - t1
        t_prep += t1 - t0
        q += len(batch.queries)
    return {"images": n, "queries": q, "engine_s": t_gen, "engine_queries_per_s": q / t_gen,
            "prepare_s_per_image": t_prep / n}


class CpuSampler:
    """CPU seconds (user + system) of this process and all its descendants (a Ray started here: daemons,
    actors, task workers), sampled every `every` s in a thread; processes grouped by their title. A process
    that exits between two samples loses at most one interval of CPU time."""

    AGENTS = ("DashboardAgent", "RuntimeEnvAgent")

    def __init__(self, every: float = 0.25, actor_title: str = "_EngineActor"):
        import psutil

        self.psutil, self.every, self.actor_title = psutil, every, actor_title
        self.me = psutil.Process()
        self.kind: dict[int, str] = {}
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.series: list[tuple[float, dict]] = []
        self.sampler_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cpu-sampler")
        self.sample(first=True)

    def _classify(self, p) -> str:
        if p.pid == self.me.pid:
            return "driver"
        try:
            title = " ".join(p.cmdline()) or p.name()
        except self.psutil.Error:
            title = ""
        if self.actor_title in title:
            return "actors"
        if title.startswith("ray::") and not any(a in title for a in self.AGENTS):
            return "workers"  # a Ray task worker (ray::IDLE, ray::_worker_prepare, ...)
        return "ray_daemons"

    def sample(self, first: bool = False) -> None:
        procs = [self.me] + self.me.children(recursive=True)
        for p in procs:
            try:
                t = p.cpu_times()
                cpu = t.user + t.system
            except self.psutil.Error:
                continue
            kind = self._classify(p)
            if self.kind.get(p.pid) != "actors":  # an idle worker that became an actor stays one
                self.kind[p.pid] = kind
            if p.pid not in self.base:
                self.base[p.pid] = cpu if first else 0.0
            self.last[p.pid] = cpu
        m = self.psutil.cpu_times()
        machine = m.user + m.system + m.nice + getattr(m, "irq", 0) + getattr(m, "softirq", 0)
        self.series.append((time.perf_counter(), dict(self.last), self.sampler_cpu, machine))

    @property
    def totals(self) -> list[tuple[float, dict]]:
        """(time, cumulative CPU seconds per group) per sample, each process in the group it ended in (a
        worker Ray started idle and then made an actor counts as an actor from the start)."""
        out = []
        for t, last, sampler_cpu, machine in self.series:
            g = dict.fromkeys(("driver", "actors", "workers", "ray_daemons"), 0.0)
            for pid, cpu in last.items():
                g[self.kind[pid]] += cpu - self.base[pid]
            g["driver"] -= sampler_cpu
            g["machine_busy"] = machine
            out.append((t, g))
        return out

    def _loop(self) -> None:
        t0 = time.thread_time()
        while not self._stop.wait(self.every):
            self.sample()
            self.sampler_cpu = time.thread_time() - t0

    def start(self) -> "CpuSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def at(self, t: float) -> dict:
        """Cumulative CPU seconds per group at time t (perf_counter), linear between samples."""
        s = self.totals
        if t <= s[0][0]:
            return dict(s[0][1])
        for (t0, a), (t1, b) in zip(s, s[1:]):
            if t <= t1:
                w = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
                return {k: a[k] + w * (b[k] - a[k]) for k in a}
        return dict(s[-1][1])

    def window(self, t0: float, t1: float) -> dict:
        a, b = self.at(t0), self.at(t1)
        return {k: b[k] - a[k] for k in a}


def rate_report(sampler: CpuSampler, t_start: float, full: dict, asked: float, engine_us: float,
                actors: int) -> dict:
    """Keeping up with a paced engine, and the CPU it took over the run (after startup)."""
    run_s = full["wall_s"] - full["startup_s"]
    t_run0 = t_start + full["startup_s"]
    cpu_run = sampler.window(t_run0, t_run0 + run_s)
    cpu_all = sampler.window(t_start, t_start + full["wall_s"])
    machine = cpu_run.pop("machine_busy")
    cpu_all.pop("machine_busy")
    achieved = full["queries"] / run_s
    job_cpu = sum(cpu_run.values())
    engine_cpu = engine_us * 1e-6 * full["queries"]  # the simulated answers' own computation
    gpus = achieved / 900.0
    cores = {k: v / run_s for k, v in cpu_run.items()}
    return {
        "asked_queries_per_s": asked, "per_actor_queries_per_s": asked / actors, "actors": actors,
        "achieved_queries_per_s": achieved, "ratio": achieved / asked, "keeps_up": achieved / asked >= 0.9,
        "run_s": run_s, "wall_s": full["wall_s"],
        "cpu_s_run": cpu_run, "cpu_s_whole_job": cpu_all, "busy_cores_run": cores,
        "busy_cores_job": job_cpu / run_s, "machine_busy_cores_run": machine / run_s,
        "cpu_us_per_answer": 1e6 * job_cpu / full["queries"],
        "cpu_us_per_answer_less_simulated_engine": 1e6 * (job_cpu - engine_cpu) / full["queries"],
        "gpus_at_900qps": gpus,
        "cores_per_900qps": job_cpu / run_s / gpus,
        "cores_per_900qps_by_group": {k: v / gpus for k, v in cores.items()},
        "cores_per_900qps_less_simulated_engine": (job_cpu - engine_cpu) / run_s / gpus,
        "cores_for_8x900qps": 8 * job_cpu / run_s / gpus,
        "cores_for_8x900qps_less_simulated_engine": 8 * (job_cpu - engine_cpu) / run_s / gpus,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--count", type=int, default=3072, help="queries per image")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--actors", type=int, default=None, help="Ray actors (default: one per CPU)")
    ap.add_argument("--in-flight", type=int, default=2, help="batches in flight per actor")
    ap.add_argument("--no-ray", action="store_true", help="engine in the driver process")
    ap.add_argument("--cpu-workers", type=int, default=0, help="prepare and densify in this many Ray CPU tasks "
                                                               "(ray.cpu_workers; 0: in the driver)")
    ap.add_argument("--densify", default=None, help="densify.method (default: the label config's, linear)")
    ap.add_argument("--adaptive", action="store_true", help="plan.mode adaptive (default: the label config's, grid)")
    ap.add_argument("--out", help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--tag", default="", help="suffix for the results file name")
    ap.add_argument("--engine-rate", type=float, default=None, help="pace the simulated engines to this many "
                    "answers/s in all (each actor: rate / actors) and measure the CPU of every process")
    ap.add_argument("--no-resume", action="store_true", help="skip the rerun from the answer store")
    ap.add_argument("--results", default=str(RESULTS), help="folder for the results file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("densify.io.cameras").setLevel(logging.ERROR)

    from densify.config.loading import dict_overrides
    from densify.stages.label import LabelJob
    from densify.stages.settings import LabelConfig, load_config

    if args.engine_rate is not None and not args.engine_rate > 0:
        ap.error("--engine-rate must be > 0")
    if args.engine_rate and args.no_ray and args.cpu_workers:
        ap.error("--cpu-workers need Ray: drop --no-ray")
    actors = 1 if args.no_ray else (args.actors or os.cpu_count())
    engine = {"name": "simulated"}
    if args.engine_rate:
        engine["options"] = {"answers_per_s": args.engine_rate / actors}
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="label_bench_"))
    sampler = None
    started_ray = False
    try:
        t0 = time.perf_counter()
        manifest = make_dataset(work / "data", args.images, args.width, args.height)
        t_data = time.perf_counter() - t0
        cfg = load_config(LabelConfig, None, dict_overrides({
            "engine": engine, "plan": {"count": args.count, **({"mode": "adaptive"} if args.adaptive else {})},
            "ray": {"enabled": not args.no_ray, "num_actors": None if args.no_ray else actors, "max_in_flight_per_actor": args.in_flight,
                    "cpu_workers": args.cpu_workers},
            **({"densify": {"method": args.densify}} if args.densify else {}),
            "manifest_every_s": 30.0,
        }), default_name="label")
        out = work / "out"
        if args.engine_rate and not args.no_ray:
            import ray  # started here, so that every process of the job is this one's descendant

            ray.init(num_cpus=max(os.cpu_count(), actors + args.cpu_workers), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            started_ray = True
        if args.engine_rate:
            sampler = CpuSampler().start()
        load = os.getloadavg()
        t_start = time.perf_counter()
        full = LabelJob(cfg, out).run(str(manifest))
        load_after = os.getloadavg()
        if sampler is not None:
            sampler.stop()  # before Ray shuts down: the workers' last CPU seconds
        if started_ray:
            ray.shutdown()
            started_ray = False
        # Rerun with every image redone from the store: the framework without any engine work.
        for d in out.iterdir():
            if d.is_dir():
                (d / "result.json").unlink(missing_ok=True)
        cfg_store = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"enabled": False, "cpu_workers": 0})})
        resumed = None if args.no_resume else LabelJob(cfg_store, out).run(str(manifest))
        alone = engine_alone(manifest, cfg, min(20, args.images))
    finally:
        if sampler is not None and sampler._thread.is_alive():
            sampler.stop()
        if started_ray:
            import ray

            ray.shutdown()
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)

    run_s = full["wall_s"] - full["startup_s"]
    q = full["queries"]
    driver_cpu = full["time_s"]["driver_cpu"]
    actor_cpu = full["pool"].get("actor_cpu_s", 0.0)
    total_us = 1e6 * (driver_cpu + actor_cpu) / max(q, 1)
    engine_us = 1e6 / alone["engine_queries_per_s"]
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg": {"before": load, "after": load_after}},
        "setup": {"images": args.images, "size": [args.width, args.height], "queries_per_image": args.count,
                  "ray": not args.no_ray, "actors": full["pool"] and args.actors, "in_flight_per_actor": args.in_flight,
                  "cpu_workers": args.cpu_workers, "densify": cfg.densify.method, "plan": cfg.plan.mode,
                  "outputs": cfg.outputs.model_dump(), "store": cfg.store.model_dump(), "dataset_s": t_data},
        "full_job": {
            "images_per_s": full["images_per_s"], "queries_per_s": full["queries_per_s"],
            "wall_s": full["wall_s"], "startup_s": full["startup_s"], "run_s": run_s, "queries": q,
            "ok": full["ok"], "failed": full["failed"],
            "time_s": full["time_s"],
            "pool": full["pool"],
            "driver_cpu_us_per_query": 1e6 * driver_cpu / max(q, 1),
            "actor_cpu_us_per_query": 1e6 * actor_cpu / max(q, 1),
            "total_cpu_us_per_query": total_us,
        },
        "resume_from_store": resumed and {
            "images_per_s": resumed["images_per_s"], "queries_per_s": resumed["queries_per_s"],
            "store_hits": resumed["store_hits"], "engine_queries": resumed["engine_queries"],
            "time_s": resumed["time_s"],
        },
        "engine_alone": alone,
    }
    # The framework's cost per answer, as a real engine would see it: the job's CPU per query (prepare,
    # store, Ray, densify, outputs) less the simulated engine's own, against a 500 q/s engine's 2,000 us.
    fw = total_us - engine_us if actor_cpu else report["full_job"]["driver_cpu_us_per_query"] - engine_us
    report["engine_us_per_query"] = engine_us
    report["framework_us_per_query"] = fw
    report["overhead_vs_500qps_engine"] = fw / 2000.0
    report["framework_only_queries_per_s_per_core"] = 1e6 / fw
    report["projected_queries_per_s_2_cores"] = 2e6 / total_us if actor_cpu else None
    if args.engine_rate:
        report["setup"]["engine_rate"] = args.engine_rate
        report["rate"] = rate_report(sampler, t_start, full, args.engine_rate, engine_us, actors)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = f"label_bench_{datetime.date.today().isoformat()}{('_' + args.tag) if args.tag else ''}.json"
    (results / name).write_text(json.dumps(report, indent=2) + "\n")
    keys = ("full_job", "engine_us_per_query", "framework_us_per_query", "overhead_vs_500qps_engine",
            "framework_only_queries_per_s_per_core", "projected_queries_per_s_2_cores", "rate")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=2))
    print(f"results: {results / name}")
    report["results_file"] = str(results / name)
    return report


if __name__ == "__main__":
    main()
