"""Prompt tokenisation the way original LLaVA does it: split on ``<image>``, encode each chunk as
a whole text (sentencepiece's dummy prefix applies to every chunk), BOS on the first chunk only.

Hugging Face's ``LlavaProcessor`` instead tokenizes the whole prompt with ``<image>`` as a
special token; a Llama tokenizer with ``legacy=False`` (transformers' default) puts no dummy
prefix on the text after it. ``prefix_after_image=False`` encodes that way (the loader sets it
for Hugging Face LLaVA folders), so that the ids equal the processor's."""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for where the image tokens go


class PromptTokenizer:
    """Wraps a sentencepiece ``tokenizer.model`` (or, failing that, a ``tokenizer.json``)."""

    def __init__(self, path: str | Path, bos_id: int = 1, eos_id: int = 2,
                 prefix_after_image: bool = True) -> None:
        path = Path(path)
        self.path = path
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.prefix_after_image = prefix_after_image
        self._sp_bare = None  # sentencepiece without the dummy prefix, made when first needed
        if path.name == "tokenizer.model" or path.suffix == ".model":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(path))
            self._tok = None
            self.vocab_size = self._sp.vocab_size()
            if self._sp.bos_id() >= 0:
                self.bos_id = self._sp.bos_id()
            if self._sp.eos_id() >= 0:
                self.eos_id = self._sp.eos_id()
        else:
            from tokenizers import Tokenizer

            self._sp = None
            self._tok = Tokenizer.from_file(str(path))
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=False)
        self.special_ids = {self.bos_id, self.eos_id, 0}

    @classmethod
    def from_dir(cls, directory: str | Path, bos_id: int = 1, eos_id: int = 2,
                 prefix_after_image: bool = True) -> PromptTokenizer:
        d = Path(directory)
        for name in ("tokenizer.model", "tokenizer.json"):
            if (d / name).is_file():
                return cls(d / name, bos_id=bos_id, eos_id=eos_id,
                           prefix_after_image=prefix_after_image)
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {d}")

    def encode_text(self, text: str, prefix: bool = True) -> list[int]:
        """``text`` as ids; ``prefix=False``: as the text after ``<image>`` is encoded by a
        tokenizer that puts no dummy prefix there (see the module docstring)."""
        if self._sp is not None:
            return list((self._sp if prefix else self._bare()).encode(text))
        image_id = None if prefix else self._tok.token_to_id(IMAGE_TOKEN)
        if image_id is not None:  # encoded after <image>, as the processor sees it
            ids = self._tok.encode(IMAGE_TOKEN + text, add_special_tokens=False).ids
            if ids[:1] == [image_id]:
                return ids[1:]
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def _bare(self):
        """The sentencepiece model with ``add_dummy_prefix`` off: text that follows a special
        token, as Hugging Face's Llama tokenizer (``legacy=False``) encodes it."""
        if self._sp_bare is None:
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self.path.read_bytes())
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._sp_bare

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt text -> ids with ``IMAGE_TOKEN_INDEX`` where ``<image>`` stood (at most once)."""
        chunks = prompt.split(IMAGE_TOKEN)
        if len(chunks) > 2:
            raise ValueError(f"a prompt may hold one {IMAGE_TOKEN}, this one holds"
                             f" {len(chunks) - 1}")
        ids = [self.bos_id]
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            if chunk:
                ids.extend(self.encode_text(chunk, prefix=i == 0 or self.prefix_after_image))
        return ids

    def decode(self, ids: list[int]) -> str:
        # ids past the tokenizer (a model vocabulary may be larger, e.g. llava-hf's added rows)
        # decode to nothing
        ids = [i for i in ids if i not in self.special_ids and 0 <= i < self.vocab_size]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        """Copy the tokenizer file (and a small config) into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / self.path.name).write_bytes(self.path.read_bytes())
        if self.path.name == "tokenizer.model":
            (d / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                 "add_eos_token": False, "legacy": False}, indent=2))
