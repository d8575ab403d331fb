# The gguf method: HF -> F16 GGUF once per model, then one llama.cpp quantization per variant.
rule fetch_gguf_converter:
    """llama.cpp's convert_hf_to_gguf.py from the pinned llama-cpp-python sdist (fetched once)."""
    output:
        paths.CONVERTER,
    log:
        paths.log("fetch_converter"),
    benchmark:
        paths.benchmark("fetch_converter")
    conda:
        "../../envs/llamacpp.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(2000),
        runtime=60,
    shell:
        "python -m quantbench fetch-converter --out $(dirname {output}) > {log} 2>&1"


rule convert_gguf:
    """HF -> F16 GGUF, once per model; every llama.cpp type starts from it."""
    input:
        hf=rules.download_model.output[0],
        converter=paths.CONVERTER,
    output:
        paths.F16_GGUF,
    log:
        paths.log("convert", paths.PER_MODEL),
    benchmark:
        paths.benchmark("convert", paths.PER_MODEL)
    conda:
        "../../envs/llamacpp.yaml"
    threads: 2
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    shell:
        "python -m quantbench convert --hf {input.hf} --converter {input.converter} --out {output} > {log} 2>&1"


rule quantize_gguf:
    input:
        rules.convert_gguf.output[0],
    output:
        gguf=paths.GGUF_FILE,
        info=paths.QUANTIZE_INFO,
    log:
        paths.log("quantize", paths.PER_CELL),
    benchmark:
        paths.benchmark("quantize", paths.PER_CELL)
    wildcard_constraints:
        method=PLAN.method_pattern(Family.GGUF),
    conda:
        PLAN.env(Family.GGUF)
    threads: 8
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(8000),
        runtime=60,
    params:
        type=PLAN.gguf_type,
    shell:
        "python -m quantbench quantize-gguf --src {input} --dst {output.gguf} --type {params.type} "
        "--threads {threads} --info {output.info} > {log} 2>&1"
