"""`score`: one article for one profile, or every line of a JSONL of them."""

from __future__ import annotations

import argparse
import json

from ..data.task import parse_completion, scoring_messages
from ..model.generate import generate
from ._command import Command
from .evaluate import add_model_arguments, load_model_of

USAGE = """Score one article for one profile, or every line of a JSONL of them, and print score and reasoning.

    stratos-lite score --model runs/demo/merged --profile "Geophysicist, Kuwait. Field: energy." \\
        --title "Kuwait oil output rises" --article "Sector: energy. Country: Kuwait. ..."
    stratos-lite score --model models/base --adapter runs/v2/adapter --jsonl articles.jsonl

JSONL lines need profile, title and article (other fields are ignored).
"""


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--profile")
    parser.add_argument("--title", default="")
    parser.add_argument("--article")
    parser.add_argument("--jsonl", help="score every line of this file instead")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)


def _main(args: argparse.Namespace) -> None:
    if args.jsonl:
        with open(args.jsonl, encoding="utf-8") as f:
            items = [json.loads(line) for line in f if line.strip()]
    elif args.profile and args.article:
        items = [{"profile": args.profile, "title": args.title, "article": args.article}]
    else:
        args.command_parser.error("give --profile and --article, or --jsonl")
    model, tokenizer = load_model_of(args)
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


COMMAND = Command("score an article for a reader's profile (or a JSONL of them)", USAGE, _arguments, _main)
