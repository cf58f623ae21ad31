"""Export to Hugging Face: config.json + model.safetensors for `LlamaForCausalLM`, `GPT2LMHeadModel`
or `MambaForCausalLM` (by `ModelConfig.arch`).

Our rotary layout is already Hugging Face's half-split one, so export is a rename. μP models
are folded into standard ones: the readout multiplier goes into lm_head and the 1/head_dim
attention scale into q_proj (RoPE is linear, so scaling q before or after it is the same; GPT-2
has no RoPE, so its q rows and q bias are scaled). GPT-2's Conv1D layers store (in, out): our
Linear weights are transposed. Mamba's blocks are transformers' own: only the prefixes change.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import click
import torch
from safetensors.torch import save_file

from trainer.model import CausalLM, ModelConfig

__all__ = ["hf_config", "to_hf_state_dict", "export_hf", "export_hf_command"]


def _special_ids(specials: dict) -> dict:
    # Special ids live above the codebook (trainer.data: bos_video, bos_image, eos, pad).
    return {"bos_token_id": specials.get("bos_video"), "eos_token_id": specials.get("eos"),
            "pad_token_id": specials.get("pad"), "torch_dtype": "float32", "dtype": "float32"}


def hf_config(cfg: ModelConfig, specials: dict | None = None) -> dict:
    """A transformers config dict equivalent to `cfg` (written as config.json): LlamaConfig,
    GPT2Config or MambaConfig by cfg.arch."""
    specials = specials or {}
    if cfg.arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim,
            "n_positions": cfg.max_seq_len, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "initializer_range": cfg.init_std, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": False, "use_cache": True, **_special_ids(specials),
        }
    if cfg.arch == "mamba":
        from trainer.backbones import mamba_hf_config

        # use_mambapy is a run-time choice of the loading machine, not part of the model.
        doc = mamba_hf_config(cfg, use_mambapy=False).to_dict()
        return {**doc, "architectures": ["MambaForCausalLM"], **_special_ids(specials)}
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
        **_special_ids(specials),
    }


def _lm_head(model: CausalLM, sd: dict) -> torch.Tensor:
    # Only the real vocabulary's rows: the lm-head padding (ModelConfig.padded_vocab_size) is ours.
    mult = model.output_mult if model.cfg.mup_base_dim is not None else 1.0
    return sd["output.weight"][: model.cfg.vocab_size] * mult


def _gpt2_state_dict(model: CausalLM, sd: dict) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    q_fold = 1.0
    if cfg.mup_base_dim is not None:
        q_fold = model.layers[0].attn.scale * math.sqrt(cfg.head_dim)  # HF divides scores by sqrt(hd)
    out = {
        "transformer.wte.weight": sd["tok_embeddings.weight"],
        "transformer.wpe.weight": sd["pos_embeddings.weight"],
        "transformer.ln_f.weight": sd["norm.weight"],
        "transformer.ln_f.bias": sd["norm.bias"],
        "lm_head.weight": _lm_head(model, sd),
    }
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        w, b = sd[p + "attn.c_attn.weight"].clone(), sd[p + "attn.c_attn.bias"].clone()  # (3D, D), (3D,)
        w[: cfg.dim] *= q_fold
        b[: cfg.dim] *= q_fold
        out[q + "attn.c_attn.weight"], out[q + "attn.c_attn.bias"] = w.t(), b
        out[q + "attn.c_proj.weight"], out[q + "attn.c_proj.bias"] = sd[p + "attn.c_proj.weight"].t(), sd[p + "attn.c_proj.bias"]
        out[q + "mlp.c_fc.weight"], out[q + "mlp.c_fc.bias"] = sd[p + "c_fc.weight"].t(), sd[p + "c_fc.bias"]
        out[q + "mlp.c_proj.weight"], out[q + "mlp.c_proj.bias"] = sd[p + "c_proj.weight"].t(), sd[p + "c_proj.bias"]
        for ln in ("ln_1", "ln_2"):
            out[q + f"{ln}.weight"], out[q + f"{ln}.bias"] = sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"]
    return out


def _mamba_state_dict(model: CausalLM, sd: dict) -> dict[str, torch.Tensor]:
    out = {"backbone.embeddings.weight": sd["tok_embeddings.weight"], "backbone.norm_f.weight": sd["norm.weight"],
           "lm_head.weight": _lm_head(model, sd)}
    out.update({"backbone." + k: v for k, v in sd.items() if k.startswith("layers.")})
    return out


def to_hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """Our parameter names -> Hugging Face names of cfg.arch's model (fp32 tensors, contiguous, cloned)."""
    cfg = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if cfg.arch != "llama":
        out = (_gpt2_state_dict if cfg.arch == "gpt2" else _mamba_state_dict)(model, sd)
        return {k: v.contiguous().clone() for k, v in out.items()}
    q_fold = 1.0
    if cfg.mup_base_dim is not None:
        # HF scales scores by 1/sqrt(hd); ours by model.layers[0].attention.scale.
        q_fold = model.layers[0].attention.scale * math.sqrt(cfg.head_dim)
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": _lm_head(model, sd),
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


def export_hf(model: CausalLM, out_dir: str | os.PathLike, specials: dict | None = None) -> Path:
    """Write config.json + model.safetensors that `LlamaForCausalLM` / `GPT2LMHeadModel` /
    `MambaForCausalLM.from_pretrained(out_dir)` loads (by the model's arch)."""
    if model.cfg.input != "tokens" or model.cfg.target != "tokens":
        raise ValueError(f"model.input={model.cfg.input}, model.target={model.cfg.target}: transformers' causal LMs "
                         "embed token ids and predict a vocabulary, so a patch model (Table 3) has no equivalent to "
                         "export to; load its checkpoint with trainer.checkpoint.load_model instead")
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

    OUT gets config.json and model.safetensors loadable by transformers' LlamaForCausalLM
    (GPT2LMHeadModel for model.arch=gpt2, MambaForCausalLM for mamba); logits match ours within
    1e-4 in fp32.

    Example: toto-train export-hf runs/demo runs/demo-hf
    """
    from trainer.checkpoint import load_model

    model, meta = load_model(ckpt)
    path = export_hf(model, out, specials=meta.get("specials"))
    click.echo(f"exported {meta.get('step_dir', ckpt)} -> {path}")
