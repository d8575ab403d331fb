rule report:
    """Every cell's metrics.json -> results/report/: summary.csv, summary.md, report.html and the plots (the
    GGUF cells' Modelfiles are listed there)."""
    input:
        metrics=PLAN.metrics(),
        modelfiles=PLAN.modelfiles(),
        references=PLAN.references,
    output:
        csv=report(f"{paths.REPORT_DIR}/summary.csv", category="Summary", labels={"file": "table (CSV)"}),
        md=report(f"{paths.REPORT_DIR}/summary.md", category="Summary", labels={"file": "report (Markdown)"}),
        html=report(f"{paths.REPORT_DIR}/report.html", category="Summary", labels={"file": "report (HTML)"}),
        done=paths.REPORT_DONE,
        plots=[
            report(f"{paths.REPORT_DIR}/{name}", category="Plots", labels={"figure": name.removesuffix(".png")})
            for name in plots.FIGURES.values()
        ],
    log:
        paths.log("report"),
    benchmark:
        paths.benchmark("report")
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(2000),
        runtime=60,
    params:
        models=PLAN.models_settings,
        tolerance=config["report"]["tolerance_pct"],
        budget=config["report"]["quality_budget_pct"],
    shell:
        "python -m quantbench report --models {params.models:q} --out-dir $(dirname {output.csv}) "
        "--references {input.references:q} --tolerance-pct {params.tolerance} --quality-budget-pct {params.budget} "
        "--metrics {input.metrics} --complete {output.done} > {log} 2>&1"
