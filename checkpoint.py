"""
Checkpoints: the files a run reads and writes, each checked before memory is spent.
  Loading weights: this project's ckpt.pt, nanoGPT's, a Hugging Face GPT-2 (its folder, or by name).
  --resume: <out_dir>/ckpt.pt, saved in one place (save) and restored in one (restore).
A .pt or .bin file is read by torch.load(weights_only=True): plain data, never pickled code. A
.safetensors file holds tensors only. GPT-2 by name comes through transformers (optional).
"""

import json
import math
import os
import re
import warnings
from dataclasses import asdict, fields

import torch

import cherry
from data import prepare as data_prep

# ----------------------------------------------------------------------------
# loading weights


def load_checkpoint(path):
    """Tensors, numbers, strings, lists and dicts; a file that would need pickled code run is
    refused, not run. An OSError (no permission, a folder) is torch's own line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # a damaged file makes torch warn before it fails
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception:  # torch's own message is many lines of advice: say what happened in one
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # read, never run
        except Exception:
            unsafe = []
        if unsafe:
            raise ValueError(f"{path} holds a pickled Python object ({unsafe[0]}) that loading "
                             f"would have to run; refused, nothing was executed") from None
        raise ValueError(f"{path} is corrupt, truncated or not a torch checkpoint; it was not "
                         f"loaded") from None


def config_error(config):
    """The first field of a stored config (a dict) that cannot build a model, as 'name value is of
    the wrong type' (32.0 where a count belongs, a string for a flag, an infinite float) or 'name
    value is out of range', else None. Flags are checked by their types; a file is checked here."""
    for f in fields(cherry.GPTConfig):
        value, default = config.get(f.name, f.default), f.default
        if isinstance(default, bool):
            passed = isinstance(value, bool)
        elif isinstance(default, int):
            passed = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            passed = number and math.isfinite(value)
        elif isinstance(default, str):
            passed = isinstance(value, str)
        else:  # schedule: None or the layer of each application
            passed = value is None or isinstance(value, (list, tuple))
        if not passed:
            return f"{f.name} {value!r} is of the wrong type"
    c = {f.name: config.get(f.name, f.default) for f in fields(cherry.GPTConfig)}
    depth = cherry.MAX_DEPTH
    schedule = c["schedule"] or ()
    in_range = {  # field: its value is in range
        "block_size": c["block_size"] >= 1,
        "vocab_size": c["vocab_size"] >= 1,
        "n_embd": c["n_embd"] >= 1,
        "n_layer": 1 <= c["n_layer"] <= depth,
        "dropout": 0 <= c["dropout"] < 1,
        "gelu_approximate": c["gelu_approximate"] in ("none", "tanh"),
        "schedule": c["schedule"] is None or 0 < len(schedule) <= depth and all(
            isinstance(i, int) and 0 <= i < c["n_layer"] for i in schedule),
        "lora_rank": c["lora_rank"] >= 0,
        "n_expert": c["n_expert"] >= 0,
        "experts_per_token": 1 <= c["experts_per_token"] <= max(1, c["n_expert"]),
        "capacity_factor": c["capacity_factor"] > 0,
        "aux_weight": c["aux_weight"] >= 0,
        "z_weight": c["z_weight"] >= 0,
        "mtp": 0 <= c["mtp"] <= 16,
        "mtp_weight": c["mtp_weight"] >= 0,
    }
    for name, ok in in_range.items():
        if not ok:
            return f"{name} {c[name]!r} is out of range"
    return None


def build_model(config, state, source, dropout=None):
    """A GPT of config (a dict) holding the tensors of state, checked before memory is spent: field
    types, modules are counted, the model is built on the meta device, the stored tensors are
    assigned to it, not copied, and must be finite (NaN weights would only show as NaN logits).
    dropout None keeps the config's."""
    wrong = config_error(config) if isinstance(config, dict) else "config, not a dict"
    if wrong:
        raise ValueError(f"{source} has a config this model cannot build ({wrong})")
    try:
        config = dict(config)
        if "vocab" in config:  # its name in checkpoints written before it was vocab_id
            config["vocab_id"] = config.pop("vocab")
        if dropout is not None:
            config["dropout"] = dropout
        config = cherry.GPTConfig(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source} has a config this model cannot build ({e})") from None
    tensors = isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    if not tensors:
        raise ValueError(f"{source} holds no weights of this model")
    integer = next((f"{k}, {v.dtype}" for k, v in state.items() if not v.is_floating_point()), None)
    if integer:  # every tensor of this model is a float parameter
        raise ValueError(f"{source} holds a tensor that is not floating point ({integer}) where "
                         f"weights belong")
    state = {k: v.float() for k, v in state.items()}
    modules = dict(n_layer=r"blocks\.(\d+)\.", n_expert=r"experts\.(\d+)",
                   mtp=r"mtp_modules\.(\d+)")
    for field, pattern in modules.items():
        stored = len({m.group(1) for m in map(re.compile(pattern).search, state) if m})
        if stored != getattr(config, field):
            declared = getattr(config, field)
            raise ValueError(f"{source} declares {field} {declared} but stores {stored}")
    with torch.device("meta"):
        model = cherry.GPT(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # names and shapes, strictly
    except RuntimeError as e:  # a header line, then one line per problem: the first problem
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        raise ValueError(f"{source} does not fit its config: {first[:300]}") from None
    model.lm_head.weight = model.wte.weight  # assigning replaced both: tie them again
    broken = next((name for name, t in state.items() if not torch.isfinite(t).all()), None)
    if broken:
        raise ValueError(f"{source} holds NaN or infinite weights ({broken}); nothing can be "
                         f"trained or sampled from it")
    return model


def gpt2_config(c, source):
    """Hugging Face's GPT2Config (a dict) -> ours; GPT-2's "gelu_new" is the tanh GELU."""
    c = c if isinstance(c, dict) else {}
    gelus = dict(gelu_new="tanh", gelu_pytorch_tanh="tanh", gelu="none")
    gelu = gelus.get(c.get("activation_function", "gelu_new"))
    plain_mlp = c.get("n_inner") in (None, 4 * c.get("n_embd", 0))
    if c.get("model_type", "gpt2") != "gpt2" or gelu is None or not plain_mlp:
        raise ValueError(f"{source} is not a GPT-2 this model can run (model_type "
                         f"{c.get('model_type')!r})")
    return dict(block_size=c.get("n_positions"), vocab_size=c.get("vocab_size"),
                n_layer=c.get("n_layer"), n_head=c.get("n_head"), n_embd=c.get("n_embd"), bias=True,
                gelu_approximate=gelu, vocab_id="gpt2")


def gpt2_state(state, conv1d):
    """GPT-2's parameter names (nanoGPT's, Hugging Face's) -> ours; Hugging Face's Conv1D stores
    matrices transposed."""
    out = {}
    for name, t in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # mask buffers, not weights
            continue
        if conv1d and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        name = name.removeprefix("_orig_mod.").removeprefix("transformer.")
        out[re.sub(r"^h\.", "blocks.", name)] = t
    return {"lm_head.weight": out.get("wte.weight"), **out}  # tied; some files leave it out


def ckpt_path(source):
    """A run folder's ckpt.pt, or the file given."""
    return os.path.join(source, "ckpt.pt") if os.path.isdir(source) else source


def load_model(source, dropout=None):
    """A GPT from this project's ckpt.pt or nanoGPT's (the file or its folder), a Hugging Face GPT-2
    folder (config.json and model.safetensors or pytorch_model.bin), or gpt2 .. gpt2-xl by name
    (transformers, online or cached). GPT-2's weights come with its tanh GELU, so the logits are
    Hugging Face's. dropout None keeps the checkpoint's."""
    if os.path.isfile(os.path.join(source, "config.json")):  # a Hugging Face folder
        try:
            hf_config = json.load(open(os.path.join(source, "config.json")))
        except json.JSONDecodeError:
            raise ValueError(f"{source}/config.json is not valid JSON") from None
        config = gpt2_config(hf_config, source)
        if os.path.isfile(os.path.join(source, "model.safetensors")):
            from safetensors.torch import load_file  # comes with transformers
            state = load_file(os.path.join(source, "model.safetensors"))
        else:
            state = load_checkpoint(os.path.join(source, "pytorch_model.bin"))
        return build_model(config, gpt2_state(state, conv1d=True), source, dropout)
    path = ckpt_path(source)
    if not os.path.exists(path) and source in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        from transformers import GPT2LMHeadModel  # optional: pip install transformers
        hf = GPT2LMHeadModel.from_pretrained(source)
        config = gpt2_config(hf.config.to_dict(), source)
        return build_model(config, gpt2_state(hf.state_dict(), conv1d=True), source, dropout)
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):  # ours
        return build_model(ckpt["config"], ckpt.get("model"), path, dropout)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_args"), dict):  # nanoGPT's names
        args = ckpt["model_args"]
        fields = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias")
        config = {k: args.get(k) for k in fields}
        gpt2 = (config["vocab_size"] or 0) >= 50257  # GPT-2's tokens, unless smaller
        config["vocab_id"] = "gpt2" if gpt2 else ""
        state = gpt2_state(ckpt.get("model") or {}, conv1d=False)
        return build_model(config, state, path, dropout)
    raise ValueError(f"{path} is neither this project's checkpoint nor nanoGPT's nor a Hugging "
                     f"Face GPT-2 folder")


# ----------------------------------------------------------------------------
# --resume: what it needs, saved in one place and restored in one


def save(path, model, optimizer, scaler, generators, device, args, data, it, best, rows):
    """<out_dir>/ckpt.pt, written whole (a kill in the middle leaves the previous one)."""
    cuda = device.startswith("cuda")
    state = {
        "model": model.state_dict(), "config": asdict(model.config),
        "args": vars(args),  # the flags as given: --resume is checked against them
        "data_fingerprint": data.fingerprint,  # the data's content, whatever its folder's path
        "iter": it, "best": best, "metrics": rows,  # optimizer steps done, the evaluations so far
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "rng": [g.get_state() for g in generators],  # data order, SGT's draws
        "torch_rng": torch.get_rng_state(),  # dropout
        "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None,
    }
    data_prep.atomic_write(path, lambda f: torch.save(state, f))


def check_resume_fields(ckpt, path):
    """The fields --resume reads, in their types: a damaged or hand-edited checkpoint is one line,
    not a traceback."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_loss = lambda v: isinstance(v, (int, float))
    is_row = lambda r: isinstance(r, dict) and is_int(r.get("iter")) and is_loss(r.get("loss"))
    is_state = lambda t: isinstance(t, torch.Tensor) and t.dtype == torch.uint8
    optimizer = ckpt["optimizer"]
    saved = ckpt["args"]
    checks = {
        "iter": is_int(ckpt.get("iter")) and ckpt["iter"] >= 0,
        "metrics": isinstance(ckpt.get("metrics"), list) and all(map(is_row, ckpt["metrics"])),
        "best": ckpt.get("best") is None or is_row(ckpt["best"]),
        "rng": isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2
        and all(map(is_state, ckpt["rng"])),
        "torch_rng": is_state(ckpt.get("torch_rng")),
        "optimizer": isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list),
        "scaler": isinstance(ckpt.get("scaler"), (dict, type(None))),
        "args.bias": isinstance(saved.get("bias"), (bool, type(None))),
    }
    for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        checks[f"args.{k}"] = saved.get(k) is None or is_int(saved[k]) and saved[k] >= 1
    bad = next((k for k, passed in checks.items() if not passed), None)
    if bad:
        raise ValueError(f"{path} cannot be resumed: its {bad} is damaged or of the wrong type; "
                         f"start a new --out_dir with --init_from {path}")


def restore(ckpt, optimizer, scaler, generators, device):
    """save's inverse for what the model does not hold; returns (step, best, rows).
    Field types were checked (check_resume_fields); shapes and contents are torch's to judge,
    said in one line."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        for p, state in optimizer.state.items():  # torch takes moments of any shape, then fails
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape:
                    raise ValueError(f"its {k} has shape {tuple(v.shape)}, its weight "
                                     f"{tuple(p.shape)}")
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        for generator, state in zip(generators, ckpt["rng"]):
            generator.set_state(state)
        torch.set_rng_state(ckpt["torch_rng"])
        if device.startswith("cuda") and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise ValueError(f"the checkpoint's optimizer or random state does not fit this run "
                         f"({first}); start a new --out_dir with --init_from the checkpoint"
                         ) from None
    return ckpt["iter"], ckpt["best"], ckpt["metrics"]
