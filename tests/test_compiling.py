"""CUDA graphs through torch.compile (model.compile_mode): the loop's bookkeeping that CPU can check.

Whether the graphs are captured on a GPU is tests/test_gpu_readiness.py's
test_gpu_cudagraphs_run_like_default_compile (gpu-marked)."""
import os

import torch

from fast_ressl.compiling import CudagraphSkips, toolchain_problem, wants_cudagraphs


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


def test_toolchain_for_cuda_is_a_c_compiler_and_python_headers(tmp_path):
    """Triton's needs on CUDA (the GPU path CPU cannot run), checked against real folders: an empty
    PATH and an include folder without Python.h name both; a compiler on PATH (a file that is
    executable is what shutil.which looks for) and a Python.h satisfy it; $CC wins over PATH."""
    bin_, inc = tmp_path / "bin", tmp_path / "include"
    bin_.mkdir(), inc.mkdir()
    problem = toolchain_problem("cuda", {"PATH": str(bin_)}, inc)
    assert problem is not None and "a C compiler (gcc or clang on PATH, or $CC)" in problem
    assert f"Python's headers ({inc / 'Python.h'})" in problem and "apt-get install gcc python3-dev" in problem
    (inc / "Python.h").write_text("")
    assert toolchain_problem("cuda", {"PATH": str(bin_)}, inc).startswith(
        "torch.compile on cuda needs a C compiler (gcc or clang on PATH, or $CC), missing here")
    for name in ("clang", "mycc"):
        (bin_ / name).write_text("#!/bin/sh\n")
        os.chmod(bin_ / name, 0o755)
    assert toolchain_problem("cuda", {"PATH": str(bin_)}, inc) is None
    assert toolchain_problem("cuda", {"PATH": str(bin_), "CC": "mycc"}, inc) is None
    assert "the C compiler CC=nocc" in toolchain_problem("cuda", {"PATH": str(bin_), "CC": "nocc"}, inc)


def test_toolchain_for_cpu_is_a_cxx_compiler_and_python_headers(tmp_path):
    bin_, inc = tmp_path / "bin", tmp_path / "include"
    bin_.mkdir(), inc.mkdir()
    problem = toolchain_problem("cpu", {"PATH": str(bin_)}, inc)
    assert "a C++ compiler (g++ on PATH, or $CXX) and Python's headers" in problem, problem
    assert "apt-get install g++ python3-dev" in problem
    (bin_ / "g++").write_text("#!/bin/sh\n")
    os.chmod(bin_ / "g++", 0o755)
    (inc / "Python.h").write_text("")
    assert toolchain_problem("cpu", {"PATH": str(bin_)}, inc) is None
    assert "the C++ compiler CXX=clang++" in toolchain_problem("cpu", {"PATH": str(bin_), "CXX": "clang++"}, inc)


def test_cudagraph_modes_only_on_cuda():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert wants_cudagraphs(True, "reduce-overhead", cuda) and wants_cudagraphs(True, "max-autotune", cuda)
    assert not wants_cudagraphs(True, "reduce-overhead", cpu)
    assert not wants_cudagraphs(False, "reduce-overhead", cuda)
    assert not wants_cudagraphs(True, "default", cuda) and not wants_cudagraphs(True, "max-autotune-no-cudagraphs", cuda)



def test_the_loop_warns_once_per_new_batch_of_graphs_without_cuda_graphs(capsys):
    """Loop._check_cudagraphs (after the first step and at each log step): a warning with inductor's
    reasons when graphs ran without CUDA graphs, nothing when no new one did, then only the new ones."""
    import types

    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    from fast_ressl.train import Loop

    loop = types.SimpleNamespace(cudagraph_skips=CudagraphSkips().start(), cudagraphs_warned=(0, 0),
                                 cfg=types.SimpleNamespace(model=types.SimpleNamespace(compile_mode="reduce-overhead")),
                                 env=types.SimpleNamespace(is_main=True))
    try:
        Loop._check_cudagraphs(loop)
        assert capsys.readouterr().out == ""  # every graph captured: silent
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (2 instances)")
        Loop._check_cudagraphs(loop)
        out = capsys.readouterr().out
        assert "model.compile_mode=reduce-overhead: 1 compiled graph(s) run without CUDA graphs" in out
        assert "mutated inputs (2 instances)" in out
        Loop._check_cudagraphs(loop)
        assert capsys.readouterr().out == ""  # nothing new
        log_cudagraph_skip_and_bump_counter("skipping cudagraph due to function 3 exceeding max re-recording limit")
        Loop._check_cudagraphs(loop)
        out = capsys.readouterr().out
        assert "1 more compiled graph(s)" in out and "re-recording limit" in out and "mutated" not in out
    finally:
        loop.cudagraph_skips.stop()
