"""llama.cpp's own tools (`llama-perplexity`), built from the llama.cpp source vendored in the pinned
llama-cpp-python sdist: the upstream implementation of the revision quantbench runs, against which
the tests check its numbers and the bench times it. Not part of the workflow."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow"))

from quantbench import io, llamacpp  # noqa: E402

# llama.cpp leaks its logger (llama.cpp#22142), whose writer thread can still hold the last lines, the
# "Final estimate" among them, when main returns. The upstream tool flushes it first; the folder name
# keeps it apart from builds without that line.
FLUSH_LOG_AT_EXIT = {"llama-perplexity": (
    "tools/perplexity/perplexity.cpp",
    "    llama_backend_free();\n\n    return 0;\n}",
    "    llama_backend_free();\n    common_log_flush(common_log_main());\n\n    return 0;\n}")}
CACHE = Path.home() / ".cache" / "quantbench" / f"llama.cpp-{llamacpp.LLAMA_CPP_PYTHON_PIN}-logflush"


def build_tool(target: str, out_dir: str | os.PathLike = CACHE, version: str = llamacpp.LLAMA_CPP_PYTHON_PIN,
               jobs: int = os.cpu_count() or 1) -> Path:
    """Build one llama.cpp tool, its log flushed at exit. CMAKE_ARGS (as for the llama-cpp-python build,
    e.g. -DGGML_CUDA=on) apply here too. Cached in out_dir."""
    binary = Path(out_dir) / target
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory() as tmp:
        src, build = Path(tmp) / "llama.cpp", Path(tmp) / "build"
        llamacpp.extract_llama_cpp(llamacpp.download_sdist(tmp, version)[0], src)
        if target in FLUSH_LOG_AT_EXIT:
            main, ending, flushed = FLUSH_LOG_AT_EXIT[target]
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
            raise RuntimeError("building llama.cpp tools needs cmake (pip install cmake)")
        if ninja:
            options += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run([cmake, "-S", src, "-B", build, *options], check=True)
        subprocess.run([cmake, "--build", build, "--target", target, "-j", str(jobs)], check=True)
        with io.atomic_path(binary) as tmp_binary:
            shutil.copy2(build / "bin" / target, tmp_binary)
    return binary
