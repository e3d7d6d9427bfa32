"""Several named adapters on one model, against real PEFT (load_adapter / set_adapter /
disable_adapter / add_weighted_adapter), and per-row adapters against each adapter alone."""

import warnings

import peft
import pytest
import torch

import lorafit
from lorafit.errors import UserError
from lorafit.lora.adapter_io import write_adapter
from lorafit.lora.multi import (
    AdapterSwitch,
    active_adapter,
    disable_adapters,
    load_adapters,
    route_rows,
    set_active_adapter,
)
from lorafit.lora.weighted import combine_adapters
from model_builders import build_tiny_gpt2, build_tiny_llama
from test_adapter_io import logits, randomize

ADAPTERS = {  # different targets, ranks and kinds, so the switches hold mixed versions
    "attn": ({"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8}, 1),
    "mlp": ({"target_modules": "all-linear", "r": 8, "lora_alpha": 16, "use_rslora": True}, 2),
    "dora": ({"target_modules": ["q_proj", "o_proj"], "r": 2, "use_dora": True}, 3),
    "embed": ({"target_modules": ["embed_tokens", "k_proj"], "r": 4, "modules_to_save": ["lm_head"]}, 4),
}


def save_adapters(tmp_path, builder=build_tiny_llama, adapters=ADAPTERS) -> dict:
    paths = {}
    for name, (kwargs, seed) in adapters.items():
        model = randomize(lorafit.add_lora(builder(), lorafit.LoraConfig(**kwargs)), seed).eval()
        paths[name] = lorafit.save_adapter(model, tmp_path / name)
    return paths


def alone(path, builder=build_tiny_llama):
    return lorafit.load_adapter(builder(), path).eval()


def test_switching_gives_each_adapter_exactly_as_loaded_alone_and_as_peft(tmp_path):
    paths = save_adapters(tmp_path)
    model = build_tiny_llama()
    routing = load_adapters(model, paths)
    assert routing.names == tuple(ADAPTERS) and routing.active is None
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model), logits(build_tiny_llama()), atol=0, rtol=0)  # base by default

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build_tiny_llama(), paths["attn"], adapter_name="attn")
        for name in list(ADAPTERS)[1:]:
            theirs.load_adapter(paths[name], adapter_name=name)
    theirs.eval()
    for name, path in paths.items():
        set_active_adapter(model, name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(model), logits(alone(path)), atol=0, rtol=0)
        torch.testing.assert_close(logits(model), logits(theirs), atol=1e-5, rtol=0)
        with disable_adapters(model), theirs.disable_adapter():
            torch.testing.assert_close(logits(model), logits(theirs), atol=1e-6, rtol=0)
        assert model.lora_routing.active == name
    set_active_adapter(model, None)
    torch.testing.assert_close(logits(model), logits(build_tiny_llama()), atol=0, rtol=0)


def test_each_row_gets_its_own_adapter_in_one_batch(tmp_path):
    paths = save_adapters(tmp_path)
    model = build_tiny_llama()
    load_adapters(model, paths)
    ids = torch.randint(0, 128, (6, 9), generator=torch.Generator().manual_seed(5))
    names = ["mlp", None, "attn", "dora", "embed", "mlp"]
    with torch.no_grad(), route_rows(model, names):
        mixed = model(input_ids=ids).logits
    for row, name in enumerate(names):
        reference = build_tiny_llama() if name is None else alone(paths[name])
        with torch.no_grad():
            expected = reference(input_ids=ids[row:row + 1]).logits[0]
        torch.testing.assert_close(mixed[row], expected, atol=1e-5, rtol=1e-5)
    assert model.lora_routing.rows is None  # the routing ends with the block


def test_gathered_path_is_taken_where_every_version_is_plain_lora(tmp_path):
    paths = save_adapters(tmp_path, adapters={k: ADAPTERS[k] for k in ("attn", "mlp")})
    model = build_tiny_llama()
    load_adapters(model, paths)
    switch = model.model.layers[0].self_attn.q_proj
    assert isinstance(switch, AdapterSwitch)
    calls = []
    switch._per_adapter = lambda *a, **k: calls.append(1)  # must not be used
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), route_rows(model, ["attn", "mlp", None]):
        model(input_ids=ids)
    assert not calls and switch._stack is not None
    a, b = switch._stack
    assert a.shape == (3, 8, 32) and b.shape == (3, 32, 8)  # base slot + 2 adapters, ranks padded to 8
    assert a[0].abs().sum() == 0 and a[1, 4:].abs().sum() == 0


def test_conv1d_models_switch_too(tmp_path):
    adapters = {"a": ({"target_modules": ["c_attn"], "fan_in_fan_out": True}, 1),
                "b": ({"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "r": 2}, 2)}
    paths = save_adapters(tmp_path, build_tiny_gpt2, adapters)
    model = build_tiny_gpt2()
    load_adapters(model, paths)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), route_rows(model, ["a", "b"]):
        mixed = model(input_ids=ids).logits
    for row, name in enumerate("ab"):
        with torch.no_grad():
            expected = alone(paths[name], build_tiny_gpt2)(input_ids=ids[row:row + 1]).logits[0]
        torch.testing.assert_close(mixed[row], expected, atol=1e-5, rtol=1e-5)


def test_unknown_names_and_a_second_load_are_refused(tmp_path):
    paths = save_adapters(tmp_path, adapters={"attn": ADAPTERS["attn"]})
    model = build_tiny_llama()
    load_adapters(model, paths)
    with pytest.raises(UserError, match="no adapter named 'sql'.*loaded: attn"):
        set_active_adapter(model, "sql")
    with pytest.raises(UserError, match="no adapter named"), route_rows(model, ["attn", "sql"]):
        pass
    with pytest.raises(UserError, match="already has adapters"):
        load_adapters(model, paths)
    with pytest.raises(UserError, match="adapter name"):
        load_adapters(build_tiny_llama(), {"a/b": paths["attn"]})
    with active_adapter(model, "attn"):
        assert model.lora_routing.active == "attn"
    assert model.lora_routing.active is None


def test_an_unconverted_pissa_adapter_is_refused_by_name(tmp_path):
    model = lorafit.add_lora(build_tiny_llama(), lorafit.LoraConfig(init_lora_weights="pissa", r=2)).eval()
    lorafit.save_adapter(model, tmp_path / "pissa")  # converted: an ordinary adapter
    config_file = tmp_path / "pissa" / "adapter_config.json"
    import json

    raw = json.loads(config_file.read_text())
    assert raw["init_lora_weights"] is True
    load_adapters(build_tiny_llama(), {"p": tmp_path / "pissa"})  # loads
    raw.update(init_lora_weights="pissa", r=2, lora_alpha=2)  # as PEFT saves one without conversion
    tensors = lorafit.lora.adapter_io.read_adapter_tensors(tmp_path / "pissa")
    write_adapter(tmp_path / "raw", raw, {k: v[:2] if "lora_A" in k else v[:, :2] for k, v in tensors.items()})
    base = build_tiny_llama()
    with pytest.raises(UserError, match="adapter 'p'.*PiSSA/OLoRA residual base"):
        load_adapters(base, {"p": tmp_path / "raw"})
    torch.testing.assert_close(logits(base), logits(build_tiny_llama()), atol=0, rtol=0)


@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_weighted_combination_matches_peft_add_weighted_adapter(tmp_path, combination):
    same_rank = {"one": ({"target_modules": ["q_proj", "v_proj", "embed_tokens"], "r": 4, "lora_alpha": 8}, 1),
                 "two": ({"target_modules": ["q_proj", "up_proj"], "r": 4, "lora_alpha": 16, "use_rslora": True}, 2)}
    paths = save_adapters(tmp_path, adapters=same_rank)
    weights = [0.7, -0.4]
    config, tensors = combine_adapters(list(paths.values()), weights, combination)
    write_adapter(tmp_path / "combined", config, tensors)
    ours = alone(tmp_path / "combined")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build_tiny_llama(), paths["one"], adapter_name="one")
        theirs.load_adapter(paths["two"], adapter_name="two")
        theirs.add_weighted_adapter(["one", "two"], weights, "mix", combination_type=combination)
    theirs.set_adapter("mix")
    theirs.eval()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(ours), logits(build_tiny_llama()), atol=1e-3)
    with warnings.catch_warnings():  # and the combined files load in PEFT with the same outputs
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(build_tiny_llama(), tmp_path / "combined").eval()
    torch.testing.assert_close(logits(reloaded), logits(ours), atol=1e-5, rtol=0)


def test_cat_is_the_exact_weighted_sum_of_the_updates(tmp_path):
    paths = save_adapters(tmp_path, adapters={k: ADAPTERS[k] for k in ("attn", "mlp")})
    config, tensors = combine_adapters(list(paths.values()), [0.5, 2.0], "cat")
    write_adapter(tmp_path / "combined", config, tensors)
    combined = dict(lorafit.lora.lora_layers(alone(tmp_path / "combined")))
    one, two = (dict(lorafit.lora.lora_layers(alone(p))) for p in paths.values())
    for name, layer in combined.items():
        expected = sum(w * parts[name].delta_weight() for w, parts in ((0.5, one), (2.0, two)) if name in parts)
        torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-6, rtol=1e-5)
    assert config["r"] == 12 and layer.scaling == 1.0


def test_combination_refusals_name_the_problem(tmp_path):
    paths = save_adapters(tmp_path)
    with pytest.raises(UserError, match="'linear' combination needs adapters of one rank.*\\[4, 8\\]"):
        combine_adapters([paths["attn"], paths["mlp"]], [1, 1], "linear")
    with pytest.raises(UserError, match="use_dora"):
        combine_adapters([paths["attn"], paths["dora"]], [1, 1])
    with pytest.raises(UserError, match="modules_to_save"):
        combine_adapters([paths["attn"], paths["embed"]], [1, 1])
    with pytest.raises(UserError, match="2 adapters but 1 weights"):
        combine_adapters([paths["attn"], paths["mlp"]], [1])
    with pytest.raises(UserError, match="combination 'svd'"):
        combine_adapters([paths["attn"]], [1], "svd")
