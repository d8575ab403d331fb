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
        method=GGUF_FILE.name,
    conda:
        PLAN.method_env(GGUF_FILE)
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(2000),
        runtime=240,
    params:
        spec=PLAN.published_settings,
        cache=paths.DOWNLOAD_CACHE,
    shell:
        "python -m quantbench fetch-published --method {wildcards.method} --spec {params.spec:q} "
        "--out {output.gguf} --info {output.info} --cache {params.cache} > {log} 2>&1"


rule fetch_checkpoint:
    """A quantized checkpoint published for a model (models.<m>.checkpoints), taken as it is."""
    output:
        model=directory(paths.PACKED_DIR),
        info=paths.QUANTIZE_INFO,
    log:
        paths.log("fetch", paths.PER_CELL),
    benchmark:
        paths.benchmark("fetch", paths.PER_CELL)
    wildcard_constraints:
        method=CHECKPOINT.name,
    conda:
        PLAN.method_env(CHECKPOINT)
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(2000),
        runtime=240,
    params:
        spec=PLAN.published_settings,
        cache=paths.DOWNLOAD_CACHE,
    shell:
        "python -m quantbench fetch-published --method {wildcards.method} --spec {params.spec:q} "
        "--out {output.model} --info {output.info} --cache {params.cache} > {log} 2>&1"
