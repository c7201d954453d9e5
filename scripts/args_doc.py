"""The argument tables of docs/arguments.md, generated from the argument dataclasses (the single source).

    python scripts/args_doc.py            # print them
    python scripts/args_doc.py --write    # replace the block between the ARGS markers of docs/arguments.md
"""

import dataclasses
import os
import sys
import typing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppo.args import PADDLENLP_KEYS, DataArgs, DPOArgs, NoEffect, ParallelArgs, PPOArgs, RewardArgs, ServeRewardArgs, SFTArgs, TrainingArgs  # noqa: E402
from ppo.args.common import range_help  # noqa: E402

SECTIONS = [
    ("Shared: training (all stages)", TrainingArgs, ()),
    ("Shared: parallelism (all stages)", ParallelArgs, ()),
    ("Shared: data (all stages)", DataArgs, ()),
    ("SFT (`ppo/run_sft.py`)", SFTArgs, (TrainingArgs, ParallelArgs, DataArgs)),
    ("Reward model (`rm/run_reward.py`)", RewardArgs, (TrainingArgs, ParallelArgs, DataArgs)),
    ("DPO and its family (`dpo/run_dpo.py`)", DPOArgs, (TrainingArgs, ParallelArgs, DataArgs)),
    ("PPO (`ppo/run_ppo.py`)", PPOArgs, (TrainingArgs, ParallelArgs, DataArgs)),
    ("Reward server (`rm/serve_reward.py`)", ServeRewardArgs, ()),
]


def render() -> str:
    out = []
    for title, cls, shared in SECTIONS:
        skip = {f.name for s in shared for f in dataclasses.fields(s)}
        hints = typing.get_type_hints(cls)
        out.append(f"#### {title}\n\n| argument | type | default | meaning |\n| --- | --- | --- | --- |")
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            choices = f.metadata.get("choices")
            meaning = f.metadata["help"] + (f" One of: {', '.join(f'`{c}`' for c in choices if c)}." if choices else "") \
                + range_help(f)
            out.append(f"| `{f.name}` | {hints[f.name].__name__} | `{f.default!r}` | {meaning} |")
        out.append("")
    out.append("#### PaddleNLP keys that are not fields here\n\nPaddleNLP argument files run unchanged: these keys "
               "are honoured under this toolkit's name, or accepted with one notice line. Any other unknown key "
               "stops with an error.\n\n| PaddleNLP key | here | why |\n| --- | --- | --- |")
    for key, entry in PADDLENLP_KEYS.items():
        here = "no effect (notice)" if isinstance(entry, NoEffect) else f"`{entry.field}`" + (
            f" as `{entry.form}`" if entry.form else "")
        out.append(f"| `{key}` | {here} | {entry.why} |")
    out.append("")
    return "\n".join(out)


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "arguments.md")
BEGIN, END = "<!-- ARGS:BEGIN -->", "<!-- ARGS:END -->"


def readme_block(text: str) -> str:
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()


if __name__ == "__main__":
    if "--write" in sys.argv:
        text = open(README, encoding="utf-8").read()
        new = text[:text.index(BEGIN) + len(BEGIN)] + "\n" + render() + "\n" + text[text.index(END):]
        open(README, "w", encoding="utf-8").write(new)
    else:
        print(render())
