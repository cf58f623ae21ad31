"""Export to Hugging Face `LlamaForCausalLM`: config.json + model.safetensors.

Our rotary layout is already Hugging Face's half-split one, so export is a rename. μP models
are folded into standard ones: the readout multiplier goes into lm_head and the 1/head_dim
attention scale into q_proj (RoPE is linear, so scaling q before or after it is the same).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import click
import torch
from safetensors.torch import save_file

from trainer.model import ModelConfig, Transformer

__all__ = ["hf_config", "to_hf_state_dict", "export_hf", "export_hf_command"]


def hf_config(cfg: ModelConfig, specials: dict | None = None) -> dict:
    """A `LlamaConfig` dict equivalent to `cfg` (written as config.json)."""
    specials = specials or {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        # Special ids live above the codebook (trainer.data: bos_video, bos_image, eos, pad).
        "bos_token_id": specials.get("bos_video"),
        "eos_token_id": specials.get("eos"),
        "pad_token_id": specials.get("pad"),
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameter names -> Hugging Face Llama names (fp32 tensors, contiguous, cloned)."""
    cfg = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    q_fold = 1.0
    if cfg.mup_base_dim is not None:
        # HF scales scores by 1/sqrt(hd); ours by model.layers[0].attention.scale.
        q_fold = model.layers[0].attention.scale * math.sqrt(cfg.head_dim)
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        # Only the real vocabulary's rows: the lm-head padding (ModelConfig.padded_vocab_size) is ours.
        "lm_head.weight": sd["output.weight"][: cfg.vocab_size] * (model.output_mult if cfg.mup_base_dim is not None else 1.0),
    }
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        nq, nkv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        wq, wk, wv = sd[p + "attention.wqkv.weight"].split([nq, nkv, nkv], dim=0)
        gate, up = sd[p + "feed_forward.w13.weight"].split(cfg.ffn_dim, dim=0)
        out[q + "self_attn.q_proj.weight"] = wq * q_fold
        out[q + "self_attn.k_proj.weight"] = wk
        out[q + "self_attn.v_proj.weight"] = wv
        out[q + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        out[q + "mlp.gate_proj.weight"] = gate
        out[q + "mlp.up_proj.weight"] = up
        out[q + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def export_hf(model: Transformer, out_dir: str | os.PathLike, specials: dict | None = None) -> Path:
    """Write config.json + model.safetensors that `LlamaForCausalLM.from_pretrained(out_dir)` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf_config(model.cfg, specials)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


@click.command("export-hf")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
def export_hf_command(ckpt: str, out: str) -> None:
    """Export checkpoint CKPT (a step-NNNNNNNN dir, or a run dir: its newest checkpoint) to OUT.

    OUT gets config.json and model.safetensors loadable by transformers' LlamaForCausalLM;
    logits match ours within 1e-4 in fp32.

    Example: toto-train export-hf runs/demo runs/demo-hf
    """
    from trainer.checkpoint import load_model

    model, meta = load_model(ckpt)
    path = export_hf(model, out, specials=meta.get("specials"))
    click.echo(f"exported {meta.get('step_dir', ckpt)} -> {path}")
