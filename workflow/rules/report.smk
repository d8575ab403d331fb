rule report:
    """Every cell's metrics.json -> results/report/summary.{csv,md}."""
    input:
        [cell.metrics for cell in CELLS],
    output:
        csv="results/report/summary.csv",
        md="results/report/summary.md",
    params:
        models=json.dumps(config["models"], sort_keys=True),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
    shell:
        "python -m quantbench report --models {params.models:q} --out-dir $(dirname {output.csv}) {input} > {log} 2>&1"
