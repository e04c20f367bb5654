"""Answers computed without the platform's engine, to check the engine against.

One adapter loaded on its own by plain PEFT (``PeftModel.from_pretrained``) on a fresh copy
of the base, each question alone (no batch, no padding), greedy ``generate``. Only the
prompt and image layout come from the platform (the backbone family's collator): what is
under test is which adapter answers which row of a mixed batch.
"""

from __future__ import annotations

from typing import Sequence

import torch


def adapter_answers(model_path: str, adapter_dir: str | None, prompts: Sequence[str], images: Sequence,
                    max_new_tokens: int, min_new_tokens: int = 0) -> list[str]:
    """Greedy answers of one adapter (None = the base model), one row at a time."""
    from peft import PeftModel

    from mllmcl.models import load_backbone

    bb = load_backbone(model_path)
    model = PeftModel.from_pretrained(bb.model, adapter_dir) if adapter_dir else bb.model
    model.eval()
    tok = bb.collator.tok
    out = []
    with torch.no_grad():
        for prompt, image in zip(prompts, images):
            batch = bb.collator.prompt_batch([prompt], bb.collator.images.pixels([image]))
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None,
                                 do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            new = gen[0, batch["input_ids"].shape[1]:].tolist()
            if tok.eos_token_id in new:
                new = new[:new.index(tok.eos_token_id)]
            out.append(tok.decode(new, skip_special_tokens=True).strip())
    return out


def assert_mixed_batch_matches_reference(engine, model_path: str, adapter_dirs: dict[str, str | None],
                                         prompts: Sequence[str], images: Sequence, max_new_tokens: int,
                                         min_new_tokens: int = 0) -> None:
    """Every row of one mixed-adapter batch, each row assigned each adapter in turn, answers as
    that adapter alone (plain PEFT), and at least two adapters disagree on one input (else the
    check could not tell the adapters apart)."""
    names = list(adapter_dirs)
    want = {n: adapter_answers(model_path, adapter_dirs[n], prompts, images, max_new_tokens, min_new_tokens)
            for n in names}
    assert any(len({want[n][i] for n in names}) > 1 for i in range(len(prompts))), \
        f"the adapters {names} agree on every input: the check cannot tell them apart"
    for shift in range(len(names)):  # every row meets every adapter, rows of a batch use different ones
        rows = [names[(i + shift) % len(names)] for i in range(len(prompts))]
        got = engine.generate(list(prompts), list(images), rows, [max_new_tokens] * len(prompts),
                              [min_new_tokens] * len(prompts) if min_new_tokens else None)
        for i, name in enumerate(rows):
            assert got[i].text == want[name][i], (f"row {i} with adapter {name!r}: engine {got[i].text!r}, "
                                                  f"plain PEFT {want[name][i]!r}")
