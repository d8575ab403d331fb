# Wildcards match only names the config declares, so paths can never be misread.
wildcard_constraints:
    model="|".join(sorted(map(re.escape, config["models"]))),
    variant=r"[A-Za-z0-9][A-Za-z0-9._-]*",


def cell_json(model, method, variant):
    return json.dumps(qbconfig.find_cell(config, model, method, variant).record())


EVAL_JSON = json.dumps(config["eval"])
