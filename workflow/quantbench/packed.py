"""The gptq, awq, rtn and autoround methods' module: packed checkpoints through GPTQModel (the
maintained successor of AutoGPTQ and AutoAWQ), quantized once and loaded back to be evaluated. RTN uses
the same packing and kernels as GPTQ, so the two differ only in how the weights were rounded —
the baseline the GPTQ and AWQ papers compare against. AutoRound quantizes through auto-round
(autoround.py) into GPTQ's format, and is loaded back the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from . import failures, io
from .sources import trusts_remote_code


def quantize_config(method: str, params: dict):
    from gptqmodel import AWQConfig, GPTQConfig, RTNConfig

    if method == "gptq":
        return GPTQConfig(bits=params["bits"], group_size=params["group_size"], desc_act=params["desc_act"],
                          sym=params["sym"], damp_percent=params["damp"])
    if method == "awq":  # GEMM layout with zero points: what transformers and vLLM's "awq" load
        return AWQConfig(bits=params["bits"], group_size=params["group_size"], sym=not params["zero_point"])
    if method == "rtn":
        return RTNConfig(bits=params["bits"], group_size=params["group_size"], sym=params["sym"])
    raise ValueError(f"no GPTQModel method {method!r}")


def quantize(method: str, params: dict, hf_dir: str, calib_ids: str | None, out_dir: str, threads: int) -> dict:
    import torch

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(threads))
    torch.set_num_threads(threads)
    if method == "autoround":
        from . import autoround

        return measured(autoround.quantize(params, hf_dir, calib_ids, out_dir), threads)
    from gptqmodel import BACKEND, GPTQModel

    calibration = None
    if calib_ids:
        samples = np.load(calib_ids)
        calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in samples]
    t0 = time.perf_counter()
    model = GPTQModel.load(hf_dir, quantize_config(method, params), trust_remote_code=trusts_remote_code(hf_dir))
    kwargs = {}
    if method == "awq" and not torch.cuda.is_available():
        kwargs["backend"] = BACKEND.AWQ_TORCH  # AWQ's default kernels need CUDA
    model.quantize(calibration, batch_size=1, **kwargs)
    quantize_s = time.perf_counter() - t0
    with io.atomic_path(out_dir) as staging:
        model.save(str(staging))
    return measured({"quantize_s": quantize_s}, threads)


def measured(info: dict, threads: int) -> dict:
    """A quantization's record with the threads, peak memory and device it took."""
    import torch

    return {
        **info,
        "quantize_threads": threads,
        "quantize_peak_rss_mb": io.peak_rss_mb(),
        "quantize_peak_vram_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "quantize_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def quantize_isolated(method: str, params: dict, hf_dir: str, calib_ids: str | None, out_dir: str,
                      threads: int) -> dict:
    """quantize() in a child process: GPTQModel's worker threads can turn a caught error into a
    failed exit of the whole interpreter, so the outcome is read from the child, not trusted to it.
    The child works in a scratch directory until it exits: GPTQModel's threads write ./logs."""
    hf_dir, out_dir = str(Path(hf_dir).resolve()), str(Path(out_dir).resolve())
    calib_ids = calib_ids and str(Path(calib_ids).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "info.json"
        args = [json.dumps([method, params, hf_dir, calib_ids, out_dir, threads]), str(result)]
        proc = subprocess.Popen([sys.executable, "-m", "quantbench.packed", *args], stderr=subprocess.PIPE,
                                cwd=tmp)
        tail = b""
        while chunk := os.read(proc.stderr.fileno(), 1 << 16):  # GPTQModel's progress reaches the job log as it comes
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-(1 << 20):]  # enough for the last error line
        proc.wait()
        if proc.returncode == 0 and result.is_file():
            return json.loads(result.read_text())
    raise failures.from_exit(proc.returncode, failures.error_line(tail.decode(errors="replace")))


def run(cell: dict, hf_dir: str, calib_ids: str | None, calib_meta: str | None, out_dir: str, info_file: str,
        threads: int) -> None:
    """Quantize one cell into out_dir and record how it went in info_file. A deterministic failure is
    recorded, not raised: the cell's evaluation turns it into a failed row. A transient one fails the job."""
    try:
        info = {"status": "ok", **quantize_isolated(cell["method"], cell["params"], hf_dir, calib_ids, out_dir,
                                                    threads)}
    except Exception as exc:  # noqa: BLE001 - recorded; the evaluation turns it into a failed row
        if failures.is_transient(exc):
            raise
        traceback.print_exc()
        info = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    if calib_meta:
        info["calibration"] = io.read_json(calib_meta)
    io.write_json(info_file, info)


def load(method: str, model_dir: str, kernel: str, trust_remote_code: bool = False):
    """A checkpoint loaded back by GPTQModel with `kernel`, and the names of the kernel classes it used."""
    import torch
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    cuda = torch.cuda.is_available()
    if not cuda and kernel not in ("auto", "torch"):
        from .backends import Skipped

        raise Skipped(f"GPTQModel's {kernel} kernel needs CUDA, and this machine has none")
    kwargs = {"backend": backend(method, kernel, cuda), "trust_remote_code": trust_remote_code}
    if not cuda:
        kwargs["dtype"] = torch.bfloat16
    model = GPTQModel.load(model_dir, device="cuda" if cuda else "cpu", **kwargs).model
    used = sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})
    return model, ",".join(used) or None


def backend(method: str, kernel: str, cuda: bool):
    """GPTQModel's BACKEND for a kernel name. `auto` on a CPU is the plain torch kernel: GPTQModel's
    packed-int4 CPU kernels need in_features divisible by the group size, and it has no such limit
    (it runs in bf16). RTN and AutoRound checkpoints are in GPTQ's format."""
    from gptqmodel import BACKEND

    if kernel == "auto":
        return BACKEND.AUTO if cuda else BACKEND.TORCH
    names = {"gptq": {"torch": "GPTQ_TORCH", "triton": "GPTQ_TRITON", "marlin": "GPTQ_MARLIN", "exllama_v2": "GPTQ_EXLLAMA_V2"},
             "awq": {"torch": "AWQ_TORCH", "triton": "AWQ_GEMM_TRITON", "marlin": "AWQ_MARLIN", "exllama_v2": "AWQ_EXLLAMA_V2"}}
    return BACKEND[names["awq" if method == "awq" else "gptq"][kernel]]


if __name__ == "__main__":
    info = quantize(*json.loads(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(info))
