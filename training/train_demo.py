#!/usr/bin/env python3
"""Train the tiny demo BitNet b1.58 model of bitnet-run (CPU, quantization-aware).

Data
  * English prose: the reStructuredText sources of the Python 3.11 documentation shipped by the
    Debian package ``python3.11-doc`` (/usr/share/doc/python3.11/html/_sources, PSF licence,
    see /usr/share/doc/python3.11-doc/copyright). Markup is stripped; only prose paragraphs kept.
  * English prose (short texts): the fortune cookie files of the Debian package ``fortunes``
    (/usr/share/games/fortunes, BSD licence, see /usr/share/doc/fortunes/copyright).
  * Synthetic chat dialogues generated here: addition / subtraction of two-digit (and some
    three-digit) numbers asked in words, formatted with the 2B-4T style chat template.

Model
  transformers ``BitNetForCausalLM`` (2B-4T architecture: relu2, sub-norms, GQA, RoPE 500000,
  tied embeddings) whose linears are ``AutoBitLinear(online_quant=True)`` -- exactly what
  ``quantization_mode: "online"`` loads -- trained with AdamW, warmup + cosine decay.

Output
  ``--out`` (default models/demo): a checkpoint stored like microsoft/bitnet-b1.58-2B-4T
  (uint8 packed ternary linears + bf16 weight_scale, bf16 norms/embedding, no lm_head),
  tokenizer.json / tokenizer_config.json (chat template) / generation_config.json,
  heldout/arith.jsonl and heldout/prose.txt. Master float weights go to ``--work``
  (default training/out, git-ignored).

Commands used for models/demo (two phases, see docs/demo-model.md):
  OMP_NUM_THREADS=1 python training/train_demo.py --seed 1234 --minutes 70 --steps 6000
  OMP_NUM_THREADS=1 python training/train_demo.py --seed 1234 --resume training/out/master.pt \
      --chat-frac 0.8 --lr 5e-4 --warmup 30 --minutes 11 --steps 100000
  OMP_NUM_THREADS=1 python training/verify_demo.py --export-only && python training/verify_demo.py
"""
import argparse
import glob
import json
import math
import os
import random
import re
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DOC_DIR = "/usr/share/doc/python3.11/html/_sources"
FORTUNE_DIR = "/usr/share/games/fortunes"  # Debian package `fortunes` (BSD licence, see its copyright)
FORTUNE_FILES = ["fortunes", "literature", "wisdom", "humorists", "people", "science", "platitudes",
                 "education", "work", "love", "pets", "food", "law", "politics", "sports", "computers",
                 "riddles", "magic", "medicine", "miscellaneous", "news", "paradoxum", "kids", "goedel",
                 "linux", "startrek", "songs-poems", "definitions", "cookie", "tao", "pratchett", "debian",
                 "men-women", "zippy", "knghtbrd"]

BOS, EOT_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIALS = [BOS, EOT_TEXT, EOT]  # ids 0, 1, 2 (BpeTrainer puts special tokens first)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '<|eot_id|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '<|eot_id|>' }}"
    "{% elif message['role'] == 'system' %}{{ 'System: ' + message['content'] + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


# ----------------------------------------------------------------------------- prose data
_ROLE = re.compile(r":[a-zA-Z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_LIT = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"(\*\*|\*)([^*]+)\1")
_REF = re.compile(r"`([^`]+)`_*")


def clean_inline(s):
    s = _ROLE.sub(r"\1", s)
    s = _LINK.sub(r"\1", s)
    s = _LIT.sub(r"\1", s)
    s = _EMPH.sub(r"\2", s)
    s = _REF.sub(r"\1", s)
    s = s.replace("::", ":").replace("\\", "")
    return re.sub(r"\s+", " ", s).strip()


def rst_paragraphs(text):
    """Prose paragraphs of an rst file: unindented text blocks, no directives/headings/code."""
    paras, cur = [], []

    def flush():
        if cur:
            p = clean_inline(" ".join(cur))
            if len(p) >= 80 and p.count(" ") >= 10 and not p.startswith(("|", "+", "=")):
                paras.append(p)
            cur.clear()

    for line in text.splitlines():
        if not line.strip():
            flush()
            continue
        if line[0] in " \t" or line.startswith(".."):
            flush()
            continue
        if re.fullmatch(r"([=\-~*^#\"'`+.:_])\1{2,}\s*", line):  # heading underline: drop title
            cur.clear()
            continue
        if re.match(r"^(\* |- |\d+\. |#\. |>>>|:\w)", line):
            flush()
            continue
        cur.append(line.strip())
    flush()
    return paras


def load_prose():
    if not os.path.isdir(DOC_DIR):
        sys.exit(
            f"error: {DOC_DIR} not found. The prose corpus is the Python 3.11 documentation from the "
            "Debian package python3.11-doc: run `apt-get update && apt-get install -y python3.11-doc`."
        )
    files = sorted(glob.glob(os.path.join(DOC_DIR, "**", "*.rst.txt"), recursive=True))
    train, held = [], []
    for i, f in enumerate(files):
        with open(f, encoding="utf-8", errors="replace") as fh:
            paras = rst_paragraphs(fh.read())
        (held if i % 40 == 7 else train).extend(paras)  # every 40th file is held out
    if not os.path.isdir(FORTUNE_DIR):
        sys.exit(f"error: {FORTUNE_DIR} not found: run `apt-get update && apt-get install -y fortunes`.")
    k = 0
    for name in FORTUNE_FILES:
        with open(os.path.join(FORTUNE_DIR, name), encoding="utf-8", errors="replace") as fh:
            for fort in fh.read().split("\n%\n"):
                fort = fort.strip("%\n ").replace("\t", "    ")
                if len(fort) < 40:
                    continue
                k += 1
                (held if k % 40 == 7 else train).append(fort)
    return train, held


# ----------------------------------------------------------------------------- arithmetic
ADD_Q = [
    "What is {a} plus {b}?", "What is {a} + {b}?", "Compute {a} + {b}.", "How much is {b} added to {a}?",
    "What's the sum of {a} and {b}?", "Add {a} and {b}.", "Calculate {a} plus {b}.",
    "Please add {a} and {b}.", "{a} + {b} = ?", "What do you get if you add {a} and {b}?",
    "Can you tell me what {a} plus {b} is?", "What is the sum of {a} and {b}?",
]
SUB_Q = [
    "What is {a} minus {b}?", "What is {a} - {b}?", "Compute {a} - {b}.", "How much is {a} take away {b}?",
    "Subtract {b} from {a}.", "What's {a} minus {b}?", "Calculate {a} - {b}.",
    "What is the difference between {a} and {b}?", "{a} - {b} = ?", "What do you get if you subtract {b} from {a}?",
    "Can you tell me what {a} minus {b} is?", "Please compute {a} minus {b}.",
]


def answer_text(rng, op, a, b, c):
    r = rng.random()
    word = "plus" if op == "+" else "minus"
    if r < 0.45:
        return f"{a} {word} {b} is {c}."
    if r < 0.75:
        return f"{c}"
    if r < 0.9:
        return f"The answer is {c}."
    return f"{a} {op} {b} = {c}."


def sample_problem(rng, three_digit_p=0.15):
    op = "+" if rng.random() < 0.5 else "-"
    hi = 999 if rng.random() < three_digit_p else 99
    a, b = rng.randint(10, hi), rng.randint(10, hi)
    if op == "-" and b > a:
        a, b = b, a
    return op, a, b


def solve(op, a, b):
    return a + b if op == "+" else a - b


def question_text(rng, op, a, b):
    return rng.choice(ADD_Q if op == "+" else SUB_Q).format(a=a, b=b)


def make_heldout(seed):
    """200 fixed two-digit questions (100 add, 100 sub) never used in training."""
    rng = random.Random(seed + 777)
    seen, items = set(), []
    while len(items) < 200:
        op = "+" if len(items) % 2 == 0 else "-"
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and b > a:
            a, b = b, a
        if (op, a, b) in seen:
            continue
        seen.add((op, a, b))
        items.append({"question": question_text(rng, op, a, b), "answer": solve(op, a, b),
                      "op": op, "a": a, "b": b})
    return items, seen


def render_chat(messages, add_generation_prompt=False):
    """Same string as the jinja chat template (checked against apply_chat_template at export)."""
    s = BOS
    for m in messages:
        s += {"user": "User: ", "assistant": "Assistant: ", "system": "System: "}[m["role"]] + m["content"] + EOT
    if add_generation_prompt:
        s += "Assistant: "
    return s


def sample_dialogue(rng, exclude):
    turns = 1 if rng.random() < 0.8 else 2
    msgs = []
    for _ in range(turns):
        while True:
            op, a, b = sample_problem(rng)
            if (op, a, b) not in exclude:
                break
        msgs.append({"role": "user", "content": question_text(rng, op, a, b)})
        msgs.append({"role": "assistant", "content": answer_text(rng, op, a, b, solve(op, a, b))})
    return render_chat(msgs)


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


# ----------------------------------------------------------------------------- model
def build_model(vocab_size, args):
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import AutoBitLinear

    cfg = BitNetConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        hidden_act="relu2", max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
        pad_token_id=None, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
    )
    model = BitNetForCausalLM(cfg)
    swap_to_bitlinear(model, AutoBitLinear)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, cfg


def swap_to_bitlinear(model, AutoBitLinear):
    """Replace every nn.Linear except the (tied) lm_head by AutoBitLinear(online_quant=True)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and not isinstance(mod, AutoBitLinear) and name != "lm_head":
            new = AutoBitLinear(mod.in_features, mod.out_features, bias=False, online_quant=True)
            with torch.no_grad():
                new.weight.copy_(mod.weight)
            model.set_submodule(name, new)


def eager_quant_patch():
    """transformers wraps WeightQuant/ActQuant.forward in torch.compile; on this shared 2-core CPU
    we run the identical math eagerly (no inductor compile, no dynamic-shape recompiles)."""
    from transformers.integrations import bitnet as B

    def wq(ctx, weight):
        dtype = weight.dtype
        weight = weight.float()
        scale = 1.0 / weight.abs().mean().clamp_(min=1e-5)
        weight = (weight * scale).round().clamp(-1, 1) / scale
        return weight.to(dtype)

    def aq(ctx, activation):
        dtype = activation.dtype
        activation = activation.float()
        scale = 127 / activation.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
        activation = (activation * scale).round().clamp(-128, 127) / scale
        return activation.to(dtype)

    B.WeightQuant.forward = staticmethod(wq)
    B.ActQuant.forward = staticmethod(aq)


# ----------------------------------------------------------------------------- export
def export_checkpoint(model, cfg, tok, out_dir):
    """Write out_dir like microsoft/bitnet-b1.58-2B-4T (offline autobitlinear, packed uint8)."""
    from safetensors.torch import save_file
    from transformers.integrations.bitnet import AutoBitLinear, pack_weights

    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    lin = {n for n, m in model.named_modules() if isinstance(m, AutoBitLinear)}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        mod = name.rsplit(".", 1)[0]
        if mod in lin:
            W = p.detach().float()
            s = 1.0 / W.abs().mean().clamp(min=1e-5)
            w = (W * s).round().clamp(-1, 1).to(torch.int8)
            tensors[name] = pack_weights(w.clone()).contiguous()
            tensors[mod + ".weight_scale"] = torch.tensor([1.0 / s.item()], dtype=torch.float32).to(torch.bfloat16)
        else:
            tensors[name] = p.detach().to(torch.bfloat16).contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(out_dir, "model.safetensors"), 0o644)

    c = cfg.to_dict()
    c.update({
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "torch_dtype": "bfloat16",
        "dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": True,
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "offline"},
    })
    for k in ("_name_or_path", "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder",
              "output_attentions", "output_hidden_states", "problem_type", "return_dict"):
        c.pop(k, None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": [1, 2], "do_sample": False,
                   "max_new_tokens": 32}, f, indent=2)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    # add_bos_token: plain prompts start with <|begin_of_text|>, as every prose document did in training
    # (the chat template writes its own BOS, and apply_chat_template does not add another).
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOT_TEXT,
            "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": 512, "chat_template": CHAT_TEMPLATE,
            "added_tokens_decoder": {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                              "normalized": False, "single_word": False}
                                     for i, s in enumerate(SPECIALS)},
        }, f, indent=2)


# ----------------------------------------------------------------------------- training
class Streams:
    def __init__(self, prose_ids, tok, exclude, seed, T):
        self.prose, self.tok, self.exclude, self.T = prose_ids, tok, exclude, T
        self.rng = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)

    def prose_seq(self):
        i = torch.randint(0, len(self.prose) - self.T - 1, (1,), generator=self.g).item()
        return self.prose[i:i + self.T + 1]

    def chat_seq(self):
        ids = []
        while len(ids) < self.T + 1:
            ids += self.tok.encode(sample_dialogue(self.rng, self.exclude)).ids
        return torch.tensor(ids[:self.T + 1])

    def batch(self, B, chat_frac):
        n_chat = int(round(B * chat_frac))
        seqs = [self.chat_seq() for _ in range(n_chat)] + [self.prose_seq() for _ in range(B - n_chat)]
        x = torch.stack(seqs)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()


@torch.no_grad()
def greedy_answer(model, tok, question, max_new=16):
    ids = tok.encode(render_chat([{"role": "user", "content": question}], add_generation_prompt=True)).ids
    x = torch.tensor([ids])
    out = model.generate(x, max_new_tokens=max_new, do_sample=False, eos_token_id=[1, 2], pad_token_id=1)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def is_correct(text, answer):
    nums = re.findall(r"-?\d+", text)
    return bool(nums) and int(nums[-1]) == answer


@torch.no_grad()
def eval_loss(model, xy):
    model.eval()
    x, y = xy
    logits = model(input_ids=x).logits
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
    model.train()
    return loss.item()


def arith_acc(model, tok, items):
    model.eval()
    ok = sum(is_correct(greedy_answer(model, tok, it["question"]), it["answer"]) for it in items)
    model.train()
    return ok / len(items)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=os.path.join(REPO, "models", "demo"))
    ap.add_argument("--work", default=os.path.join(HERE, "out"))
    ap.add_argument("--minutes", type=float, default=70.0, help="wall-clock training budget")
    ap.add_argument("--steps", type=int, default=6000, help="max optimizer steps (schedule length)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--chat-frac", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--vocab", type=int, default=3072)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", default=None,
                    help="continue from a master.pt (weights only; fresh optimizer and lr schedule; "
                         "tokenizer read from --out/tokenizer.json)")
    args = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    eager_quant_patch()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(os.path.join(args.out, "heldout"), exist_ok=True)
    logf = open(os.path.join(args.work, "log.jsonl"), "a")

    def log(**kw):
        kw["elapsed_s"] = round(time.time() - t_start, 1)
        print(json.dumps(kw), flush=True)
        logf.write(json.dumps(kw) + "\n")
        logf.flush()

    # data
    prose_train, prose_held = load_prose()
    random.Random(args.seed).shuffle(prose_train)
    heldout, exclude = make_heldout(args.seed)
    with open(os.path.join(args.out, "heldout", "arith.jsonl"), "w") as f:
        for it in heldout:
            f.write(json.dumps({"question": it["question"], "answer": it["answer"]}) + "\n")
    held_text = "\n\n".join(prose_held)
    held_text = held_text[:held_text.find("\n\n", 60000)]  # ~60 kB held-out prose slice
    with open(os.path.join(args.out, "heldout", "prose.txt"), "w") as f:
        f.write(held_text + "\n")
    log(event="data", prose_paragraphs=len(prose_train), heldout_paragraphs=len(prose_held),
        prose_chars=sum(map(len, prose_train)), heldout_prose_chars=len(held_text))

    # tokenizer
    rng_tok = random.Random(args.seed + 1)
    tok_texts = prose_train[:20000] + [sample_dialogue(rng_tok, exclude).replace(BOS, "").replace(EOT, "\n")
                                       for _ in range(5000)]
    if args.resume:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(args.out, "tokenizer.json"))
    else:
        tok = train_tokenizer(tok_texts, args.vocab)
    V = tok.get_vocab_size()
    docs = tok.encode_batch([BOS + p + EOT_TEXT for p in prose_train])
    prose_ids = torch.tensor([i for d in docs for i in d.ids], dtype=torch.long)
    held_ids = torch.tensor(tok.encode(BOS + held_text.replace("\n\n", EOT_TEXT + BOS) + EOT_TEXT).ids)
    log(event="tokenizer", vocab=V, prose_tokens=len(prose_ids), heldout_prose_tokens=len(held_ids),
        example=tok.encode(render_chat([{"role": "user", "content": "What is 47 plus 35?"}], True)).tokens)

    # fixed eval batches: held-out prose windows + held-out chat dialogues
    T = args.seq
    nwin = min(16, (len(held_ids) - 1) // (T + 1))
    hp = held_ids[: nwin * (T + 1)].view(nwin, T + 1)
    prose_eval = (hp[:, :-1].contiguous(), hp[:, 1:].contiguous())
    rng_e = random.Random(args.seed + 2)
    chat_ids = []
    for it in heldout:
        chat_ids += tok.encode(render_chat([{"role": "user", "content": it["question"]},
                                            {"role": "assistant", "content": answer_text(rng_e, it["op"], it["a"], it["b"], it["answer"])}])).ids
    nwin = min(16, (len(chat_ids) - 1) // (T + 1))
    hc = torch.tensor(chat_ids[: nwin * (T + 1)]).view(nwin, T + 1)
    chat_eval = (hc[:, :-1].contiguous(), hc[:, 1:].contiguous())
    torch.save({"prose": prose_eval, "chat": chat_eval}, os.path.join(args.work, "eval_batches.pt"))

    # model
    model, cfg = build_model(V, args)
    step0 = 0
    if args.resume:
        import shutil
        ck = torch.load(args.resume, weights_only=False)
        model.load_state_dict(ck["model"])
        model.tie_weights()
        step0 = ck["step"]
        shutil.copy(args.resume, os.path.join(args.work, f"master_step{step0}.pt"))
        log(event="resume", from_step=step0, path=args.resume)
    n_params = sum(p.numel() for p in model.parameters())
    n_lin = sum(m.weight.numel() for n, m in model.named_modules() if type(m).__name__ == "AutoBitLinear")
    log(event="model", params=n_params, ternary_linear_params=n_lin, config=cfg.to_dict())

    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    nodecay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    streams = Streams(prose_ids, tok, exclude, args.seed, T)
    budget = args.minutes * 60.0
    t_train = time.time()
    model.train()
    step, ema = 0, None
    last_ckpt = None

    def save(step, final=False):
        torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": step0 + step, "args": vars(args)},
                   os.path.join(args.work, "master.pt"))
        export_checkpoint(model, cfg, tok, args.out)

    while True:
        progress = max(step / args.steps, (time.time() - t_train) / budget)
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = streams.batch(args.batch, args.chat_frac)
        logits = model(input_ids=x).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0:
            log(event="train", step=step0 + step, loss=round(loss.item(), 4), loss_ema=round(ema, 4), lr=round(lr, 6),
                grad_norm=round(gn.item(), 3), train_s=round(time.time() - t_train, 1))
        if step % args.eval_every == 0:
            acc = arith_acc(model, tok, heldout[:50])
            log(event="eval", step=step0 + step, prose_loss=round(eval_loss(model, prose_eval), 4),
                chat_loss=round(eval_loss(model, chat_eval), 4), arith_acc50=acc,
                sample=greedy_answer(model, tok, heldout[0]["question"]), train_s=round(time.time() - t_train, 1))
            save(step)
    train_s = time.time() - t_train
    acc = arith_acc(model, tok, heldout)
    log(event="final", step=step0 + step, train_s=round(train_s, 1), prose_loss=round(eval_loss(model, prose_eval), 4),
        chat_loss=round(eval_loss(model, chat_eval), 4), arith_acc200=acc, loss_ema=ema)
    save(step, final=True)
    log(event="done", total_s=round(time.time() - t_start, 1))


if __name__ == "__main__":
    main()
