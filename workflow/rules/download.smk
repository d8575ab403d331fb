rule download_model:
    output:
        directory(paths.MODEL_DIR),
    log:
        paths.log("download", paths.PER_MODEL),
    benchmark:
        paths.benchmark("download", paths.PER_MODEL)
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(8000),
        runtime=240,
    params:
        spec=PLAN.model_settings,
        cache=paths.DOWNLOAD_CACHE,
    shell:
        "python -m quantbench fetch-model --name {wildcards.model} --spec {params.spec:q} "
        "--out {output} --cache {params.cache} > {log} 2>&1"
