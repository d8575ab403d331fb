REPORT = config["report"]
REFERENCES = REPORT.get("references") or qbpublished.shipped()


rule report:
    """Every cell's metrics.json -> results/report/: summary.csv, summary.md, report.html and the plots."""
    input:
        metrics=[cell.metrics for cell in CELLS],
        references=REFERENCES,
    output:
        csv=report("results/report/summary.csv", category="Summary", labels={"file": "table (CSV)"}),
        md=report("results/report/summary.md", category="Summary", labels={"file": "report (Markdown)"}),
        html=report("results/report/report.html", category="Summary", labels={"file": "report (HTML)"}),
        plots=[report(f"results/report/{name}", category="Plots", labels={"figure": name.removesuffix(".png")})
               for name in qbplots.FIGURES.values()],
    params:
        models=json.dumps(config["models"], sort_keys=True),
        tolerance=REPORT["tolerance_pct"],
        budget=REPORT["quality_budget_pct"],
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(2000),
        runtime=60,
    shell:
        "python -m quantbench report --models {params.models:q} --out-dir $(dirname {output.csv}) "
        "--references {input.references:q} --tolerance-pct {params.tolerance} --quality-budget-pct {params.budget} "
        "--metrics {input.metrics} > {log} 2>&1"
