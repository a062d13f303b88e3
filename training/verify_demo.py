#!/usr/bin/env python3
"""Check the exported demo checkpoint against the training (master-weight) model, with transformers
as the reference, and draw the loss curve.

  OMP_NUM_THREADS=1 python training/verify_demo.py            # models/demo + training/out
  python training/verify_demo.py --export-only                # re-export models/demo from training/out/master.pt

Reports (printed and written to training/out/verify.json):
  * loss on the fixed held-out batches (prose windows, held-out chat dialogues) of the master model
    (AutoBitLinear online quantization, eval mode) and of the packed checkpoint loaded by
    AutoModelForCausalLM.from_pretrained(models/demo, dtype=float32) with every parameter cast to float32;
  * greedy chat accuracy of the packed reference on the 200 held-out arithmetic questions;
  * perplexity of the packed reference on models/demo/heldout/prose.txt;
  * a few example generations.
"""
import argparse
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import train_demo as td  # noqa: E402


def ce(model, x, y):
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()


def load_master(work):
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import AutoBitLinear

    ck = torch.load(os.path.join(work, "master.pt"), weights_only=False)
    cfg = BitNetConfig(**{k: v for k, v in ck["config"].items() if k not in ("model_type", "transformers_version")})
    m = BitNetForCausalLM(cfg)
    td.swap_to_bitlinear(m, AutoBitLinear)
    m.load_state_dict(ck["model"])
    m.tie_weights()
    return m.eval(), cfg, ck


def load_reference(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for p in m.parameters():
        p.data = p.data.float()
    for b in m.buffers():
        b.data = b.data.float()
    return m.eval()


def generate(model, tok, ids, max_new=24):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=max_new, do_sample=False, eos_token_id=[1, 2], pad_token_id=1)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def plot(work, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in open(os.path.join(work, "log.jsonl"))]
    tr = [r for r in rows if r.get("event") == "train"]
    ev = [r for r in rows if r.get("event") == "eval"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=0.6, alpha=0.4, label="train (batch)")
    ax[0].plot([r["step"] for r in tr], [r["loss_ema"] for r in tr], lw=1.5, label="train (EMA)")
    ax[0].plot([r["step"] for r in ev], [r["prose_loss"] for r in ev], "o-", label="held-out prose")
    ax[0].plot([r["step"] for r in ev], [r["chat_loss"] for r in ev], "s-", label="held-out chat")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("cross-entropy (nats/token)")
    ax[0].set_ylim(0, 8)
    ax[0].legend()
    ax[0].grid(alpha=0.3)
    ax[1].plot([r["step"] for r in ev], [100 * r["arith_acc50"] for r in ev], "o-", color="C3")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("% correct (50 held-out questions, greedy)")
    ax[1].set_ylim(0, 100)
    ax[1].grid(alpha=0.3)
    for r in rows:
        if r.get("event") == "resume":
            for a in ax:
                a.axvline(r["from_step"], color="gray", ls="--", lw=1)
            ax[0].text(r["from_step"], 7.5, " phase 2\n (80 % chat)", fontsize=8, color="gray", va="top")
    fig.suptitle("bitnet-run demo model: ternary QAT training on 1 CPU thread")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(REPO, "models", "demo"))
    ap.add_argument("--work", default=os.path.join(HERE, "out"))
    ap.add_argument("--png", default=os.path.join(REPO, "docs", "demo-loss.png"))
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--eager", action="store_true", help="run the quantizers eagerly (no torch.compile)")
    ap.add_argument("--n", type=int, default=200, help="held-out arithmetic questions to ask")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.eager:
        td.eager_quant_patch()
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    master, cfg, ck = load_master(args.work)
    if args.export_only:
        td.export_checkpoint(master, cfg, Tokenizer.from_file(os.path.join(args.model, "tokenizer.json")), args.model)
        print("exported step", ck["step"], "to", args.model)
        return
    t0 = time.time()
    res = {"master_step": ck["step"]}
    ev = torch.load(os.path.join(args.work, "eval_batches.pt"))
    ref = load_reference(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    for k in ("prose", "chat"):
        x, y = ev[k]
        res[f"{k}_loss_master"] = ce(master, x, y)
        res[f"{k}_loss_reference"] = ce(ref, x, y)
        print(k, res[f"{k}_loss_master"], res[f"{k}_loss_reference"], flush=True)
    # chat template check: the string the training data used == transformers' rendering
    msgs = [{"role": "user", "content": "What is 47 plus 35?"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == td.render_chat(msgs, True)
    # perplexity on the held-out prose slice
    text = open(os.path.join(args.model, "heldout", "prose.txt")).read()
    ids = tok(text.replace("\n\n", "<|end_of_text|><|begin_of_text|>"), add_special_tokens=False)["input_ids"]
    ids = [0] + ids
    nll, cnt = 0.0, 0
    for i in range(0, len(ids) - 1, 256):
        chunk = torch.tensor([ids[i:i + 257]])
        if chunk.size(1) < 2:
            break
        with torch.no_grad():
            lg = ref(input_ids=chunk[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(lg[0], chunk[0, 1:], reduction="sum").item()
        cnt += chunk.size(1) - 1
    res["heldout_prose_tokens"] = cnt
    res["heldout_prose_ppl_reference"] = math.exp(nll / cnt)
    print("prose ppl", res["heldout_prose_ppl_reference"], flush=True)
    # arithmetic
    items = [json.loads(l) for l in open(os.path.join(args.model, "heldout", "arith.jsonl"))][: args.n]
    ok, outs = 0, []
    for it in items:
        p = tok.apply_chat_template([{"role": "user", "content": it["question"]}], add_generation_prompt=True)
        p = p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p
        a = generate(ref, tok, list(p), 16)
        good = td.is_correct(a, it["answer"])
        ok += good
        outs.append({"question": it["question"], "answer": it["answer"], "model": a, "correct": bool(good)})
    res["arith_acc_reference"] = ok / len(items)
    res["arith_n"] = len(items)
    add = [o for o, it in zip(outs, items) if "+" in it["question"] or "plus" in it["question"] or "add" in it["question"].lower() or "sum" in it["question"]]
    print("arith acc", res["arith_acc_reference"], flush=True)
    with open(os.path.join(args.work, "arith_outputs.jsonl"), "w") as f:
        for o in outs:
            f.write(json.dumps(o) + "\n")
    # examples
    ex = []
    for q in ["What is 47 plus 35?", "Compute 83 - 29.", "How much is 12 added to 64?", "What is 250 plus 125?",
              "What is 7 plus 5?", "Who are you?"]:
        p = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        p = p["input_ids"] if hasattr(p, "keys") else p
        ex.append({"prompt": q, "chat": True, "output": generate(ref, tok, list(p), 24)})
    for s in ["The Python interpreter", "A list is", "Life is"]:
        p = [0] + tok(s, add_special_tokens=False)["input_ids"]
        ex.append({"prompt": s, "chat": False, "output": generate(ref, tok, p, 40)})
    res["examples"] = ex
    res["verify_s"] = round(time.time() - t0, 1)
    for e in ex:
        print(json.dumps(e))
    with open(os.path.join(args.work, "verify.json"), "w") as f:
        json.dump(res, f, indent=2)
    plot(args.work, args.png)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=2))


if __name__ == "__main__":
    main()
