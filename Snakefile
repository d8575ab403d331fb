# quantbench: models x quantization methods x variants -> one table of measured costs.
# Run:  snakemake --cores 8 --resources gpu=1     (workflow/profiles/default is picked up)
import json
import re
import shlex
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from quantbench import config as qbconfig, gguf as qbgguf, textdata

configfile: "config.yaml"

qbconfig.validate(config)  # schema + cross-field checks, before any job
CELLS = qbconfig.cells(config)
RESOURCES = "resources"
TEXT = textdata.describe_text(config["eval"]["text"], RESOURCES)
# Rules call the package through the environment's own python (a venv, or the rule's conda env).
QB = f"PYTHONPATH={shlex.quote(str(Path(workflow.basedir) / 'workflow'))} python -m quantbench"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/gguf.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


onstart:
    textdata.preflight(config["eval"]["text"], RESOURCES)


rule all:
    input:
        "results/report/summary.csv",
        "results/report/summary.md",
    default_target: True
