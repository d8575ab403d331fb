rule download_model:
    output:
        directory(f"{RESOURCES}/models/{{model}}/hf"),
    params:
        # the note is prose for the report: editing it must not re-download the model
        spec=lambda w: json.dumps({k: v for k, v in config["models"][w.model].items() if k != "note"}, sort_keys=True),
        cache=f"{RESOURCES}/cache",
    log:
        "results/logs/download/{model}.log",
    benchmark:
        "results/benchmarks/download/{model}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(8000),
        runtime=240,
    shell:
        "python -m quantbench fetch-model --name {wildcards.model} --spec {params.spec:q} "
        "--out {output} --cache {params.cache} > {log} 2>&1"
