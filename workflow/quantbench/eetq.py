"""The eetq method's module: EETQ int8, quantized while transformers loads the model (CUDA only).

transformers 5 no longer uses the `eetq` package (not on PyPI for this platform anyway): it takes
the kernels from the Hub kernel kernels-community/quantization-eetq through `kernels`."""
from __future__ import annotations


def quantize(params: dict, device: str, load):
    from transformers import EetqConfig

    return load(EetqConfig("int8"))


def require() -> None:
    from transformers.utils import is_kernels_available

    if not is_kernels_available():
        raise RuntimeError("EETQ needs the `kernels` package (pip install -e '.[eetq]'), which fetches the "
                           "Hub kernel kernels-community/quantization-eetq (offline: pre-fetch it into KERNELS_CACHE)")
