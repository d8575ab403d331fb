# Packed checkpoints (GPTQ / AWQ / RTN through GPTQModel): calibrate once per model, quantize, save.


rule calibration_tokens:
    """The calibration tokens of the calibration spec, drawn once per model for every cell."""
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
        PLAN.env(Family.PACKED)
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


rule quantize_packed:
    input:
        unpack(PLAN.packed_inputs),
    output:
        model=directory(paths.PACKED_DIR),
        info=paths.QUANTIZE_INFO,
    log:
        paths.log("quantize", paths.PER_CELL),
    benchmark:
        paths.benchmark("quantize", paths.PER_CELL)
    wildcard_constraints:
        method=PLAN.method_pattern(Family.PACKED),
    conda:
        PLAN.env(Family.PACKED)
    threads: 8
    resources:
        gpu=1,
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    params:
        cell=PLAN.cell_settings,
        calib=PLAN.calibration_args,
    shell:
        "python -m quantbench quantize-packed --cell {params.cell:q} --hf {input.hf} {params.calib} "
        "--out {output.model} --info {output.info} --threads {threads} > {log} 2>&1"
