"""`toto-pipeline convert-tokenizer`: OpenAI dVAE pickles and taming VQGAN checkpoints → tokenizer folder.

Nothing in the input files is executed: OpenAI's whole-module pickles and Lightning checkpoints are
read with `pipeline.tokenizers.unpickle` (tensors + known classes only); the output is safetensors
plus a validated config.json.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
import torch
import yaml

from pipeline.tokenizers.base import CONFIG_FILE as _CONFIG_FILE
from pipeline.tokenizers.base import (
    build_modules,
    load_tokenizer_files,
    make_config,
    save_tokenizer,
    sha256_path,
)
from pipeline.tokenizers.dalle import DVAEArch
from pipeline.tokenizers.unpickle import (
    CKPT_OPAQUE_PREFIXES,
    DALLE_CLASSES,
    PickledObject,
    UnsafePickleError,
    load_restricted,
    module_state_dict,
)
from pipeline.tokenizers.vqgan import VQGANArch


def _attrs(obj: PickledObject) -> dict:
    return {k: v for k, v in (obj.state or {}).items() if not k.startswith("_")}


def read_dalle_pickle(path: str, expect: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """An OpenAI dVAE module pickle → (its attrs fields, state dict). `expect`: 'Encoder' or 'Decoder'."""
    obj = load_restricted(path, allowed_classes=DALLE_CLASSES)
    want = f"dall_e.{expect.lower()}.{expect}"
    if not isinstance(obj, PickledObject) or obj.cls != want:
        got = obj.cls if isinstance(obj, PickledObject) else type(obj).__name__
        raise ValueError(f"{path} holds {got}, expected a pickled {want} (OpenAI's {expect.lower()}.pkl)")
    return _attrs(obj), module_state_dict(obj)


def convert_dalle(encoder_pkl: str, out_dir: str, *, decoder_pkl: str | None = None, name: str = "openai-dvae",
                  resolution: int = 128) -> dict:
    """Convert OpenAI's encoder.pkl (and optionally decoder.pkl); returns the written config."""
    enc_attrs, enc_sd = read_dalle_pickle(encoder_pkl, "Encoder")
    if int(enc_attrs.get("group_count", 4)) != 4 or int(enc_attrs.get("input_channels", 3)) != 3:
        raise ValueError(f"{encoder_pkl}: only the 4-group RGB architecture is supported, got {enc_attrs}")
    arch_kw: dict[str, Any] = dict(vocab_size=int(enc_attrs["vocab_size"]), n_hid=int(enc_attrs["n_hid"]),
                                   n_blk_per_group=int(enc_attrs["n_blk_per_group"]))
    source: dict[str, Any] = {"converted_from": "openai-dall_e",
                              "encoder": {"file": os.path.basename(encoder_pkl), "sha256": sha256_path(encoder_pkl)}}
    dec_sd: dict[str, torch.Tensor] = {}
    if decoder_pkl:
        dec_attrs, dec_sd = read_dalle_pickle(decoder_pkl, "Decoder")
        for k in ("vocab_size", "n_hid", "n_blk_per_group"):
            if int(dec_attrs[k]) != arch_kw[k]:
                raise ValueError(f"{decoder_pkl}: decoder {k}={dec_attrs[k]} but encoder {k}={arch_kw[k]}; "
                                 "pass the decoder that belongs to this encoder")
        arch_kw["n_init"] = int(dec_attrs["n_init"])
        source["decoder"] = {"file": os.path.basename(decoder_pkl), "sha256": sha256_path(decoder_pkl)}
    arch = DVAEArch(**arch_kw)
    config = make_config("dalle", name, arch, resolution=resolution, has_decoder=bool(decoder_pkl), source=source)
    # Check names and shapes against our modules before writing anything.
    encoder, decoder = build_modules(config)
    sd = {f"encoder.{k}": v for k, v in enc_sd.items()}
    sd.update({f"decoder.{k}": v for k, v in dec_sd.items()})
    _check_fits(encoder, enc_sd, encoder_pkl)
    if decoder is not None:
        _check_fits(decoder, dec_sd, decoder_pkl or "")
    return save_tokenizer(out_dir, config, sd)


def _check_fits(module: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    want = module.state_dict()
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    bad = sorted(k for k in set(want) & set(sd) if tuple(want[k].shape) != tuple(sd[k].shape))
    if missing or extra or bad:
        raise ValueError(f"{where}: tensors do not match the architecture (missing {missing[:5]}, unexpected "
                         f"{extra[:5]}, wrong shape {bad[:5]})")


def read_taming_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The `state_dict` of a taming Lightning .ckpt, without importing Lightning or running code.

    `torch.load(weights_only=True)` first; checkpoints whose metadata names Lightning/OmegaConf
    classes are read by the restricted unpickler, those classes becoming inert records."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any refusal falls through to the stricter-than-needed reader
        ckpt = load_restricted(path, opaque_prefixes=CKPT_OPAQUE_PREFIXES)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a taming checkpoint: no 'state_dict' of tensors inside")
    return {k: v.detach().clone() for k, v in sd.items()}


def vqgan_arch_from_yaml(path: str) -> VQGANArch:
    with open(path) as f:
        doc = yaml.safe_load(f)
    try:
        model = doc["model"]
        params = model["params"]
        dd = params["ddconfig"]
    except (KeyError, TypeError):
        raise ValueError(f"{path} is not a taming model config (needs model.params.ddconfig)") from None
    target = str(model.get("target", "taming.models.vqgan.VQModel"))
    if not target.endswith("vqgan.VQModel"):
        raise ValueError(f"{path}: model.target {target!r} is not supported; convert a taming.models.vqgan.VQModel")
    if dd.get("double_z", False):
        raise ValueError(f"{path}: ddconfig.double_z=true is a KL autoencoder, not a VQGAN")
    return VQGANArch(
        n_embed=int(params["n_embed"]), embed_dim=int(params["embed_dim"]), z_channels=int(dd["z_channels"]),
        ch=int(dd["ch"]), ch_mult=list(dd["ch_mult"]), num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=list(dd["attn_resolutions"]), resolution=int(dd["resolution"]),
        in_channels=int(dd.get("in_channels", 3)), out_ch=int(dd.get("out_ch", 3)),
    )


def convert_taming(ckpt_path: str, yaml_path: str, out_dir: str, *, name: str | None = None,
                   with_decoder: bool = True, resolution: int | None = None) -> dict:
    arch = vqgan_arch_from_yaml(yaml_path)
    sd = read_taming_checkpoint(ckpt_path)
    # Training-only parts (the GAN loss: discriminator, LPIPS) are not part of the tokenizer.
    keep = ("encoder.", "quant_conv.", "quantize.embedding.")
    if with_decoder:
        keep += ("decoder.", "post_quant_conv.")
    sd = {k: v for k, v in sd.items() if k.startswith(keep)}
    name = name or f"vqgan-f{arch.downsample}-{arch.n_embed}"
    source = {"converted_from": "taming-transformers", "checkpoint": {"file": os.path.basename(ckpt_path),
              "sha256": sha256_path(ckpt_path)}, "config": {"file": os.path.basename(yaml_path),
              "sha256": sha256_path(yaml_path)}}
    config = make_config("vqgan", name, arch, resolution=resolution or arch.resolution, has_decoder=with_decoder,
                         source=source)
    model, _ = build_modules(config)
    _check_fits(model, sd, ckpt_path)
    return save_tokenizer(out_dir, config, sd)


@click.command("convert-tokenizer")
@click.argument("weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--from", "src", type=click.Choice(["dalle", "taming"]), required=True,
              help="dalle: OpenAI's encoder.pkl (whole pickled module); taming: a VQGAN Lightning .ckpt.")
@click.option("--decoder", "decoder_pkl", type=click.Path(exists=True, dir_okay=False), default=None,
              help="dalle only: OpenAI's decoder.pkl, to make the tokenizer able to decode. [default: none]")
@click.option("--config", "yaml_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="taming only (required): the model's YAML config (model.params.ddconfig, n_embed, embed_dim).")
@click.option("--no-decoder", is_flag=True, help="taming only: keep the encoder and quantizer only.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: config.json + model.safetensors.")
@click.option("--name", default=None, help="Name in the tokenizer id. [default: openai-dvae / vqgan-f16-N]")
@click.option("--resolution", type=int, default=None,
              help="Frame size the tokenizer is meant for. [default: 128 for dalle, the YAML's for taming]")
def convert_tokenizer_cmd(weights: str, src: str, decoder_pkl: str | None, yaml_path: str | None, no_decoder: bool,
                          out_dir: str, name: str | None, resolution: int | None) -> None:
    """Convert published tokenizer weights into a tokenizer folder, executing nothing from them.

    \b
    Pickles are read by a restricted unpickler: tensors and the known dVAE module classes only;
    a file naming any other global (e.g. os.system) is refused.
    \b
    Examples:
      toto-pipeline convert-tokenizer --from dalle encoder.pkl --decoder decoder.pkl --out tok/dalle
      toto-pipeline convert-tokenizer --from taming last.ckpt --config model.yaml --out tok/vqgan1024
      then: load_tokenizer("dalle:tok/dalle") / --tokenizer vqgan:tok/vqgan1024
    """
    try:
        if src == "dalle":
            if yaml_path or no_decoder:
                raise click.UsageError("--config/--no-decoder are for --from taming")
            cfg = convert_dalle(weights, out_dir, decoder_pkl=decoder_pkl, name=name or "openai-dvae",
                                resolution=resolution or 128)
        else:
            if not yaml_path:
                raise click.UsageError("--from taming needs --config MODEL.yaml")
            if decoder_pkl:
                raise click.UsageError("--decoder is for --from dalle")
            cfg = convert_taming(weights, yaml_path, out_dir, name=name, with_decoder=not no_decoder,
                                 resolution=resolution)
    except (UnsafePickleError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    tok = load_tokenizer_files(os.path.join(out_dir, _CONFIG_FILE))
    click.echo(f"wrote {out_dir}: {tok.id} ({tok.vocab_size} codes, /{tok.downsample}, "
               f"decoder: {'yes' if tok.has_decoder else 'no'})", file=sys.stderr)
    click.echo(f"{cfg['kind']}:{out_dir}")
