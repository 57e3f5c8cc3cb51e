"""Benchmark: user-specific pruning + distillation recovery + dynamic int8 on the real local model.

For SmolLM2-135M-Instruct (loaded through ``adapters.LocalModel``'s cache), with a user whose
domains are cooking, food and health, it reports for each variant

    base | base int8 | pruned (no recovery) | pruned + distilled | pruned + distilled + int8

the serialised size, perplexity on held-out general text and on held-out user-domain text (texts
never used for scoring or distillation), and greedy decoding speed (tokens/s, KV cache, batch 1).

    nice -n 10 python tests/benchmarks/bench_plm_compress.py [--head-keep 0.67] [--neuron-keep 0.75]
        [--steps 40] [--threads 2] [--json out.json]

Figures go to stdout (and to --json). CPU only; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

USER_CALIBRATION = [
    ("I cook vegetarian dinners most nights, usually a lentil stew, a chickpea curry or roasted vegetables "
     "with rice. I soak dried beans overnight and cook them slowly with bay leaves, garlic and a little salt."),
    ("My partner is allergic to peanuts, so I check every label and I never use peanut oil. For crunch I toast "
     "sunflower seeds or pumpkin seeds instead, and I make pesto with basil, parmesan and toasted pine nuts."),
    ("On Sundays I bake sourdough bread. The starter lives in the fridge and I feed it with rye flour the night "
     "before. The dough rests for twelve hours, then I shape it, score it and bake it in a hot cast iron pot."),
    ("My doctor asked me to lower my blood pressure, so I cut down on sodium. I season soups with lemon juice, "
     "fresh herbs and black pepper, and I rinse canned beans to wash away some of the salt."),
    ("For breakfast I eat oatmeal with berries and a spoon of yogurt. When I train for a long hike I add "
     "walnuts and a banana, because the extra protein and potassium help my legs recover."),
    ("I keep a spice drawer with cumin, coriander, smoked paprika, turmeric and cinnamon. Toasting whole "
     "spices in a dry pan for a minute before grinding them makes a curry taste much deeper."),
    ("When I meal prep, I roast two trays of vegetables, cook a pot of quinoa and make a jar of tahini "
     "dressing. That gives me lunches for four days that only need a few minutes to assemble."),
    ("I am trying to eat more fibre, so I swapped white pasta for whole wheat and add a handful of spinach "
     "or kale to almost everything. My digestion and my energy in the afternoon are both better."),
]
USER_HELD_OUT = [
    ("Tonight I am making a mushroom risotto. I warm the vegetable stock in one pot, toast the rice in olive "
     "oil with shallots, and add the stock one ladle at a time while stirring until the rice is creamy."),
    ("Because of the peanut allergy at home, I bake cookies with oat flour, dark chocolate and sunflower "
     "butter. They come out soft in the middle, and nobody has to worry about a reaction."),
    ("My dietitian suggested more iron-rich foods since I stopped eating meat. Lentils, tofu and dark leafy "
     "greens help, especially with something acidic like tomatoes or lemon to improve absorption."),
    ("For a quick weeknight dinner I stir-fry broccoli, peppers and tofu with ginger, garlic and a splash of "
     "low sodium soy sauce, then serve it over brown rice with a few sesame seeds on top."),
]
GENERAL_CALIBRATION = [
    ("The Roman Empire reached its greatest extent under the emperor Trajan in the second century. Its roads, "
     "aqueducts and laws shaped the development of Europe for many centuries after its decline."),
    ("Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide and water and, "
     "using sunlight captured by chlorophyll, produce glucose and release oxygen into the air."),
    ("The stock market fell sharply on Tuesday after the central bank signalled that interest rates would stay "
     "high for longer than investors had expected, and technology shares led the decline."),
    ("In football, a team scores by moving the ball into the opposing goal. Each match lasts ninety minutes, "
     "and the referee may add extra time to make up for stoppages during play."),
    ("Modern computers store information as binary digits. A processor fetches instructions from memory, "
     "decodes them and executes them, billions of times every second."),
    ("The Amazon river carries more water than any other river on Earth. Its basin covers a large part of "
     "South America and is home to an enormous variety of plants, animals and insects."),
]
GENERAL_HELD_OUT = [
    ("The printing press, developed in the fifteenth century, made books far cheaper to produce. Ideas spread "
     "faster than ever before, which helped bring about the Reformation and the scientific revolution."),
    ("Earthquakes happen when stress builds up along faults in the Earth's crust and is suddenly released. "
     "Seismologists measure their strength with instruments that record how the ground shakes."),
    ("The city council approved a plan to expand the public library, adding a new reading room, a computer "
     "lab and longer opening hours on weekends, after residents asked for more study space."),
    ("Jazz grew out of the African American communities of New Orleans in the early twentieth century, "
     "mixing blues, ragtime and brass band music, and it soon spread to Chicago and New York."),
]
SPEED_PROMPT = "Here is a simple plan for a healthy week of dinners:"


def load_model(cache_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters import LocalModel

    local = LocalModel(cache_dir=cache_dir)
    ok, source = local.loadable()
    if not ok:
        raise SystemExit(f"local model unavailable: {source}")
    if source != "cached":  # first run: dequantize the GGUF once and cache it
        local.load()
        local.close()
    tokenizer = AutoTokenizer.from_pretrained(local.cache_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(local.cache_path, local_files_only=True).eval()
    return model, tokenizer


def tokens_per_second(model, tokenizer, *, new_tokens: int, repeats: int) -> float:
    """Greedy decoding with the KV cache, batch 1; median of ``repeats`` runs (prefill excluded)."""
    import torch

    ids = torch.tensor([tokenizer(SPEED_PROMPT, add_special_tokens=False)["input_ids"]])
    rates = []
    with torch.inference_mode():
        for _ in range(repeats):
            out = model(input_ids=ids, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            started = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            rates.append(new_tokens / (time.perf_counter() - started))
    return statistics.median(rates)


def measure(name: str, model, tokenizer, held_general, held_user, args) -> dict:
    from adapters.plm.prune import model_bytes, perplexity

    row = {
        "variant": name,
        "size_mb": round(model_bytes(model) / 1e6, 1),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "ppl_general": round(perplexity(model, held_general), 2),
        "ppl_user": round(perplexity(model, held_user), 2),
        "tok_s": round(tokens_per_second(model, tokenizer, new_tokens=args.new_tokens, repeats=args.repeats), 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("MEMLANE_MODEL_CACHE", Path.home() / ".cache/memlane/models")))
    parser.add_argument("--head-keep", type=float, default=2 / 3)
    parser.add_argument("--neuron-keep", type=float, default=0.75)
    parser.add_argument("--general-weight", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from adapters.plm.prune import PruneConfig, encode_texts, prune_for_user, quantize_int8

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = load_model(args.cache_dir)
    enc = lambda texts: encode_texts(tokenizer, texts, max_tokens=256)
    user_cal, general_cal = enc(USER_CALIBRATION), enc(GENERAL_CALIBRATION)
    held_user, held_general = enc(USER_HELD_OUT), enc(GENERAL_HELD_OUT)
    config = PruneConfig(head_keep=args.head_keep, neuron_keep=args.neuron_keep,
                         general_weight=args.general_weight, distill_steps=args.steps, distill_lr=args.lr)
    rows = [measure("base fp32", model, tokenizer, held_general, held_user, args)]
    rows.append(measure("base int8", quantize_int8(model), tokenizer, held_general, held_user, args))

    no_recovery = copy.deepcopy(model)
    t0 = time.perf_counter()
    distilled, plan, losses = prune_for_user(model, user_cal, general_cal, config)
    prune_s = time.perf_counter() - t0
    # the same plan without distillation, to show what recovery buys
    from adapters.plm.prune import apply_plan

    apply_plan(no_recovery, plan)
    rows.append(measure("pruned, no recovery", no_recovery, tokenizer, held_general, held_user, args))
    del no_recovery
    rows.append(measure("pruned + distilled", distilled, tokenizer, held_general, held_user, args))
    rows.append(measure("pruned + distilled + int8", quantize_int8(distilled), tokenizer, held_general,
                        held_user, args))
    summary = {
        "model": "SmolLM2-135M-Instruct",
        "config": {k: getattr(config, k) for k in ("head_keep", "neuron_keep", "general_weight", "distill_steps",
                                                   "distill_lr", "temperature")},
        "heads_kept_per_layer": len(plan.heads[0]),
        "neurons_kept_per_layer": len(plan.neurons[0]),
        "prune_and_distill_s": round(prune_s, 1),
        "distill_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
        "threads": args.threads,
        "total_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    print(f"\n{'variant':28} {'size MB':>8} {'params M':>9} {'ppl general':>12} {'ppl user':>9} {'tok/s':>7}")
    for r in rows:
        print(f"{r['variant']:28} {r['size_mb']:8} {r['params_m']:9} {r['ppl_general']:12} {r['ppl_user']:9} "
              f"{r['tok_s']:7}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
