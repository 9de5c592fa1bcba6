"""generate's steps on their own: a prefill and decode steps driven by hand equal the matching
steps of a full generation, and a decode step synchronises with the host a fixed number of times,
whatever the batch size."""

from __future__ import annotations

import itertools

import torch
from torch.overrides import TorchFunctionMode

from .conftest import CASES, PROMPT, golden_case
from .test_generate import mixed_inputs


def test_decode_step_from_a_prefilled_state_equals_generation(golden_model):
    images, prompts = mixed_inputs()
    images, prompts = images[:3], prompts[:3]
    full = golden_model.generate(images, prompts, max_new_tokens=4, return_logits=True)
    m = golden_model
    with torch.inference_mode():
        ids, sizes = m.tokenize(images, prompts)
        vision = m.encode_vision(images, "flexattn")
        seq = m.build_sequences(ids, vision, "flexattn", extra_slots=4)
        flex = m.flex_inputs(seq, vision, images, sizes)
        caches = m._caches(3, seq.key_valid.shape[1])
        logits, _ = m.prefill(seq, caches, flex)
        positions = torch.tensor(seq.lengths)
        for step in range(3):
            for i, g in enumerate(full):
                torch.testing.assert_close(logits[i, -1], g.logits[step], atol=1e-4, rtol=0)
            tokens = torch.tensor([g.token_ids[step] for g in full])
            slot = seq.width + step
            seq.key_valid[:, slot] = True
            logits, record = m.decode_step(tokens, positions + step, slot, seq.key_valid,
                                           seq.sdpa_mask is not None, caches, flex)
            assert len(record.used) == len(m.config.flex_layers)
        for i, g in enumerate(full):
            torch.testing.assert_close(logits[i, -1], g.logits[3], atol=1e-4, rtol=0)


class HostSyncs(TorchFunctionMode):
    """Counts the calls that hand a tensor's values to Python (a device synchronisation on a
    GPU)."""

    NAMES = frozenset({"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero"})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def syncs_per_decode_step(model, batch: int) -> list[int]:
    image, _ = golden_case(CASES[2])
    counter = HostSyncs()
    marks = []
    step = model.decode_step

    def counted(*args, **kwargs):
        marks.append(counter.count)
        return step(*args, **kwargs)

    model.decode_step = counted
    try:
        with counter:
            model.generate([image] * batch, [PROMPT] * batch, max_new_tokens=6)
    finally:
        del model.decode_step
    return [b - a for a, b in itertools.pairwise(marks)]


def test_host_syncs_per_decode_step_do_not_grow_with_the_batch(golden_model):
    old = golden_model.config.eos_token_id
    golden_model.configure(eos_token_id=golden_model.config.vocab_size + 7)  # never chosen
    try:
        one = syncs_per_decode_step(golden_model, 1)
        four = syncs_per_decode_step(golden_model, 4)
    finally:
        golden_model.configure(eos_token_id=old)
    assert len(one) == len(four) == 4
    n_flex = len(golden_model.config.flex_layers)
    # the loop's "are all done?", and per FlexAttention layer: which tiles to encode, which
    # blocks to gather and project
    assert set(one) == set(four) == {1 + 2 * n_flex}, (one, four)
