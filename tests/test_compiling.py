"""CUDA graphs through torch.compile (model.compile_mode): the loop's bookkeeping that CPU can check.

Whether the graphs are captured on a GPU is tests/test_gpu_readiness.py's
test_gpu_cudagraphs_run_like_default_compile (gpu-marked)."""
import torch

from fast_ressl.compiling import CudagraphSkips, wants_cudagraphs


def test_skip_reasons_come_from_inductors_own_logger():
    """The reasons are read from the logger inductor's real skip function writes to (torch-internal:
    this fails if a torch release logs them elsewhere), and the count from its counter."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    skips = CudagraphSkips().start()
    try:
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (2 instances)\nstack ...")
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (2 instances)\nstack ...")
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to cpu device (arg3_1)")
    finally:
        skips.stop()
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to something after stop")
    assert skips.report() == {"graphs_without_cudagraphs": 3, "reasons": [
        "skipping cudagraphs due to mutated inputs (2 instances)", "skipping cudagraphs due to cpu device (arg3_1)"]}
    fresh = CudagraphSkips().start()  # counts from its own start
    fresh.stop()
    assert fresh.count == 0


def test_cudagraph_modes_only_on_cuda():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert wants_cudagraphs(True, "reduce-overhead", cuda) and wants_cudagraphs(True, "max-autotune", cuda)
    assert not wants_cudagraphs(True, "reduce-overhead", cpu)
    assert not wants_cudagraphs(False, "reduce-overhead", cuda)
    assert not wants_cudagraphs(True, "default", cuda) and not wants_cudagraphs(True, "max-autotune-no-cudagraphs", cuda)

