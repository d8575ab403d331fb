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


rule fetch_gguf_file:
    """A GGUF file published for a model (models.<m>.gguf_files), taken as it is."""
    output:
        gguf=paths.GGUF_FILE,
        info=paths.QUANTIZE_INFO,
    log:
        paths.log("fetch", paths.PER_CELL),
    benchmark:
        paths.benchmark("fetch", paths.PER_CELL)
    wildcard_constraints:
        method=PLAN.method_pattern(Family.PREQUANTIZED),
    conda:
        PLAN.env(Family.PREQUANTIZED)
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(2000),
        runtime=240,
    params:
        spec=PLAN.gguf_file_settings,
        cache=paths.DOWNLOAD_CACHE,
    shell:
        "python -m quantbench fetch-gguf-file --spec {params.spec:q} --out {output.gguf} --info {output.info} "
        "--cache {params.cache} > {log} 2>&1"
