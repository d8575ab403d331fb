rule fetch_eval_text:
    output:
        f"{RESOURCES}/data/{{dataset}}/test_rows.json",
    log:
        "results/logs/data/{dataset}.log",
    benchmark:
        "results/benchmarks/data/{dataset}.tsv"
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
        unpack(tokenizer_inputs),
    output:
        ids="results/{model}/data/eval_tokens.npy",
        meta="results/{model}/data/eval_tokens.json",
    params:
        text=json.dumps(TEXT),
        tokenizer=lambda w, input: f"--gguf {input.gguf}" if "gguf" in input.keys() else f"--hf {input.hf}",
    log:
        "results/logs/tokenize/{model}.log",
    benchmark:
        "results/benchmarks/tokenize/{model}.tsv"
    conda:
        "../../envs/llamacpp.yaml" if config["eval"]["tokens"] == "gguf" else "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=scaled_by_attempt(4000),
        runtime=60,
    shell:
        "python -m quantbench tokenize --text {params.text:q} {params.tokenizer} --ids {output.ids} "
        "--meta {output.meta} > {log} 2>&1"
