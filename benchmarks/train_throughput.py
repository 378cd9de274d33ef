"""Training throughput: a plain PyTorch loop vs vembed in-process vs Ray Train with 1 and 2 DDP workers.

One run, one machine, one model (a CLIP with 4-layer, 128-wide towers on 64 px images, built from a config), one
global batch size. Cases:

    (a) plain   a minimal single-process loop written here: a torch DataLoader decoding images and tokenising in
                this process, forward, loss, backward, clip, AdamW step (no reporting, no checkpoints);
                (a') is the same loop over batches decoded beforehand: the compute-only ceiling
    (b) local   vembed's TorchTrainer with num_workers=0 (the loop runs in this process, data from Ray Data)
    (c) ray-1   TorchTrainer, 1 worker
    (d) ray-2   TorchTrainer, 2 DDP workers, torch threads split so workers do not oversubscribe the cores
    (n) ray-1   as (c) with ``cache_preprocessed: false``: streaming, every epoch preprocesses again (before/after)
    (s) seed    the seed API as a new user calls it: ``VEmbedFactoryTrainer(model).train(data, out, epochs=E,
                batch_size=B)`` with every other setting at its default (1 worker, shuffling on), on the local Ray
                instance it starts itself (no Ray running before it), as a new user gets it

Every case trains 2K epochs of ``--steps`` steps and is timed over the last K (``--timed-epochs``, 3): the first
K absorb start-up (Train workers and Ray Data worker processes importing torch and transformers, first batches,
the cache filling) and the one-time costs of the first end-of-epoch checkpoint and the first cached epoch, as in
any run longer than a few minutes. vembed reports samples/s per logging window, so ``logging_steps`` is K epochs;
the timed window also pays each epoch's end (checkpoint, the next Ray Data execution starting). On a shared
2-core VM single epochs vary by about ±15 %, so K epochs are timed rather than one, and (a) runs twice, before
Ray starts and after it has shut down, its mean the reference. Each vembed case also prints
rank 0's time per loop phase over that window (``vembed.training.step_timing``) and, on Linux, the CPU each
process on the machine used over the same window (from ``/proc``, in % of one core): the training process(es),
Ray Data's tasks and actors, Ray Train's actors, vembed's own actor and Ray's daemons, and how long the training
threads were runnable but waiting for a core, and how often they were preempted. ``--cache`` sets
``cache_preprocessed`` for (b)-(d) (the seed case keeps the default, auto): ``false`` measures streaming, where
every epoch preprocesses again.
Model FLOP/s are the FLOPs of one training step (counted with ``torch.utils.flop_counter``) times steps/s, as a
fraction of this CPU's measured float32 matmul peak. Goals (issue 18): b/a >= 0.95, c/a >= 0.9, seed/a >= 0.9,
d/c as high as the cores allow.

    python benchmarks/train_throughput.py [--steps 16] [--timed-epochs 3] [--batch-size 32] [--cases abcds] [--cache auto]
        [--rounds 1]   # R > 1: every case R times, each round on a fresh local Ray (every other round in reverse
                       # order); the median of each goal ratio
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from vembed.data.dataset import VisualRetrievalDataset  # noqa: E402
from vembed.losses.factory import LossFactory  # noqa: E402
from vembed.testing import make_shapes_dataset, make_tiny_clip  # noqa: E402
from vembed.training.model_builder import build_model, load_processor  # noqa: E402
from vembed.training.optimizer_builder import build_optimizer  # noqa: E402
from vembed.training.step_timing import breakdown_table  # noqa: E402

IMAGE_SIZE = 64
WIDTH = 128
LAYERS = 4


def make_model(directory: Path) -> Path:
    """The tiny CLIP's tokenizer and processor with 4-layer, 128-wide towers (random init, seeded)."""
    make_tiny_clip(directory, hidden=WIDTH, image_size=IMAGE_SIZE)
    config = CLIPConfig.from_pretrained(directory)
    config.text_config.num_hidden_layers = LAYERS
    config.vision_config.num_hidden_layers = LAYERS
    config.vision_config.patch_size = 8
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    return directory


def matmul_peak(threads: int, n: int = 1024, repeats: int = 20) -> float:
    """Measured float32 matmul FLOP/s with ``threads`` threads (best of ``repeats``)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def plain_loop(cfg: dict, steps: int, threads: int) -> tuple[float, float, float]:
    """(a): samples/s of a minimal hand-written loop that decodes its batches as it goes (a torch DataLoader in
    this process, as such a loop is usually written), the same loop over batches decoded beforehand (compute
    only), and the FLOPs of one step."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(cfg)
    criterion = LossFactory.create(cfg)
    optimizer = build_optimizer(model, cfg, extra_modules=[criterion])
    dataset = VisualRetrievalDataset(cfg["data_path"], load_processor(cfg["model_name"]))
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], collate_fn=dataset.collator(), drop_last=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(batch):
        loss = criterion(model(**batch), batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = list(loader)
    counter = FlopCounterMode(display=False)
    with counter:
        step(batches[0])

    def timed(batch_source) -> float:
        """samples/s over one pass of ``batch_source``."""
        start = time.perf_counter()
        for batch in batch_source:
            step(batch)
        return steps * cfg["batch_size"] / (time.perf_counter() - start)

    timed_epochs = cfg["logging_steps"] // steps
    for _ in range(cfg["epochs"] - timed_epochs):  # the warm-up epochs, as in the vembed cases
        timed(loader)  # the data set holds exactly `steps` batches
    live = over_timed_epochs("(a)", lambda: timed(loader), timed_epochs)
    precollated = over_timed_epochs("(a')", lambda: timed(batches), timed_epochs)
    return live, precollated, float(counter.get_total_flops())


def thread_scheduling(pid: int | str = "self") -> dict[int, tuple[float, int]]:
    """Per thread of process ``pid``: seconds spent runnable but waiting for a core, and how many times it was
    preempted (involuntary context switches), from ``/proc`` (Linux; empty elsewhere or once it ended)."""
    threads = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # the process ended
        return threads
    for task in tasks:
        try:
            waited = int((task / "schedstat").read_text().split()[1]) / 1e9
            preempted = int((task / "status").read_text().split("nonvoluntary_ctxt_switches:")[1].split()[0])
        except (OSError, IndexError, ValueError):  # this thread ended meanwhile
            continue
        threads[int(task.name)] = (waited, preempted)
    return threads


def scheduling_delta(before: dict[int, tuple[float, int]], after: dict[int, tuple[float, int]]) -> tuple[float, int]:
    """Waiting seconds and preemptions between two :func:`thread_scheduling` readings (threads that started in
    between count from zero, threads that ended are left out)."""
    waited = sum(w - before.get(tid, (0.0, 0))[0] for tid, (w, _) in after.items())
    preempted = sum(p - before.get(tid, (0.0, 0))[1] for tid, (_, p) in after.items())
    return waited, preempted


def over_timed_epochs(name: str, epoch: Callable[[], float], epochs: int) -> float:
    """samples/s over ``epochs`` runs of ``epoch`` (which returns its own samples/s); prints how long this process's
    threads waited for a core meanwhile and how often they were preempted."""
    before, start = thread_scheduling(), time.perf_counter()
    rate = epochs / sum(1 / epoch() for _ in range(epochs))
    elapsed = time.perf_counter() - start
    waited, preempted = scheduling_delta(before, thread_scheduling())
    print(
        f"{name} threads waited for a core {100 * waited / elapsed:.1f} % of one core, preempted "
        f"{preempted / elapsed:.0f} times/s",
        flush=True,
    )
    return rate


def process_cpu(proc_entry: Path) -> tuple[str, float]:
    """A process's name (as ``/proc`` shows it, 15 characters at most) and the CPU seconds it has used (user plus
    system), from ``/proc/PID/stat``; raises OSError once the process has ended."""
    stat = (proc_entry / "stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return stat[stat.index("(") + 1 : stat.rindex(")")], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProcessCpu:
    """CPU time of every process on this machine, sampled from ``/proc`` every ``interval`` seconds in a thread,
    to say which processes used the cores over a training window, and how often the training threads waited for
    a core (Linux only; elsewhere it records nothing)."""

    def __init__(self, training: set[str], interval: float = 1.0) -> None:
        self.training = training  # process names as /proc shows them (15 characters at most)
        self.interval = interval
        # (time, {pid: (name, cpu seconds, training processes' thread_scheduling or {})})
        self.samples: list[tuple[float, dict[int, tuple[str, float, dict[int, tuple[float, int]]]]]] = []
        self._stopped = threading.Event()
        if Path("/proc/self/stat").exists():
            threading.Thread(target=self._run, daemon=True).start()

    def _is_training(self, pid: int, name: str) -> bool:
        return pid == os.getpid() or name in self.training

    def _snapshot(self) -> dict[int, tuple[str, float, dict[int, tuple[float, int]]]]:
        processes = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                name, cpu = process_cpu(entry)
            except OSError:  # the process ended
                continue
            pid = int(entry.name)
            threads = thread_scheduling(pid) if self._is_training(pid, name) else {}
            processes[pid] = (name, cpu, threads)
        return processes

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.samples.append((time.monotonic(), self._snapshot()))

    def stop(self) -> None:
        self._stopped.set()

    def window(self, seconds: float) -> str:
        """One line on the last ``seconds`` of training -- the window ends at the last sample in which the training
        processes (and this one) together still used more than one core: each process's % of one core (those
        above 0.5 %), the cores left idle, and the training threads' time waiting for a core and preemptions."""
        busy = [i for i in range(1, len(self.samples)) if self._training_cpu(i) > self._elapsed(i - 1, i)]
        if not busy:
            return "CPU by process: not measured"
        last = busy[-1]
        first = min(range(last), key=lambda i: abs(self.samples[i][0] - (self.samples[last][0] - seconds)))
        elapsed = self._elapsed(first, last)
        start, end = self.samples[first][1], self.samples[last][1]
        shares: dict[str, float] = defaultdict(float)
        waited = preempted = 0.0
        for pid, (name, cpu, threads) in end.items():
            before = start.get(pid, (name, 0.0, {}))
            shares["this process (driver)" if pid == os.getpid() else name] += 100 * (cpu - before[1]) / elapsed
            wait, switches = scheduling_delta(before[2], threads)
            waited, preempted = waited + wait, preempted + switches
        idle = 100 * (os.cpu_count() or 1) - sum(shares.values())
        parts = [f"{name} {share:.1f}" for name, share in sorted(shares.items(), key=lambda x: -x[1]) if share >= 0.5]
        return (
            f"CPU by process over the timed window, % of one core: {', '.join(parts)}; idle {max(idle, 0.0):.1f}. "
            f"Training threads waited for a core {100 * waited / elapsed:.1f} % of one core, preempted "
            f"{preempted / elapsed:.0f} times/s"
        )

    def _elapsed(self, first: int, last: int) -> float:
        return self.samples[last][0] - self.samples[first][0]

    def _training_cpu(self, i: int) -> float:
        before, after = self.samples[i - 1][1], self.samples[i][1]
        return sum(
            after[pid][1] - before[pid][1] for pid in after if pid in before and self._is_training(pid, after[pid][0])
        )

    def reset(self) -> None:
        self.samples.clear()


TRAINING_PROCESSES = {"ray::RayTrainWo"}  # Ray Train's workers, as /proc names them (15 characters)


def vembed_run(cfg: dict, num_workers: int, threads: int, out: Path) -> tuple[float, dict]:
    """(b)-(d), (n): samples/s over the timed epochs of a vembed Ray Train run, and rank 0's time per loop phase."""
    from vembed.training.launcher import run_training

    torch.set_num_threads(threads)
    result = run_training(
        {**cfg, "num_workers": num_workers, "torch_threads": threads, "output_dir": str(out), "run_name": out.name}
    )
    return float(result.metrics["samples_per_s"]), result.metrics


def seed_api_run(cfg: dict, out: Path) -> tuple[float, dict]:
    """(s): samples/s over the timed epochs through ``VEmbedFactoryTrainer(...).train`` with default settings."""
    from vembed.trainer import VEmbedFactoryTrainer

    trainer = VEmbedFactoryTrainer(
        cfg["model_name"], learning_rate=cfg["learning_rate"], logging_steps=cfg["logging_steps"]
    )
    result = trainer.train(cfg["data_path"], out, epochs=cfg["epochs"], batch_size=cfg["batch_size"])
    return float(result.metrics["samples_per_s"]), result.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per epoch")
    parser.add_argument(
        "--timed-epochs", type=int, default=3, help="K: each case trains 2K epochs and is timed over the last K"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every case this many times; report each ratio's median"
    )
    parser.add_argument("--preprocess-tasks", type=int, default=None, help="vembed's preprocess_tasks (default: null)")
    parser.add_argument("--cases", default="abcds", help="which cases to run, e.g. 'ab' (ratios need a)")
    parser.add_argument(
        "--cache", default="auto", choices=["auto", "true", "false"], help="cache_preprocessed for (b)-(d)"
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="vembed-bench-"))
    model_dir = make_model(work / "clip")
    data = make_shapes_dataset(
        work / "data", num_train=args.steps * args.batch_size, num_val=0, num_test=0, image_size=IMAGE_SIZE
    )
    cfg = {
        "model_name": str(model_dir),
        "data_path": str(data["train"]),
        "batch_size": args.batch_size,
        "epochs": 2 * max(1, args.timed_epochs),
        "learning_rate": 1e-4,
        "logging_steps": args.steps * max(1, args.timed_epochs),  # one window over the warm-up, one timed
        "mixed_precision": "no",
        "shuffle": False,
        "preprocess_tasks": args.preprocess_tasks,
        "cache_preprocessed": {"auto": "auto", "true": True, "false": False}[args.cache],
    }

    peak = matmul_peak(cores)  # before Ray starts
    goal_ratios: list[dict[str, float]] = []
    for round_index in range(args.rounds):
        if args.rounds > 1:
            print(f"\n## round {round_index + 1} of {args.rounds}", flush=True)
        rates, flops_per_step = one_round(cfg, args, work / f"round{round_index}", reverse=bool(round_index % 2))
        if "a" in args.cases:
            goal_ratios.append(report(rates, flops_per_step, peak, args))
    if len(goal_ratios) > 1:
        print(f"\nGoal ratios per round and their median over {len(goal_ratios)} rounds:")
        print("| ratio | " + " | ".join(f"round {i + 1}" for i in range(len(goal_ratios))) + " | median |")
        print("|---|" + "---|" * (len(goal_ratios) + 1))
        for key in goal_ratios[0]:
            values = [ratios[key] for ratios in goal_ratios]
            print(f"| {key} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {statistics.median(values):.2f} |")


def one_round(cfg: dict, args: argparse.Namespace, work: Path, reverse: bool = False) -> tuple[dict[str, float], float]:
    """Every selected case once: the plain loop before Ray starts, (b)-(d) and (n) on a fresh local Ray, (s) on
    the local Ray the seed API starts itself (as a user gets it: ``vembed.training.launcher.ensure_ray``), all in
    reverse order when ``reverse`` (alternate rounds, so that a drift of the machine over a round does not always
    fall on the same case), the plain loop again once Ray has shut down. Returns samples/s per case ((a), (a'):
    the mean of their two runs) and the FLOPs of one step."""
    cores = os.cpu_count() or 1
    # The plain loop first, before Ray starts: Ray's start-up (its worker processes importing) would otherwise take
    # the cores from under it for several seconds.
    rates: dict[str, float] = {}
    flops_per_step = 0.0
    if "a" in args.cases:
        plain, compute_only, flops_per_step = plain_loop(cfg, args.steps, cores)
        rates = {"(a) plain PyTorch loop": plain, "(a') same loop, batches decoded beforehand": compute_only}
        print(f"(a) {plain:.1f} samples/s; (a') {compute_only:.1f} samples/s", flush=True)

    import ray

    streaming = {**cfg, "cache_preprocessed": False}
    on_shared_ray: list[tuple[str, str, Callable[[Path], tuple[float, dict]]]] = [
        ("b", "(b) vembed num_workers=0", lambda out: vembed_run(cfg, 0, cores, out)),
        ("c", "(c) TorchTrainer 1 worker", lambda out: vembed_run(cfg, 1, cores, out)),
        ("d", "(d) TorchTrainer 2 workers DDP", lambda out: vembed_run(cfg, 2, max(1, cores // 2), out)),
        ("n", "(n) TorchTrainer 1 worker, cache_preprocessed false", lambda out: vembed_run(streaming, 1, cores, out)),
    ]
    seed = ("s", "(s) seed API, VEmbedFactoryTrainer(...).train", lambda out: seed_api_run(cfg, out))
    cpu = ProcessCpu(TRAINING_PROCESSES)

    def run_cases(cases: list[tuple[str, str, Callable[[Path], tuple[float, dict]]]]) -> None:
        for letter, name, run in reversed(cases) if reverse else cases:
            if letter in args.cases:
                cpu.reset()
                rates[name], metrics = run(work / letter)
                print(f"{name}: {rates[name]:.1f} samples/s; {breakdown_table(metrics)}", flush=True)
                print(f"    {cpu.window(metrics['time_window_s'])}", flush=True)

    def shut_down_ray() -> None:
        ray.shutdown()
        time.sleep(15)  # let Ray's processes exit

    def on_own_ray() -> None:
        """(s) on the local Ray instance the seed API starts itself, as a new user gets it."""
        if "s" in args.cases:
            run_cases([seed])
            shut_down_ray()

    if reverse:
        on_own_ray()
    ray.init(num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)  # +2: the data pipeline beside 2 workers
    run_cases(on_shared_ray)
    shut_down_ray()
    if not reverse:
        on_own_ray()
    cpu.stop()
    if "a" in args.cases:
        # The plain loop once more, after Ray's processes have gone: the reference is the mean of the two runs, so
        # that a slow drift of this (shared) machine over the round does not tilt the ratios either way.
        plain_after, compute_only_after, _ = plain_loop(cfg, args.steps, cores)
        print(f"(a) before the vembed cases {plain:.1f}, after {plain_after:.1f} samples/s", flush=True)
        rates["(a) plain PyTorch loop"] = (plain + plain_after) / 2
        rates["(a') same loop, batches decoded beforehand"] = (compute_only + compute_only_after) / 2
    return rates, flops_per_step


def report(rates: dict[str, float], flops_per_step: float, peak: float, args: argparse.Namespace) -> dict[str, float]:
    """Print the README table and the goal ratios; returns the goal ratios."""
    plain = rates["(a) plain PyTorch loop"]
    flops_per_sample = flops_per_step / args.batch_size
    print(
        f"\nCLIP {LAYERS}x{WIDTH} towers, {IMAGE_SIZE}px, global batch {args.batch_size}, {args.steps} steps per "
        f"epoch, timed over the last {args.timed_epochs} of {2 * args.timed_epochs} epochs, "
        f"{os.cpu_count()} cores; matmul peak {peak / 1e9:.1f} GFLOP/s; {flops_per_step / 1e9:.2f} GFLOP per step"
    )
    print("(a), (a'): the mean of their runs before and after the vembed cases")
    print("| case | samples/s | vs (a) | model FLOP/s / peak |\n|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / plain:.2f} | {rate * flops_per_sample / peak:.1%} |")
    b = rates.get("(b) vembed num_workers=0", float("nan"))
    c = rates.get("(c) TorchTrainer 1 worker", float("nan"))
    d = rates.get("(d) TorchTrainer 2 workers DDP", float("nan"))
    seed = rates.get("(s) seed API, VEmbedFactoryTrainer(...).train", float("nan"))
    print(f"\ncache_preprocessed={args.cache}")
    print("| b/a (goal >= 0.95) | c/a (goal >= 0.9) | d/c (as the cores allow) | seed/a (goal >= 0.9) |")
    print("|---|---|---|---|")
    print(f"| {b / plain:.2f} | {c / plain:.2f} | {d / c:.2f} | {seed / plain:.2f} |")
    streaming = rates.get("(n) TorchTrainer 1 worker, cache_preprocessed false")
    if streaming:
        print(f"cache_preprocessed={args.cache} vs false, 1 worker: c/n = {c / streaming:.2f}")
    return {"b/a": b / plain, "c/a": c / plain, "d/c": d / c, "seed/a": seed / plain}


if __name__ == "__main__":
    main()
