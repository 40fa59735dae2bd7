#!/usr/bin/env python3
"""make_stories_qa.py: the small multi-document question dataset of kvsim's sweep tests and README.

Builds tests/data/stories_qa.jsonl from ../shared/data/tinystories_sample.txt (five TinyStories
stories, CDLA-Sharing-1.0): every ordered pair of distinct stories (20 samples) gives two documents,
the first paragraph of each, and a question about the main character of one of them (the first
document for even samples, the second for odd ones). Records have LongBench's shape: _id, dataset,
context (the documents, "Document N:" headed, separated by <|endoftext|> lines so that each becomes
a segment of the capture), input (the question), answers (a list) and length (words of the context).
Each prompt is 100-200 tokens under stories260K's tokenizer, so prompt and decode fit its 512-token
context. Usage: scripts/make_stories_qa.py [SAMPLE.txt] [OUT.jsonl]
"""
import itertools
import json
import sys

src = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/tinystories_sample.txt"
out = sys.argv[2] if len(sys.argv) > 2 else "tests/data/stories_qa.jsonl"
names = ["Ben", "Ollie", "Tim", "Bob", "Lucy"]  # the main character of each story, in file order

text = open(src, encoding="utf-8").read()
stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
assert len(stories) == len(names), f"{src}: expected {len(names)} stories, found {len(stories)}"
firsts = [s.split("\n")[0].strip() for s in stories]
for n, p in zip(names, firsts):
    assert n in p, f"{n} is not in the first paragraph {p!r}"

with open(out, "w", encoding="utf-8") as f:
    for k, (a, b) in enumerate(itertools.permutations(range(len(stories)), 2)):
        asked = 1 if k % 2 == 0 else 2
        story = a if asked == 1 else b
        context = f"Document 1:\n{firsts[a]}\n<|endoftext|>\nDocument 2:\n{firsts[b]}"
        rec = {
            "_id": f"stories-qa-{k:02d}",
            "dataset": "stories_qa",
            "context": context,
            "input": f"What is the name of the main character of document {asked}?",
            "answers": [names[story]],
            "length": len(context.split()),
        }
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
