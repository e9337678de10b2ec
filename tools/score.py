"""Score one article for one profile, or every line of a JSONL of them, and print score and reasoning.

    python tools/score.py --model runs/demo/merged --profile "Geophysicist, Kuwait. Field: energy." \\
        --title "Kuwait oil output rises" --article "Sector: energy. Country: Kuwait. ..."
    python tools/score.py --model models/base --adapter runs/v2/adapter --jsonl articles.jsonl

JSONL lines need profile, title and article (other fields are ignored).
"""

import argparse
import json

import torch

from stratos_lite.cli import run
from stratos_lite.data import scoring_messages
from stratos_lite.evaluate import parse_completion
from stratos_lite.generate import generate
from stratos_lite.weights import load_pretrained_with_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--profile")
    parser.add_argument("--title", default="")
    parser.add_argument("--article")
    parser.add_argument("--jsonl", help="score every line of this file instead")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.jsonl:
        with open(args.jsonl, encoding="utf-8") as f:
            items = [json.loads(line) for line in f if line.strip()]
    elif args.profile and args.article:
        items = [{"profile": args.profile, "title": args.title, "article": args.article}]
    else:
        parser.error("give --profile and --article, or --jsonl")

    model, tokenizer = load_pretrained_with_adapter(args.model, args.adapter, getattr(torch, args.dtype), args.device)
    for start in range(0, len(items), args.batch_size):
        batch = items[start:start + args.batch_size]
        prompts = [tokenizer.encode_prompt(scoring_messages(i["profile"], i["title"], i["article"])) for i in batch]
        outputs = generate(model, prompts, max_new_tokens=args.max_new_tokens, stop_ids=tokenizer.stop_ids,
                           pad_id=tokenizer.pad_id)
        for item, output in zip(batch, outputs, strict=True):
            parsed = parse_completion(tokenizer.decode(output))
            score = f"{parsed.score:g}" if parsed.ok else f"unreadable ({parsed.status})"
            print(json.dumps({"title": item["title"], "score": score, "reasoning": parsed.think.strip()},
                             ensure_ascii=False))


if __name__ == "__main__":
    run(main)
