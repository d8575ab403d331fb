# Packed checkpoints (GPTQ / AWQ / RTN through GPTQModel): quantize from the calibration tokens, save.


rule quantize_packed:
    input:
        unpack(PLAN.quantize_inputs),
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
        PLAN.cell_env
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
