rule fetch_eval_text:
    output:
        paths.TEXT_CACHE,
    log:
        paths.log("data", "{dataset}"),
    benchmark:
        paths.benchmark("data", "{dataset}")
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(4000),
        runtime=60,
    shell:
        "python -m quantbench fetch-text --out {output} > {log} 2>&1"


rule tokenize_eval_text:
    """The evaluation text, tokenized once per model; every backend scores these ids."""
    input:
        unpack(PLAN.tokenizer_inputs),
    output:
        ids=paths.EVAL_TOKENS,
        meta=paths.EVAL_TOKENS_META,
    log:
        paths.log("tokenize", paths.PER_MODEL),
    benchmark:
        paths.benchmark("tokenize", paths.PER_MODEL)
    conda:
        PLAN.tokenizer_env
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(4000),
        runtime=60,
    params:
        text=PLAN.text_settings,
        tokenizer=PLAN.tokenizer_args,
    shell:
        "python -m quantbench tokenize --text {params.text:q} {params.tokenizer} --ids {output.ids} "
        "--meta {output.meta} > {log} 2>&1"


rule calibration_tokens:
    """The calibration tokens of the calibration spec, drawn once per model for every cell that calibrates
    (GPTQ, AWQ, a GGUF importance matrix)."""
    input:
        hf=rules.download_model.output[0],
        eval_ids=rules.tokenize_eval_text.output.ids,
    output:
        ids=paths.CALIB_TOKENS,
        meta=paths.CALIB_TOKENS_META,
    log:
        paths.log("calibration", paths.PER_MODEL),
    benchmark:
        paths.benchmark("calibration", paths.PER_MODEL)
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(4000),
        runtime=60,
    params:
        spec=PLAN.calibration_settings,
    shell:
        "python -m quantbench calibrate --spec {params.spec:q} --hf {input.hf} --eval-ids {input.eval_ids} "
        "--ids {output.ids} --meta {output.meta} > {log} 2>&1"


rule fetch_task_data:
    """The data of the config's Hub tasks (lm-evaluation-harness), fetched once through `datasets` into
    resources/; evaluations read it offline. Tasks with a path need nothing fetched."""
    output:
        paths.TASKS_FETCHED,
    log:
        paths.log("fetch_task_data"),
    benchmark:
        paths.benchmark("fetch_task_data")
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(4000),
        runtime=120,
    params:
        tasks=PLAN.hub_tasks_settings,
        cache=lambda wildcards, output: Path(output[0]).parent,  # paths.TASK_DATA
    shell:
        "python -m quantbench fetch-task-data --tasks {params.tasks:q} --cache {params.cache} --out {output} > {log} 2>&1"
