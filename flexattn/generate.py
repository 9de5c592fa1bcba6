"""Batched generation: images and prompts in, one ``Generation`` per input out.

Left padding, a preallocated KV cache, greedy or temperature/top-p sampling, EOS and
``max_new_tokens`` per sample. Three modes share the weights: ``flexattn`` (hierarchical
attention over selected 1008-px features), ``lowres`` (plain LLaVA-1.5 on the 336 view) and
``fullres`` (all 5184 high-res tokens placed in the sequence after the 576 low-res ones).
The 336 view is the 1008 square downsampled (LLaVA-FlexAttn checkpoints) or, for a plain
LLaVA-1.5 checkpoint (``lowres_view="direct"``), the padded image resized straight to 336 px.

``generate`` is a few steps, each a method of its own: check the inputs (``tokenize``), encode
the vision side (``encode_vision``), merge it into the left-padded batch (``build_sequences``),
``prefill``, then ``decode_step`` until every sample is done, while ``GenerationStats`` counts
what the FlexAttention layers did. ``teacher_forward`` (training) runs the same steps over
prompt plus answer in one forward.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from .attention import Activations, FlexInputs, HighResCache, KVCache, StepRecord
from .config import FlexAttnConfig
from .flops import image_cost
from .image import direct_view, lowres_view, normalise, prepare_image, tiles
from .model import LlavaFlexAttnForCausalLM
from .options import MODES
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


@dataclass
class VisionFeatures:
    """The vision side of a batch. f_lr: [B, 576, hidden] (zeros where a sample has no image);
    f_hr: [B, 5184, hidden] row-major, when every tile was encoded up front; pixels:
    [B, 3, Z*t, Z*t] the normalised 1008 views, for tiles encoded lazily."""

    f_lr: torch.Tensor
    f_hr: torch.Tensor | None = None
    pixels: torch.Tensor | None = None


@dataclass
class Sequences:
    """A left-padded batch. embeds: [B, T, hidden]; positions: [B, T]; key_valid: [B, S_max]
    bool (slots T.. are filled by decoding); image_slot: [B] cache slot of the first image
    token; image_pos: [B] its rotary position; sdpa_mask: [B, 1, T, T] bool, None when no
    sample is padded."""

    embeds: torch.Tensor
    positions: torch.Tensor
    key_valid: torch.Tensor
    image_slot: torch.Tensor
    image_pos: torch.Tensor
    lengths: list[int]
    sdpa_mask: torch.Tensor | None

    @property
    def width(self) -> int:  # T
        return self.embeds.shape[1]


@dataclass
class TeacherOutput:
    """What ``teacher_forward`` computed. logits: [B, R, vocab] float32 of the R flex rows;
    targets: [B, R] the answer token each row predicts (-100 where a row is prompt, for answers
    shorter than R); record: the FlexAttention layers' maps and selections; vision, hr: the
    encoded features (low-res, and the high-res blocks that were encoded); activations: with
    ``return_activations``, what the training losses read (``attention.Activations``)."""

    logits: torch.Tensor
    targets: torch.Tensor
    record: StepRecord
    vision: VisionFeatures
    hr: HighResCache | None
    activations: Activations | None = None


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class GenerationStats:
    """Accumulates, on the device, what a generation's FlexAttention layers did per step: the
    selected fraction, the union of cells, prefill counts per layer, layer s's last map, and
    with ``trace`` every selecting layer's masks and maps."""

    def __init__(self, cfg: FlexAttnConfig, batch: int, device: torch.device, trace: bool):
        self.cfg, self.trace = cfg, trace
        n_flex = len(cfg.flex_layers)
        self.sel_sum = torch.zeros(batch, device=device)
        self.sel_steps = torch.zeros(batch, device=device)
        self.cells = torch.zeros(batch, cfg.num_blocks, dtype=torch.bool, device=device)
        self.prefill_counts = torch.zeros(batch, n_flex, dtype=torch.long, device=device)
        self.used_blocks = torch.zeros(batch, dtype=torch.long, device=device)
        self.last_map: torch.Tensor | None = None
        self.masks: list[torch.Tensor] = []
        self.maps: list[torch.Tensor] = []

    def add(self, record: StepRecord, active: torch.Tensor, step: int) -> None:
        """record: one decode step's (one flex row); active: [B] bool samples still going."""
        cfg = self.cfg
        if record.used:
            u = torch.stack(record.used, 1)[:, :, 0]  # [B, n_flex, 81]
            counts = u.sum(-1)
            self.sel_sum += active * (counts.float() * cfg.block_size ** 2 / cfg.hr_tokens).sum(1)
            self.cells |= u.any(1) & active.view(-1, 1)
            self.used_blocks += counts.sum(1)
            if step == 0:
                self.prefill_counts = counts * cfg.block_size ** 2
        self.sel_steps += active * len(cfg.flex_layers)
        amap = record.select_map[:, 0]
        self.last_map = amap if self.last_map is None else torch.where(
            active.view(-1, 1), amap, self.last_map)
        if self.trace:
            self.masks.append(torch.stack(record.masks, 1)[:, :, 0])
            self.maps.append(torch.stack(record.maps, 1)[:, :, 0])

    def frac(self) -> list[float]:
        return (self.sel_sum / self.sel_steps.clamp(min=1)).tolist()

    def blocks_projected(self, hr: HighResCache) -> list[int]:
        """Blocks put through ``k_proj_hd``: each (layer, block) once with reuse, else every
        selected block at every step."""
        if not self.cfg.hr_kv_reuse:
            return self.used_blocks.tolist()
        done = [p.sum(1) for p in hr.projected.values()]
        return torch.stack(done).sum(0).tolist() if done else [0] * self.sel_sum.shape[0]

    def sample_trace(self, i: int) -> dict[str, torch.Tensor]:
        return {"block_masks": torch.stack([m[i] for m in self.masks]).cpu(),
                "maps": torch.stack([m[i] for m in self.maps]).cpu()}


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
        """Change run-time options by name (validated), e.g. ``threshold=255``,
        ``lazy_tiles=False``; structural fields are refused (``FlexAttnConfig.with_runtime``)."""
        self.module.config = self.module.config.with_runtime(**changes)

    @property
    def device(self) -> torch.device:
        return self.module.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.lm_head.weight.dtype

    # 1. inputs ----------------------------------------------------------------------------------
    def tokenize(self, images: list[Image.Image | None], prompts: list[str],
                 image_sizes: list[tuple[int, int] | None] | None = None
                 ) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Prompt ids (``IMAGE_TOKEN_INDEX`` where ``<image>`` stood) and the original (w, h)
        of each image ((1, 1) without one), checked against the images."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        if image_sizes is not None and len(image_sizes) != len(images):
            raise ValueError(f"got {len(image_sizes)} image_sizes for {len(images)} images")
        ids = [self.tokenizer.encode_prompt(p) for p in prompts]
        sizes: list[tuple[int, int]] = []
        for i, (im, seq) in enumerate(zip(images, ids)):
            has = IMAGE_TOKEN_INDEX in seq
            if has and im is None:
                raise ValueError(f"prompt {i} holds <image> but no image was given")
            if not has and im is not None:
                raise ValueError(f"prompt {i} has no <image> placeholder for its image")
            if im is not None and not isinstance(im, Image.Image):
                raise TypeError(f"images[{i}] must be a PIL image, got {type(im).__name__}")
            given = image_sizes[i] if image_sizes is not None and im is not None else None
            sizes.append(tuple(given) if given is not None else im.size if im is not None
                         else (1, 1))
            bad = [t for t in seq if t >= self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:3]} outside the vocabulary"
                                 f" of {self.config.vocab_size}")
        return ids, sizes

    @staticmethod
    def _check_sampling(mode: str, max_new_tokens: int, do_sample: bool, temperature: float,
                        top_p: float) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be within (0, 1], got {top_p}")

    # 2. vision ----------------------------------------------------------------------------------
    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised padded squares [N, 3, 1008, 1008] float32 on the device."""
        cfg = self.config
        squares = [prepare_image(im, cfg.highres_size, cfg.image_mean)[0] for im in images]
        return normalise(squares, cfg.image_mean, cfg.image_std, self.device)

    def encode_vision(self, images: list[Image.Image | None], mode: str) -> VisionFeatures:
        """The low-res features of every image, and the high-res side the mode needs: all
        tiles encoded (``fullres``, or ``flexattn`` without lazy tiles), their pixels kept for
        lazy encoding (``flexattn``), or nothing (``lowres``). All crops of the batch that are
        encoded now go through CLIP in one call."""
        cfg, dtype = self.config, self.dtype
        b = len(images)
        with_img = [i for i in range(b) if images[i] is not None]
        lazy = mode == "flexattn" and cfg.lazy_tiles
        eager_hr = mode == "fullres" or (mode == "flexattn" and not lazy)
        f_lr = torch.zeros(b, cfg.lr_tokens, cfg.hidden_size, device=self.device, dtype=dtype)
        out = VisionFeatures(f_lr)
        if eager_hr:
            out.f_hr = torch.zeros(b, cfg.hr_tokens, cfg.hidden_size, device=self.device,
                                   dtype=dtype)
        if not with_img:
            return out
        t, z2, n = cfg.lowres_size, cfg.zoom_ratio ** 2, len(with_img)
        given = [images[i] for i in with_img]
        if cfg.lowres_view == "direct":  # plain LLaVA-1.5: the 336 view from the image itself
            crops = direct_view(given, t, cfg.image_mean, cfg.image_std, self.device)
            hr = self._pixels(given) if mode != "lowres" else None
        else:  # LLaVA-FlexAttn: the 336 view from the 1008 square
            hr = self._pixels(given)
            crops = lowres_view(hr, t)  # [n, 3, 336, 336]
        if eager_hr:
            crops = torch.cat([crops, tiles(hr, t)])
        feats = self.module.encode_crops(crops.to(dtype))  # [n (1 + Z*Z if eager), 576, hidden]
        out.f_lr = out.f_lr.index_copy(0, torch.tensor(with_img, device=self.device), feats[:n])
        if eager_hr:
            f_hr = self.module.stitch(feats[n:].view(n, z2, cfg.lr_tokens, -1))
            out.f_hr[with_img] = f_hr
        if lazy:
            hr = hr.to(dtype)
            out.pixels = hr if n == b else hr.new_zeros(b, *hr.shape[1:]).index_copy(
                0, torch.tensor(with_img, device=self.device), hr)
        return out

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image], with_hr: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PIL images -> (f_LR [N, 576, hidden], f_HR [N, 5184, hidden] or None)."""
        vision = self.encode_vision(images, "fullres" if with_hr else "lowres")
        return vision.f_lr, vision.f_hr

    # 3. the batch -------------------------------------------------------------------------------
    def build_sequences(self, ids: list[list[int]], vision: VisionFeatures, mode: str,
                        extra_slots: int) -> Sequences:
        """Left-padded embeddings of ``ids`` with each image's features (its 576 low-res
        tokens, then in ``fullres`` its 5184 high-res ones) at its ``<image>`` placeholder,
        merged for the whole batch in one masked scatter. ``extra_slots`` cache slots are left
        for decoding."""
        cfg, device = self.config, self.device
        n_img = cfg.lr_tokens + (cfg.hr_tokens if mode == "fullres" else 0)
        lengths = [len(s) - 1 + n_img if IMAGE_TOKEN_INDEX in s else len(s) for s in ids]
        b, t_max = len(ids), max(lengths)
        rows = []  # token ids per slot, -1 for padding, IMAGE_TOKEN_INDEX for image slots
        image_pos = []
        for seq, length in zip(ids, lengths):
            at = seq.index(IMAGE_TOKEN_INDEX) if IMAGE_TOKEN_INDEX in seq else 0
            image_pos.append(at)
            body = seq[:at] + [IMAGE_TOKEN_INDEX] * n_img + seq[at + 1:] \
                if IMAGE_TOKEN_INDEX in seq else seq
            rows.append([-1] * (t_max - length) + body)
        slots = torch.tensor(rows, device=device)  # [B, T]
        is_img = slots == IMAGE_TOKEN_INDEX
        embeds = self.module.model.embed_tokens(slots.clamp(min=0))
        if mode == "fullres":
            feats = torch.cat([vision.f_lr, vision.f_hr], dim=1)
        else:
            feats = vision.f_lr
        has = is_img.any(1)
        embeds = embeds.masked_scatter(is_img.unsqueeze(-1), feats[has].to(embeds.dtype))
        valid = slots != -1
        embeds = embeds.masked_fill(~valid.unsqueeze(-1), 0.0)  # padding slots hold zeros
        key_valid = torch.zeros(b, t_max + extra_slots, dtype=torch.bool, device=device)
        key_valid[:, :t_max] = valid
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        pad = torch.tensor([t_max - n for n in lengths], device=device)
        image_pos_t = torch.tensor(image_pos, device=device)
        sdpa_mask = None
        if len(set(lengths)) > 1:
            causal = torch.ones(t_max, t_max, dtype=torch.bool, device=device).tril()
            eye = torch.eye(t_max, dtype=torch.bool, device=device)
            sdpa_mask = (causal & (valid[:, None, :] | eye)).unsqueeze(1)  # [B, 1, T, T]
        return Sequences(embeds=embeds, positions=positions, key_valid=key_valid,
                         image_slot=pad + image_pos_t, image_pos=image_pos_t, lengths=lengths,
                         sdpa_mask=sdpa_mask)

    def flex_inputs(self, seq: Sequences, vision: VisionFeatures, images: list,
                    sizes: list[tuple[int, int]], **options) -> FlexInputs:
        """What the FlexAttention layers read: margins, the high-res cache (features, or the
        tiles to encode lazily, and the interpolated rotary tables of the image positions).
        ``options`` are ``FlexInputs`` fields (rows, row_valid, forced, forced_on,
        keep_maps, activations)."""
        cfg, device, dtype = self.config, self.device, self.dtype
        b = len(images)
        keep = margin_keep(torch.tensor(sizes), cfg.lr_grid).to(device)
        img_positions = seq.image_pos.view(-1, 1) + torch.arange(cfg.lr_tokens, device=device)
        cos, sin = self.module.rotary(torch.zeros(1, device=device), img_positions)
        hr_cos, hr_sin = hr_rope_tables(cos, sin, cfg.hr_grid)  # [B, 5184, D] float32
        blocks = to_blocks(vision.f_hr, cfg.hr_grid, cfg.pool_grid) if vision.f_hr is not None \
            else torch.zeros(b, cfg.num_blocks, cfg.block_size ** 2, cfg.hidden_size,
                             device=device, dtype=dtype)
        hr = HighResCache(blocks=blocks, cos=to_blocks(hr_cos, cfg.hr_grid, cfg.pool_grid),
                          sin=to_blocks(hr_sin, cfg.hr_grid, cfg.pool_grid),
                          pixels=vision.pixels, tile_done=None if vision.pixels is None else
                          torch.zeros(b, cfg.zoom_ratio ** 2, dtype=torch.bool, device=device))
        has_image = torch.tensor([im is not None for im in images], device=device)
        return FlexInputs(cfg=cfg, image_slot=seq.image_slot, has_image=has_image, keep=keep,
                          hr=hr, **options)

    def _caches(self, batch: int, length: int) -> list[KVCache]:
        cfg = self.config
        return [KVCache.empty(cfg, batch, length, self.device, self.dtype)
                for _ in range(cfg.num_hidden_layers)]

    # 4. prefill and decode ----------------------------------------------------------------------
    def prefill(self, seq: Sequences, caches: list[KVCache], flex: FlexInputs | None
                ) -> tuple[torch.Tensor, StepRecord]:
        """The whole prompt batch -> logits of its last positions [B, 1, vocab], and what the
        FlexAttention layers did."""
        t = seq.width
        return self.module.forward_step(seq.embeds, seq.positions, 0, seq.sdpa_mask,
                                        seq.key_valid[:, :t], caches, flex)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int,
                    key_valid: torch.Tensor, padded: bool, caches: list[KVCache],
                    flex: FlexInputs | None) -> tuple[torch.Tensor, StepRecord]:
        """One new token per sample. tokens, positions: [B]; slot: the cache slot it fills;
        key_valid: [B, S_max] with ``slot`` set. Returns logits [B, 1, vocab] and the step's
        record. No host synchronisation beyond what the FlexAttention layers need."""
        emb = self.module.model.embed_tokens(tokens).unsqueeze(1)  # [B, 1, hidden]
        step_mask = key_valid[:, None, None, :slot + 1] if padded else None
        return self.module.forward_step(emb, positions.view(-1, 1), slot, step_mask,
                                        key_valid[:, :slot + 1], caches, flex)

    @torch.inference_mode()
    def generate(self, images: list[Image.Image | None], prompts: list[str],
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, return_logits: bool = False,
                 image_sizes: list[tuple[int, int] | None] | None = None,
                 mode: str | None = None, seed: int | None = None,
                 return_trace: bool = False, selections: torch.Tensor | None = None
                 ) -> list[Generation]:
        """Answer ``prompts`` (each with one ``<image>``, or none with a ``None`` image).

        image_sizes: original (w, h) per image when ``images`` are already padded and resized
        squares (selection zeroes the padding margins of the original shape). selections:
        replay a selection instead of the model's own, [B, steps, P*P] bool (every FlexAttention
        layer reads it) or [B, steps, n, P*P] (one per FlexAttention layer); step k of the
        generation uses entry min(k, steps - 1)."""
        mode = mode or self.config.mode
        self._check_sampling(mode, max_new_tokens, do_sample, temperature, top_p)
        ids, sizes = self.tokenize(images, prompts, image_sizes)
        if not prompts:
            return []
        t0 = _now(self.device)
        vision = self.encode_vision(images, mode)
        seq = self.build_sequences(ids, vision, mode, extra_slots=max_new_tokens)
        flex = self.flex_inputs(seq, vision, images, sizes, keep_maps=return_trace) \
            if mode == "flexattn" else None
        if flex is not None and selections is not None:
            flex.forced_on = torch.ones(len(prompts), dtype=torch.bool, device=self.device)
            flex.replay = selections.to(self.device)
            flex.forced = flex.replay[:, 0].unsqueeze(1)
        caches = self._caches(len(prompts), seq.key_valid.shape[1])
        logits, record = self.prefill(seq, caches, flex)
        t1 = _now(self.device)
        stats = GenerationStats(self.config, len(prompts), self.device, return_trace) \
            if flex is not None else None
        tokens, step_logits, times = self._decode(seq, logits, record, caches, flex, stats,
                                                  max_new_tokens, do_sample, temperature,
                                                  top_p, seed, return_logits)
        return self._generations(images, mode, seq, flex, stats, tokens, step_logits,
                                 prefill_ms=(t1 - t0) * 1000.0,
                                 decode_ms=[(t - t1) * 1000.0 for t in times])

    def _decode(self, seq: Sequences, logits: torch.Tensor, record: StepRecord,
                caches: list[KVCache], flex: FlexInputs | None, stats: GenerationStats | None,
                max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                seed: int | None, return_logits: bool
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
        """Choose a token, decode a step, until every sample met EOS or the limit. Returns the
        tokens [B, steps] (-1 after a sample's EOS), the logits each token was chosen from and
        the time at each step. The only host synchronisation of a step is whether all are done."""
        cfg, device = self.config, self.device
        b = seq.embeds.shape[0]
        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(seed)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        positions = torch.tensor(seq.lengths, device=device)
        chosen, step_logits, times = [], [], []
        for step in range(max_new_tokens):
            active = ~done
            if stats is not None:
                stats.add(record, active, step)
            nxt = self._choose(logits[:, -1], do_sample, temperature, top_p, gen)
            chosen.append(torch.where(active, nxt, -1))
            if return_logits:
                step_logits.append(logits[:, -1])
            done |= nxt == cfg.eos_token_id
            finished = bool(done.all())  # the step's one host synchronisation
            times.append(time.perf_counter())
            if finished or step == max_new_tokens - 1:
                break
            slot = seq.width + step
            seq.key_valid[:, slot] = True
            if flex is not None and flex.replay is not None:
                flex.forced = flex.replay[:, min(step + 1, flex.replay.shape[1] - 1)].unsqueeze(1)
            logits, record = self.decode_step(torch.where(done, cfg.pad_token_id, nxt),
                                              positions, slot, seq.key_valid,
                                              seq.sdpa_mask is not None, caches, flex)
            positions = positions + 1
        return torch.stack(chosen, 1), step_logits, times

    def _generations(self, images: list, mode: str, seq: Sequences, flex: FlexInputs | None,
                     stats: GenerationStats | None, tokens: torch.Tensor,
                     step_logits: list[torch.Tensor], prefill_ms: float,
                     decode_ms: list[float]) -> list[Generation]:
        """One ``Generation`` per sample from the decoded tokens and the statistics."""
        cfg = self.config
        b = len(images)
        n_img = cfg.lr_tokens + (cfg.hr_tokens if mode == "fullres" else 0)
        token_rows = tokens.tolist()
        logits = torch.stack(step_logits, 1).cpu() if step_logits else None
        n_flex = len(cfg.flex_layers)
        if stats is not None:
            frac, projected = stats.frac(), stats.blocks_projected(flex.hr)
            counts, cells = stats.prefill_counts.tolist(), stats.cells.tolist()
            maps = stats.last_map.float().cpu()
        else:
            frac, projected = [0.0] * b, [0] * b
            counts, cells, maps = [[0] * n_flex] * b, [[False] * cfg.num_blocks] * b, None
        if flex is not None and flex.hr.tile_done is not None:
            tiles_per = flex.hr.tile_done.sum(1).tolist()
        else:
            tiles_per = [cfg.zoom_ratio ** 2 if mode != "lowres" else 0] * b
        out = []
        for i in range(b):
            ids = [t for t in token_rows[i] if t >= 0]
            has = images[i] is not None and stats is not None
            tiles_i = tiles_per[i] if images[i] is not None else 0
            cost = None if images[i] is None else image_cost(
                cfg, self.module.vision_config, mode, text_tokens=seq.lengths[i] - n_img,
                new_tokens=len(ids), selected_frac=float(frac[i]) if has else 0.0,
                tiles=tiles_i, blocks_projected=projected[i], reuse=cfg.hr_kv_reuse).total / 1e12
            out.append(Generation(
                token_ids=ids, text=self.tokenizer.decode(ids), prompt_tokens=seq.lengths[i],
                hr_selected_per_layer=counts[i] if has else [0] * n_flex,
                hr_selected_frac=float(frac[i]) if has else 0.0,
                hr_cells=[bool(c) for c in cells[i]] if has else [False] * cfg.num_blocks,
                prefill_ms=prefill_ms, decode_ms=decode_ms[len(ids) - 1],
                finish_reason="eos" if ids[-1] == cfg.eos_token_id else "length",
                logits=logits[i, :len(ids)] if logits is not None else None,
                selection_map=maps[i].tolist() if has else None,
                tiles_encoded=tiles_i, hr_blocks_projected=projected[i], tflops=cost,
                trace=stats.sample_trace(i) if has and stats.trace else None))
        return out

    # training -----------------------------------------------------------------------------------
    def teacher_forward(self, images: list[Image.Image | None], prompts: list[str],
                        answers: list[list[int]],
                        image_sizes: list[tuple[int, int] | None] | None = None,
                        forced: torch.Tensor | None = None,
                        forced_on: torch.Tensor | None = None,
                        return_activations: bool = False) -> TeacherOutput:
        """Prompt plus answer in one forward, each answer token predicted exactly as the
        matching step of ``generate`` predicts it (mode ``flexattn``, greedy).

        answers: token ids per sample, EOS included; row j of the R = max answer length flex
        rows is the position that predicts answer token j (the last prompt token for j = 0),
        with its own selection from its own attention at layer s, its high-res keys and the
        interpolated rotary embedding. forced: [B, R, P*P] selection used in place of the
        model's own where ``forced_on`` [B] is set. Runs with autograd when enabled: this is the
        model's differentiable forward. With ``return_activations``, the output also carries
        the final normed hidden state, the hidden state entering layer s, the attention of the
        layers before s, the selecting layers' maps and the high-res reading
        (``attention.Activations``); without it nothing extra is computed."""
        ids, sizes = self.tokenize(images, prompts, image_sizes)
        if any(not a for a in answers) or len(answers) != len(ids):
            raise ValueError("every sample needs a non-empty answer")
        r = max(len(a) for a in answers)
        fed = [p + a[:-1] for p, a in zip(ids, answers)]
        vision = self.encode_vision(images, "flexattn")
        seq = self.build_sequences(fed, vision, "flexattn", extra_slots=0)
        targets = torch.full((len(ids), r), -100, dtype=torch.long, device=self.device)
        for i, a in enumerate(answers):
            targets[i, r - len(a):] = torch.tensor(a, device=self.device)
        flex = self.flex_inputs(seq, vision, images, sizes, rows=r, row_valid=targets >= 0,
                                forced=forced, forced_on=forced_on, keep_maps=True,
                                activations=Activations() if return_activations else None)
        logits, record = self.module.forward_step(
            seq.embeds, seq.positions, 0, seq.sdpa_mask, seq.key_valid, self._caches(
                len(ids), seq.width), flex)
        return TeacherOutput(logits=logits, targets=targets, record=record, vision=vision,
                             hr=flex.hr, activations=flex.activations)

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
