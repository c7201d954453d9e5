"""README.md and docs/ stay true: the argument tables are the ones generated from the code, the
front door stays short, and every relative link points at a file of the checkout."""

import glob
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_argument_tables_match_the_dataclasses():
    spec = importlib.util.spec_from_file_location("args_doc", os.path.join(ROOT, "scripts", "args_doc.py"))
    args_doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(args_doc)
    text = open(os.path.join(ROOT, "docs", "arguments.md"), encoding="utf-8").read()
    assert args_doc.readme_block(text) == args_doc.render().strip(), \
        "docs/arguments.md argument tables are stale: run python scripts/args_doc.py --write"


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert 'pip install -c constraints.txt -e ".[cpu,test,plot]"' in readme
    assert 'pip install --quiet -c constraints.txt -e ".[cpu,test,plot]"' in ci


def test_readme_is_a_front_door_and_every_link_resolves():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert sum(1 for _ in f) < 250
    pages = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    assert len(pages) > 8
    broken = []
    for page in pages:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith(("#", "mailto:")):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
    assert not broken, broken
    readme = open(pages[0], encoding="utf-8").read()
    linked = set(re.findall(r"\]\(docs/([^)#]+)", readme))
    assert linked == {os.path.basename(p) for p in pages[1:]}, "every docs page is linked from README.md"
