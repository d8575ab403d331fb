# Evaluation: every cell scored on the model's one token stream, in the backend of its method's
# family, on the GPU when one is present (the model's `gpus`; llama.cpp's CPU build takes none), the
# CPU otherwise.


rule evaluate_baseline:
    """The unquantized model in transformers (FP16/BF16 on CUDA, FP32 on a CPU); writes the
    distributions every other cell of the model is compared with."""
    input:
        unpack(PLAN.task_inputs),
        hf=rules.download_model.output[0],
        ids=rules.tokenize_eval_text.output.ids,
        meta=rules.tokenize_eval_text.output.meta,
    output:
        metrics=cell_report(paths.baseline(paths.METRICS)),
        distributions=paths.DISTRIBUTIONS,
    log:
        paths.log("evaluate", paths.baseline(paths.PER_CELL)),
    benchmark:
        paths.benchmark("evaluate", paths.baseline(paths.PER_CELL))
    conda:
        PLAN.env(Family.BASELINE)
    threads: 8
    resources:
        gpu=PLAN.gpus,
        tasks_per_gpu=0,  # Slurm: one process drives all the model's GPUs
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    params:
        cell=PLAN.cell_settings,
        eval=PLAN.eval_settings,
        generation=PLAN.generation_settings,
    shell:
        "python -m quantbench evaluate --cell {params.cell:q} --artifact {input.hf} --tokens {input.ids} "
        "--tokens-meta {input.meta} --eval {params.eval:q} --threads {threads} --gpus {resources.gpu} "
        "--write-distributions {output.distributions} --generation {params.generation:q} --out {output.metrics} "
        "> {log} 2>&1"


rule evaluate_gguf:
    """A GGUF cell in llama.cpp (quantized here or published), fed the same token ids and windows as the
    baseline; then its speeds as llama-bench measures them and its completions of the config's prompts."""
    input:
        unpack(PLAN.task_inputs),
        gguf=paths.GGUF_FILE,
        info=paths.QUANTIZE_INFO,
        hf=rules.download_model.output[0],
        ids=rules.tokenize_eval_text.output.ids,
        meta=rules.tokenize_eval_text.output.meta,
        distributions=paths.DISTRIBUTIONS,
    output:
        cell_report(paths.METRICS),
    log:
        paths.log("evaluate", paths.PER_CELL),
    benchmark:
        paths.benchmark("evaluate", paths.PER_CELL)
    wildcard_constraints:
        method=PLAN.backend_pattern(LLAMA_CPP),
    conda:
        PLAN.env(Family.GGUF)
    threads: 8
    resources:
        gpu=PLAN.gguf_gpus,
        mem_mb=scaled_by_attempt(8000),
        runtime=720,
    params:
        cell=PLAN.cell_settings,
        eval=PLAN.eval_settings,
        generation=PLAN.generation_settings,
    shell:
        "python -m quantbench evaluate --cell {params.cell:q} --artifact {input.gguf} --quantize-info {input.info} "
        "--base-dir {input.hf} --tokens {input.ids} --tokens-meta {input.meta} --eval {params.eval:q} "
        "--distributions {input.distributions} --generation {params.generation:q} --threads {threads} "
        "--out {output} > {log} 2>&1"


rule evaluate_packed:
    """A packed checkpoint (quantized here or published), loaded back through GPTQModel by the method's
    kernel, or by transformers for a published bitsandbytes one."""
    input:
        unpack(PLAN.task_inputs),
        model=paths.PACKED_DIR,
        info=paths.QUANTIZE_INFO,
        hf=rules.download_model.output[0],
        ids=rules.tokenize_eval_text.output.ids,
        meta=rules.tokenize_eval_text.output.meta,
        distributions=paths.DISTRIBUTIONS,
    output:
        cell_report(paths.METRICS),
    log:
        paths.log("evaluate", paths.PER_CELL),
    benchmark:
        paths.benchmark("evaluate", paths.PER_CELL)
    wildcard_constraints:
        method=PLAN.checkpoint_pattern(),
    conda:
        PLAN.cell_env
    threads: 8
    resources:
        gpu=1,
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    params:
        cell=PLAN.cell_settings,
        eval=PLAN.eval_settings,
        kernel=PLAN.kernel,
        generation=PLAN.generation_settings,
    shell:
        "python -m quantbench evaluate --cell {params.cell:q} --artifact {input.model} --base-dir {input.hf} "
        "--quantize-info {input.info} --tokens {input.ids} --tokens-meta {input.meta} --eval {params.eval:q} "
        "--distributions {input.distributions} --kernel {params.kernel} --generation {params.generation:q} "
        "--threads {threads} --out {output} > {log} 2>&1"


rule evaluate_load_time:
    """bitsandbytes, EETQ, HQQ, torchao and quanto quantize while loading: no artifact, the evaluation job
    quantizes (each in its method's env)."""
    input:
        unpack(PLAN.task_inputs),
        hf=rules.download_model.output[0],
        ids=rules.tokenize_eval_text.output.ids,
        meta=rules.tokenize_eval_text.output.meta,
        distributions=paths.DISTRIBUTIONS,
    output:
        cell_report(paths.METRICS),
    log:
        paths.log("evaluate", paths.PER_CELL),
    benchmark:
        paths.benchmark("evaluate", paths.PER_CELL)
    wildcard_constraints:
        method=PLAN.method_pattern(Family.LOAD_TIME),
    conda:
        PLAN.cell_env
    threads: 8
    resources:
        gpu=PLAN.gpus,
        tasks_per_gpu=0,  # Slurm: one process drives all the model's GPUs
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    params:
        cell=PLAN.cell_settings,
        eval=PLAN.eval_settings,
        generation=PLAN.generation_settings,
    shell:
        "python -m quantbench evaluate --cell {params.cell:q} --artifact {input.hf} --tokens {input.ids} "
        "--tokens-meta {input.meta} --eval {params.eval:q} --distributions {input.distributions} "
        "--threads {threads} --gpus {resources.gpu} --generation {params.generation:q} --out {output} > {log} 2>&1"


rule evaluate_finetune:
    """QLoRA: the model quantized while loading, its LoRA adapters trained on the calibration tokens, then
    scored with them."""
    input:
        unpack(PLAN.task_inputs),
        hf=rules.download_model.output[0],
        calib=paths.CALIB_TOKENS,
        ids=rules.tokenize_eval_text.output.ids,
        meta=rules.tokenize_eval_text.output.meta,
        distributions=paths.DISTRIBUTIONS,
    output:
        cell_report(paths.METRICS),
    log:
        paths.log("evaluate", paths.PER_CELL),
    benchmark:
        paths.benchmark("evaluate", paths.PER_CELL)
    wildcard_constraints:
        method=PLAN.method_pattern(Family.FINETUNE),
    conda:
        PLAN.env(Family.FINETUNE)
    threads: 8
    resources:
        gpu=1,
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    params:
        cell=PLAN.cell_settings,
        eval=PLAN.eval_settings,
        generation=PLAN.generation_settings,
    shell:
        "python -m quantbench evaluate --cell {params.cell:q} --artifact {input.hf} --calib {input.calib} "
        "--tokens {input.ids} --tokens-meta {input.meta} --eval {params.eval:q} --distributions {input.distributions} "
        "--threads {threads} --generation {params.generation:q} --out {output} > {log} 2>&1"
