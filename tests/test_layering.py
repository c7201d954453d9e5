"""The layering of ppo/, rm/ and dpo/: every module imports on its own, imports are module-level, nothing
imports upward, and fleet's wrappers and process groups are reached only through the distributed
modules."""

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first.  A module may import only modules of strictly lower layers (a new module gets a
# place here, or the test fails).  The folders are the layers of the picture in README.md: the pure
# core, configuration, data / rewards / models, the distributed layer, storage, rollout, the stages.
LAYERS = [
    # foundations: no ppo imports (the pure core, the decoder protocol, the package markers)
    ["ppo", "ppo.core", "ppo.core.errors", "ppo.core.experience", "ppo.core.algorithms", "ppo.core.metrics",
     "ppo.data.template", "ppo.models.normalizer", "ppo.rollout", "ppo.rollout.decoding",
     "ppo.distributed", "ppo.storage", "ppo.stages", "ppo.stages.sft", "ppo.stages.ppo", "ppo.stages.dpo", "ppo.tiny", "rm",
     "rm.losses", "dpo", "ppo.core.preference", "ppo.models.kernel_library"],
    # the rest of the pure core; what the by-NAME registries share
    ["ppo.core.registry", "ppo.core.advantages", "ppo.core.batching", "ppo.models.cpu_gemm", "ppo.core.placement"],
    # the fast CPU paths (the fused norm kernel is tried only where the CPU can run it: cpu_gemm's flags)
    ["ppo.models.cpu_kernels"],
    ["ppo.models.fast_paths", "ppo.models.decode_kernels"],
    # reading files: the one place that turns damaged files into one-line errors (pickles checked first)
    ["ppo.storage.safe_pickle"],
    ["ppo.storage.files"],
    # tensor files (safetensors through its library: lazy reads, sharded writes) and model folders' weights
    ["ppo.storage.tensors"],
    # configuration: the shared parts and the PaddleNLP key mapping, then one module per stage
    ["ppo.args.common", "ppo.args.paddlenlp"],
    ["ppo.args.parse", "ppo.args.sft", "ppo.args.reward", "ppo.args.ppo", "ppo.args.dpo"],
    ["ppo.args"],
    # registries (raw datasets, reward functions, model families) and model adaptations
    ["ppo.data.base", "ppo.data.chat", "ppo.data.tokenizer_utils", "ppo.models.families.base",
     "ppo.models.recompute", "ppo.models.lora", "ppo.rewards.base"],
    # data: sources and tokenized datasets; the built-in reward functions
    ["ppo.data.datasets", "ppo.data.alpaca", "ppo.data.safe_rlhf", "ppo.data.tiny",
     "ppo.data.gsm8k", "ppo.rewards.builtin", "ppo.rewards.remote"],
    ["ppo.data.arithmetic", "ppo.data.preference"],
    ["ppo.data", "ppo.rewards"],
    # models: the score head, the families, loading
    ["ppo.models.score_model"],
    ["ppo.models.families.llama", "ppo.models.families.mistral", "ppo.models.families.qwen2"],
    ["ppo.models.families.qwen3"],
    ["ppo.models.families.ernie4_5"],
    ["ppo.models.families"],
    ["ppo.models.hf"],
    ["ppo.models.loading"],
    ["ppo.models"],
    # the distributed layer: the only modules that touch fleet and process groups
    ["ppo.distributed.cpu_fleet", "ppo.distributed.pools", "ppo.distributed.transfer"],
    ["ppo.distributed.parallel"],
    ["ppo.distributed.pipeline", "ppo.distributed.offload", "ppo.distributed.vocab"],
    # storage: the output folder's lock and refusal, checkpoint folders, the graceful stop, checkpoints
    ["ppo.storage.output_dir", "ppo.storage.manifest", "ppo.storage.finite"],
    ["ppo.storage.graceful"],
    ["ppo.storage.checkpoint"],
    # rollout: the lean decode path, the fused GPU model, generation and scoring -> Experience
    ["ppo.rollout.layer_ops"],
    ["ppo.rollout.inference", "ppo.rollout.sampling"],
    ["ppo.rollout.fused", "ppo.rollout.collect"],
    # what every stage's loop uses: entry plumbing, optimizer, numeric guard; the single-model loop
    ["ppo.stages.entry", "ppo.stages.optim", "ppo.stages.guard"],
    ["ppo.stages.single_model"],
    # the PPO stage: models in their layout, one update step, scoring, evaluation; then its data
    ["ppo.stages.ppo.pools"],
    ["ppo.stages.ppo.roles", "ppo.stages.ppo.steps", "ppo.stages.ppo.scoring"],
    ["ppo.stages.ppo.evaluation", "ppo.stages.ppo.serving"],
    ["ppo.stages.ppo.data"],
    # the loops
    # the DPO stage: its objective and reference modes
    ["ppo.stages.dpo.objective", "ppo.stages.dpo.reference"],
    ["ppo.stages.dpo.pipelined"],
    ["ppo.stages.sft.trainer", "rm.reward_trainer", "rm.server", "ppo.stages.ppo.trainer", "ppo.stages.dpo.trainer"],
    ["ppo.stages.dpo.online"],
    # entry points and the built-in demo
    ["ppo.run_ppo", "ppo.run_sft", "rm.run_reward", "rm.serve_reward", "dpo.run_dpo", "ppo.tiny.task", "ppo.tiny.arithmetic"],
    ["ppo.tiny.build", "ppo.tiny.evaluate"],
    ["ppo.tiny.pipeline"],
]

# What a folder may import besides itself: the pure core nothing of the toolkit, and nothing below
# the stages reaches up into them (None: no rule beyond LAYERS).
FOLDER_MAY_IMPORT = {
    "ppo.core": set(),
    "ppo.args": {"ppo.core", "ppo.storage.files", "ppo.storage.tensors"},
    "ppo.distributed": {"ppo.core", "ppo.models"},
    "ppo.storage": {"ppo.core", "ppo.distributed", "ppo.models", "ppo"},
    "ppo.rollout": {"ppo.core", "ppo.distributed", "ppo.models", "ppo.data"},
}


# Function-local ppo / rm imports allowed (module -> imported names), each with its reason.  Lazy
# imports are for optional heavy third-party dependencies only (paddlenlp_ops, visualdl), which
# this scan does not look at; no ppo module is optional, so the list is empty.
LOCAL_IMPORT_ALLOWED: dict = {}

# Private attributes of fleet's wrappers (model, optimizer, pipeline schedule) and the hybrid group.
FLEET_PRIVATE = {"_layers", "_layer", "_inner_opt", "_optim", "_loss_fn", "_prepare_training", "hcg"}
DISTRIBUTED = {"ppo/distributed/parallel.py", "ppo/distributed/pipeline.py", "ppo/distributed/cpu_fleet.py",
               "ppo/distributed/vocab.py", "ppo/distributed/pools.py", "ppo/distributed/transfer.py"}
MAX_LINES = 500  # no library module longer
# Files whose fleet-private code is being moved into ppo/distributed/pipeline.py (the pipeline pass of the PPO
# trainer); empty this set once it has moved.
BEING_MOVED: set = set()


def module_files() -> dict:
    """{module name: path relative to the repository} of every module under ppo/, rm/ and dpo/."""
    out = {}
    for top in ("ppo", "rm", "dpo"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)
                    name = rel[:-3].replace(os.sep, ".")
                    out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = rel
    return out


MODULES = module_files()


def parse(rel: str) -> ast.Module:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return ast.parse(f.read(), rel)


def ours(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in ("ppo", "rm", "dpo")


def imported_modules(node) -> list[str]:
    """The ppo / rm modules an import statement loads (``from ppo import parallel`` -> ppo.distributed.parallel)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if ours(a.name)]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and ours(node.module):
        return sorted({f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                       for a in node.names})
    return []


def local_imports(tree) -> list[tuple[int, str]]:
    """(line, module) of every ppo / rm import inside a function or class body."""
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if nested and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((child.lineno, m) for m in imported_modules(child))
            visit(child, inner)

    visit(tree, False)
    return found


def test_every_module_has_one_layer():
    placed = [m for layer in LAYERS for m in layer]
    assert len(placed) == len(set(placed)), "a module is listed in two layers"
    assert set(placed) == set(MODULES), (f"not in LAYERS: {sorted(set(MODULES) - set(placed))}; "
                                         f"listed but missing: {sorted(set(placed) - set(MODULES))}")


# A fresh interpreter per module: a child forked from a parent that has loaded only third-party
# libraries, so no ppo module is imported before the one under test (and paddle loads once).
IMPORT_EACH = r"""
import importlib, json, os, sys, traceback
import numpy, paddle, paddle.distributed, paddlenlp.transformers  # noqa: F401  third-party only
assert not any(m == "ppo" or m.startswith(("ppo.", "rm.")) or m == "rm" for m in sys.modules)
failed, running = {}, {}
width = max(1, len(os.sched_getaffinity(0)))  # children at once: one per core


def reap():
    pid, status = os.wait()
    name, read = running.pop(pid)
    message = os.read(read, 4000).decode()
    os.close(read)
    if status != 0:
        failed[name] = message or "the import ended the process"


for name in json.loads(sys.argv[1]):
    if len(running) >= width:
        reap()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            os.write(write, traceback.format_exc().encode()[-2000:])
            os._exit(1)
    os.close(write)
    running[pid] = (name, read)
while running:
    reap()
print(json.dumps(failed))
"""


def test_every_module_imports_on_its_own():
    env = dict(os.environ, PYTHONPATH=ROOT, MKL_DEBUG_CPU_TYPE="5")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", IMPORT_EACH, json.dumps(sorted(MODULES))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(f"{name}:\n{message}" for name, message in failed.items())


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_are_module_level(module):
    found = [(line, m) for line, m in local_imports(parse(MODULES[module]))
             if m not in LOCAL_IMPORT_ALLOWED.get(module, ())]
    assert not found, f"{MODULES[module]}: function-local imports of {found}; import at module level"


def test_no_module_imports_upward():
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = []
    for module, rel in sorted(MODULES.items()):
        for node in ast.walk(parse(rel)):
            for target in imported_modules(node):
                target = target if target in layer_of else target.rsplit(".", 1)[0]
                if target != module and layer_of.get(target, -1) >= layer_of.get(module, -1):
                    upward.append(f"{rel}:{node.lineno} imports {target} (layer {layer_of[target]}) "
                                  f"from layer {layer_of[module]}")
    assert not upward, "\n".join(upward)


def fleet_private_uses(tree) -> list[tuple[int, str]]:
    """(line, what) of fleet-private attribute reads (also via getattr / hasattr) and imports of
    paddle.distributed."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in FLEET_PRIVATE:
            found.append((node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in FLEET_PRIVATE):
            found.append((node.lineno, node.args[1].value))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.startswith("paddle.distributed"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("paddle.distributed"):
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_fleet_internals_stay_in_the_distributed_modules(module):
    rel = MODULES[module]
    if rel in DISTRIBUTED | BEING_MOVED:
        return
    found = fleet_private_uses(parse(rel))
    assert not found, (f"{rel} reaches into fleet ({found}); go through a function of ppo/distributed/parallel.py or "
                       "ppo/distributed/pipeline.py")


def folder_of(module: str) -> str:
    return next((f for f in sorted(FOLDER_MAY_IMPORT, key=len, reverse=True)
                 if module == f or module.startswith(f + ".")), "")


def test_folders_import_only_the_layers_below_them():
    wrong = []
    for module, rel in sorted(MODULES.items()):
        folder = folder_of(module)
        if not folder:
            continue
        allowed = FOLDER_MAY_IMPORT[folder] | {folder}
        for node in ast.walk(parse(rel)):
            for target in imported_modules(node):
                if not any(target == a or target.startswith(a + ".") for a in allowed if a != "ppo") \
                        and not ("ppo" in allowed and target == "ppo"):
                    wrong.append(f"{rel}:{node.lineno} imports {target}; {folder} may import {sorted(allowed)}")
    assert not wrong, "\n".join(wrong)


def test_the_tree_shows_stages_and_layers():
    """No module named after its package (ppo/ppo_steps.py was a folder in disguise), and no library
    module over MAX_LINES lines."""
    named_after = [rel for rel in MODULES.values()
                   if os.path.basename(rel).startswith(os.path.basename(os.path.dirname(rel)) + "_")
                   or os.path.basename(rel)[:-3] == os.path.basename(os.path.dirname(rel))]
    assert not named_after, named_after
    long = {}
    for rel in MODULES.values():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long[rel] = n
    assert not long, long
