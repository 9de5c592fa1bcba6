"""Batched generation: images and prompts in, one ``Generation`` per input out.

Left padding, a preallocated KV cache, greedy or temperature/top-p sampling, EOS and
``max_new_tokens`` per sample. Three modes share the weights: ``flexattn`` (hierarchical
attention over selected 1008-px features), ``lowres`` (plain LLaVA-1.5 on the 336 view) and
``fullres`` (all 5184 high-res tokens placed in the sequence after the 576 low-res ones)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from .attention import FlexState, KVCache
from .config import MODES, FlexAttnConfig
from .flops import image_cost
from .image import lowres_view, normalise, prepare_image, tiles
from .model import LlavaFlexAttnForCausalLM
from .selection import hr_rope_tables, margin_keep, to_blocks
from .tokenizer import IMAGE_TOKEN_INDEX, PromptTokenizer

log = logging.getLogger(__name__)


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    prompt_tokens: int  # sequence length at prefill, image positions included
    hr_selected_per_layer: list[int]  # prefill, per FlexAttention layer (layer s+1 first)
    hr_selected_frac: float  # mean over FlexAttention layers and steps
    hr_cells: list[bool]  # union of the 9x9 cells used over the generation
    prefill_ms: float  # vision encoding + prefill of the batch this input was in
    decode_ms: float  # decoding until this input finished
    finish_reason: str = "length"  # "eos" or "length"
    tiles_encoded: int = 0  # 336 tiles of the 1008 view that went through CLIP (of Z*Z)
    hr_blocks_projected: int = 0  # 8x8 blocks put through k_proj_hd/v_proj_hd, all layers
    logits: torch.Tensor | None = None  # [n_new, vocab] float32, when asked
    selection_map: list[float] | None = None  # layer s's map at the last step (576 values)
    tflops: float | None = None  # analytical cost of this input (flexattn.flops), no image: None
    trace: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class LlavaFlexAttn:
    """A loaded model: the modules, the tokenizer, the device. Made by ``load_model``."""

    def __init__(self, module: LlavaFlexAttnForCausalLM, tokenizer: PromptTokenizer,
                 model_id: str = "llava-flexattn") -> None:
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id

    @property
    def config(self) -> FlexAttnConfig:
        return self.module.config

    def configure(self, **changes) -> None:
        """Change config fields by name (validated), e.g. ``threshold=255``, ``lazy_tiles=False``."""
        self.module.config = self.module.config.replace(**changes)

    @property
    def device(self) -> torch.device:
        return self.module.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.lm_head.weight.dtype

    # --------------------------------------------------------------------------------------------
    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised padded squares [N, 3, 1008, 1008] float32 on the device."""
        cfg = self.config
        squares = [prepare_image(im, cfg.highres_size, cfg.image_mean)[0] for im in images]
        return normalise(squares, cfg.image_mean, cfg.image_std, self.device)

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image], with_hr: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PIL images -> (f_LR [N, 576, hidden], f_HR [N, 5184, hidden] or None).

        All crops of the batch (low-res views and, with ``with_hr``, the 3x3 tiles) go through
        CLIP in one call."""
        cfg = self.config
        hr = self._pixels(images)
        lr = lowres_view(hr, cfg.lowres_size)  # [N, 3, 336, 336]
        n = len(images)
        crops = torch.cat([lr, tiles(hr, cfg.lowres_size)]) if with_hr else lr
        feats = self.module.encode_crops(crops.to(self.dtype))  # [N (1 + Z*Z), 576, hidden]
        f_lr = feats[:n]
        if not with_hr:
            return f_lr, None
        f_hr = self.module.stitch(feats[n:].view(n, cfg.zoom_ratio ** 2, cfg.lr_tokens, -1))
        return f_lr, f_hr

    @torch.inference_mode()
    def generate(self, images: list[Image.Image | None], prompts: list[str],
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, return_logits: bool = False,
                 image_sizes: list[tuple[int, int] | None] | None = None,
                 mode: str | None = None, seed: int | None = None,
                 return_trace: bool = False) -> list[Generation]:
        """Answer ``prompts`` (each with one ``<image>``, or none with a ``None`` image).

        image_sizes: original (w, h) per image when ``images`` are already padded and resized
        squares (selection zeroes the padding margins of the original shape)."""
        cfg = self.config
        mode = mode or cfg.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        if not prompts:
            return []
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be within (0, 1], got {top_p}")
        if image_sizes is not None and len(image_sizes) != len(images):
            raise ValueError(f"got {len(image_sizes)} image_sizes for {len(images)} images")
        device, dtype = self.device, self.dtype
        b = len(prompts)
        ids = [self.tokenizer.encode_prompt(p) for p in prompts]
        sizes: list[tuple[int, int]] = []
        for i, (im, seq) in enumerate(zip(images, ids)):
            has = IMAGE_TOKEN_INDEX in seq
            if has and im is None:
                raise ValueError(f"prompt {i} holds <image> but no image was given")
            if not has and im is not None:
                raise ValueError(f"prompt {i} has no <image> placeholder for its image")
            if im is not None:
                if not isinstance(im, Image.Image):
                    raise TypeError(f"images[{i}] must be a PIL image, got {type(im).__name__}")
                given = image_sizes[i] if image_sizes is not None else None
                sizes.append(tuple(given) if given is not None else im.size)
            else:
                sizes.append((1, 1))
            bad = [t for t in seq if t >= cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:3]} outside the vocabulary"
                                 f" of {cfg.vocab_size}")

        t0 = _now(device)
        # 1. vision ---------------------------------------------------------------------------
        with_img = [i for i in range(b) if images[i] is not None]
        lazy = mode == "flexattn" and cfg.lazy_tiles
        want_hr = mode == "fullres" or (mode == "flexattn" and not lazy)
        hidden = cfg.hidden_size
        f_lr = torch.zeros(b, cfg.lr_tokens, hidden, device=device, dtype=dtype)
        f_hr = torch.zeros(b, cfg.hr_tokens, hidden, device=device, dtype=dtype) \
            if want_hr else None
        tile_pixels = None
        if with_img and lazy:
            hr = self._pixels([images[i] for i in with_img])
            f_lr[with_img] = self.module.encode_crops(
                lowres_view(hr, cfg.lowres_size).to(dtype))
            t = cfg.lowres_size
            tile_pixels = torch.zeros(b, cfg.zoom_ratio ** 2, 3, t, t, device=device, dtype=dtype)
            tile_pixels[with_img] = tiles(hr, t).view(len(with_img), -1, 3, t, t).to(dtype)
            del hr
        elif with_img:
            lr_i, hr_i = self.encode_images([images[i] for i in with_img], want_hr)
            f_lr[with_img] = lr_i
            if want_hr:
                f_hr[with_img] = hr_i

        # 2. sequences, left padded -----------------------------------------------------------
        n_img = cfg.lr_tokens + (cfg.hr_tokens if mode == "fullres" else 0)
        lengths = [len(s) - 1 + n_img if IMAGE_TOKEN_INDEX in s else len(s) for s in ids]
        t_max = max(lengths)
        s_max = t_max + max_new_tokens
        embed = self.module.model.embed_tokens
        embeds = torch.zeros(b, t_max, hidden, device=device, dtype=dtype)
        key_valid = torch.zeros(b, s_max, dtype=torch.bool, device=device)
        positions = torch.zeros(b, t_max, dtype=torch.long, device=device)
        image_slot = torch.zeros(b, dtype=torch.long, device=device)
        image_pos = torch.zeros(b, dtype=torch.long, device=device)
        for i, seq in enumerate(ids):
            pad = t_max - lengths[i]
            key_valid[i, pad:t_max] = True
            positions[i, pad:] = torch.arange(lengths[i], device=device)
            if IMAGE_TOKEN_INDEX in seq:
                at = seq.index(IMAGE_TOKEN_INDEX)
                before = torch.tensor(seq[:at], device=device)
                after = torch.tensor(seq[at + 1:], device=device, dtype=torch.long)
                parts = [embed(before), f_lr[i]]
                if mode == "fullres":
                    parts.append(f_hr[i])
                parts.append(embed(after))
                embeds[i, pad:] = torch.cat(parts)
                image_slot[i] = pad + at
                image_pos[i] = at
            else:
                embeds[i, pad:] = embed(torch.tensor(seq, device=device))
        has_image = torch.tensor([im is not None for im in images], device=device)

        flex = None
        if mode == "flexattn":
            keep = margin_keep(torch.tensor(sizes), cfg.lr_grid).to(device)
            img_positions = image_pos.view(-1, 1) + torch.arange(cfg.lr_tokens, device=device)
            cos, sin = self.module.rotary(torch.zeros(1, device=device), img_positions)
            hr_cos, hr_sin = hr_rope_tables(cos, sin, cfg.hr_grid)  # [B, 5184, D] float32
            flex = FlexState(
                cfg=cfg, image_slot=image_slot, has_image=has_image, keep=keep,
                # lazy tiles fill the block-major features tile by tile as they are selected
                hr_blocks=to_blocks(f_hr, cfg.hr_grid, cfg.pool_grid) if f_hr is not None
                else torch.zeros(b, cfg.num_blocks, cfg.block_size ** 2, hidden, device=device,
                                 dtype=dtype),
                hr_cos=to_blocks(hr_cos, cfg.hr_grid, cfg.pool_grid),
                hr_sin=to_blocks(hr_sin, cfg.hr_grid, cfg.pool_grid), trace=return_trace,
                tile_pixels=tile_pixels, encode_tiles=self.module.encode_crops)
        caches = [KVCache.empty(cfg, b, s_max, device, dtype) for _ in range(cfg.num_hidden_layers)]

        # 3. prefill --------------------------------------------------------------------------
        padded = len(set(lengths)) > 1
        sdpa_mask = None  # no padding: plain causal attention
        if padded:
            causal = torch.ones(t_max, t_max, dtype=torch.bool, device=device).tril()
            eye = torch.eye(t_max, dtype=torch.bool, device=device)
            sdpa_mask = (causal & (key_valid[:, None, :t_max] | eye)).unsqueeze(1)  # [B,1,T,T]
        logits = self.module.forward_step(embeds, positions, 0, sdpa_mask, key_valid[:, :t_max],
                                          caches, flex)
        t1 = _now(device)
        prefill_ms = (t1 - t0) * 1000.0

        # 4. decode ---------------------------------------------------------------------------
        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(seed)
        n_flex = len(cfg.flex_layers)
        tokens: list[list[int]] = [[] for _ in range(b)]
        chosen_logits: list[list[torch.Tensor]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=device)
        finish = ["length"] * b
        decode_ms = [0.0] * b
        sel_sum = torch.zeros(b, device=device)
        sel_steps = torch.zeros(b, device=device)
        cells = torch.zeros(b, cfg.num_blocks, dtype=torch.bool, device=device)
        prefill_counts = [[0] * n_flex for _ in range(b)]
        last_map = None
        trace_masks, trace_maps = [], []
        pos_next = torch.tensor(lengths, device=device)
        for step in range(max_new_tokens):
            active = ~done
            if flex is not None:
                used = flex.step_used  # one [B, 81] per FlexAttention layer that attended
                if used:
                    u = torch.stack(used, 1)  # [B, n_flex, 81]
                    sel_sum += active * (u.sum(-1).float() * cfg.block_size ** 2
                                         / cfg.hr_tokens).sum(1)
                    cells |= u.any(1) & active.view(-1, 1)
                    if step == 0:
                        counts = (u.sum(-1) * cfg.block_size ** 2).tolist()
                        prefill_counts = [[int(c) for c in row] for row in counts]
                sel_steps += active * n_flex
                last_map = flex.last_map if last_map is None else torch.where(
                    active.view(-1, 1), flex.last_map, last_map)
                if return_trace:
                    trace_masks.append(torch.stack(flex.step_masks, 1))
                    trace_maps.append(torch.stack(flex.step_maps, 1))
            nxt = self._choose(logits, do_sample, temperature, top_p, gen)
            now = _now(device)
            for i in active.nonzero().flatten().tolist():
                tokens[i].append(int(nxt[i]))
                if return_logits:
                    chosen_logits[i].append(logits[i].cpu())
                if int(nxt[i]) == cfg.eos_token_id:
                    finish[i] = "eos"
                decode_ms[i] = (now - t1) * 1000.0
            done |= nxt == cfg.eos_token_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            slot = t_max + step
            key_valid[:, slot] = True
            emb = embed(torch.where(done, cfg.pad_token_id, nxt)).unsqueeze(1)  # [B, 1, hidden]
            step_mask = key_valid[:, None, None, :slot + 1] if padded else None
            logits = self.module.forward_step(emb, pos_next.view(-1, 1), slot, step_mask,
                                              key_valid[:, :slot + 1], caches, flex)
            pos_next = pos_next + 1

        results = []
        frac = (sel_sum / sel_steps.clamp(min=1)).tolist()
        projected = flex.blocks_projected.tolist() if flex is not None else [0] * b
        if flex is not None and flex.tile_done is not None:
            tiles_per_sample = flex.tile_done.sum(1).tolist()
        else:
            full = cfg.zoom_ratio ** 2 if mode != "lowres" else 0
            tiles_per_sample = [full if im is not None else 0 for im in images]
        for i in range(b):
            has = images[i] is not None and flex is not None
            cost = None
            if images[i] is not None:
                cost = image_cost(
                    cfg, self.module.vision_config, mode, text_tokens=lengths[i] - n_img,
                    new_tokens=len(tokens[i]), selected_frac=float(frac[i]) if has else 0.0,
                    tiles=tiles_per_sample[i], blocks_projected=projected[i],
                    reuse=cfg.hr_kv_reuse).total / 1e12
            trace = None
            if return_trace and trace_masks:
                trace = {"block_masks": torch.stack([m[i] for m in trace_masks]).cpu(),
                         "maps": torch.stack([m[i] for m in trace_maps]).cpu()}
            results.append(Generation(
                token_ids=tokens[i], text=self.tokenizer.decode(tokens[i]),
                prompt_tokens=lengths[i],
                hr_selected_per_layer=prefill_counts[i] if has else [0] * n_flex,
                hr_selected_frac=float(frac[i]) if has else 0.0,
                hr_cells=[bool(c) for c in cells[i].tolist()],
                prefill_ms=prefill_ms, decode_ms=decode_ms[i], finish_reason=finish[i],
                logits=torch.stack(chosen_logits[i]) if return_logits else None,
                selection_map=last_map[i].float().cpu().tolist() if has and last_map is not None
                else None,
                tiles_encoded=tiles_per_sample[i],
                hr_blocks_projected=projected[i],
                tflops=cost,
                trace=trace))
        return results

    @staticmethod
    def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                gen: torch.Generator) -> torch.Tensor:
        """logits: [B, V] float32 -> next token ids [B]."""
        if not do_sample:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest nucleus >= top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            pick = torch.multinomial(sorted_p, 1, generator=gen)
            return order.gather(1, pick).view(-1)
        return torch.multinomial(probs, 1, generator=gen).view(-1)
