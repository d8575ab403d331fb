# GPTQ / AWQ / RTN through GPTQModel: calibrate once per model, quantize, save a checkpoint.


rule calibration_tokens:
    """The calibration tokens of the calibration spec, drawn once per model for every cell."""
    input:
        hf=rules.download_model.output[0],
        eval_ids=rules.tokenize_eval_text.output.ids,
    output:
        ids="results/{model}/data/calib_tokens.npy",
        meta="results/{model}/data/calib_tokens.json",
    params:
        spec=json.dumps(config["calibration"], sort_keys=True),
    log:
        "results/logs/calibration/{model}.log",
    benchmark:
        "results/benchmarks/calibration/{model}.tsv"
    conda:
        "../../envs/gptqmodel.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(4000),
        runtime=60,
    shell:
        "python -m quantbench calibrate --spec {params.spec:q} --hf {input.hf} --eval-ids {input.eval_ids} "
        "--ids {output.ids} --meta {output.meta} > {log} 2>&1"


rule quantize_checkpoint:
    input:
        unpack(checkpoint_inputs),
    output:
        model=directory("results/{model}/{checkpoint_method}/{variant}/model"),
        info="results/{model}/{checkpoint_method}/{variant}/quantize.json",
    params:
        cell=lambda w: cell_json(w.model, w.checkpoint_method, w.variant),
        calib=lambda w, input: f"--calib {input.calib} --calib-meta {input.calib_meta}" if "calib" in input.keys() else "",
    log:
        "results/logs/quantize/{model}/{checkpoint_method}-{variant}.log",
    benchmark:
        "results/benchmarks/quantize/{model}/{checkpoint_method}-{variant}.tsv"
    conda:
        "../../envs/gptqmodel.yaml"
    threads: 8
    resources:
        gpu=1,
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    shell:
        "python -m quantbench quantize-checkpoint --cell {params.cell:q} --hf {input.hf} {params.calib} "
        "--out {output.model} --info {output.info} --threads {threads} > {log} 2>&1"


rule evaluate_checkpoint:
    """A GPTQModel checkpoint, loaded back through GPTQModel, on the shared token stream."""
    input:
        model=rules.quantize_checkpoint.output.model,
        info=rules.quantize_checkpoint.output.info,
        hf=rules.download_model.output[0],
        ids=rules.tokenize_eval_text.output.ids,
        meta=rules.tokenize_eval_text.output.meta,
        reference=REFERENCE,
    output:
        cell_report("results/{model}/{checkpoint_method}/{variant}/metrics.json"),
    params:
        cell=lambda w: cell_json(w.model, w.checkpoint_method, w.variant),
        eval=EVAL_JSON,
        kernel=lambda w: config["methods"][w.checkpoint_method].get("kernel", "auto"),
    log:
        "results/logs/evaluate/{model}/{checkpoint_method}-{variant}.log",
    benchmark:
        "results/benchmarks/evaluate/{model}/{checkpoint_method}-{variant}.tsv"
    conda:
        "../../envs/gptqmodel.yaml"
    threads: 8
    resources:
        gpu=1,
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    shell:
        "python -m quantbench eval --cell {params.cell:q} --model-dir {input.model} --base-dir {input.hf} "
        "--quant-info {input.info} --tokens {input.ids} --tokens-meta {input.meta} --eval {params.eval:q} "
        "--reference {input.reference} --kernel {params.kernel} --threads {threads} --out {output} > {log} 2>&1"
