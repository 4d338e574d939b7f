"""Data-parallel scaling of stage 2, measured side by side in one run: images/s of the training step for 1 and
2 processes with DeepSpeed ZeRO 0 / 2 / 3 against a plain torch DistributedDataParallel loop over the same model
and the same data, and the per-rank memory of parameters + gradients + optimizer state for ZeRO 0 vs 3 on the
~30 M-parameter reference model (configs/reference_224.yaml).

    OMP_NUM_THREADS=1 python bench/scaling.py [--rounds 5 --steps 4 --size 96 --batch 8 --worlds 1 2]

For each world size the script starts that many worker processes (plain env: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT; gloo on CPU, NCCL on GPU). The workers build every variant once, warm each up for 2 steps, then
time them in rounds, one step of each variant in turn, so a load change on a shared machine hits every
variant alike; the DeepSpeed/DDP ratio is taken per round and its median reported. The step is the one of
trainer/train.py: forward, the objective against the frozen g, backward, Adam step, on fixed in-memory batches
(the loader is measured by bench/loader.py).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

THROUGHPUT_MODES = ["ddp", "zero0", "zero2", "zero3"]
MEMORY_MODES = ["zero0", "zero2", "zero3-deepspeed", "zero3"]  # zero3-deepspeed: DeepSpeed's own second fp32 copy


# ------------------------------------------------------------------------------------------------ workers
def _config(path: str, overrides: list[str]):
    from trainer.config import load_config

    return load_config(os.path.join(ROOT, path), ["mlflow.enabled=false", *overrides])


def _frozen_g():
    from trainer.effnet import EfficientNetLite0
    from trainer.models import FrozenClassifier

    torch.manual_seed(0)
    net = EfficientNetLite0(num_classes=1)  # random weights: the cost of g does not depend on them
    return net, FrozenClassifier(net)


def _variant(mode: str, cfg, g_net, device: torch.device):
    """A fresh segmenter (same initial weights for every mode) wrapped as `mode`; returns (forward, step)."""
    from trainer.engine import deepspeed_config, make_engine
    from trainer.weights import build_segmenter

    torch.manual_seed(1)
    model = build_segmenter(cfg, 1, g_net).to(device)
    if mode == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)

        def backward_step(loss):
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return ddp, backward_step, None
    cfg.train.deepspeed = mode.split("-")[0]
    engine, _ = make_engine(model, cfg.train.lr, deepspeed_config(cfg, cfg.data.batch_size),
                            zero3_shared_master=not mode.endswith("-deepspeed"))

    def engine_step(loss):
        engine.backward(loss)
        engine.step()

    return engine, engine_step, engine


def _batches(cfg, rank: int, count: int, device: torch.device) -> list[dict]:
    gen = torch.Generator().manual_seed(100 + rank)
    size, batch = cfg.data.image_size, cfg.data.batch_size
    return [{"image": torch.rand(batch, 3, size, size, generator=gen).to(device),
             "labels": (torch.rand(batch, 1, generator=gen) < 0.5).float().to(device)} for _ in range(count)]


def _train_step(forward, backward_step, g, cfg, batch) -> float:
    from trainer.objectives import objective

    images, labels = batch["image"], batch["labels"]
    terms = objective(forward(images), images, labels, g, cfg.objective, segment=forward)
    backward_step(terms["loss"])
    return terms["loss"].item()


def throughput_worker(args) -> dict:
    """images/s (all ranks together) of each mode, per round."""
    import torch.distributed as dist

    from trainer.distributed import init_distributed

    rank, world = init_distributed(3600)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    cfg = _config(args.config, [f"data.image_size={args.size}", f"data.batch_size={args.batch}"])
    g_net, g = _frozen_g()
    g.to(device)
    batches = _batches(cfg, rank, args.steps, device)
    variants = {mode: _variant(mode, cfg, g_net, device) for mode in THROUGHPUT_MODES}
    for forward, backward_step, _ in variants.values():  # warm-up: first-step allocations, DeepSpeed buckets
        for batch in batches[:2]:
            _train_step(forward, backward_step, g, cfg, batch)
    # Interleaved one step at a time (ddp, zero0, zero2, zero3, ddp, ...): a load change on a shared machine
    # hits every variant alike. A round's rate is its images over the summed times of its steps.
    rates: dict[str, list[float]] = {mode: [] for mode in variants}
    for _ in range(args.rounds):
        seconds = dict.fromkeys(variants, 0.0)
        for batch in batches:
            for mode, (forward, backward_step, _) in variants.items():
                dist.barrier()
                _sync(device)
                start = time.perf_counter()
                _train_step(forward, backward_step, g, cfg, batch)
                _sync(device)
                dist.barrier()
                seconds[mode] += time.perf_counter() - start
        for mode in variants:
            rates[mode].append(world * args.batch * len(batches) / seconds[mode])
    return {"rates": rates}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_state_bytes(module: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state: every tensor reachable from the
    module's parameters (their ZeRO-3 partitions included), their .grad, and the optimizer object (DeepSpeed's
    flat partitions, fp32 master copies, gradient partitions and buckets, torch Adam's moments), each
    underlying storage counted once, in the first of those three groups that reaches it."""
    seen_storages: set[int] = set()
    totals = {"params": 0, "grads": 0, "optimizer": 0}

    def add(group: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() == 0 or storage.data_ptr() in seen_storages:
            return
        seen_storages.add(storage.data_ptr())
        totals[group] += storage.nbytes()

    params = list(module.parameters())
    for p in params:
        add("params", p.data)
        if hasattr(p, "ds_tensor"):
            add("params", p.ds_tensor)
    for p in params:
        if p.grad is not None:
            add("grads", p.grad)
    for tensor in _reachable_tensors(optimizer):
        add("optimizer", tensor)
    return totals


def _reachable_tensors(root, limit: int = 8):
    """Tensors reachable from `root` through containers, torch optimizers and DeepSpeed objects."""
    stack, seen = [(root, 0)], set()
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or depth > limit:
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            yield obj
            continue
        if isinstance(obj, dict):
            children = list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            children = list(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            children = [obj.state, obj.param_groups]
        elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
            children = list(vars(obj).values())
        else:
            continue
        stack.extend((child, depth + 1) for child in children)


def memory_worker(args) -> dict:
    """Peak model-state bytes of this rank for each ZeRO stage on the reference model (2 steps, the
    peak of the measurements right after backward and right after the optimizer step)."""
    from trainer.distributed import init_distributed

    rank, world = init_distributed(3600)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    # Model-state memory does not depend on the image size: a small image keeps the CPU steps short.
    cfg = _config("configs/reference_224.yaml", [f"data.image_size={args.memory_size}", "data.batch_size=1"])
    g_net, g = _frozen_g()
    g.to(device)
    batches = _batches(cfg, rank, 2, device)
    result = {}
    for mode in MEMORY_MODES:
        forward, _, engine = _variant(mode, cfg, g_net, device)
        peak = {"params": 0, "grads": 0, "optimizer": 0, "total": 0}
        from trainer.objectives import objective

        for batch in batches:
            images, labels = batch["image"], batch["labels"]
            terms = objective(forward(images), images, labels, g, cfg.objective, segment=forward)
            engine.backward(terms["loss"])
            after_backward = model_state_bytes(engine.module, engine.optimizer)
            engine.step()
            after_step = model_state_bytes(engine.module, engine.optimizer)
            for sample in (after_backward, after_step):
                total = sum(sample.values())
                if total > peak["total"]:
                    peak = {**sample, "total": total}
        result[mode] = peak
        del forward, engine
    from trainer.models import count_parameters
    from trainer.weights import build_segmenter

    return {"memory": result, "parameters": count_parameters(build_segmenter(cfg, 1, g_net), True)}


def worker_main(args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    result = throughput_worker(args) if args.worker == "throughput" else memory_worker(args)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ driver
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(kind: str, world: int, args) -> dict:
    """`world` worker processes of this script, started with the plain torch env, as torchrun would."""
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR":
               os.environ.get("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--out", out,
               *[str(a) for a in args.forward]]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if rank else None))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{kind} workers (world {world}) failed: exit codes {codes}")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def report(throughput: dict[int, dict], memory: dict[int, dict], args) -> str:
    lines = ["| processes | variant | images/s (all ranks), median | per round | DeepSpeed / DDP, median of rounds |",
             "|---:|---|---:|---|---:|"]
    for world, result in throughput.items():
        rates = result["rates"]
        for mode, per_round in rates.items():
            ratios = [r / d for r, d in zip(per_round, rates["ddp"])]
            ratio = "" if mode == "ddp" else (f"**{statistics.median(ratios):.2f}** "
                                              f"({min(ratios):.2f}–{max(ratios):.2f})")
            lines.append(f"| {world} | {mode} | {statistics.median(per_round):.1f} | "
                         f"{', '.join(f'{r:.1f}' for r in per_round)} | {ratio} |")
    if len(throughput) > 1 and 1 in throughput:
        many = max(throughput)
        lines += ["", f"| variant | {many}-process / 1-process images/s (medians) |", "|---|---:|"]
        for mode in throughput[1]["rates"]:
            rates = [statistics.median(throughput[w]["rates"][mode]) for w in (1, many)]
            speedup = rates[1] / rates[0]
            lines.append(f"| {mode} | {speedup:.2f} |")
    if memory:
        mib = 2 ** 20
        lines += ["", "Reference model (configs/reference_224.yaml), per rank (MiB):", "",
                  "| processes | ZeRO stage | parameters | gradients | optimizer state | total | / ZeRO-0 |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for world, result in memory.items():
            base = result["memory"]["zero0"]["total"]
            for mode, m in result["memory"].items():
                lines.append(f"| {world} | {mode} | {m['params'] / mib:.0f} | {m['grads'] / mib:.0f} | "
                             f"{m['optimizer'] / mib:.0f} | {m['total'] / mib:.0f} | **{m['total'] / base:.2f}** |")
        lines.append(f"\n({next(iter(memory.values()))['parameters'] / 1e6:.1f} M trainable parameters)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy_birds.yaml", help="model of the throughput runs")
    parser.add_argument("--size", type=int, default=96, help="image size of the throughput runs")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per process")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--worlds", type=int, nargs="*", default=[1, 2], help="throughput runs (none: skip)")
    parser.add_argument("--memory-worlds", type=int, nargs="*", default=[2, 4],
                        help="processes of the memory runs (none: skip)")
    parser.add_argument("--memory-size", type=int, default=64, help="image size of the memory run")
    parser.add_argument("--worker", choices=["throughput", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    args.forward = ["--config", args.config, "--size", args.size, "--batch", args.batch, "--steps", args.steps,
                    "--rounds", args.rounds, "--threads", args.threads, "--memory-size", args.memory_size]
    started = time.time()
    throughput = {world: launch("throughput", world, args) for world in args.worlds}
    memory = {world: launch("memory", world, args) for world in args.memory_worlds}
    print(report(throughput, memory, args))
    print(f"\n{time.time() - started:.0f} s; device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU, {os.cpu_count()} cores'}")


if __name__ == "__main__":
    main()
