"""Where the DPO stage's reference log-probs come from (``reference_mode``).

* ``model``: a separate frozen copy (``ref_model_name_or_path``), optionally offloaded between forwards;
* ``lora``: the policy itself with its adapters off (``AdaptersOff``): no second copy;
* ``precompute``: one pass over the train and eval pairs before training, kept in
  ``output_dir/reference_log_probs/`` (``log_probs.npz``, read without pickle, and
  ``fingerprint.json``: the data, tokenizer and reference it was computed from, and the table's
  CRC-32C).  A resumed run reuses it; a run whose data, tokenizer or reference differ is refused;
* ``none``: reference-free (SimPO, ORPO, or ``reference_free``): the reference log-probs are 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import paddle
from tqdm import tqdm

from ppo.core import preference as pref
from ppo.core.algorithms import gather_log_probs
from ppo.core.errors import UserError
from ppo.distributed import parallel
from ppo.distributed.offload import default_store, offload_model, reload_model
from ppo.models import position_ids_from_mask
from ppo.rollout.collect import log_probs_from_logits
from ppo.stages.single_model import data_shard, gather_shard_rows
from ppo.storage.files import first_line, read_json
from ppo.storage.manifest import file_crc32c

logger = logging.getLogger("ppo")
TABLE_DIR = "reference_log_probs"
TABLE, FINGERPRINT = "log_probs.npz", "fingerprint.json"


def answer_log_probs(model, ids, mask, answer_mask) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(sum [B], count [B])`` of ``log model(token t+1 | tokens <= t)`` over the answer positions
    (``answer_mask`` [B, T - 1]); positions counted over real tokens (any padding side)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), return_dict=True)
    log_probs, _ = log_probs_from_logits(out.logits, ids)
    return pref.sequence_log_probs(log_probs.astype("float32"), answer_mask)


def pair_log_probs(model, batch) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """``(chosen sum, rejected sum, chosen tokens, rejected tokens)`` [B] each: both answers of every
    pair in one forward, of a ``[2B, T]`` batch or (``pack_pairs``) of one packed row per pair."""
    if "packed_input_ids" in batch:
        return packed_pair_log_probs(model, batch)
    B = batch["better_input_ids"].shape[0]
    ids = paddle.concat([batch["better_input_ids"], batch["worse_input_ids"]], axis=0)
    mask = paddle.concat([batch["better_attention_mask"], batch["worse_attention_mask"]], axis=0)
    answer = paddle.concat([batch["better_answer_mask"], batch["worse_answer_mask"]], axis=0)
    total, count = answer_log_probs(model, ids, mask, answer)
    return total[:B], total[B:], count[:B], count[B:]


def packed_pair_log_probs(model, batch):
    """``pair_log_probs`` of pairs packed one per row (``ppo.data.preference.collate_packed_pairs``)."""
    ids = batch["packed_input_ids"]
    out = model(input_ids=ids, attention_mask=batch["packed_attention_mask"],
                position_ids=batch["packed_position_ids"], return_dict=True)
    return packed_from_logits(out.logits, ids, batch["packed_chosen_mask"], batch["packed_rejected_mask"],
                              batch["packed_first_rejected"])


def packed_from_logits(logits, ids, chosen_mask, rejected_mask, first):
    """The pair log-probs of packed rows from their logits [B, T, V]: the chosen answer's tokens
    scored at their own positions, the rejected answer's first token at the prompt's last position
    (``first`` [B, 2]: that position and the token) and the rest inside the rejected segment, which
    never sees the chosen answer."""
    log_probs, _ = log_probs_from_logits(logits, ids)
    log_probs = log_probs.astype("float32")
    chosen, n_chosen = pref.sequence_log_probs(log_probs, chosen_mask)
    rest, n_rest = pref.sequence_log_probs(log_probs, rejected_mask)
    at = first[:, :1].unsqueeze(-1).expand([ids.shape[0], 1, logits.shape[-1]])
    head = gather_log_probs(paddle.take_along_axis(logits, at, axis=1), first[:, 1:]).squeeze(1).astype("float32")
    return chosen, rest + head, n_chosen, n_rest + 1


# -- fingerprints of what a table was computed from --------------------------------------------


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(datasets: dict) -> str:
    """Hash of the tokenized items of every split (``{"train": dataset, "eval": dataset or None}``)."""
    return _sha({split: [d[i] for i in range(len(d))] if d is not None else None for split, d in datasets.items()})


def tokenizer_fingerprint(tokenizer) -> str:
    return _sha({"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens})


def model_fingerprint(path: str) -> str:
    """Hash of a model folder's config and the CRC-32C of its weight files (safetensors or pdparams)."""
    names = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".pdparams", ".json"))
                   and not n.startswith(("tokenizer", "special_tokens", "trainer_state", "manifest")))
    return _sha({n: file_crc32c(os.path.join(path, n)) for n in names})


# -- the table -----------------------------------------------------------------------------------


def compute_table(model, datasets: dict, batch_size: int, precision, disable_tqdm: bool) -> dict:
    """``{"<split>_chosen": [N], "<split>_rejected": [N]}`` float64 reference log-probs of every pair
    of every split, sharded over the data ranks and gathered."""
    ctx = parallel.context()
    table = {}
    model.eval()
    for split, data in datasets.items():
        if data is None:
            continue
        mine, per_rank = data_shard(len(data), ctx)
        chosen, rejected = [np.zeros(0)], [np.zeros(0)]
        collate = data.get_collator()
        with paddle.no_grad():
            for start in tqdm(range(0, len(mine), batch_size), desc=f"reference log-probs ({split})",
                              disable=disable_tqdm or not ctx.is_main, dynamic_ncols=True):
                batch = collate([data[i] for i in mine[start:start + batch_size]])
                with precision.autocast():
                    c, r, _, _ = pair_log_probs(model, batch)
                chosen.append(c.numpy().astype(np.float64))
                rejected.append(r.numpy().astype(np.float64))
        pairs = gather_shard_rows(np.stack([np.concatenate(chosen), np.concatenate(rejected)], axis=1), per_rank)
        table[f"{split}_chosen"], table[f"{split}_rejected"] = pairs[:, 0], pairs[:, 1]
    return table


def save_table(output_dir: str, table: dict, fingerprint: dict) -> None:
    """Main rank: the table and its fingerprint, written into a temporary folder and renamed."""
    folder = os.path.join(output_dir, TABLE_DIR)
    tmp = os.path.join(output_dir, f".tmp-{TABLE_DIR}")
    os.makedirs(tmp, exist_ok=True)
    np.savez(os.path.join(tmp, TABLE), **table)
    record = {**fingerprint, "table_crc32c": file_crc32c(os.path.join(tmp, TABLE))}
    with open(os.path.join(tmp, FINGERPRINT), "w") as f:
        json.dump(record, f, indent=1)
    if os.path.isdir(folder):  # overwrite_output_dir cleared it; a leftover of a failed start otherwise
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
    os.replace(tmp, folder)


def load_table(output_dir: str, fingerprint: dict) -> dict | None:
    """The stored table when it matches ``fingerprint``; None when there is none; UserError (one line)
    when it is damaged or was computed from other data, tokenizer or reference."""
    folder = os.path.join(output_dir, TABLE_DIR)
    if not os.path.isdir(folder):
        return None
    stored = read_json(os.path.join(folder, FINGERPRINT), "reference log-probs fingerprint")
    file = os.path.join(folder, TABLE)
    if not os.path.isfile(file) or stored.get("table_crc32c") != file_crc32c(file):
        raise UserError(f"'{file}' is missing or damaged (its CRC-32C differs from {FINGERPRINT}); start afresh "
                        "with --overwrite_output_dir true to compute it again")
    changed = [what for what in ("data", "tokenizer", "reference") if stored.get(what) != fingerprint[what]]
    if changed:
        raise UserError(f"the reference log-probs in '{folder}' were computed for another "
                        f"{' and '.join(changed)} than this run's; resume with the run's own settings, or start "
                        "afresh with --overwrite_output_dir true (or another output_dir)")
    try:
        with np.load(file, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except Exception as e:  # BadZipFile, ValueError (a pickled array), OSError, EOFError
        raise UserError(f"reference log-probs table '{file}' cannot be read (damaged or not a .npz archive): "
                        f"{first_line(e)}; start afresh with --overwrite_output_dir true to compute it again") from None


class Reference:
    """Reference log-probs of a micro-batch of pairs, the same call for every mode."""

    def __init__(self, mode: str, model=None, table: dict | None = None, offload: bool = False):
        self.mode, self.model, self.table = mode, model, table
        self.store = default_store() if offload and model is not None else None
        if self.store is not None:
            offload_model(self.model, self.store)

    def pairs(self, batch, split: str, precision) -> tuple[paddle.Tensor, paddle.Tensor]:
        """``(ref chosen, ref rejected)`` [B] for ``batch`` (its ``index`` [B]: rows of the split)."""
        B = batch["index"].shape[0]
        if self.mode == "none":
            zero = paddle.zeros([B], dtype="float32")
            return zero, zero
        if self.mode == "precompute":
            rows = batch["index"].numpy()
            return (paddle.to_tensor(self.table[f"{split}_chosen"][rows].astype(np.float32)),
                    paddle.to_tensor(self.table[f"{split}_rejected"][rows].astype(np.float32)))
        c, r, _, _ = self.completions(lambda m: pair_log_probs(m, batch), precision)
        return c, r

    def completions(self, forward, precision):
        """``forward(model)`` under no_grad with the reference model in memory."""
        if self.store is not None:
            reload_model(self.model, self.store)
        try:
            with paddle.no_grad(), precision.autocast():
                out = forward(self.model)
            return tuple(t.detach() for t in out)
        finally:
            if self.store is not None:
                offload_model(self.model, self.store)
