"""What the Snakefile needs from a validated config: the cells, the wildcard patterns of each
family, and each job's inputs and settings. Rules only point at these; the logic lives here."""
from __future__ import annotations

import json
import re

from . import calibration, paths, published, textdata
from .config import cells, find_cell
from .methods import METHODS, Family, of_family


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


class Plan:
    def __init__(self, config: dict):
        self.config = config
        self.cells = cells(config)
        self.text = textdata.describe_text(config["eval"]["text"], paths.RESOURCES, config["eval"]["protocol"])
        # With eval-holdout calibration, the leading tokens that calibrate GPTQ/AWQ are never scored, in any cell.
        calibrated = any(METHODS[cell.method].calibrated for cell in self.cells)
        skip = calibration.holdout_tokens(config["calibration"]) if calibrated else 0
        self.eval_settings = _json({**config["eval"], "skip_tokens": skip})
        self.text_settings = json.dumps(self.text)
        self.calibration_settings = _json(config["calibration"])
        self.models_settings = _json(config["models"])

    @property
    def model_pattern(self) -> str:
        """Wildcards match only names the config declares, so paths can never be misread."""
        return "|".join(sorted(map(re.escape, self.config["models"])))

    @staticmethod
    def method_pattern(family: Family) -> str:
        return "|".join(of_family(family))

    @staticmethod
    def env(family: Family) -> str:
        """The conda env of a family's jobs (its methods share one), relative to workflow/rules/."""
        (env,) = {METHODS[m].env for m in of_family(family)}
        return f"../../envs/{env}.yaml"

    def metrics(self) -> list[str]:
        return [cell.metrics for cell in self.cells]

    # Job settings, as the rules pass them (functions of the job's wildcards)

    def cell_settings(self, wildcards) -> str:
        method = getattr(wildcards, "method", "baseline")
        variant = getattr(wildcards, "variant", "fp16")
        return _json(find_cell(self.config, wildcards.model, method, variant).record())

    def model_settings(self, wildcards) -> str:
        """The model's source: its note is prose for the report, so editing it must not re-download."""
        return _json({k: v for k, v in self.config["models"][wildcards.model].items() if k != "note"})

    def gguf_type(self, wildcards) -> str:
        return find_cell(self.config, wildcards.model, wildcards.method, wildcards.variant).params["type"]

    def kernel(self, wildcards) -> str:
        return self.config["methods"][wildcards.method].get("kernel", "auto")

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

    def packed_inputs(self, wildcards) -> dict:
        inputs = {"hf": paths.MODEL_DIR.format(model=wildcards.model)}
        if METHODS[wildcards.method].calibrated:
            inputs |= {"calib": paths.CALIB_TOKENS.format(model=wildcards.model),
                       "calib_meta": paths.CALIB_TOKENS_META.format(model=wildcards.model)}
        return inputs

    @staticmethod
    def tokenizer_args(wildcards, input) -> str:
        return f"--gguf {input.gguf}" if "gguf" in input.keys() else f"--hf {input.hf}"

    @staticmethod
    def calibration_args(wildcards, input) -> str:
        return f"--calib {input.calib} --calib-meta {input.calib_meta}" if "calib" in input.keys() else ""


def scaled_by_attempt(mem_mb: int):
    """Memory that grows with each attempt, so `--retries` recovers a job killed for lack of memory."""
    return lambda wildcards, attempt: mem_mb * attempt
