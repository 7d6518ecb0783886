"""Padding-free collation of preference examples: every sequence of a batch in one row.

:class:`PackedPreferenceCollator` takes the examples TRL's ``DPOTrainer`` tokenizes (``prompt_ids``,
``chosen_ids``, ``rejected_ids``, optionally ``ref_chosen_logps`` / ``ref_rejected_logps``) and returns
what the padded ``DataCollatorForPreference`` returns, packed: ``input_ids`` (1, total) holding
prompt + chosen of every example, then prompt + rejected of every example (sequences 0..B-1 chosen,
B..2B-1 rejected, as in the padded layout), ``position_ids`` (1, total) restarting at 0 for each
sequence (which keeps the sequences apart in a Hugging Face model's attention when no attention mask
is given), ``completion_mask`` (1, total), and the reference log-probs when the examples carry them.
No ``attention_mask``: a model given one would attend across the packed sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class PackedPreferenceCollator:
    """``max_length`` / ``truncation_mode``: per-sequence truncation as TRL's padded collator does it
    (``"keep_start"`` or ``"keep_end"``), before packing."""

    max_length: Optional[int] = None
    truncation_mode: str = "keep_start"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        ids, completion = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for example in examples:
                prompt = list(example["prompt_ids"])
                seq = prompt + list(example[side])
                mask = [0] * len(prompt) + [1] * len(example[side])
                if self.max_length is not None:
                    cut = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(
                        -self.max_length, None)  # fmt: skip
                    seq, mask = seq[cut], mask[cut]
                if not seq:
                    raise ValueError("a packed preference batch cannot hold an empty sequence (prompt and completion)")
                ids.append(torch.tensor(seq, dtype=torch.long))
                completion.append(torch.tensor(mask, dtype=torch.long))
        out = {
            "input_ids": torch.cat(ids).unsqueeze(0),
            "position_ids": torch.cat([torch.arange(len(s)) for s in ids]).unsqueeze(0),
            "completion_mask": torch.cat(completion).unsqueeze(0),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                out[key] = torch.tensor([example[key] for example in examples])
        return out
