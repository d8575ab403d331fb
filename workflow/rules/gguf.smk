CONVERTER = f"{RESOURCES}/tools/llama.cpp-{qbgguf.LLAMA_CPP_PYTHON_PIN}/convert_hf_to_gguf.py"


rule fetch_gguf_converter:
    """llama.cpp's convert_hf_to_gguf.py from the pinned llama-cpp-python sdist (fetched once)."""
    output:
        CONVERTER,
    log:
        "results/logs/gguf/fetch_converter.log",
    benchmark:
        "results/benchmarks/gguf/fetch_converter.tsv"
    conda:
        "../../envs/llamacpp.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(2000),
        runtime=60,
    shell:
        "python -m quantbench fetch-converter --out $(dirname {output}) > {log} 2>&1"


rule gguf_convert:
    """HF -> F16 GGUF, once per model; every k-quant starts from it."""
    input:
        hf=rules.download_model.output[0],
        converter=CONVERTER,
    output:
        "results/{model}/gguf/F16.gguf",
    log:
        "results/logs/gguf/{model}/convert.log",
    benchmark:
        "results/benchmarks/gguf/{model}/convert.tsv"
    conda:
        "../../envs/llamacpp.yaml"
    threads: 2
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(16000),
        runtime=720,
    shell:
        "python -m quantbench convert --hf {input.hf} --converter {input.converter} --out {output} > {log} 2>&1"


rule gguf_quantize:
    input:
        rules.gguf_convert.output[0],
    output:
        gguf="results/{model}/gguf/{variant}/model.gguf",
        info="results/{model}/gguf/{variant}/quantize.json",
    params:
        type=lambda w: qbconfig.find_cell(config, w.model, "gguf", w.variant).params["type"],
    log:
        "results/logs/gguf/{model}/{variant}/quantize.log",
    benchmark:
        "results/benchmarks/gguf/{model}/{variant}/quantize.tsv"
    conda:
        "../../envs/llamacpp.yaml"
    threads: 8
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(8000),
        runtime=60,
    shell:
        "python -m quantbench quantize --src {input} --dst {output.gguf} --type {params.type} "
        "--threads {threads} --info {output.info} > {log} 2>&1"
