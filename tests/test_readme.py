"""README.md stays true: the argument tables are the ones generated from the code."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_argument_tables_match_the_dataclasses():
    spec = importlib.util.spec_from_file_location("args_doc", os.path.join(ROOT, "scripts", "args_doc.py"))
    args_doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(args_doc)
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert args_doc.readme_block(text) == args_doc.render().strip(), \
        "README argument tables are stale: run python scripts/args_doc.py --write"


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert 'pip install -c constraints.txt -e ".[cpu,test,plot]"' in readme
    assert 'pip install --quiet -c constraints.txt -e ".[cpu,test,plot]"' in ci
