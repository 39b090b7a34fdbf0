"""A sweep's points as tasks on a Ray cluster: `./run.sh sweep --ray=ADDRESS`. Each unfinished point is one
task that holds the sweep's `resources_per_point` and trains it through the single-point path in a child
process (llm/scaling/ray_task.py). Exit code 2 is a failure that will not go away (bad config, NaN loss) and
is reported, not retried; a worker or node that dies, or any other exit code, is retried up to
`max_retries` times, resuming from the point's last checkpoint. The driver alone appends rows to
results.csv, in the order of the points (_Rows). Only this path imports ray.

Sweep config keys read here (llm/scaling/points.py has the others):
  resources_per_point  the Ray resources one point holds while it trains: {'CPU': 2}, {'GPU': 1}, {'TPU': 4},
                       'memory' in bytes, or a custom resource (default {'CPU': 1}); the child inherits the
                       CUDA_VISIBLE_DEVICES / TPU_VISIBLE_CHIPS that Ray sets for the task
  max_retries          how many times a point is started again after its worker died (SIGKILL, a preempted
                       VM) or its run exited with a code other than 0 and 2 (default 3)
"""

import dataclasses
import os
import pickle
import socket
import time
from typing import Any

import ml_collections

from llm.scaling import ray_task, sweep
from llm.scaling.points import Point, duration, estimate_seconds
from llm.spec import ConfigError

DEFAULT_RESOURCES = {"CPU": 1}
DEFAULT_MAX_RETRIES = 3
CONNECT_TIMEOUT_S = 5.0  # ray.init to an address where nothing listens retries for minutes
PROGRESS_EVERY_S = 30.0


def options(sweep_cfg: ml_collections.ConfigDict) -> tuple[dict[str, float], int]:
    """(resources_per_point, max_retries), checked."""
    resources = dict(sweep_cfg.get("resources_per_point") or DEFAULT_RESOURCES)
    for key, value in resources.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"resources_per_point[{key!r}] = {value!r}: need a number >= 0")
    max_retries = sweep_cfg.get("max_retries", DEFAULT_MAX_RETRIES)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"max_retries = {max_retries!r}: need an integer >= 0")
    return resources, max_retries


def _task_options(resources: dict[str, float]) -> dict[str, Any]:
    """Ray takes CPU, GPU and memory (bytes) as arguments of their own, every other resource in a dict."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    return dict(num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0),
                memory=resources.get("memory"), resources=custom)


def _check_reachable(address: str) -> None:
    """An address where no cluster listens is one error line now, not ray.init's minutes of retrying."""
    if address == "auto":
        return  # ray.init finds the cluster this machine belongs to, or fails at once
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray={address!r} is not 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there with "
                          f"`ray start --head --port={port}`, or give another --ray address") from None


def _connect(address: str):
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs the ray extra: pip install -e '.[ray]' (./run.sh setup installs it)") from None
    _check_reachable(address)
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as e:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {e}") from None
    return ray


def _room(ray, resources: dict[str, float]) -> int:
    """How many points the alive nodes can train at once, each holding `resources`."""
    room = 0
    for node in ray.nodes():
        if node["Alive"]:
            have = node["Resources"]
            room += min((int(have.get(k, 0) // v) for k, v in resources.items() if v > 0), default=0)
    return room


class _Rows:
    """Rows reach results.csv in the order of the points: a finished point's row waits until every earlier
    point has finished or failed, so a sweep without failures writes the local run's rows in the local run's
    order, whatever order its points finish in. A failed point holds up nobody; finished by a rerun, its row
    comes last. A row that waits is already in its point's result.json, so a killed driver loses none."""

    def __init__(self, workdir: str, points: list[Point]):
        self.workdir, self.order, self.outcome = workdir, [p.name for p in points], {}
        self.written: list[dict] = []

    def finish(self, name: str, row: dict | None) -> None:
        self.outcome[name] = row
        while self.order and self.order[0] in self.outcome:
            row = self.outcome[self.order.pop(0)]
            if row is not None:
                sweep._append_row(self.workdir, row)
                self.written.append(row)


@dataclasses.dataclass(eq=False)
class _Task:
    point: Point
    attempt: int  # 0: the first
    refs: Any  # its ObjectRefGenerator: {'host'} when it starts, then {'returncode', 'error'}
    host: str = ""
    started: float = 0.0


class _Progress:
    """done / running / pending / failed and an ETA: the dry-run estimates of what is left, scaled by how the
    points finished so far compare to theirs, over the points training at once."""

    def __init__(self, points: list[Point], throughput: dict, total: int):
        self.estimate = {p.name: estimate_seconds(p, throughput) for p in points}
        self.total, self.done, self.failed = total, total - len(points), 0
        self.measured = self.estimated = 0.0
        self.counts = ""

    def finished(self, name: str, seconds: float) -> None:
        self.done += 1
        self.measured += seconds
        self.estimated += self.estimate[name]

    def show(self, running: list[_Task], queued: list[_Task], always: bool = False) -> None:
        counts = (f"{self.done}/{self.total} done, {len(running)} running, {len(queued)} pending, "
                  f"{self.failed} failed")
        if counts == self.counts and not always:
            return
        self.counts = counts
        scale = self.measured / self.estimated if self.estimated else 1.0
        now = time.monotonic()
        left = sum(self.estimate[t.point.name] * scale for t in queued)
        left += sum(max(0.0, self.estimate[t.point.name] * scale - (now - t.started)) for t in running)
        print(f"[ray] {counts}; ETA {duration(left / max(1, len(running)))}", flush=True)


class _Driver:
    """Submits the points, hears from their tasks, retries or fails them, and hands rows to _Rows."""

    def __init__(self, ray, workdir: str, base, resources: dict[str, float], max_retries: int, rows: _Rows,
                 progress: _Progress):
        self.ray, self.workdir, self.base, self.max_retries = ray, workdir, base, max_retries
        self.remote = ray.remote(ray_task.train).options(max_retries=0, **_task_options(resources))  # retries are ours
        self.rows, self.progress = rows, progress
        self.queued: list[_Task] = []  # submitted, not started: Ray queues what does not fit (an autoscaler sees it)
        self.running: list[_Task] = []
        self.failures: list[str] = []

    def submit(self, point: Point, attempt: int = 0) -> None:
        blob = pickle.dumps((point, self.base))
        self.queued.append(_Task(point, attempt, self.remote.remote(blob, point.name, self.workdir, attempt)))

    def run(self) -> None:
        self.progress.show(self.running, self.queued)
        while self.queued or self.running:
            tasks = self.queued + self.running
            ready, _ = self.ray.wait([t.refs for t in tasks], num_returns=1, timeout=PROGRESS_EVERY_S)
            for task in [t for t in tasks if any(t.refs is r for r in ready)]:
                (self.queued if task in self.queued else self.running).remove(task)
                self.receive(task)
            self.progress.show(self.running, self.queued, always=not ready)

    def receive(self, task: _Task) -> None:
        exceptions = self.ray.exceptions
        try:
            message = self.ray.get(next(task.refs))
        except exceptions.RayTaskError as e:  # the task's own code raised: it would raise again
            self.fail(task, f"not retried: {str(e).strip().splitlines()[-1]}")
            return
        except exceptions.RayError as e:  # its worker or its node died
            self.retry_or_fail(task, f"its worker on {task.host or 'a node'} was lost ({type(e).__name__})")
            return
        if "host" in message:
            task.host, task.started = message["host"], time.monotonic()
            self.running.append(task)
            print(f"{task.point.name}: started on {task.host}, attempt {task.attempt + 1}", flush=True)
        elif message["returncode"] == 0:
            self.finished(task)
        elif message["returncode"] == 2:
            self.fail(task, f"not retried: {message['error']}")
        else:
            self.retry_or_fail(task, f"exit code {message['returncode']} on {task.host} ({message['error']})")

    def finished(self, task: _Task) -> None:
        row = sweep.finished_row(task.point, self.workdir)
        if row is None:
            marker = os.path.join(self.workdir, task.point.name, sweep.MARKER)
            self.fail(task, f"not retried: it finished on {task.host}, but {marker} is not here: is "
                            f"{self.workdir} one storage that every node mounts at this path?")
            return
        self.progress.finished(task.point.name, time.monotonic() - task.started)
        self.rows.finish(task.point.name, row)
        print(f"{task.point.name}: eval loss {row['eval_loss']}, {row['bits_per_byte']} bits/byte, "
              f"train loss {row['train_loss']}, {row['wall_seconds']} s on {task.host}", flush=True)

    def fail(self, task: _Task, why: str) -> None:
        self.progress.failed += 1
        self.failures.append(task.point.name)
        print(f"{task.point.name}: failed, {why}", flush=True)
        self.rows.finish(task.point.name, None)

    def retry_or_fail(self, task: _Task, why: str) -> None:
        if task.attempt >= self.max_retries:
            self.fail(task, f"out of retries (max_retries={self.max_retries}): {why}")
            return
        print(f"{task.point.name}: {why}; retry {task.attempt + 1} of {self.max_retries}, from its last "
              f"checkpoint", flush=True)
        self.submit(task.point, task.attempt + 1)


def run(sweep_cfg: ml_collections.ConfigDict, workdir: str, address: str, shard: str = "") -> list[dict]:
    """Trains every unfinished point of the sweep as a Ray task; returns the rows this run appended."""
    resources, max_retries = options(sweep_cfg)
    ray = _connect(address)
    workdir = os.path.abspath(workdir)  # a worker's working directory is not the driver's
    points, throughput = sweep.announce(sweep_cfg, workdir, shard, where=f" on the Ray cluster at {address}")
    done = sweep.finished_names(workdir)
    todo = [p for p in points if p.name not in done]
    rows, progress = _Rows(workdir, todo), _Progress(todo, throughput, len(points))
    room = _room(ray, resources)
    print(f"[ray] each point holds {resources}; the cluster has room for {room} at once"
          + ("" if room else " (none yet: waiting for nodes that fit)"), flush=True)
    driver = _Driver(ray, workdir, sweep_cfg.get("base"), resources, max_retries, rows, progress)
    for point in todo:
        row = sweep.finished_row(point, workdir)
        if row is None:
            driver.submit(point)
        else:  # finished, but the driver stopped before its row reached results.csv
            print(f"{point.name}: finished, row restored from {os.path.join(point.name, sweep.MARKER)}")
            progress.done += 1
            rows.finish(point.name, row)
    driver.run()
    if driver.failures:
        raise ConfigError(f"{len(driver.failures)} of {len(points)} points failed ({', '.join(driver.failures)}; "
                          f"why: above, and in each one's {ray_task.LOG}); rerun to retry them, the finished "
                          f"points are skipped")
    return rows.written
