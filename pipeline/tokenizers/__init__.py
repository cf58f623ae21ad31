"""Visual tokenizers: frames (uint8 [N, H, W, 3]) ⇄ discrete codes (uint16 [N, H/f, W/f]).

    from pipeline.tokenizers import load_tokenizer
    tok = load_tokenizer("demo")            # or "dalle:DIR", "vqgan:DIR", "dvae:DIR"
    tok = tok.to("cuda")                    # optional; precision bf16 on CUDA, fp32 on CPU (or "tf32")
    codes = tok.encode(frames)              # uint16 (N, h, w); frames: uint8 (N, H, W, 3) or a list of them
    frames = tok.decode(codes)              # uint8 (N, H, W, 3) when tok.has_decoder
    tok.vocab_size, tok.downsample, tok.id (kind:name:weights-sha256), tok.sha256, tok.precision

Folders hold config.json (schema tokenizer_config) + model.safetensors; make them with
`toto-pipeline convert-tokenizer` (OpenAI dVAE pickles, taming VQGAN checkpoints) or
`toto-pipeline train-tokenizer` (our own Gumbel-softmax dVAE). See docs/tokenizers.md.
"""

from pipeline.tokenizers.base import (
    VisualTokenizer,
    load_config,
    load_tokenizer,
    load_tokenizer_files,
    make_config,
    save_tokenizer,
)
from pipeline.tokenizers.dalle import DVAEArch, DVAEDecoder, DVAEEncoder
from pipeline.tokenizers.vqgan import VQGAN, VQGANArch

__all__ = [
    "DVAEArch",
    "DVAEDecoder",
    "DVAEEncoder",
    "VQGAN",
    "VQGANArch",
    "VisualTokenizer",
    "load_config",
    "load_tokenizer",
    "load_tokenizer_files",
    "make_config",
    "save_tokenizer",
]
