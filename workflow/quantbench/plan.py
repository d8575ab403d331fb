"""What the Snakefile needs from a validated config: the cells, the wildcard patterns of each
family, and each job's inputs and settings. Rules only point at these; the logic lives here."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from . import calibration, failures, io, paths, published, seals, sources, textdata
from .config import cells
from .methods import CHECKPOINT, GGUF_FILE, LLAMA_CPP, METHODS, PUBLISHED_BY, Family, of_backend, of_family


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


class Plan:
    def __init__(self, config: dict):
        self.config = config
        self.cells = cells(config)
        self._cell = {(c.model, c.method, c.variant): c for c in self.cells}
        self.text = textdata.describe_text(config["eval"]["text"], paths.RESOURCES, config["eval"]["protocol"])
        # With eval-holdout calibration, the leading tokens that calibrate GPTQ/AWQ are never scored, in any cell.
        skip = calibration.holdout_tokens(config["calibration"]) if any(c.calibrated for c in self.cells) else 0
        self.eval_settings = _json({**config["eval"], "skip_tokens": skip})
        self.text_settings = json.dumps(self.text)
        self.calibration_settings = _json(config["calibration"])
        self.models_settings = _json(config["models"])
        self.generation_settings = _json({k: config["report"][k] for k in ("prompts", "max_new_tokens",
                                                                          "speed_repetitions")})
        self.ollama_settings = _json(config["ollama"])
        self.hub_tasks = [t for t in config["eval"].get("tasks", []) if not t["path"]]  # fetched once, before any job
        self.hub_tasks_settings = _json(self.hub_tasks)

    @property
    def model_pattern(self) -> str:
        """Wildcards match only names the config declares, so paths can never be misread."""
        return "|".join(sorted(map(re.escape, self.config["models"])))

    @staticmethod
    def method_pattern(family: Family) -> str:
        return "|".join(of_family(family))

    @staticmethod
    def backend_pattern(backend: str) -> str:
        """The methods whose cells one backend evaluates (every GGUF file in llama.cpp)."""
        return "|".join(map(re.escape, of_backend(backend)))

    @staticmethod
    def env(family: Family) -> str:
        """The conda env of a family's jobs (its methods share one), relative to workflow/rules/."""
        (env,) = {METHODS[m].env for m in of_family(family)}
        return f"../../envs/{env}.yaml"

    @staticmethod
    def method_env(method) -> str:
        """The conda env of one method's jobs, relative to workflow/rules/."""
        return f"../../envs/{method.env}.yaml"

    @staticmethod
    def cell_env(wildcards) -> str:
        """The conda env of a cell's job, by its method: for the rules whose methods each have their own."""
        return Plan.method_env(METHODS[wildcards.method])

    def metrics(self) -> list[str]:
        return [cell.metrics for cell in self.cells]

    def modelfiles(self) -> list[str]:
        """The Ollama Modelfile of every cell with a GGUF file."""
        return [paths.cell(paths.MODELFILE, c.model, c.method, c.variant) for c in self.cells
                if METHODS[c.method].backend == LLAMA_CPP]

    # Job settings, as the rules pass them (functions of the job's wildcards)

    def cell_settings(self, wildcards) -> str:
        method = getattr(wildcards, "method", "baseline")
        variant = getattr(wildcards, "variant", "fp16")
        return _json(self._cell[wildcards.model, method, variant].record())

    def model_settings(self, wildcards) -> str:
        """The model's source: its note (prose for the report) and gpus are not, so editing them must not
        re-download. A local directory or file also gives its fingerprint, so new weights at the same
        path are noticed."""
        spec = {k: v for k, v in self.config["models"][wildcards.model].items()
                if k not in ("note", "gpus", *PUBLISHED_BY)}
        return _json(_fingerprinted(spec))

    def published_settings(self, wildcards) -> str:
        """Where a published artifact comes from (a local one with its fingerprint)."""
        key = next(k for k, m in PUBLISHED_BY.items() if m.name == wildcards.method)
        return _json(_fingerprinted(self.config["models"][wildcards.model][key][wildcards.variant]))

    def gguf_type(self, wildcards) -> str:
        return self._cell[wildcards.model, wildcards.method, wildcards.variant].params["type"]

    def gguf_inputs(self, wildcards) -> dict:
        """The F16 GGUF, and the model's importance matrix with llama-quantize where the variant asks for it
        (llama-cpp-python's API cannot hand an importance matrix to the quantizer)."""
        inputs = {"f16": paths.F16_GGUF.format(model=wildcards.model)}
        if self._cell[wildcards.model, wildcards.method, wildcards.variant].params["imatrix"]:
            inputs |= {"imatrix": paths.IMATRIX.format(model=wildcards.model),
                       "imatrix_info": paths.IMATRIX_INFO.format(model=wildcards.model),
                       "tool": paths.LLAMA_TOOL.format(tool="llama-quantize")}
        return inputs

    @staticmethod
    def imatrix_args(wildcards, input) -> str:
        if "imatrix" not in input.keys():
            return ""
        return f"--imatrix {input.imatrix} --imatrix-info {input.imatrix_info} --tool {input.tool}"

    def gpus(self, wildcards) -> int:
        """GPUs of a cell's transformers evaluation: its model's `gpus`."""
        return self.config["models"][wildcards.model]["gpus"]

    def gguf_gpus(self, wildcards) -> int:
        """llama.cpp's evaluations take one GPU, or none where it is a CPU build, so that they run beside
        the GPU jobs. Under --sdm conda its build is not known here: one GPU."""
        try:
            import llama_cpp
        except ImportError:
            return 1
        return int(bool(llama_cpp.llama_supports_gpu_offload()))

    def kernel(self, wildcards) -> str:
        return self.config["methods"].get(wildcards.method, {}).get("kernel", "auto")

    @staticmethod
    def checkpoint_pattern() -> str:
        """The methods whose cells are checkpoint directories GPTQModel or transformers load back."""
        return "|".join([*of_family(Family.PACKED), CHECKPOINT.name])

    # Job inputs

    @property
    def tokenizer_env(self) -> str:
        return "../../envs/llamacpp.yaml" if self.config["eval"]["tokens"] == "gguf" else "../../envs/torch.yaml"

    @property
    def references(self) -> list[str]:
        """The published numbers to set beside the cells: the config's files, else every shipped one."""
        return self.config["report"].get("references") or published.shipped()

    def tokenizer_inputs(self, wildcards) -> dict:
        if self.config["eval"]["tokens"] == "gguf":  # llama.cpp's tokenizer, from the converted GGUF's vocabulary
            return {"text": self.text["path"], "gguf": paths.F16_GGUF.format(model=wildcards.model)}
        return {"text": self.text["path"], "hf": paths.MODEL_DIR.format(model=wildcards.model)}

    def quantize_inputs(self, wildcards) -> dict:
        """What quantizing from the HF model takes: the model, and its calibration tokens where the method is calibrated."""
        inputs = {"hf": paths.MODEL_DIR.format(model=wildcards.model)}
        if METHODS[wildcards.method].calibrated:
            inputs |= {"calib": paths.CALIB_TOKENS.format(model=wildcards.model),
                       "calib_meta": paths.CALIB_TOKENS_META.format(model=wildcards.model)}
        return inputs

    def task_inputs(self, wildcards) -> dict:
        """An evaluation's lm-eval task data from the Hub, fetched before (local tasks need none)."""
        return {"task_data": paths.TASKS_FETCHED} if self.hub_tasks else {}

    @staticmethod
    def tokenizer_args(wildcards, input) -> str:
        return f"--gguf {input.gguf}" if "gguf" in input.keys() else f"--hf {input.hf}"

    @staticmethod
    def calibration_args(wildcards, input) -> str:
        return f"--calib {input.calib} --calib-meta {input.calib_meta}" if "calib" in input.keys() else ""


    # When jobs fail: every cell is still a row

    def steps(self, cell) -> list[tuple[str, str, str]]:
        """The jobs a cell depends on, in order, ending with its own evaluation: (step, output, log)."""
        method, model = METHODS[cell.method], cell.model
        per_model, per_cell = paths.PER_MODEL.format(model=model), paths.cell(paths.PER_CELL, model, cell.method,
                                                                               cell.variant)
        convert = [("fetch_converter", paths.CONVERTER, paths.log("fetch_converter")),
                   ("convert", paths.F16_GGUF.format(model=model), paths.log("convert", per_model))]
        out = [("download", paths.MODEL_DIR.format(model=model), paths.log("download", per_model))]
        if self.config["eval"]["tokens"] == "gguf":
            out += convert
        out.append(("tokenize", paths.EVAL_TOKENS.format(model=model), paths.log("tokenize", per_model)))
        if self.hub_tasks:
            out.append(("fetch_task_data", paths.TASKS_FETCHED, paths.log("fetch_task_data")))
        if cell.calibrated:
            out.append(("calibration", paths.CALIB_TOKENS.format(model=model), paths.log("calibration", per_model)))
        if method.family is Family.GGUF:
            out += [s for s in convert if s not in out]
            if cell.params["imatrix"]:
                out += [("build llama.cpp's tools", paths.LLAMA_TOOL.format(tool="llama-imatrix"),
                         paths.log("build_llama_tools")),
                        ("imatrix", paths.IMATRIX.format(model=model), paths.log("imatrix", per_model))]
            out.append(("quantize", paths.cell(paths.GGUF_FILE, model, cell.method, cell.variant),
                        paths.log("quantize", per_cell)))
        if method.family is Family.PREQUANTIZED:
            artifact = paths.GGUF_FILE if method is GGUF_FILE else paths.QUANTIZE_INFO
            out.append(("fetch", paths.cell(artifact, model, cell.method, cell.variant), paths.log("fetch", per_cell)))
        if method.family is Family.GGUF_EXPORT:
            out.append(("quantize", paths.cell(paths.GGUF_FILE, model, cell.method, cell.variant),
                        paths.log("quantize", per_cell)))
        if method.family is Family.PACKED:
            out.append(("quantize", paths.cell(paths.QUANTIZE_INFO, model, cell.method, cell.variant),
                        paths.log("quantize", per_cell)))
        if method.family is not Family.BASELINE:
            out.append(("evaluate the FP16 baseline", paths.DISTRIBUTIONS.format(model=model),
                        paths.log("evaluate", paths.baseline(paths.PER_CELL).format(model=model))))
        return out + [("evaluate", cell.metrics, paths.log("evaluate", per_cell))]

    def row(self, cell) -> dict:
        """The cell's metrics.json, or where it was not written, why: the first job of the cell that has
        no output, and the error its log ends with."""
        if Path(cell.metrics).is_file():
            return io.read_json(cell.metrics)
        for step, output, log in self.steps(cell):
            if not Path(output).exists():
                error = seals.damage(output) or failures.last_error(log)
                status = "failed" if error else "not run"
                return {**cell.record(), "status": status, "failed_step": step,
                        "error": f"{step}: {error}" if error else f"its {step} job did not run"}
        return {**cell.record(), "status": "not run", "error": "not evaluated"}

    def report_anyway(self) -> None:
        """After a failed run: the report of every cell, the failed ones as rows saying which job failed.
        It runs in Snakemake's own process, whose environment may lack the report's packages."""
        try:
            from . import report
        except ImportError as exc:
            print(f"quantbench: no report after the failure: {exc} (install pandas, matplotlib and jinja2 beside "
                  "Snakemake)", file=sys.stderr)
            return
        report.build([self.row(cell) for cell in self.cells], self.config["models"], paths.REPORT_DIR,
                     self.references, self.config["report"]["tolerance_pct"],
                     self.config["report"]["quality_budget_pct"])
        # Without the rule's completion mark (paths.REPORT_DONE), the next run redoes the report and
        # whatever it lacks: this one never passes for the report rule's finished output.

    @staticmethod
    def retire_report() -> None:
        """A run that does work first removes the last report, which would no longer be current; the
        report rule or, if jobs fail, report_anyway writes the new one."""
        for file in Path(paths.REPORT_DIR).glob("*"):
            if file.is_file():
                file.unlink()


def _fingerprinted(spec: dict) -> dict:
    """A source spec, with the fingerprint of its local path: new files at the same path are noticed."""
    return spec | {"fingerprint": sources.fingerprint(spec["path"])} if "path" in spec else spec


def scaled_by_attempt(mem_mb: int):
    """Memory that grows with each attempt, so `--retries` recovers a job killed for lack of memory."""
    return lambda wildcards, attempt: mem_mb * attempt
