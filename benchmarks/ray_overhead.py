"""What Ray's own processes cost a training step on this machine, with no vembed code in the step.

One fixed batch, one model (``train_throughput.py``'s CLIP with 4-layer, 128-wide towers on 64 px images), one
step: forward, CLIP loss, backward, AdamW, with torch using every core. The step is timed in five places, each
round in this order, every Ray case on a fresh local instance:

    (p) this process, no Ray running
    (r) this process, a local Ray up with Ray's defaults (dashboard on)
    (q) this process, a local Ray up as vembed starts one (``include_dashboard=False``); (r) and (q) swap places
        every other round, and their paired ratio (q)/(r) is printed too
    (t) as (q), while a Ray Train run (1 worker whose train function only sleeps) is alive beside it
    (w) inside a Ray Train worker (TorchTrainer, 1 worker, on a Ray started as in (q))

Every Ray process wakes up many times a second even when idle (timers, gRPC polling), and on a small machine
each wake-up takes a core from one of torch's threads, whose team then waits for it. For each case the script
prints samples/s, the ratio to (p), and what the other processes did over the timed window (from ``/proc``:
how many, their CPU in % of one core, their threads' wake-ups per second). (p) and the Ray cases alternate
within a round, so a slow drift of a shared machine falls on all of them.

    python benchmarks/ray_overhead.py [--rounds 3] [--steps 30] [--batch-size 32] [--cases rqtw]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from train_throughput import make_model, process_cpu  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from transformers import CLIPModel  # noqa: E402

WINDOWS = 3  # the step is timed over this many windows of --steps steps; the median is reported


def step_rate(model_dir: str, steps: int, batch_size: int) -> float:
    """Samples/s of the fixed training step in the calling process (median of :data:`WINDOWS` windows)."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = CLIPModel.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(0, 100, (batch_size, 16))
    pixel_values = torch.randn(batch_size, 3, 64, 64)

    def step() -> None:
        model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(8):  # warm-up: allocator, thread pool, first-call paths
        step()
    rates = []
    for _ in range(WINDOWS):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def process_counters(exclude: set[int]) -> dict[int, tuple[float, int]]:
    """Per process on this machine (but ``exclude``): CPU seconds used and its threads' context switches
    (voluntary and not: each is a wake-up or a preemption)."""
    counters = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            _, cpu = process_cpu(entry)
            switches = 0
            for task in (entry / "task").iterdir():
                status = (task / "status").read_text()
                switches += sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
        except OSError:  # the process ended while being read
            continue
        counters[int(entry.name)] = (cpu, switches)
    return counters


def others_line(before: dict[int, tuple[float, int]], after: dict[int, tuple[float, int]], seconds: float) -> str:
    """How many other processes ran over the window, their CPU (% of one core) and wake-ups per second."""
    common = [pid for pid in after if pid in before]
    cpu = sum(after[p][0] - before[p][0] for p in common)
    wakeups = sum(after[p][1] - before[p][1] for p in common)
    return f"{len(common)} other processes: {100 * cpu / seconds:.1f} % of one core, {wakeups / seconds:.0f} wake-ups/s"


def measured(run: Callable[[], float], exclude: set[int]) -> tuple[float, str]:
    """``run()``'s samples/s and what the other processes did meanwhile."""
    before, start = process_counters(exclude), time.monotonic()
    rate = run()
    return rate, others_line(before, process_counters(exclude), time.monotonic() - start)


def in_train_worker(model_dir: str, steps: int, batch_size: int) -> tuple[float, str]:
    """(w): the step inside a Ray Train worker, its result written to a file this process reads (same machine)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    work = Path(tempfile.mkdtemp(prefix="vembed-ray-overhead-"))

    def train_loop(config: dict) -> None:
        time.sleep(15)  # as in (t): Ray Train's controller and helper actors are up and idle
        rate, line = measured(
            lambda: step_rate(config["model_dir"], config["steps"], config["batch_size"]), {os.getpid()}
        )
        Path(config["result"]).write_text(json.dumps([rate, line]))

    TorchTrainer(
        train_loop,
        train_loop_config={
            "model_dir": model_dir,
            "steps": steps,
            "batch_size": batch_size,
            "result": str(work / "result.json"),
        },
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(storage_path=str(work)),
    ).fit()
    rate, line = json.loads((work / "result.json").read_text())
    return float(rate), str(line)


def beside_idle_train_run(model_dir: str, steps: int, batch_size: int) -> tuple[float, str]:
    """(t): the step in this process while a 1-worker Ray Train run that only sleeps is alive (on the running
    local Ray)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stop = threading.Event()

    def idle_loop(config: dict) -> None:
        time.sleep(config["seconds"])

    def fit() -> None:
        TorchTrainer(
            idle_loop,
            train_loop_config={"seconds": 20 + 2 * steps},
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="vembed-ray-overhead-")),
        ).fit()
        stop.set()

    runner = threading.Thread(target=fit, daemon=True)
    runner.start()
    time.sleep(15)  # the controller, its helper actors and the worker are up and idle
    result = measured(lambda: step_rate(model_dir, steps, batch_size), {os.getpid()})
    if stop.is_set():
        raise RuntimeError("the idle Ray Train run ended before the window did: raise its sleep")
    runner.join()
    return result


NO_RAY = "(p) no Ray"
DASHBOARD = "(r) Ray up, Ray's defaults (dashboard on)"
NO_DASHBOARD = "(q) Ray up as vembed starts it (no dashboard)"


def one_round(model_dir: str, steps: int, batch_size: int, cases: str, reverse: bool) -> dict[str, tuple[float, str]]:
    """(p) and the selected Ray cases once, each Ray case on a fresh local instance; (r) and (q) swap places when
    ``reverse`` (alternate rounds), so that their paired ratio does not always see the same drift."""
    import ray

    here = {os.getpid()}
    cores = os.cpu_count() or 1

    def in_this_process() -> tuple[float, str]:
        return measured(lambda: step_rate(model_dir, steps, batch_size), here)

    def on_fresh_ray(dashboard: bool, run: Callable[[], tuple[float, str]]) -> tuple[float, str]:
        ray.init(num_cpus=cores + 1, include_dashboard=dashboard, log_to_driver=False)
        time.sleep(10)  # Ray's start-up (workers importing) is over
        try:
            return run()
        finally:
            ray.shutdown()
            time.sleep(10)  # let its processes exit

    results = {NO_RAY: in_this_process()}
    dashboard_cases = [("r", DASHBOARD, True), ("q", NO_DASHBOARD, False)]
    for letter, name, dashboard in reversed(dashboard_cases) if reverse else dashboard_cases:
        if letter in cases:
            results[name] = on_fresh_ray(dashboard, in_this_process)
    if "t" in cases:
        results["(t) as (q), beside an idle Ray Train run"] = on_fresh_ray(
            False, lambda: beside_idle_train_run(model_dir, steps, batch_size)
        )
    if "w" in cases:
        results["(w) inside a Ray Train worker"] = on_fresh_ray(
            False, lambda: in_train_worker(model_dir, steps, batch_size)
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="steps per timed window")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cases", default="rqtw", help="Ray cases beside (p), e.g. 'rq' for the dashboard A/B")
    args = parser.parse_args()
    model_dir = str(make_model(Path(tempfile.mkdtemp(prefix="vembed-ray-overhead-")) / "clip"))
    rounds = []
    for index in range(args.rounds):
        print(f"## round {index + 1} of {args.rounds}", flush=True)
        rounds.append(one_round(model_dir, args.steps, args.batch_size, args.cases, reverse=bool(index % 2)))
        for name, (rate, others) in rounds[-1].items():
            print(f"{name}: {rate:.1f} samples/s; {others}", flush=True)
    print(f"\n{os.cpu_count()} cores, batch {args.batch_size}; samples/s vs (p), per round and the median")
    print("| case | " + " | ".join(f"round {i + 1}" for i in range(len(rounds))) + " | median |")
    print("|---|" + "---|" * (len(rounds) + 1))
    paired = {name: [r[name][0] / r[NO_RAY][0] for r in rounds] for name in rounds[0]}
    if DASHBOARD in rounds[0] and NO_DASHBOARD in rounds[0]:
        paired["(q)/(r): without the dashboard vs with it"] = [r[NO_DASHBOARD][0] / r[DASHBOARD][0] for r in rounds]
    for name, ratios in paired.items():
        print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in ratios) + f" | {statistics.median(ratios):.2f} |")


if __name__ == "__main__":
    main()
