"""Tests of behaviour and invariants. Tiny models and data: the whole file runs in a few minutes on 2 CPU cores."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cherry
import compress
import fuse
import train
from data import prepare as data_prep


HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_config(**kw):
    return cherry.GPTConfig(**{"block_size": 32, "vocab_size": 96, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return cherry.GPT(tiny_config(**kw)).eval()


# ----------------------------------------------------------------------------
# the transformer


def test_causality_future_tokens_never_change_earlier_logits():
    model = tiny_model()
    x = torch.randint(0, 96, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        a, b = model.lm_head(model.hidden(x)), model.lm_head(model.hidden(y))
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_generation_equals_full_recompute_past_the_block_size():
    model = tiny_model()
    prompt = torch.randint(0, 96, (2, 5))
    # 40 new tokens run past block_size 32: the cache must refill exactly as the cropped context does
    with_cache = model.generate(prompt, 40, temperature=0, use_cache=True)
    without = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)


def test_kv_cache_logits_match_a_full_forward():
    model = tiny_model()
    x = torch.randint(0, 96, (1, 20))
    cache = cherry.KVCache()
    with torch.no_grad():
        full = model.hidden(x)
        parts = [model.hidden(x[:, :7], cache), model.hidden(x[:, 7:15], cache), model.hidden(x[:, 15:], cache)]
    assert torch.allclose(full, torch.cat(parts, dim=1), atol=1e-5)


def test_sampling_with_the_kv_cache_equals_recomputation_at_temperature_and_top_k():
    torch.manual_seed(0)
    unrolled = cherry.GPT(tiny_config(schedule=cherry.loop_schedule(1, 1, 0, 3), step_embed=True, lora_rank=2)).eval()
    with torch.no_grad():
        unrolled.step_embed.normal_(std=0.1)
    prompt = torch.randint(0, 96, (2, 5))
    for model in (tiny_model(), unrolled):
        runs = []
        for use_cache in (True, False):  # the same seed: the same draws, so the same tokens if the logits agree
            torch.manual_seed(7)
            runs.append(model.generate(prompt, 30, temperature=0.9, top_k=20, use_cache=use_cache))  # past block_size
        assert torch.equal(*runs)
    assert not torch.equal(runs[0], unrolled.generate(prompt, 30, temperature=0))  # it sampled, not argmax


def test_sample_script_decodes_dense_unrolled_and_moee_checkpoints_with_a_compact_vocabulary(tmp_path):
    from tools import sample
    data = str(tmp_path / "compact")
    data_prep.prepare([d[:20_000] for d in data_prep.shakespeare_documents()[:2]], data, compact_vocab=True)
    run_train(data, tmp_path / "dense", "--max_iters", "4", "--eval_interval", "4")
    dense = cherry.GPT.from_pretrained(str(tmp_path / "dense"))
    unrolled = cherry.compress(dense, 1, (0, 0, 0), lora_rank=2)
    moee = cherry.fuse([unrolled, cherry.compress(dense, 1, (0, 0, 0), lora_rank=2)], mtp=1)
    for name, model in (("unrolled", unrolled), ("moee", moee)):
        torch.save({"config": model.config.to_dict(), "model": model.state_dict(), "args": {"data": data}}, tmp_path / f"{name}.pt")
    flags = ["--prompt", "The king", "--num_samples", "2", "--max_new_tokens", "20", "--temperature", "0.8", "--top_k", "50",
             "--seed", "1", "--device", "cpu"]
    for source in (str(tmp_path / "dense"), str(tmp_path / "unrolled.pt"), str(tmp_path / "moee.pt")):
        texts = sample.main(["--init_from", source, *flags])
        assert len(texts) == 2 and all(t.startswith("The king") and len(t) > 20 for t in texts)
        assert sample.main(["--init_from", source, *flags, "--no_cache"]) == texts  # the KV cache changes nothing
    one_line_error("the prompt has tokens the model's vocabulary lacks", sample.main, ["--init_from", str(tmp_path / "dense"), *flags, "--prompt", "🍒"])


def test_flops_per_token_counts_the_matmuls():
    cfg = cherry.GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=4)
    per_layer = 2 * 12 * 16 + 4 * 8 * 4
    assert cherry.flops_per_token(cfg, training=False) == per_layer + 2 * 4 * 10
    assert cherry.flops_per_token(cfg, sgt_fraction=0.5) == 3 * (per_layer + 4 * 10)


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu")
    decayed, plain = opt.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------
# SGT


def test_gathered_head_loss_and_gradients_equal_the_masked_full_loss():
    x = torch.randint(0, 96, (3, 16))
    y = torch.randint(0, 96, (3, 16))
    select = cherry.select_tokens(y, 0.25, "random", generator=torch.Generator().manual_seed(0))
    mask = cherry.selection_mask(select, 16)

    m1 = tiny_model()
    _, gathered = m1(x, y, select)
    gathered.backward()
    m2 = tiny_model()
    logits = m2.lm_head(m2.hidden(x))
    masked = F.cross_entropy(logits[mask], y[mask])  # mean over the selected positions only
    masked.backward()

    assert torch.allclose(gathered, masked, atol=1e-6)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-6), name


def test_selector_picks_ceil_f_T_distinct_positions_per_sequence():
    y = torch.randint(0, 96, (4, 50))
    for f in (0.05, 0.15, 0.5, 1.0):
        for method in ("surprisal", "random"):
            sel = cherry.select_tokens(y, f, method, torch.rand(96), torch.Generator().manual_seed(0))
            assert sel.shape == (4, math.ceil(f * 50))
            assert all(len(set(row.tolist())) == sel.size(1) for row in sel)


def test_surprisal_selector_prefers_rare_tokens():
    counts = {str(i): 1000 // (i + 1) for i in range(96)}  # token 0 frequent ... token 95 rare
    surprisal = cherry.surprisal_table(counts, 96)
    assert surprisal[95] > surprisal[0]
    y = torch.randint(0, 96, (2, 40))
    sel = cherry.select_tokens(y, 0.15, "surprisal", surprisal)
    mask = cherry.selection_mask(sel, 40)
    for b in range(2):  # every selected token is at least as surprising as every unselected one
        assert surprisal[y[b][mask[b]]].min() >= surprisal[y[b][~mask[b]]].max()


def test_gamma_equals_a_hand_computation():
    x = torch.randint(0, 96, (2, 16))
    y = torch.randint(0, 96, (2, 16))
    select = cherry.select_tokens(y, 0.25, "random", generator=torch.Generator().manual_seed(1))
    mask = cherry.selection_mask(select, 16)
    model = tiny_model()
    gamma, norm_s, norm_u = cherry.gradient_coupling(model, x, y, select)

    grads = []
    for part in (mask, ~mask):  # two separate backward passes, by hand
        model.zero_grad()
        logits = model.lm_head(model.hidden(x))
        F.cross_entropy(logits[part], y[part]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    g_s, g_u = grads
    assert gamma == pytest.approx((g_s @ g_u / (g_s.norm() * g_u.norm())).item(), abs=1e-5)
    assert norm_s == pytest.approx(g_s.norm().item(), rel=1e-5)
    assert norm_u == pytest.approx(g_u.norm().item(), rel=1e-5)


# ----------------------------------------------------------------------------
# data


def test_offline_gpt2_tokenizer_round_trip_and_known_ids():
    enc = data_prep.get_tokenizer("gpt2")
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's own ids
    text = "To be, or not to be: that is the question.\n\tnaïve café 한국어 🍒"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_prepare_is_deterministic_and_splits_every_document(tmp_path):
    docs = ["First document. " * 50, "Second one, different words! " * 40]
    m1 = data_prep.prepare(docs, tmp_path / "a")
    m2 = data_prep.prepare(docs, tmp_path / "b")
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    enc = data_prep.get_tokenizer()
    train_ids = np.fromfile(tmp_path / "a" / "train.bin", dtype=np.uint16)
    val_ids = np.fromfile(tmp_path / "a" / "val.bin", dtype=np.uint16)
    assert m1["train_tokens"] + m1["val_tokens"] == sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    assert (val_ids == enc.eot_token).sum() == 2 and (train_ids == enc.eot_token).sum() == 0
    assert sum(m1["unigram_counts"].values()) == m1["train_tokens"] == m2["train_tokens"]


def test_compact_vocab_keeps_the_text_and_only_the_types_that_occur(tmp_path):
    docs = ["To be, or not to be: that is the question. " * 30, "Whether 'tis nobler in the mind to suffer " * 30]
    full, compact = data_prep.prepare(docs, tmp_path / "a"), data_prep.prepare(docs, tmp_path / "b", compact_vocab=True)
    read = lambda d: {split: np.fromfile(tmp_path / d / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")}
    plain, small = read("a"), read("b")
    token_ids = np.array(compact["token_ids"])  # compact id -> tokenizer id
    assert compact["vocab_size"] == len(token_ids) == len(np.unique(np.concatenate([plain["train"], plain["val"]])))
    for split in ("train", "val"):  # mapped back, the compact ids are the tokenizer's ids, token for token
        assert np.array_equal(token_ids[small[split]], plain[split])
    assert sum(compact["unigram_counts"].values()) == full["train_tokens"]
    assert sorted(compact["unigram_counts"].values()) == sorted(full["unigram_counts"].values())


def test_prepare_reports_a_missing_input_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no such file or folder"):
        data_prep.main(["--input", str(tmp_path / "nope.txt"), "--out_dir", str(tmp_path / "x")])


# ----------------------------------------------------------------------------
# training end to end


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """About 60k tokens of real text: the first part of four plays."""
    path = tmp_path_factory.mktemp("data") / "tiny"
    data_prep.prepare([d[:60_000] for d in data_prep.shakespeare_documents()[:4]], path)
    return str(path)


def run_train(data, out_dir, *extra):
    flags = ["--data", data, "--out_dir", str(out_dir), "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
             "--block_size", "32", "--batch_size", "8", "--eval_iters", "4", "--log_interval", "1000",
             "--warmup_iters", "5", "--lr", "3e-3", "--device", "cpu", *extra]
    train.main(flags)
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return rows, json.load(open(os.path.join(out_dir, "summary.json")))


def test_sgt_training_lowers_every_held_out_loss_and_writes_the_outputs(tiny_data, tmp_path):
    rows, summary = run_train(tiny_data, tmp_path, "--sgt", "0.15", "--max_iters", "60", "--eval_interval", "30")
    assert [r["iter"] for r in rows] == [0, 30, 60]
    first, last = rows[0], rows[-1]
    for key in ("loss", "loss_sup", "loss_unsup"):
        assert last[key] < first[key], key
    assert last["loss_unsup"] < first["loss_unsup"] - 1.0  # never supervised, yet they improve most
    assert all(-1 <= r["gamma"] <= 1 for r in rows)
    assert summary["best"]["loss"] == min(r["loss"] for r in rows)
    assert summary["config"]["n_layer"] == 2 and summary["args"]["sgt"] == 0.15
    ckpt = cherry.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter"] == 60
    cherry.GPT.from_checkpoint(ckpt)  # the checkpoint rebuilds the model on its own


def test_resume_continues_exactly(tiny_data, tmp_path):
    common = ["--sgt", "0.3", "--sgt_select", "random", "--eval_interval", "4", "--lr_decay_iters", "8"]
    run_train(tiny_data, tmp_path / "straight", *common, "--max_iters", "8")
    run_train(tiny_data, tmp_path / "split", *common, "--max_iters", "4")
    rows, _ = run_train(tiny_data, tmp_path / "split", *common, "--max_iters", "8", "--resume")
    a = cherry.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    b = cherry.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["iter"] for r in rows] == [0, 4, 8]


def one_line_error(pattern, fn, *args):
    """fn(*args) must stop with one plain line matching pattern (a SystemExit, so no traceback)."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = str(e.value.code)
    assert re.search(pattern, message) and "\n" not in message, message
    return message


def test_data_problems_and_bad_flags_are_one_line_errors_that_write_nothing(tiny_data, tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    base = ["--out_dir", out, "--device", "cpu", "--data", tiny_data]
    one_line_error(r"--data \S+missing: no such folder; make it with: python data/prepare.py", train.main, [*base, "--data", str(tmp_path / "missing")])
    one_line_error(r"no train.bin in it; make it with", train.main, [*base, "--data", str(tmp_path / "empty")])
    one_line_error(r"too few for --block_size 100000; use a smaller --block_size", train.main, [*base, "--block_size", "100000"])
    for bad in ("0", "1.5", "-0.2"):
        one_line_error(r"--sgt must be in \(0, 1\], got", train.main, [*base, "--sgt", bad])
    one_line_error(r"--n_embd 30 is not divisible by --n_head 4", train.main, [*base, "--n_embd", "30"])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.dat").write_bytes(bytes(range(128, 256)) * 20)  # not UTF-8
    for name in ("empty.txt", "blob.dat"):
        one_line_error(r"no readable text .*empty or not UTF-8 text", data_prep.main,
                       ["--input", str(tmp_path / name), "--out_dir", str(tmp_path / "prepared")])
    one_line_error("has no text", data_prep.prepare, ["", ""], str(tmp_path / "prepared"))
    assert not os.path.exists(out) and not (tmp_path / "prepared").exists()
    # the scripts themselves: exit status non-zero, one line on stderr, no traceback
    result = subprocess.run([sys.executable, "train.py", *base, "--sgt", "1.5"], capture_output=True, text=True, cwd=HERE)
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0 and "--sgt must be in" in result.stderr, result.stderr


def test_an_out_dir_that_holds_a_run_is_never_overwritten(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "run", "--max_iters", "2", "--eval_interval", "2")
    before = {f: (tmp_path / "run" / f).read_bytes() for f in train.RUN_FILES}
    one_line_error(r"--out_dir \S+ already holds a run \(ckpt.pt\); add --resume to continue it, or choose a new --out_dir",
                   run_train, tiny_data, tmp_path / "run", "--max_iters", "4")
    one_line_error("already holds a run", run_train, tiny_data, tmp_path / "run", "--init_from", str(tmp_path / "run"))
    assert before == {f: (tmp_path / "run" / f).read_bytes() for f in train.RUN_FILES}
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "metrics.jsonl").write_text("")  # any trace of a run counts
    one_line_error(r"already holds a run \(metrics.jsonl\)", run_train, tiny_data, tmp_path / "partial")


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    real_step, calls = train.optimizer_step, []

    def poisoned(model, *args):  # the 13th step runs on a model with a NaN in it: its loss is NaN for real
        calls.append(1)
        if len(calls) == 13:
            with torch.no_grad():
                model.ln_f.weight[0] = float("nan")
        return real_step(model, *args)

    monkeypatch.setattr(train, "optimizer_step", poisoned)
    one_line_error(r"loss became NaN or inf at step 13; stopped, \S+ckpt.pt still holds step 10, the last good state",
                   run_train, tiny_data, tmp_path, "--max_iters", "30", "--eval_interval", "10")
    ckpt = cherry.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter"] == 10 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert [json.loads(line)["iter"] for line in open(tmp_path / "metrics.jsonl")] == [0, 10]
    assert not (tmp_path / "summary.json").exists()


def test_a_run_killed_with_sigkill_resumes_bit_for_bit(tiny_data, tmp_path):
    """A real train.py process, killed at a random moment after its first checkpoints, then --resume'd."""
    flags = ["--data", tiny_data, "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
             "--batch_size", "4", "--eval_iters", "2", "--max_iters", "120", "--eval_interval", "10", "--log_interval", "7",
             "--dropout", "0.1", "--sgt", "0.3", "--sgt_select", "random", "--device", "cpu"]  # every RNG in play
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda out, *extra: subprocess.run([sys.executable, "train.py", *flags, "--out_dir", str(out), *extra],
                                             env=env, cwd=HERE, capture_output=True, text=True)
    assert run(tmp_path / "straight").returncode == 0
    killed = subprocess.Popen([sys.executable, "train.py", *flags, "--out_dir", str(tmp_path / "killed")],
                              env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    while killed.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL  # it was still running
    assert cherry.load_checkpoint(str(tmp_path / "killed" / "ckpt.pt"))["iter"] < 120
    (tmp_path / "killed" / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")  # as a kill during a save leaves it
    resumed = run(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    timing = ("tokens_per_s", "mfu")
    rows = lambda out: [{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(out / "metrics.jsonl")]
    assert rows(tmp_path / "killed") == rows(tmp_path / "straight") and len(rows(tmp_path / "straight")) == 13
    a, b = (cherry.load_checkpoint(str(tmp_path / out / "ckpt.pt")) for out in ("straight", "killed"))
    assert a["iter"] == b["iter"] == 120
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s1, s2 in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])


def _touch(path):
    open(path, "w").close()


class Unsafe:
    """Unpickling this calls _touch: what a malicious checkpoint could do with any function."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _touch, (self.path,)


def as_nanogpt(ckpt):
    """Our checkpoint in nanoGPT's layout: model_args, transformer.h.N names, torch.compile's prefix."""
    c = ckpt["config"]
    state = {"_orig_mod." + ("transformer." + k.replace("blocks.", "h.") if k != "lm_head.weight" else k): v
             for k, v in ckpt["model"].items()}
    return {"model": state, "model_args": {k: c[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")}}


def test_broken_foreign_or_unsafe_checkpoints_are_refused_in_one_line(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "run", "--max_iters", "2", "--eval_interval", "2")
    good = cherry.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    raw = (tmp_path / "run" / "ckpt.pt").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.pt").write_bytes(b"\x80not a checkpoint" * 50)
    (bad / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    torch.save({**good, "config": {**good["config"], "n_embd": 64}}, bad / "shapes.pt")
    torch.save({**good, "config": {**good["config"], "n_kv_head": 4}}, bad / "fields.pt")
    nano = as_nanogpt(good)
    torch.save({**nano, "model": {k: v for k, v in nano["model"].items() if ".h.1." not in k}}, bad / "nanogpt_missing.pt")
    torch.save({**nano, "model_args": {k: v for k, v in nano["model_args"].items() if k != "vocab_size"}}, bad / "nanogpt_args.pt")
    torch.save({"weights": good["model"]}, bad / "neither.pt")
    torch.save({"model": Unsafe(str(tmp_path / "pwned"))}, bad / "unsafe.pt")
    cases = {"garbage": "is corrupt, truncated or not a torch checkpoint", "truncated": "is corrupt, truncated",
             "shapes": r"does not fit its own config.*wte.weight is \(50304, 32\), the config needs \(50304, 64\)",
             "fields": "another architecture .*n_kv_head", "nanogpt_missing": "missing blocks.1", "nanogpt_args": "without vocab_size",
             "neither": "neither this project's checkpoint nor nanoGPT's", "unsafe": r"pickled Python object \(\S*_touch\).*refused, nothing was executed"}
    out = str(tmp_path / "out")
    common = ["--data", tiny_data, "--out_dir", out, "--device", "cpu", "--block_size", "32"]
    from tools import sample
    for name, pattern in cases.items():
        path = str(bad / f"{name}.pt")
        with pytest.raises(ValueError, match=pattern):
            cherry.GPT.from_pretrained(path)
        one_line_error("^train: .*" + pattern, train.main, [*common, "--init_from", path])
        one_line_error("^compress: .*" + pattern, compress.main, [*common, "--init_from", path])
        one_line_error("^sample: .*" + pattern, sample.main, ["--init_from", path, "--data", tiny_data, "--device", "cpu"])
    assert not os.path.exists(out) and not (tmp_path / "pwned").exists()  # nothing written, nothing executed
    # --resume from a damaged checkpoint: refused, and the file is left as it was
    (tmp_path / "run" / "ckpt.pt").write_bytes(raw[:-100])
    one_line_error("ckpt.pt is corrupt, truncated", run_train, tiny_data, tmp_path / "run", "--resume")
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == raw[:-100]


def test_init_from_fine_tunes_our_checkpoint_or_nanogpts(tiny_data, tmp_path):
    _, base = run_train(tiny_data, tmp_path / "base", "--max_iters", "10", "--eval_interval", "10")
    torch.save(as_nanogpt(cherry.load_checkpoint(str(tmp_path / "base" / "ckpt.pt"))), tmp_path / "nanogpt.pt")
    for source, out in ((tmp_path / "base", "ours"), (tmp_path / "nanogpt.pt", "nano")):
        rows, summary = run_train(tiny_data, tmp_path / out, "--init_from", str(source), "--max_iters", "10", "--eval_interval", "10")
        assert rows[0]["loss"] == pytest.approx(base["final"]["loss"], abs=1e-5)  # it starts where the source ended
        assert rows[-1]["loss"] < rows[0]["loss"] and summary["args"]["init_from"] == str(source)
    one_line_error("shape comes from --init_from; leave out --n_layer", run_train, tiny_data, tmp_path / "x",
                   "--init_from", str(tmp_path / "base"), "--n_layer", "3")


# ----------------------------------------------------------------------------
# scale: presets and distributed training


@pytest.mark.parametrize("name, paper_params", [("cherry-1b", 1.0e9), ("cherry-227m", 227e6), ("cherry-566m", 566e6),
                                                ("gpt2", 124e6), ("gpt2-xl", 1558e6)])
def test_presets_match_the_published_parameter_counts(name, paper_params):
    with torch.device("meta"):  # no memory, no time: shapes only
        model = cherry.GPT(cherry.GPTConfig(**cherry.PRESETS[name]))
    assert cherry.count_params(model) == pytest.approx(paper_params, rel=0.05)


def test_moee_presets_count_shared_parts_once():
    with torch.device("meta"):
        base, unrolled = (cherry.GPT(cherry.GPTConfig(**cherry.PRESETS[name])) for name in ("cherry-227m", "cherry-227m-x34"))
        two, eight = (cherry.GPT(cherry.GPTConfig(**cherry.PRESETS[name])) for name in ("cherry-moee-2", "cherry-moee-8"))
    d, layers = 1248, 6
    assert len(unrolled.schedule) == 34 and cherry.count_params(unrolled) == cherry.count_params(base) + 34 * d
    mlp, router = 8 * d * d, lambda e: layers * d * e
    for model, e in ((two, 2), (eight, 8)):
        assert cherry.count_params(model) == cherry.count_params(unrolled) + layers * (e - 1) * mlp + router(e)
        assert cherry.count_params(model, active=True) == cherry.count_params(unrolled) + router(e)  # top-1
    assert cherry.count_params(eight) == pytest.approx(0.75e9, rel=0.02)  # not the 1.8B of eight whole 227M models


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_data, tmp_path):
    flags = ["--data", tiny_data, "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
             "--batch_size", "4", "--grad_accum", "2", "--max_iters", "6", "--eval_interval", "3", "--eval_iters", "2",
             "--sgt", "0.3", "--sgt_select", "random", "--device", "cpu", "--log_interval", "100"]
    train.main(flags + ["--out_dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                    *flags, "--out_dir", str(tmp_path / "two")], check=True, env=env, capture_output=True,
                   cwd=os.path.dirname(os.path.abspath(__file__)))
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["iter"] for r in one] == [r["iter"] for r in two] == [0, 3, 6]
    for a, b in zip(one, two):
        for key in ("loss", "loss_sup", "loss_unsup"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["iter"], key)
    assert one[-1]["loss"] < one[0]["loss"]


# ----------------------------------------------------------------------------
# depth compression


def distinct_layers_model(n_layer=4, seed=0, **kw):
    """A tiny model whose layers (norms and biases included) all differ: fresh norms are all ones, so averaging them proves nothing."""
    model = tiny_model(seed, n_layer=n_layer, bias=True, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def logits_of(model, x):
    with torch.no_grad():
        return model.lm_head(model.hidden(x))


def test_averaging_is_an_exact_mean_of_every_tensor():
    teacher = distinct_layers_model(n_layer=6)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    small = cherry.compress(teacher, 2, step_embed=False)
    assert small.config.n_layer == 2 and len(small.blocks) == 2
    for j, group in enumerate(([0, 1, 2], [3, 4, 5])):
        for name, p in small.blocks[j].named_parameters():
            mean = sum(teacher.blocks[i].get_parameter(name) for i in group) / 3
            assert torch.allclose(p, mean, rtol=1e-6, atol=1e-7), name
    assert small.blocks[0].ln_1.weight.std() > 0.01  # the norm gains were averaged, not left at ones
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        assert torch.equal(small.state_dict()[name], teacher.state_dict()[name]), name
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the original is untouched
    with pytest.raises(ValueError, match="equal groups"):
        cherry.compress(teacher, 4)


def test_group_size_unroll_with_full_rank_lora_reproduces_the_original():
    teacher = distinct_layers_model(n_layer=4)
    x = torch.randint(0, 96, (2, 24))
    for k in (2, 1):
        g = 4 // k
        small = cherry.compress(teacher, k, cherry.repeat_schedule([g] * k), lora_rank=32).eval()  # 32 = full rank
        assert torch.allclose(logits_of(small, x), logits_of(teacher, x), atol=1e-4), k
    low = cherry.compress(teacher, 2, cherry.repeat_schedule([2, 2]), lora_rank=2).eval()
    assert not torch.allclose(logits_of(low, x), logits_of(teacher, x), atol=1e-2)  # low rank only approximates


def test_zero_step_embeddings_without_lora_equal_plain_repeated_application():
    teacher = distinct_layers_model(n_layer=4)
    x = torch.randint(0, 96, (2, 20))
    for schedule in (cherry.repeat_schedule([3, 2]), cherry.loop_schedule(0, 2, 0, 3)):
        small = cherry.compress(teacher, 2, schedule, step_embed=True).eval()
        with torch.no_grad():
            h = small.wte(x) + small.wpe(torch.arange(20))
            for layer in schedule:  # by hand: the averaged blocks applied in the schedule's order
                h = small.blocks[layer](h)
            by_hand = small.lm_head(small.ln_f(h))
            assert torch.allclose(logits_of(small, x), by_hand, atol=1e-6), schedule
            small.step_embed.normal_()  # a learned step embedding makes the applications differ
        assert not torch.allclose(logits_of(small, x), by_hand, atol=1e-3)


def test_schedules():
    assert cherry.default_repeats(6, 8) == (1, 8, 8, 8, 8, 1) and sum(cherry.default_repeats(6, 8)) == 34
    assert cherry.repeat_schedule((1, 3, 1)) == (0, 1, 1, 1, 2)
    assert cherry.loop_schedule(1, 2, 1, 3) == (0, 1, 2, 1, 2, 1, 2, 3)
    assert len(compress.parse_unroll("1,8,8,8,8,1", 6)) == 34 and len(compress.parse_unroll("1+4x8+1", 6)) == 34
    assert compress.parse_unroll("none", 3) == (0, 1, 2) and compress.parse_unroll(None, 3) is None
    for bad in ("1,2", "1,0,1", "1+1x2+2", "two", "1,,2"):
        with pytest.raises(SystemExit):
            compress.parse_unroll(bad, 3)


def test_params_and_flops_of_an_unrolled_model_by_hand():
    C, V, T, r = 32, 96, 32, 4
    schedule = (0, 0, 1, 1, 1)
    model = cherry.GPT(tiny_config(schedule=schedule, step_embed=True, lora_rank=r))
    layer = 12 * C * C + 2 * C  # qkv, proj, 4x MLP; two norm gains
    adapter = r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C)) + 2 * C  # B and A of each matrix; norm offsets
    assert cherry.count_params(model) == V * C + 2 * layer + C + 5 * C + 5 * adapter  # + ln_f, + step embeddings
    assert cherry.count_params(model, non_embedding=False) == cherry.count_params(model) + T * C
    per_layer = 2 * 12 * C * C + 4 * T * C
    assert cherry.flops_per_token(model.config, training=False) == 5 * per_layer + 2 * C * V  # every application pays
    assert cherry.flops_per_token(model.config) == 3 * cherry.flops_per_token(tiny_config(n_layer=5), training=False)


def test_kv_cache_generation_of_an_unrolled_model_equals_full_recompute():
    torch.manual_seed(0)
    model = cherry.GPT(tiny_config(schedule=cherry.loop_schedule(0, 2, 0, 3), step_embed=True, lora_rank=3)).eval()
    with torch.no_grad():
        model.step_embed.normal_(std=0.1)
        for adapter in model.adapters:  # every application different
            for b in adapter.B.values():
                b.normal_(std=0.05)
    prompt = torch.randint(0, 96, (2, 5))
    with_cache = model.generate(prompt, 40, temperature=0, use_cache=True)
    assert torch.equal(with_cache, model.generate(prompt, 40, temperature=0, use_cache=False))
    x = torch.randint(0, 96, (1, 20))
    cache = cherry.KVCache()
    with torch.no_grad():
        parts = [model.hidden(x[:, :9], cache), model.hidden(x[:, 9:], cache)]
    assert len(cache.k) == 6  # one slot per application
    assert torch.allclose(model.hidden(x), torch.cat(parts, dim=1), atol=1e-5)


def test_nanogpt_and_hugging_face_layouts_load(tmp_path, monkeypatch):
    model = distinct_layers_model(n_layer=2)
    x = torch.randint(0, 96, (2, 16))
    nanogpt = {}
    for name, t in model.state_dict().items():  # nanoGPT's names, torch.compile's prefix, its causal-mask buffers
        name = "transformer." + name.replace("blocks.", "h.") if name != "lm_head.weight" else name
        nanogpt["_orig_mod." + name] = t
    nanogpt["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    c = model.config
    torch.save({"model": nanogpt, "model_args": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "bias": True,
                                                 "vocab_size": 96, "dropout": 0.0}}, tmp_path / "ckpt.pt")
    assert torch.allclose(logits_of(train.load_model(str(tmp_path), "compress").eval(), x), logits_of(model, x), atol=1e-6)
    # Hugging Face: Conv1D weights are stored (in, out)
    hf = {("transformer." + k.replace("blocks.", "h.") if k != "lm_head.weight" else k):
          (v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v) for k, v in model.state_dict().items()}
    loaded = cherry.build_model(c.to_dict(), cherry.gpt2_state_to_cherry(hf, conv1d=True), "hf").eval()
    assert torch.allclose(logits_of(loaded, x), logits_of(model, x), atol=1e-6)
    # ... and as a save_pretrained folder with pytorch_model.bin: read without transformers
    (tmp_path / "hf").mkdir()
    json.dump({"model_type": "gpt2", "n_positions": 32, "vocab_size": 96, "n_layer": 2, "n_head": 2, "n_embd": 32,
               "activation_function": "gelu"}, open(tmp_path / "hf" / "config.json", "w"))
    torch.save({k: v for k, v in hf.items() if k != "lm_head.weight"}, tmp_path / "hf" / "pytorch_model.bin")  # tied: left out
    assert torch.allclose(logits_of(cherry.GPT.from_pretrained(str(tmp_path / "hf")).eval(), x), logits_of(model, x), atol=1e-6)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: a one-line error, no network
    with pytest.raises(SystemExit, match="needs the transformers package"):
        train.load_model("gpt2-xl", "compress")


def test_real_hugging_face_gpt2_folder_and_name_give_its_logits(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)  # GPT-2's tanh GELU
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # norms and biases away from their 1 and 0, so that every conversion shows
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        expected = hf(x).logits
    model = cherry.GPT.from_pretrained(str(tmp_path / "hf")).eval()
    assert model.config.gelu_approximate == "tanh"
    assert torch.allclose(logits_of(model, x), expected, atol=2e-6)  # the exact GELU would be ~1e-4 off
    # a GPT-2 name goes through transformers.GPT2LMHeadModel.from_pretrained (here: the model above, no network)
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", classmethod(lambda cls, name: hf))
    assert torch.allclose(logits_of(cherry.GPT.from_pretrained("gpt2").eval(), x), expected, atol=1e-5)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated"):
        cherry.GPT.from_pretrained(str(tmp_path / "hf"))


def test_compress_end_to_end_from_a_train_checkpoint(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "dense", "--n_layer", "4", "--max_iters", "10", "--eval_interval", "10")
    dense = json.load(open(tmp_path / "dense" / "summary.json"))
    flags = ["--data", tiny_data, "--init_from", str(tmp_path / "dense" / "ckpt.pt"), "--out_dir", str(tmp_path / "small"),
             "--block_size", "32", "--batch_size", "8", "--eval_iters", "4", "--log_interval", "1000",
             "--warmup_iters", "5", "--lr", "3e-3", "--device", "cpu", "--max_iters", "10", "--eval_interval", "5"]
    summary = compress.main([*flags, "--layers", "2", "--unroll", "2,3", "--lora_rank", "4"])
    info = summary["compress"]
    assert info["loss_original"] == pytest.approx(dense["final"]["loss"], abs=1e-5)  # the same held-out windows
    assert info["effective_layers"] == 5 and info["schedule"] == [0, 0, 1, 1, 1]
    assert info["after"]["params"] == summary["params"] < info["before"]["params"]
    assert info["after"]["training_flops_per_token"] == summary["flops_per_token"] > info["before"]["training_flops_per_token"]
    rows = [json.loads(line) for line in open(tmp_path / "small" / "metrics.jsonl")]
    assert rows[0]["loss"] == pytest.approx(info["loss_start"], abs=1e-5)  # train()'s step 0 is the compressed model
    assert rows[-1]["loss"] < rows[0]["loss"]  # recovery
    assert json.load(open(tmp_path / "small" / "summary.json"))["compress"]["layers"] == 2
    rebuilt = cherry.GPT.from_pretrained(str(tmp_path / "small"))
    assert rebuilt.schedule == (0, 0, 1, 1, 1) and len(rebuilt.adapters) == 5
    fresh = ["--out_dir", str(tmp_path / "fresh")]  # argparse keeps the last --out_dir
    with pytest.raises(SystemExit, match="does not divide the model's 4 layers .*use one of 1, 2, 4"):
        compress.main([*flags, "--layers", "3", *fresh])
    with pytest.raises(SystemExit, match="leave out --n_layer"):
        compress.main([*flags, "--n_layer", "2", *fresh])
    with pytest.raises(SystemExit, match="no checkpoint"):
        compress.main([*flags, "--init_from", str(tmp_path / "nowhere" / "ckpt.pt"), *fresh])
    with pytest.raises(SystemExit, match="would overwrite"):
        compress.main([*flags, "--layers", "2", "--init_from", str(tmp_path / "dense"), "--out_dir", str(tmp_path / "dense")])
    with pytest.raises(SystemExit, match="already compressed"):
        compress.main([*flags, "--init_from", str(tmp_path / "small" / "ckpt.pt"), *fresh])
    with pytest.raises(SystemExit, match="already holds a run .*--resume"):  # small/ holds the run above
        compress.main([*flags, "--layers", "2"])
    assert not (tmp_path / "fresh").exists()  # no error wrote anything


# the SGT study's pieces


def test_shuffled_windows_keep_each_windows_tokens_but_not_their_order(tiny_data):
    plain, shuffled = train.Data(tiny_data, 32), train.Data(tiny_data, 32, shuffle=True)
    (x0, y0), (x1, y1) = plain.eval_batch(12), shuffled.eval_batch(12)
    window = lambda x, y: torch.cat([x, y[:, -1:]], dim=1)  # the block_size + 1 tokens of each window
    w0, w1 = window(x0, y0), window(x1, y1)
    assert torch.equal(w0.sort(dim=1).values, w1.sort(dim=1).values)  # the same multiset, window by window
    assert (w0 != w1).float().mean() > 0.5  # yet mostly in other places
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are still the next inputs
    assert torch.equal(shuffled.eval_batch(12)[0], x1)  # the same permutation every time
    a = shuffled.train_batch(4, torch.Generator().manual_seed(3))
    b = shuffled.train_batch(4, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_recovery_and_efficiency_from_hand_made_curves():
    from studies import sgt
    rows = lambda losses: [{"iter": 10 * i, "loss": l, "loss_unsup": l, "tokens_per_s": 100.0} for i, l in enumerate(losses)]
    full = {"rows": rows([10.0, 6.0, 4.0, 4.5]), "summary": {"unigram_loss": 6.0}}  # best 4.0 at step 20
    run = {"rows": rows([10.0, 8.0, 7.5, 7.0]), "summary": {}}                         # best 7.0 at step 30
    for r, gamma in zip(run["rows"], (0.2, 0.4, 0.6, 0.8)):
        r["gamma"] = gamma
    c = sgt.compare(run, full, 0.15)
    assert c["iter"] == 30 and c["loss"] == 7.0
    assert c["R"] == pytest.approx((10 - 7) / (10 - 4))              # 0.5
    assert c["eff"] == pytest.approx(0.5 / 0.15)                     # 3.33x per supervised token
    assert c["R_ctx"] == pytest.approx((6 - 7) / (6 - 4))            # -0.5: worse than the unigram model
    assert c["gamma_bar"] == pytest.approx(0.5)
    assert sgt.compare(full, full, 1.0)["R"] == sgt.compare(full, full, 1.0)["eff"] == 1.0


def test_study_writes_no_plots_but_says_so_without_matplotlib(monkeypatch, capsys):
    from studies import sgt
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    sgt.plots(None, None, None, None, None)
    assert "no matplotlib" in capsys.readouterr().out


def test_theorem1_first_order_check_on_a_tiny_model():
    model = tiny_model()
    x = torch.randint(0, 96, (4, 32))
    select = cherry.select_tokens(x, 0.25, "random", generator=torch.Generator().manual_seed(0))
    mask = cherry.selection_mask(select, 32)
    before = [p.clone() for p in model.parameters()]
    # every target the same token: the selected and the unselected tokens pull the same way, gamma > 0
    y = torch.zeros(4, 32, dtype=torch.long)
    gamma, norm_s, norm_u = cherry.gradient_coupling(model, x, y, select)
    predicted, measured = cherry.theorem1_check(model, x, y, select, lr=1e-2)
    assert gamma > 0.3
    assert predicted == pytest.approx(-1e-2 * norm_s * norm_u * gamma, rel=1e-4)
    assert measured < 0 and measured == pytest.approx(predicted, rel=0.05)  # L_U falls, as predicted
    big_predicted, big_measured = cherry.theorem1_check(model, x, y, select, lr=30.0)
    assert abs(big_measured - big_predicted) > 0.5 * abs(big_predicted)  # a large step leaves the first order behind
    # selected and unselected targets from disjoint sets pull against each other: gamma < 0 and L_U rises
    y = torch.where(mask, torch.randint(0, 2, (4, 32)), torch.randint(2, 4, (4, 32)))
    gamma, _, _ = cherry.gradient_coupling(model, x, y, select)
    predicted, measured = cherry.theorem1_check(model, x, y, select, lr=1e-2)
    assert gamma < 0 and measured > 0 and measured == pytest.approx(predicted, rel=0.1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the check works on a copy


# ----------------------------------------------------------------------------
# MoEE: mixture of experts and multi-token prediction


def compressed_model(seed=0):
    """A tiny compressed model with every part an expert can have: unroll, step embeddings, LoRA."""
    small = cherry.compress(distinct_layers_model(n_layer=4, seed=seed), 2, cherry.repeat_schedule([2, 3]), lora_rank=4)
    with torch.no_grad():
        small.step_embed.normal_(std=0.1)
    return small.eval()


def test_fusing_identical_experts_gives_the_single_experts_logits():
    expert = compressed_model()
    x = torch.randint(0, 96, (2, 24))
    for top_k in (1, 2):
        fused = cherry.fuse([expert, expert, expert], top_k=top_k).eval()
        with torch.no_grad():
            fused.blocks[0].mlp.router.weight.normal_()  # whatever the routing, the output is the expert's
        assert torch.allclose(logits_of(fused, x), logits_of(expert, x), atol=1e-5), top_k
    prompt = torch.randint(0, 96, (2, 4))
    assert torch.equal(fused.generate(prompt, 20, temperature=0), expert.generate(prompt, 20, temperature=0))
    assert torch.equal(fused.generate(prompt, 20, temperature=0, use_cache=False), fused.generate(prompt, 20, temperature=0))
    # different experts: the fused model is something else, and each expert's MLP weights sit in their own slot
    other = compressed_model(seed=1)
    fused = cherry.fuse([expert, other])
    assert torch.equal(fused.blocks[1].mlp.experts[1].c_fc.weight, other.blocks[1].mlp.c_fc.weight)
    assert torch.equal(fused.adapters[3].B["mlp_experts_0_c_proj_weight"], expert.adapters[3].B["mlp_c_proj_weight"])
    mean = (expert.blocks[0].attn.c_attn.weight + other.blocks[0].attn.c_attn.weight) / 2
    assert torch.allclose(fused.blocks[0].attn.c_attn.weight, mean)
    with pytest.raises(ValueError, match="n_embd"):
        cherry.fuse([tiny_model(), tiny_model(n_embd=64, n_head=2)])


def test_top1_active_params_are_one_experts_plus_the_routers():
    expert = compressed_model()
    fused = cherry.fuse([expert] * 4, top_k=1, mtp=2)
    routers = sum(b.mlp.router.weight.numel() for b in fused.blocks)
    router_lora = sum(p.numel() for n, p in fused.adapters.named_parameters() if "router" in n)
    assert cherry.count_params(fused, active=True) == cherry.count_params(expert) + routers + router_lora
    mlp = sum(p.numel() for n, p in expert.named_parameters() if "mlp" in n)
    mtp = sum(p.numel() for p in fused.mtp_modules.parameters())
    assert cherry.count_params(fused) == cherry.count_params(expert) + 3 * mlp + routers + router_lora + mtp
    two = cherry.fuse([expert] * 2, top_k=2)
    assert cherry.count_params(two, active=True) == cherry.count_params(two)
    # FLOPs: the router and top_k MLPs per application; MTP modules only in training
    C, T, V, E, apps = 32, 32, 96, 4, 5
    attention, mlp_flops = 2 * 4 * C * C + 4 * T * C, 2 * 8 * C * C
    assert cherry.flops_per_token(fused.config, training=False) == apps * (attention + mlp_flops + 2 * C * E) + 2 * C * V
    assert cherry.flops_per_token(fused.config) == 3 * (cherry.flops_per_token(fused.config, training=False)
                                                        + 2 * (4 * C * C + attention + mlp_flops + 2 * C * V))


def test_switch_loss_is_minimal_at_uniform_routing():
    E, N = 4, 64
    uniform = cherry.switch_loss(torch.full((N, E), 1 / E), torch.full((E,), N // E))
    assert uniform.item() == pytest.approx(1.0)
    collapsed = cherry.switch_loss(torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(N, E), torch.tensor([N, 0, 0, 0]))
    assert collapsed.item() == pytest.approx(E * 0.97)
    for _ in range(20):  # any routing is at least as costly as the uniform one
        probs = torch.randn(N, E).mul(3).softmax(-1)
        assert cherry.switch_loss(probs, torch.bincount(probs.argmax(-1), minlength=E)) >= uniform - 1e-6


def test_router_loss_is_per_layer_and_never_pools_experts_across_layers():
    torch.manual_seed(0)
    expert = tiny_model(bias=True)
    fused = cherry.fuse([expert, expert], aux_weight=1.0)
    with torch.no_grad():  # each layer routes every token to one expert: layer 0 to expert 0, layer 1 to expert 1
        for layer, block in enumerate(fused.blocks):
            block.ln_2.weight.zero_()
            block.ln_2.bias.fill_(1.0)  # the router sees the same input for every token
            block.mlp.router.weight.zero_()
            block.mlp.router.weight[layer].fill_(1.0)
    x = torch.randint(0, 96, (2, 16))
    fused(x, x)
    assert [c.tolist() for m in fused.moe_layers for _, c in m.calls] == [[32, 0], [0, 32]]
    # pooled over the two layers the load would look balanced (loss 1); per layer each is fully collapsed (~E = 2)
    assert cherry.router_loss(fused.moe_layers).item() > 1.9
    assert cherry.expert_counts(fused).tolist() == [[32, 0], [0, 32]]


def test_mtp_targets_are_shifted_and_the_last_positions_masked():
    y = torch.arange(10).view(1, 10)
    assert cherry.shift_left(y, 2, fill=-1).tolist() == [[2, 3, 4, 5, 6, 7, 8, 9, -1, -1]]
    assert torch.equal(cherry.shift_left(y, 0, fill=-1), y)
    torch.manual_seed(0)
    model = cherry.GPT(tiny_config(mtp=2, mtp_weight=0.5)).eval()
    x, y = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    _, loss = model(x, y)
    # by hand: module k reads the token k-1 steps past each target and predicts the one k steps past it
    h = model.hidden(x, residual=True)
    next_token = F.cross_entropy(model.lm_head(model.ln_f(h)).view(-1, 96), y.view(-1))
    extra = []
    for k, module in enumerate(model.mtp_modules, start=1):
        h = module(h, model.wte(torch.cat([y[:, k - 1:], torch.zeros(2, k - 1, dtype=torch.long)], 1)))
        logits = model.lm_head(model.ln_f(h))[:, :16 - k]  # the last k positions have no target
        extra.append(F.cross_entropy(logits.reshape(-1, 96), y[:, k:].reshape(-1)))
    assert loss.item() == pytest.approx((next_token + 0.5 * (extra[0] + extra[1]) / 2).item(), abs=1e-5)
    # the MTP modules never touch inference: logits are the next-token model's
    assert torch.equal(model(x)[0], model.lm_head(model.ln_f(model.hidden(x, residual=True)))[:, [-1]])


def test_fuse_end_to_end_from_compress_checkpoints(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "dense", "--n_layer", "4", "--max_iters", "6", "--eval_interval", "6")
    common = ["--data", tiny_data, "--block_size", "32", "--batch_size", "8", "--eval_iters", "4", "--log_interval", "1000",
              "--warmup_iters", "2", "--lr", "3e-3", "--device", "cpu", "--max_iters", "6", "--eval_interval", "6"]
    for seed in ("1", "2"):  # two experts: the same teacher recovered with different data order
        compress.main([*common, "--init_from", str(tmp_path / "dense" / "ckpt.pt"), "--layers", "2", "--seed", seed,
                       "--out_dir", str(tmp_path / f"e{seed}")])
    experts = [str(tmp_path / "e1" / "ckpt.pt"), str(tmp_path / "e2" / "ckpt.pt")]
    summary = fuse.main([*common, "--experts", *experts, "--mtp", "1", "--out_dir", str(tmp_path / "moe")])
    info = summary["fuse"]
    assert info["n_expert"] == 2 and info["params_active"] < info["params_total"]
    assert len(info["expert_load"]) == 2 and all(sum(layer) == pytest.approx(1.0) for layer in info["expert_load"])
    rows = [json.loads(line) for line in open(tmp_path / "moe" / "metrics.jsonl")]
    assert rows[0]["loss"] == pytest.approx(info["loss_start"], abs=1e-5) and rows[-1]["loss"] < rows[0]["loss"]
    on_disk = json.load(open(tmp_path / "moe" / "summary.json"))
    assert on_disk["fuse"]["expert_load"] == info["expert_load"]
    rebuilt = cherry.GPT.from_checkpoint(torch.load(tmp_path / "moe" / "ckpt.pt", weights_only=True))
    assert rebuilt.config.n_expert == 2 and rebuilt.schedule == (0, 0, 1, 1)
    again = fuse.main([*common, "--init_from", str(tmp_path / "moe"), "--out_dir", str(tmp_path / "moe2")])  # train on
    assert again["fuse"]["loss_start"] == pytest.approx(rows[-1]["loss"], abs=1e-5) and again["config"]["mtp"] == 1
    with pytest.raises(SystemExit, match="not a fused model"):
        fuse.main([*common, "--init_from", experts[0], "--out_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="at least two"):
        fuse.main([*common, "--experts", experts[0], "--out_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="top_k"):
        fuse.main([*common, "--experts", *experts, "--top_k", "3", "--out_dir", str(tmp_path / "x")])
    torch.save({"model": cherry.GPT(tiny_config(n_layer=3)).state_dict(), "config": tiny_config(n_layer=3).to_dict()},
               tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="fuse: expert 1 differs .* n_layer"):
        fuse.main([*common, "--experts", experts[0], str(tmp_path / "other.pt"), "--out_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
