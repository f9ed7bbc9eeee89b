"""The sample workflows in workflows/ against the node definitions of a real ComfyUI: node types
exist, widget values fit the inputs, links connect matching types; and a broken copy is caught."""
import asyncio
import copy
import json
import pathlib

import pytest

from comfyui_env import import_comfyui

import_comfyui()

import nodes  # noqa: E402

from rt_lynx_pack.nodes import NODE_CLASS_MAPPINGS as PACK_NODES  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# Nodes that exist only in ComfyUI's frontend (no Python class): text notes and wire reroutes.
FRONTEND_ONLY = {"Note": 1, "MarkdownNote": 1, "Reroute": 0}  # type -> number of widget values
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Combos listing files of the user's models folders: any file name is valid there.
FILE_LIST_INPUTS = {"unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "lora_name", "ckpt_name"}
LOADER_FOLDERS = {"unet_name": "diffusion_models", "clip_name": "text_encoders", "clip_name1": "text_encoders",
                  "clip_name2": "text_encoders", "vae_name": "vae"}
BYPASS = 4


@pytest.fixture(scope="module")
def node_classes():
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return {**nodes.NODE_CLASS_MAPPINGS, **PACK_NODES}


def widget_inputs(cls):
    """(name, type, options, spec) of the node's widget inputs, in the order the UI stores them,
    plus the UI-only control_after_generate value after a seed: the frontend adds one where the
    input asks for it and, where it says nothing, to an INT named seed or noise_seed."""
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind, opts = value[0], (value[1] if len(value) > 1 and value[1] else {})
            if isinstance(kind, (list, tuple)):
                out.append((name, "COMBO", list(kind), opts))
            elif kind in WIDGET_TYPES and not opts.get("forceInput"):
                out.append((name, kind, opts.get("options"), opts))
                if opts.get("control_after_generate", kind == "INT" and name in ("seed", "noise_seed")):
                    out.append(("control_after_generate", "COMBO", ["fixed", "increment", "decrement", "randomize"], {}))
    return out


def check_value(node_type, name, kind, options, opts, value):
    where = f"{node_type}.{name}={value!r}"
    if kind == "COMBO":
        if name in FILE_LIST_INPUTS:
            return [] if isinstance(value, str) and value.endswith(".safetensors") else [f"{where}: not a .safetensors file"]
        return [] if value in options else [f"{where}: not one of {options}"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: not a boolean"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{where}: not a string"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and not isinstance(value, int)):
        return [f"{where}: not {kind}"]
    if value < opts.get("min", float("-inf")) or value > opts.get("max", float("inf")):
        return [f"{where}: outside [{opts.get('min')}, {opts.get('max')}]"]
    return []


def socket_types(cls):
    spec = cls.INPUT_TYPES()
    inputs = {name: v[0] for s in ("required", "optional") for name, v in spec.get(s, {}).items()
              if isinstance(v[0], str) and v[0] not in WIDGET_TYPES}
    return inputs, list(cls.RETURN_TYPES)


def workflow_problems(workflow: dict, classes: dict) -> list[str]:
    problems = []
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        if key not in workflow:
            problems.append(f"not a UI-format workflow: no '{key}'")
    if problems:
        return problems
    by_id = {n["id"]: n for n in workflow["nodes"]}
    if len(by_id) != len(workflow["nodes"]):
        problems.append("duplicate node ids")
    for node in workflow["nodes"]:
        node_type, values = node["type"], node.get("widgets_values", [])
        if node_type in FRONTEND_ONLY:
            if len(values) != FRONTEND_ONLY[node_type]:
                problems.append(f"{node_type} {node['id']}: {len(values)} widget values")
            continue
        if node_type not in classes:
            problems.append(f"unknown node type {node_type!r} (node {node['id']})")
            continue
        widgets = widget_inputs(classes[node_type])
        if len(values) != len(widgets):
            problems.append(f"{node_type} {node['id']}: {len(values)} widget values for "
                            f"{len(widgets)} widgets {[w[0] for w in widgets]}")
            continue
        for (name, kind, options, opts), value in zip(widgets, values):
            problems += check_value(node_type, name, kind, options, opts, value)

    for link in workflow["links"]:
        link_id, src, src_slot, dst, dst_slot, link_type = link
        if src not in by_id or dst not in by_id:
            problems.append(f"link {link_id}: node {src if src not in by_id else dst} does not exist")
            continue
        s, d = by_id[src], by_id[dst]
        if src_slot >= len(s["outputs"]) or link_id not in (s["outputs"][src_slot].get("links") or []):
            problems.append(f"link {link_id}: not listed on output {src_slot} of {s['type']} {src}")
            continue
        if dst_slot >= len(d["inputs"]) or d["inputs"][dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: not listed on input {dst_slot} of {d['type']} {dst}")
            continue
        out_type = s["outputs"][src_slot]["type"]
        in_name, in_type = d["inputs"][dst_slot]["name"], d["inputs"][dst_slot]["type"]
        if s["type"] in classes:  # the declared types, not just what the JSON says
            out_type = socket_types(classes[s["type"]])[1][src_slot]
        if d["type"] in classes:
            in_type = socket_types(classes[d["type"]])[0].get(in_name, f"<no input {in_name}>")
        if not (out_type == in_type == link_type or "*" in (out_type, in_type)):
            problems.append(f"link {link_id}: {s['type']} {out_type} -> {d['type']}.{in_name} {in_type} "
                            f"(link says {link_type})")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_matches_comfyui_node_definitions(path, node_classes):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    assert workflow_problems(workflow, node_classes) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_uses_rt_lynx_and_says_what_to_download(path, node_classes):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    modes = {n["type"]: n["mode"] for n in workflow["nodes"]}
    assert modes["RTLynxSparsifyModel"] == 0
    # Users have no Lynx LoRA yet: it is loaded bypassed, or made by the calibration in the graph.
    lora_node = "RTLynxCalibrateLoRA" if "RTLynxCalibrateLoRA" in modes else "RTLynxLoadLoRA"
    assert modes[lora_node] == (0 if lora_node == "RTLynxCalibrateLoRA" else BYPASS)
    notes = " ".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in FRONTEND_ONLY)
    assert "RT-Lynx Sparsify Model" in notes
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        for (name, *_), value in zip(widget_inputs(node_classes[node["type"]]), node["widgets_values"]):
            if name in LOADER_FOLDERS:
                assert value in notes and f"models/{LOADER_FOLDERS[name]}" in notes, (path.name, name, value)
    # Every model reaches the sampler through both RT-Lynx nodes.
    links = {link[3]: link[1] for link in workflow["links"] if link[5] == "MODEL"}
    by_id = {n["id"]: n["type"] for n in workflow["nodes"]}
    sampler = next(n["id"] for n in workflow["nodes"] if n["type"] == "KSampler")
    chain, node = [], sampler
    while node in links:
        node = links[node]
        chain.append(by_id[node])
    assert chain[-1] == "UNETLoader" and {"RTLynxSparsifyModel", lora_node} <= set(chain)


def test_the_check_catches_a_typo_a_wrong_widget_count_and_a_wrong_link(node_classes, tmp_path):
    original = json.loads((ROOT / "workflows" / "flux1_dev_rt_lynx.json").read_text(encoding="utf-8"))

    def broken(edit):
        workflow = copy.deepcopy(original)
        edit(workflow)
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(workflow), encoding="utf-8")
        return workflow_problems(json.loads(path.read_text(encoding="utf-8")), node_classes)

    def node(workflow, node_type):
        return next(n for n in workflow["nodes"] if n["type"] == node_type)

    def typo(w):
        node(w, "KSampler")["type"] = "KSampelr"
    assert broken(typo) == [f"unknown node type 'KSampelr' (node {node(original, 'KSampler')['id']})"]

    def drop_control_after_generate(w):
        del node(w, "KSampler")["widgets_values"][1]
    assert any("KSampler" in p and "6 widget values for 7 widgets" in p for p in broken(drop_control_after_generate))

    def bad_combo(w):
        values = node(w, "RTLynxSparsifyModel")["widgets_values"]
        values[values.index("auto")] = "cusparselt"  # the backend widget
    assert any("RTLynxSparsifyModel.backend='cusparselt'" in p for p in broken(bad_combo))

    def out_of_range(w):
        node(w, "EmptySD3LatentImage")["widgets_values"][0] = 8
    assert any("EmptySD3LatentImage.width=8: outside" in p for p in broken(out_of_range))

    def vae_into_model(w):
        # Rewire the VAE loader's output into the sampler's model input, keeping the JSON consistent.
        vae, sampler = node(w, "VAELoader"), node(w, "KSampler")
        link = next(link for link in w["links"] if link[3] == sampler["id"] and link[4] == 0)
        link[1], link[2] = vae["id"], 0
        vae["outputs"][0]["links"].append(link[0])
    assert any("VAELoader VAE -> KSampler.model MODEL" in p for p in broken(vae_into_model))

    def dangling(w):
        w["links"][0][3] = 999
    assert any("node 999 does not exist" in p for p in broken(dangling))

    assert broken(lambda w: None) == []


def test_calibration_workflow_prompts_fit_its_samples(node_classes):
    """Each calibration prompt is sampled (the node refuses fewer samples than prompts), and the
    file it writes is the one the FLUX workflow's Load Lynx LoRA names."""
    workflow = json.loads((ROOT / "workflows" / "flux1_dev_rt_lynx_calibrate.json").read_text(encoding="utf-8"))
    calibrate = next(n for n in workflow["nodes"] if n["type"] == "RTLynxCalibrateLoRA")
    values = dict(zip((w[0] for w in widget_inputs(node_classes["RTLynxCalibrateLoRA"])), calibrate["widgets_values"]))
    prompts = 1 + len([line for line in values["more_prompts"].splitlines() if line.strip()])
    assert values["samples"] >= prompts > 1
    assert any(i["name"] == "clip" and i["link"] is not None for i in calibrate["inputs"])
    flux = json.loads((ROOT / "workflows" / "flux1_dev_rt_lynx.json").read_text(encoding="utf-8"))
    load = next(n for n in flux["nodes"] if n["type"] == "RTLynxLoadLoRA")
    assert load["widgets_values"][0] == f"lynx/{values['filename']}.safetensors"


def test_seed_control_widgets_follow_the_frontend_rule(node_classes):
    """The pack's seeds (nothing said) and KSampler's (asked for) get the UI's control value after
    them; the calibration template keeps its seed fixed, so queueing again does not calibrate anew."""
    def names(node_type):
        return [w[0] for w in widget_inputs(node_classes[node_type])]
    for node_type in ("RTLynxCompare", "RTLynxCalibrateLoRA", "KSampler"):
        assert names(node_type)[names(node_type).index("seed") + 1] == "control_after_generate", node_type
    workflow = json.loads((ROOT / "workflows" / "flux1_dev_rt_lynx_calibrate.json").read_text(encoding="utf-8"))
    calibrate = next(n for n in workflow["nodes"] if n["type"] == "RTLynxCalibrateLoRA")
    assert dict(zip(names("RTLynxCalibrateLoRA"), calibrate["widgets_values"]))["control_after_generate"] == "fixed"
