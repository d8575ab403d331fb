"""The gguf method's module: HF -> GGUF conversion, importance matrices, llama.cpp quantization,
llama.cpp's tokenizer, and llama.cpp's own programs.

The converter is llama.cpp's own `convert_hf_to_gguf.py`, taken from the sdist of
the pinned llama-cpp-python (the same llama.cpp revision that quantizes and
evaluates), fetched once into a cache instead of being vendored here. From the same
source, one build of llama.cpp's programs (TOOLS) serves the workflow (llama-imatrix,
llama-quantize with an importance matrix), the tests and the bench (llama-perplexity,
llama-bench).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from . import failures, io

LLAMA_CPP_PYTHON = "llama-cpp-python"
LLAMA_CPP_PYTHON_PIN = "0.3.36"  # the same pin as pyproject.toml and envs/llamacpp.yaml
# Its sdist, whose converter the workflow runs: pinned by content, beside the version pin it belongs to.
LLAMA_CPP_PYTHON_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def download_sdist(dest: str, version: str) -> tuple[Path, str]:
    """The llama-cpp-python sdist of `version` and its sha256 (the pinned version's is checked)."""
    # Only this package as an sdist: its build requirements (cmake, scikit-build-core) may come as wheels,
    # which pip needs just to read the metadata; ":all:" would compile cmake from source first.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMA_CPP_PYTHON,
                    "--dest", dest, f"{LLAMA_CPP_PYTHON}=={version}"], check=True)
    (sdist,) = Path(dest).glob("*.tar.gz")
    if version == LLAMA_CPP_PYTHON_PIN:
        return sdist, io.verify_sha256(sdist, LLAMA_CPP_PYTHON_SDIST_SHA256,
                                       "quantbench.llamacpp.LLAMA_CPP_PYTHON_SDIST_SHA256")
    return sdist, io.sha256_file(sdist)


def extract_llama_cpp(sdist: Path, dest: Path, parts: tuple[str, ...] = ()) -> None:
    """vendor/llama.cpp of the sdist (only `parts` of its top level, if given) into dest."""
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)
                   and (not parts or m.name[len(prefix):].split("/")[0] in parts)]
        if not members:
            raise RuntimeError(f"{sdist.name} carries no vendor/llama.cpp/{'|'.join(parts)}")
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(dest, members=members, filter="data")


def fetch_converter(out_dir: str | os.PathLike, version: str = LLAMA_CPP_PYTHON_PIN) -> Path:
    """Unpack llama.cpp's converter from the llama-cpp-python sdist into `out_dir`."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp, io.atomic_path(out_dir) as staging:
        sdist, digest = download_sdist(tmp, version)
        extract_llama_cpp(sdist, staging, CONVERTER_PARTS)
        io.write_json(staging / "source.json", {"sdist": sdist.name, "sha256": digest})
    return out_dir / "convert_hf_to_gguf.py"


TOOLS = ("llama-perplexity", "llama-imatrix", "llama-quantize", "llama-bench")
# llama.cpp leaks its logger (llama.cpp#22142), whose writer thread can still hold the last lines, the
# "Final estimate" among them, when main returns: llama-perplexity flushes it first.
FLUSH_LOG_AT_EXIT = {"llama-perplexity": (
    "tools/perplexity/perplexity.cpp",
    "    llama_backend_free();\n\n    return 0;\n}",
    "    llama_backend_free();\n    common_log_flush(common_log_main());\n\n    return 0;\n}")}


def build_tools(out_dir: str | os.PathLike, version: str = LLAMA_CPP_PYTHON_PIN, jobs: int = os.cpu_count() or 1) -> Path:
    """Build TOOLS from the llama.cpp source vendored in the llama-cpp-python sdist of `version` into
    out_dir (static binaries). CMAKE_ARGS apply as for the llama-cpp-python build (-DGGML_CUDA=on)."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp, io.atomic_path(out_dir) as staging:
        src, build = Path(tmp) / "llama.cpp", Path(tmp) / "build"
        extract_llama_cpp(download_sdist(tmp, version)[0], src)
        for main, ending, flushed in FLUSH_LOG_AT_EXIT.values():
            source = (src / main).read_text()
            if source.count(ending) != 1:
                raise RuntimeError(f"{main}: main's ending changed; update FLUSH_LOG_AT_EXIT for llama.cpp {version}")
            (src / main).write_text(source.replace(ending, flushed))
        options = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
                   "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                   "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", *shlex.split(os.environ.get("CMAKE_ARGS", ""))]
        search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        cmake, ninja = shutil.which("cmake", path=search), shutil.which("ninja", path=search)
        if not cmake:
            raise RuntimeError("building llama.cpp's tools needs cmake (pip install cmake)")
        if ninja:
            options += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run([cmake, "-S", src, "-B", build, *options], check=True)
        subprocess.run([cmake, "--build", build, "--target", *TOOLS, "-j", str(jobs)], check=True)
        staging.mkdir()
        for tool in TOOLS:
            shutil.copy2(build / "bin" / tool, staging / tool)
    return out_dir


def imatrix(tool: str, gguf: str, calib_ids: str, calib_meta: str, hf_dir: str, out: str, text_out: str,
            threads: int) -> dict:
    """llama-imatrix over the model's calibration tokens (never scored ones): each sample decoded to
    text by the model's tokenizer (llama-imatrix reads text), one chunk of seq_len per sample.
    Returns what it was computed from, for imatrix.json and the cells quantized with it."""
    import numpy as np

    from . import sources

    spec = io.read_json(calib_meta)
    samples = np.load(calib_ids)
    tokenizer = sources.tokenizer(hf_dir)
    Path(text_out).write_text("\n".join(tokenizer.decode(s, skip_special_tokens=True) for s in samples),
                              encoding="utf-8")
    t0 = time.perf_counter()
    with io.atomic_path(out) as tmp:
        output = _run_program([tool, "-m", gguf, "-f", text_out, "-o", str(tmp), "-c", str(samples.shape[1]),
                               "--chunks", str(samples.shape[0]), "-t", str(threads), "--no-ppl", "-ngl", "999"])
    chunks = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", output)
    return {"calibration": {k: spec[k] for k in ("source", "n_samples", "seq_len", "seed") if k in spec},
            "calibration_tokens_sha256": spec["tokens_sha256"],
            "chunks": int(chunks[1]) if chunks else None, "n_ctx": int(chunks[2]) if chunks else None,
            "imatrix_s": time.perf_counter() - t0, "threads": threads}


def _run_program(cmd: list[str]) -> str:
    """Run one of llama.cpp's programs, its output copied to the job's log; a failure raises with the
    last line of its output naming an error or failure."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stdout.splitlines() if re.search(r"error|fail", line, re.IGNORECASE)]
        raise failures.from_exit(proc.returncode, lines[-1] if lines else (proc.stdout.strip().splitlines() or ["no output"])[-1])
    return proc.stdout


def converter_architectures(converter: str | os.PathLike) -> set[str]:
    """The Hugging Face architectures llama.cpp's converter can convert: the names in its own registry
    (`@ModelBase.register(...)` in convert_hf_to_gguf.py and its conversion/ package)."""
    root = Path(converter).parent
    text = "".join(p.read_text(encoding="utf-8") for p in [Path(converter), *sorted((root / "conversion").rglob("*.py"))])
    return {name for args in re.findall(r"ModelBase\.register\(([^)]*)\)", text)
            for name in re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args)}


def tokenize(gguf_path: str, text: str) -> tuple[list[int], dict]:
    """Token ids as llama-perplexity makes them: llama.cpp's tokenizer from the GGUF vocabulary,
    BOS added when the vocabulary asks for it, special tokens not parsed."""
    import llama_cpp as L

    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(gguf_path).encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load the vocabulary of {gguf_path}")
    try:
        vocab = L.llama_model_get_vocab(model)
        data = text.encode("utf-8")
        n = -L.llama_tokenize(vocab, data, len(data), None, 0, True, False)  # negative: the count needed
        ids = (L.llama_token * n)()
        if L.llama_tokenize(vocab, data, len(data), ids, n, True, False) != n:
            raise RuntimeError("llama_tokenize returned an unexpected count")
        add_bos = bool(L.llama_vocab_get_add_bos(vocab))
        return list(ids), {
            "kind": "gguf",
            "class": "llama.cpp",
            "source": Path(gguf_path).name,
            "vocab_size": L.llama_vocab_n_tokens(vocab),
            "add_bos": add_bos,
            "bos_token_id": int(L.llama_vocab_bos(vocab)),
        }
    finally:
        L.llama_model_free(model)


def convert(hf_dir: str, out: str, converter: str, outtype: str = "f16") -> None:
    """llama.cpp's converter, its own error raised when it cannot convert the model."""
    with io.atomic_path(out) as tmp:
        proc = subprocess.run([sys.executable, converter, hf_dir, "--outtype", outtype, "--outfile", str(tmp)],
                              stderr=subprocess.PIPE, text=True)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise failures.from_exit(proc.returncode, failures.error_line(proc.stderr))


def quantize(src: str, dst: str, gguf_type: str, threads: int, imatrix: str | None = None,
             tool: str | None = None) -> dict:
    """Quantize an F16 GGUF with llama.cpp's llama_model_quantize; returns timing info. With an
    importance matrix, through llama-quantize of the same source: llama-cpp-python's API cannot hand
    one to llama_model_quantize (a C++ map)."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}", None)
    if ftype is None:
        raise ValueError(f"llama.cpp {llama_cpp.__version__} has no LLAMA_FTYPE_MOSTLY_{gguf_type}")
    t0 = time.perf_counter()
    with io.atomic_path(dst) as tmp:
        if imatrix:
            _run_program([tool, "--imatrix", imatrix, src, str(tmp), gguf_type, str(threads)])
        else:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = threads
            rc = llama_cpp.llama_model_quantize(src.encode(), str(tmp).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize({src} -> {gguf_type}) failed with code {rc}")
    return {"quantize_s": time.perf_counter() - t0, "quantize_threads": threads}
