# The gguf method: HF -> F16 GGUF once per model (and its importance matrix where a variant asks),
# then one llama.cpp quantization per variant. autoround-gguf: AutoRound writes the GGUF from the HF model.
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


rule build_llama_tools:
    """llama.cpp's programs, built once from the pinned sdist's source (workflow/setup.sh builds them first)."""
    output:
        expand(paths.LLAMA_TOOL, tool=llamacpp.TOOLS),
    log:
        paths.log("build_llama_tools"),
    benchmark:
        paths.benchmark("build_llama_tools")
    conda:
        "../../envs/llamacpp.yaml"
    threads: 8
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(8000),
        runtime=120,
    params:
        out=lambda wildcards, output: Path(output[0]).parent,  # paths.LLAMA_TOOLS
    shell:
        "python -m quantbench build-llama-tools --out {params.out} --jobs {threads} > {log} 2>&1"


rule imatrix:
    """The model's importance matrix from its calibration tokens, once per model (llama-imatrix)."""
    input:
        gguf=rules.convert_gguf.output[0],
        calib=rules.calibration_tokens.output.ids,
        calib_meta=rules.calibration_tokens.output.meta,
        hf=rules.download_model.output[0],
        tool=paths.LLAMA_TOOL.format(tool="llama-imatrix"),
    output:
        imatrix=paths.IMATRIX,
        info=paths.IMATRIX_INFO,
        text=paths.IMATRIX_TEXT,
    log:
        paths.log("imatrix", paths.PER_MODEL),
    benchmark:
        paths.benchmark("imatrix", paths.PER_MODEL)
    conda:
        PLAN.env(Family.GGUF)
    threads: 8
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    shell:
        "python -m quantbench imatrix --tool {input.tool} --gguf {input.gguf} --calib {input.calib} "
        "--calib-meta {input.calib_meta} --hf {input.hf} --out {output.imatrix} --text-out {output.text} "
        "--info {output.info} --threads {threads} > {log} 2>&1"


rule quantize_gguf:
    input:
        unpack(PLAN.gguf_inputs),
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
        imatrix=PLAN.imatrix_args,
    shell:
        "python -m quantbench quantize-gguf --src {input.f16} --dst {output.gguf} --type {params.type} {params.imatrix} "
        "--threads {threads} --info {output.info} > {log} 2>&1"


rule export_gguf:
    """A GGUF written from the HF model by a calibrated quantizer (AutoRound's export), in its method's env."""
    input:
        unpack(PLAN.quantize_inputs),
    output:
        gguf=paths.GGUF_FILE,
        info=paths.QUANTIZE_INFO,
    log:
        paths.log("quantize", paths.PER_CELL),
    benchmark:
        paths.benchmark("quantize", paths.PER_CELL)
    wildcard_constraints:
        method=PLAN.method_pattern(Family.GGUF_EXPORT),
    conda:
        PLAN.cell_env
    threads: 8
    resources:
        gpu=1,
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    params:
        cell=PLAN.cell_settings,
    shell:
        "python -m quantbench export-gguf --cell {params.cell:q} --hf {input.hf} --calib {input.calib} "
        "--calib-meta {input.calib_meta} --out {output.gguf} --info {output.info} --threads {threads} > {log} 2>&1"


rule ollama_modelfile:
    """A Modelfile beside each GGUF cell's file: `ollama create NAME -f results/.../Modelfile`."""
    input:
        gguf=paths.GGUF_FILE,
    output:
        paths.MODELFILE,
    log:
        paths.log("modelfile", paths.PER_CELL),
    wildcard_constraints:
        method=PLAN.backend_pattern(LLAMA_CPP),
    conda:
        PLAN.env(Family.GGUF)
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(1000),
        runtime=10,
    params:
        ollama=PLAN.ollama_settings,
    shell:
        "python -m quantbench modelfile --gguf {input.gguf} --out {output} --settings {params.ollama:q} > {log} 2>&1"
