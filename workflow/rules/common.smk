# Wildcards match only names the config declares, so paths can never be misread.
wildcard_constraints:
    model=PLAN.model_pattern,
    variant=r"[A-Za-z0-9][A-Za-z0-9._-]*",


def cell_report(path):
    """A cell's metrics.json, listed under its model in `snakemake --report`."""
    return report(
        path,
        category="Cells",
        subcategory="{model}",
        labels={"cell": paths.cell_name(path)},
    )
