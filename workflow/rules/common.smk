# Wildcards match only names the config declares, so paths can never be misread.
wildcard_constraints:
    model="|".join(sorted(map(re.escape, config["models"]))),
    variant=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    checkpoint_method="gptq|awq|rtn",
    load_time_method="bnb|eetq",


def cell_json(model, method, variant):
    return json.dumps(qbconfig.find_cell(config, model, method, variant).record())


# With eval-holdout calibration, the leading tokens that calibrate GPTQ/AWQ are never scored, in any cell.
CALIBRATED = any(cell.method in qbcheckpoint.CALIBRATED for cell in CELLS)
SKIP_TOKENS = qbcalibration.holdout_tokens(config["calibration"]) if CALIBRATED else 0
EVAL_JSON = json.dumps({**config["eval"], "skip_tokens": SKIP_TOKENS}, sort_keys=True)


# The FP16 baseline's next-token distributions, stored once per model; every other cell's KL reads it.
REFERENCE = f"results/{{model}}/{qbconfig.BASELINE}/{qbconfig.BASELINE_VARIANT}/reference.npz"


def tokenizer_inputs(wildcards):
    if config["eval"]["tokens"] == "gguf":  # llama.cpp's tokenizer, from the converted GGUF's vocabulary
        return {"text": TEXT["path"], "gguf": f"results/{wildcards.model}/gguf/F16.gguf"}
    return {"text": TEXT["path"], "hf": rules.download_model.output[0].format(model=wildcards.model)}


def checkpoint_inputs(wildcards):
    inputs = {"hf": rules.download_model.output[0].format(model=wildcards.model)}
    if wildcards.checkpoint_method in qbcheckpoint.CALIBRATED:
        inputs |= {"calib": f"results/{wildcards.model}/data/calib_tokens.npy",
                   "calib_meta": f"results/{wildcards.model}/data/calib_tokens.json"}
    return inputs


def cell_report(path):
    """A cell's metrics.json, listed under its model in `snakemake --report`."""
    return report(path, category="Cells", subcategory="{model}", labels={"cell": path.removeprefix("results/{model}/").removesuffix("metrics.json").rstrip("/")})


def scaled_by_attempt(mem_mb):
    """Memory that grows with each attempt, so `--retries` recovers a job killed for lack of memory."""
    return lambda wildcards, attempt: mem_mb * attempt
