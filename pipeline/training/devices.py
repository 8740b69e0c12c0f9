"""Where and how a cohort computes: autocast dtype, memory format, CPU threads, and how many members fit.

On the CPU the analogue of CUDA streams is threads: :class:`CpuWorkers` steps its share of a cohort with ONE
intra-op thread per member (the cores are split between models instead of within every small convolution). Pruned
networks' convolutions have few channels, so splitting each of them across cores scales poorly and suffers badly
when the cores are shared with other processes (OpenMP barriers wait for descheduled threads); one model per core
does not. It also makes a member's numbers independent of the cohort: oneDNN's convolutions may sum in another
order with another thread count, so a cohort of one steps its member on one intra-op thread too.
"""
from __future__ import annotations

import concurrent.futures
import copy
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.training.spec import AUTO_COHORT

log = logging.getLogger(__name__)


def parse_device(device: str, *, then: str = "use --device cpu") -> torch.device:
    """``--device`` as a torch device, cpu or cuda[:N]; one NpsError line naming it otherwise, or when no CUDA device
    is here (``then`` says what to do instead)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise NpsError(f"--device {device!r}: not a device; use cpu or cuda (cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise NpsError(f"--device {device!r}: use cpu or cuda (cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NpsError(f"--device {device}: no CUDA device here; {then}")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic instructions (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def has_depthwise_convs(models: Sequence[nn.Module]) -> bool:
    """Whether any of ``models`` has a depthwise conv (groups == in_channels > 1)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for model in models for m in model.modules())


def resolve_amp(amp: str | None, device: torch.device, models: Sequence[nn.Module] = ()) -> torch.dtype | None:
    """The autocast dtype. ``"auto"``: bf16 on GPUs that support it, else fp16 (with a GradScaler); on the CPU bf16
    where it has native bf16 instructions (tools/bench_cohort.py measured a pruned ResNet-56 step about 1.5–2× faster
    on a Zen 4 core), except for networks with depthwise convs (``models``): tools/bench_amp.py measured bf16
    autocast about 2× *slower* than fp32 for MobileNetV2/V3, EfficientNet and MNASNet on an AMD EPYC with
    AVX512-BF16, so those train in fp32; else none. Pruning keeps depthwise convs depthwise, so a base network and
    its subnetworks resolve alike."""
    amp = "off" if amp in (None, False) else amp
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16() and not has_depthwise_convs(models):
            return torch.bfloat16
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise NpsError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")


def resolve_channels_last(channels_last: bool | str, device: torch.device) -> bool:
    """``"auto"``: channels_last (NHWC) on GPUs (tensor cores want it) and on the CPU (oneDNN's NHWC convolutions:
    a pruned ResNet-56 step measured about 1.4× faster than NCHW on a Zen 4 core, and no slower elsewhere we
    looked); ``False`` on other devices."""
    if channels_last == "auto":
        return device.type in ("cuda", "cpu")
    return bool(channels_last)


def resolve_cpu_workers(cpu_workers: int | str, device: torch.device, k: int) -> int:
    """Threads stepping cohort members concurrently on the CPU: ``"auto"`` → one per intra-op thread torch may use
    (``torch.get_num_threads()``), at most K; 1 = the plain loop (each op multi-threaded). Always 1 on a GPU."""
    if device.type != "cpu":
        return 1
    if cpu_workers == "auto":
        return max(1, min(k, torch.get_num_threads()))
    if isinstance(cpu_workers, bool) or not isinstance(cpu_workers, int) or cpu_workers < 1:
        raise NpsError(f"cpu_workers must be 'auto' or an integer >= 1, got {cpu_workers!r}")
    return min(k, cpu_workers)


class CpuWorkers:
    """A pool of threads that step cohort members concurrently, each op single-threaded (see the module doc)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="nps-cohort", initializer=torch.set_num_threads, initargs=(1,))

    def map(self, fn: Callable[[Any], None], items: Sequence[Any]) -> None:
        """``fn(item)`` for every item, items dealt round-robin to the threads; re-raises the first error."""
        shares = [items[i::self.workers] for i in range(self.workers)]
        futures = [self._pool.submit(lambda share=share: [fn(item) for item in share]) for share in shares if share]
        concurrent.futures.wait(futures)
        for future in futures:
            future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        torch.set_num_threads(self._saved_threads)


# --------------------------------------------------------------------------------------------------------------------
# Cohort size.


def estimate_train_bytes(model: nn.Module, input_shape: Sequence[int], amp_dtype: torch.dtype | None = None) -> int:
    """Rough device bytes to train ``model`` on batches of ``input_shape`` (N, C, H, W).

    Parameters, gradients and momentum in fp32, plus an autocast copy of the weights, plus every leaf module's output
    for the whole batch (what autograd keeps for backward), measured with a shape-only forward on the meta device.
    """
    params = sum(p.numel() for p in model.parameters())
    act_bytes = 2 if amp_dtype in (torch.float16, torch.bfloat16) else 4
    meta = copy.deepcopy(model).to("meta")
    total = [0]

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()

    handles = [m.register_forward_hook(hook) for m in meta.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            meta(torch.empty(tuple(input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return int(params * (4 * 3 + act_bytes) + total[0] * act_bytes * 1.25)


def choose_cohort_size(models: Sequence[nn.Module], device: torch.device | str, input_shape: Sequence[int], *,
                       max_k: int | None = None, amp_dtype: torch.dtype | None = None,
                       free_bytes: int | None = None, reserve: float = 0.15,
                       cpu_default: int = AUTO_COHORT["cpu"]) -> int:
    """How many of ``models`` to train at once.

    On a GPU: as many as fit in the free memory (``torch.cuda.mem_get_info``, less ``reserve`` for the data, the
    allocator's slack and cuDNN workspaces), each costing :func:`estimate_train_bytes` of the largest model (every
    CUDA stream keeps its own activations). On the CPU: ``cpu_default``. Always within [1, len(models)] and
    ``max_k``. The estimate is deliberately simple: an out-of-memory error halves the cohort anyway.
    """
    device = torch.device(device)
    n = len(models)
    if n == 0:
        return 0
    limit = n if max_k is None else max(1, min(n, int(max_k)))
    if device.type != "cuda" and free_bytes is None:
        return max(1, min(limit, cpu_default))
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    largest = max(models, key=lambda m: sum(p.numel() for p in m.parameters()))
    per_model = max(1, estimate_train_bytes(largest, input_shape, amp_dtype))
    k = int(free_bytes * (1 - reserve) // per_model)
    log.info("cohort size %d (free %.2f GiB, ~%.3f GiB per subnetwork)", k, free_bytes / 2**30, per_model / 2**30)
    return max(1, min(limit, k))
