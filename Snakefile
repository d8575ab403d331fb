# quantbench: models x quantization methods x variants -> one table of measured costs.
# Run:  snakemake --cores 8 --resources gpu=1   (or --workflow-profile workflow/profiles/default)
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from quantbench import config as qbconfig, llamacpp, paths, plots, seals, textdata
from quantbench.methods import CHECKPOINT, GGUF_FILE, LLAMA_CPP, Family
from quantbench.plan import Plan, scaled_by_attempt

# The default matrix, unless --configfile names another (then only that one: no silent merge).
if not workflow.overwrite_configfiles:

    configfile: str(Path(workflow.basedir) / "config.yaml")


qbconfig.check_files(workflow.overwrite_configfiles or [Path(workflow.basedir) / "config.yaml"])  # keys given twice
qbconfig.validate(config, deep=workflow.is_main_process)  # schema + cross-field checks, before any job
qbconfig.check_gpus(config, getattr(workflow.global_resources.get("gpu"), "value", None))  # a Resource
PLAN = Plan(config)
if workflow.is_main_process:  # damaged artifacts move away before planning, so they are rebuilt first
    seals.sweep()
# Jobs run `python -m quantbench STAGE` with the package on PYTHONPATH, in the rule's conda env
# under --sdm conda, else with the python that runs Snakemake (so a venv needs no activation).
PACKAGE_DIR = shlex.quote(str(Path(workflow.basedir) / "workflow"))
USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
PYTHON_DIR = "" if USE_CONDA else f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
shell.prefix(f"{PYTHON_DIR}export PYTHONPATH={PACKAGE_DIR}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/gguf.smk"
include: "workflow/rules/packed.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


onstart:
    textdata.preflight(config["eval"]["text"], paths.RESOURCES)
    PLAN.retire_report()


onerror:
    PLAN.report_anyway()  # every cell a row, the failed ones with the job that failed; the run still fails


rule all:
    default_target: True
    input:
        rules.report.output,
