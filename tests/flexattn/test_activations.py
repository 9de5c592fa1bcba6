"""teacher_forward(return_activations=True): the same logits as without, plus what training
losses read (final normed state, the state entering layer s, the attention of the layers
before s by the layer's own rule, the high-res reading), all in the autograd graph; and no
training-only state on the attention modules."""

from __future__ import annotations

import torch

from flexattn.attention import attention_probs, row_scores

from .test_generate import mixed_inputs


def test_activations_change_nothing_and_hold_what_the_losses_read(golden_model):
    images, prompts = mixed_inputs()
    images, prompts = images[:3], prompts[:3]
    gens = [golden_model.generate([im], [p], max_new_tokens=n)[0]
            for im, p, n in zip(images, prompts, (4, 2, 3))]
    answers = [g.token_ids for g in gens]
    with torch.no_grad():
        plain = golden_model.teacher_forward(images, prompts, answers)
    out = golden_model.teacher_forward(images, prompts, answers, return_activations=True)
    assert plain.activations is None
    torch.testing.assert_close(out.logits, plain.logits, atol=0, rtol=0)
    acts, cfg = out.activations, golden_model.config
    b, r = out.targets.shape
    assert acts.final.shape == acts.entering.shape == (b, r, cfg.hidden_size)
    lm = golden_model.module.lm_head(acts.final).float()
    torch.testing.assert_close(lm, out.logits, atol=1e-5, rtol=0)
    assert len(acts.row_attention) == cfg.select_layer
    for probs in acts.row_attention:  # [B, R, S]: rows sum to 1, causal
        assert probs.shape[:2] == (b, r)
        torch.testing.assert_close(probs.sum(-1), torch.ones(b, r), atol=1e-5, rtol=0)
        s = probs.shape[-1]
        later = torch.arange(s).view(1, -1) > torch.arange(s - r, s).view(-1, 1)  # [R, S]
        assert (probs[:, later] == 0).all()
    assert acts.maps is out.record.maps
    assert acts.hr_read, "no FlexAttention layer read high-res keys"
    for probs, order in acts.hr_read:
        assert probs.shape[:2] == (b, r) and order.shape[0] == b
        assert (probs.sum(-1) <= 1 + 1e-5).all()
    loss = sum(p.sum() for p in acts.row_attention) + acts.entering.sum() + \
        sum(p.sum() for p, _ in acts.hr_read)
    loss.backward()
    assert golden_model.module.model.layers[0].self_attn.q_proj.weight.grad is not None
    golden_model.module.zero_grad(set_to_none=True)
    assert not any(hasattr(layer.self_attn, "hr_read")
                   for layer in golden_model.module.model.layers)


def test_attention_probs_mask_padding_and_later_slots():
    torch.manual_seed(0)
    q, keys = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 7, 8)  # 4 heads over 2 kv heads
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    probs = attention_probs(q, keys, valid)  # [B, Hkv, rep, R, S]
    assert probs.shape == (2, 2, 2, 3, 7)
    assert (probs[1, ..., :2] == 0).all()
    assert (probs[:, :, :, 0, 5:] == 0).all() and (probs[:, :, :, 1, 6:] == 0).all()
    # head 1 is the second query head of kv head 0 (repeat_interleave grouping)
    manual = torch.softmax(row_scores(q, keys, valid), -1)
    ref = (q[0, 1] @ keys[0, 0].T) * 8 ** -0.5
    ref = ref.masked_fill(torch.arange(7).view(1, -1) > torch.arange(4, 7).view(-1, 1), -1e30)
    torch.testing.assert_close(manual[0, 0, 1], torch.softmax(ref, -1))
