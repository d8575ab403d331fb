# Evaluation jobs use the GPU when one is present (gpu=1), the CPU otherwise.


rule evaluate_baseline:
    """The unquantized model in transformers: FP16/BF16 on CUDA, FP32 on a CPU."""
    input:
        hf=rules.download_model.output[0],
        ids=rules.tokenize_eval_text.output.ids,
        meta=rules.tokenize_eval_text.output.meta,
    output:
        metrics=cell_report(f"results/{{model}}/{qbconfig.BASELINE}/{qbconfig.BASELINE_VARIANT}/metrics.json"),
        reference=REFERENCE,
    params:
        cell=lambda w: cell_json(w.model, qbconfig.BASELINE, qbconfig.BASELINE_VARIANT),
        eval=EVAL_JSON,
    log:
        "results/logs/evaluate/{model}/baseline.log",
    benchmark:
        "results/benchmarks/evaluate/{model}/baseline.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 8
    resources:
        gpu=1,
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    shell:
        "python -m quantbench eval --cell {params.cell:q} --model-dir {input.hf} --tokens {input.ids} "
        "--tokens-meta {input.meta} --eval {params.eval:q} --threads {threads} --write-reference {output.reference} "
        "--out {output.metrics} > {log} 2>&1"


rule evaluate_gguf:
    """A GGUF cell in llama.cpp, fed the same token ids and windows as the baseline."""
    input:
        gguf=rules.gguf_quantize.output.gguf,
        info=rules.gguf_quantize.output.info,
        ids=rules.tokenize_eval_text.output.ids,
        meta=rules.tokenize_eval_text.output.meta,
        reference=REFERENCE,
    output:
        cell_report("results/{model}/gguf/{variant}/metrics.json"),
    params:
        cell=lambda w: cell_json(w.model, "gguf", w.variant),
        eval=EVAL_JSON,
    log:
        "results/logs/evaluate/{model}/gguf-{variant}.log",
    benchmark:
        "results/benchmarks/evaluate/{model}/gguf-{variant}.tsv"
    conda:
        "../../envs/llamacpp.yaml"
    threads: 8
    resources:
        gpu=1,
        mem_mb=scaled_by_attempt(8000),
        runtime=720,
    shell:
        "python -m quantbench eval --cell {params.cell:q} --gguf {input.gguf} --quant-info {input.info} --tokens {input.ids} "
        "--tokens-meta {input.meta} --eval {params.eval:q} --reference {input.reference} --threads {threads} "
        "--out {output} > {log} 2>&1"


rule evaluate_load_time:
    """bitsandbytes and EETQ quantize while loading: no artifact, the evaluation job quantizes."""
    input:
        hf=rules.download_model.output[0],
        ids=rules.tokenize_eval_text.output.ids,
        meta=rules.tokenize_eval_text.output.meta,
        reference=REFERENCE,
    output:
        cell_report("results/{model}/{load_time_method}/{variant}/metrics.json"),
    params:
        cell=lambda w: cell_json(w.model, w.load_time_method, w.variant),
        eval=EVAL_JSON,
    log:
        "results/logs/evaluate/{model}/{load_time_method}-{variant}.log",
    benchmark:
        "results/benchmarks/evaluate/{model}/{load_time_method}-{variant}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 8
    resources:
        gpu=1,
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    shell:
        "python -m quantbench eval --cell {params.cell:q} --model-dir {input.hf} --tokens {input.ids} "
        "--tokens-meta {input.meta} --eval {params.eval:q} --reference {input.reference} --threads {threads} "
        "--out {output} > {log} 2>&1"
