"""Can DALI's decoder decode these files? Asked in a child process (`python -m
pipelines_dali.decode_check`, a JSON request on stdin), so that a decoder crash ends the child, not
the training run that asks.

Why a child: after a training pipeline failed on a file that PIL decodes but DALI cannot (a bilevel
TIFF), decoding that file again in the same process segfaulted DALI 2.4 in 3 runs of 8 (CPU mode,
this 2-core VM; the test crashed in 9 of 24 runs over three in-process variants: with the failed
pipeline still alive, closed first, and with its traceback dropped and gc run). In processes where
no training pipeline had failed, 60 such checks did not crash, and with the checks in children the
same 8-run script and 10 runs of the tests all passed. A crash is an answer too: the files cannot
be decoded.

Request: {"files": [...], "device_id": int | null, "num_threads": int, "hw_decoder_load": float}.
Exit 0: every file decodes. Exit 3: DALI raised while decoding; its message is on stderr. Exit 4:
the pipeline could not be built (no CUDA context for this process, e.g. a GPU in EXCLUSIVE_PROCESS
compute mode; out of GPU memory): no answer about the files (a missing file fails the run, not the
build: checked on DALI 2.4). The child leaves with os._exit once it has its answer: DALI can crash
while a pipeline is torn down at exit (NVIDIA/DALI#6166, a CUDA error during cleanup), which would
read as a crash on the files.
"""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

FAILED, UNAVAILABLE = 3, 4


def main() -> int:
    req = json.load(sys.stdin)
    from .pipeline import decode_pipeline

    data = SimpleNamespace(hw_decoder_load=req["hw_decoder_load"])
    try:
        pipe = decode_pipeline(data, req["files"], gpu=req["device_id"] is not None, batch_size=len(req["files"]),
                               num_threads=max(1, req["num_threads"]), device_id=req["device_id"],
                               prefetch_queue_depth=1)
        pipe.build()
    except Exception as err:  # noqa: BLE001 - e.g. "CUDA is not available", out of memory
        print(str(err), file=sys.stderr)
        return UNAVAILABLE
    try:
        pipe.run()
    except Exception as err:  # noqa: BLE001 - DALI raises RuntimeError for a failed batch
        print(str(err), file=sys.stderr)
        return FAILED
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no teardown (see above): the answer is given
