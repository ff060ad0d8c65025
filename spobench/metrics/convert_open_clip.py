"""open_clip CLIP state dict -> transformers ``CLIPModel``, loaded strictly.

open_clip's standard ``CLIP`` (ViT image tower, the built-in text transformer; e.g. ViT-H-14, the
model HPSv2 fine-tunes) keeps these parameters::

    visual.conv1.weight                      (W, 3, p, p)    no bias
    visual.class_embedding                   (W,)
    visual.positional_embedding              (g*g + 1, W)
    visual.ln_pre.{weight,bias}
    visual.transformer.resblocks.N.ln_1 / attn.in_proj_weight (3W, W) / attn.in_proj_bias (3W,)
        / attn.out_proj / ln_2 / mlp.c_fc / mlp.c_proj
    visual.ln_post.{weight,bias}
    visual.proj                              (W, E)          used as x @ proj
    token_embedding.weight                   (V, T)
    positional_embedding                     (L, T)
    transformer.resblocks.N. ...             (as above)
    ln_final.{weight,bias}
    text_projection                          (T, E)          used as x @ text_projection
    logit_scale                              ()

and computes (open_clip ``model.py``)::

    image: x = conv1(img).flatten(2).T; x = [class_embedding; x] + positional_embedding; ln_pre;
           resblocks (pre-LN: x += attn(ln_1(x)); x += mlp(ln_2(x)), nn.MultiheadAttention, GELU);
           ln_post(x[:, 0]) @ proj
    text:  x = token_embedding(ids) + positional_embedding; resblocks with a causal mask; ln_final;
           x[arange, ids.argmax(-1)] @ text_projection

transformers' ``CLIPModel`` is the same network: ``in_proj`` splits row-wise into q, k, v
(``nn.MultiheadAttention`` packs them in that order), ``ln_1/ln_2 -> layer_norm1/2``,
``c_fc/c_proj -> fc1/fc2``, ``ln_pre -> pre_layrnorm``, ``ln_post -> post_layernorm``,
``ln_final -> final_layer_norm``, and the two projections become bias-free ``nn.Linear`` layers
whose weights are the transposed matrices. open_clip's ViT-H-14 uses exact GELU (``nn.GELU``,
not QuickGELU) and LayerNorm eps 1e-5.

Text pooling: open_clip takes the features at ``argmax(ids)``, i.e. the first end-of-text token
because it has the largest id in CLIP's vocabulary; transformers takes the first position equal
to ``config.eos_token_id`` (when that is not the legacy 2). :func:`build_config` sets
``eos_token_id`` to the vocabulary's last id, so both pick the same position for any tokenizer whose
end-of-text token is the last id (checked by the HPSv2 loader) and whatever the padding id.

Attention heads cannot be read from a state dict. open_clip's ViT-H-14 has 16 heads in both towers
(image head width 80, text head width 64); other towers default to open_clip's head width 64
unless ``vision_heads`` / ``text_heads`` are given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from spobench.core.errors import ModelLoadError
from spobench.core.weights import check_state_dict, check_tensors

# open_clip image widths whose head width is not the default 64 (ViT-H 80, ViT-g 88, ViT-bigG 104).
VISION_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}
DEFAULT_HEAD_WIDTH = 64
LAYER_NORM_EPS = 1e-5

_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_TOWERS = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
           ("transformer.resblocks.", "text_model.encoder.layers."))
_DIRECT = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Buffers some open_clip versions saved with the weights: checked, then dropped.
_BUFFERS = ("attn_mask",)


_DIRECT_BACK = {v: k for k, v in _DIRECT.items()}
_TRANSPOSED_BACK = {v: k for k, v in _TRANSPOSED.items()}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}


def official_key(key: str) -> str:
    """The open_clip key a transformers ``CLIPModel`` key comes from (the inverse of
    :func:`convert_state_dict`, for error messages; q/k/v projections all come from ``in_proj``)."""
    if key in _DIRECT_BACK:
        return _DIRECT_BACK[key]
    if key in _TRANSPOSED_BACK:
        return _TRANSPOSED_BACK[key]
    for src, dst in _TOWERS:
        if key.startswith(dst):
            idx, sub = key[len(dst):].split(".", 1)
            module, _, param = sub.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                return f"{src}{idx}.attn.in_proj_{param}"
            if module in _BLOCK_BACK:
                return f"{src}{idx}.{_BLOCK_BACK[module]}.{param}"
    return key


def unwrap_state_dict(obj, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: ``obj`` itself or ``obj["state_dict"]``, with a
    DataParallel ``module.`` prefix removed."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    check_tensors(obj, name)
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _count_layers(state: Mapping[str, torch.Tensor], prefix: str, name: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if idx != set(range(len(idx))):
        raise ModelLoadError(f"{name}: {prefix}N layers are not numbered 0..{len(idx) - 1}")
    return len(idx)


def _heads(width: int, given: int | None, tower: str, name: str) -> int:
    heads = given if given is not None else (
        VISION_HEADS_BY_WIDTH.get(width) if tower == "image" else None) or width // DEFAULT_HEAD_WIDTH
    if heads < 1 or width % heads:
        raise ModelLoadError(f"{name}: cannot split the {tower} width {width} into {heads} heads "
                             f"(pass {tower.replace('image', 'vision')}_heads)")
    return heads


def build_config(state: Mapping[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None,
                 hidden_act: str = "gelu", bos_token_id: int | None = None, pad_token_id: int = 0,
                 name: str = "open_clip checkpoint"):
    """A transformers ``CLIPConfig`` with the shapes of an open_clip ``CLIP`` state dict (``name``: the
    file, for errors)."""
    from transformers import CLIPConfig

    try:
        conv = state["visual.conv1.weight"]
        v_pos = state["visual.positional_embedding"]
        proj = state["visual.proj"]
        tok = state["token_embedding.weight"]
        t_pos = state["positional_embedding"]
        t_proj = state["text_projection"]
        v_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        t_mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as e:
        raise ModelLoadError(f"{name}: not an open_clip CLIP state dict (missing key {e.args[0]})") from None
    if conv.ndim != 4 or v_pos.ndim != 2 or proj.ndim != 2 or tok.ndim != 2 or t_pos.ndim != 2 or t_proj.ndim != 2:
        raise ModelLoadError(f"{name}: wrong shape for an embedding or projection (visual.conv1.weight "
                             f"{tuple(conv.shape)}, visual.proj {tuple(proj.shape)}, token_embedding.weight "
                             f"{tuple(tok.shape)}, text_projection {tuple(t_proj.shape)})")
    v_width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((v_pos.shape[0] - 1) ** 0.5))
    if grid * grid != v_pos.shape[0] - 1 or conv.shape[-1] != conv.shape[-2]:
        raise ModelLoadError(f"{name}: unexpected image tower shapes (conv1 {tuple(conv.shape)}, "
                             f"positional_embedding {tuple(v_pos.shape)})")
    vocab, t_width = tok.shape
    embed = proj.shape[1]
    if t_proj.shape != (t_width, embed) or proj.shape[0] != v_width:
        raise ModelLoadError(f"{name}: projection shapes disagree (visual.proj {tuple(proj.shape)}, "
                             f"text_projection {tuple(t_proj.shape)})")
    text = dict(
        vocab_size=vocab, hidden_size=t_width, intermediate_size=t_mlp, projection_dim=embed,
        num_hidden_layers=_count_layers(state, "transformer.resblocks.", name),
        num_attention_heads=_heads(t_width, text_heads, "text", name), max_position_embeddings=t_pos.shape[0],
        hidden_act=hidden_act, layer_norm_eps=LAYER_NORM_EPS, attention_dropout=0.0,
        eos_token_id=vocab - 1, bos_token_id=vocab - 2 if bos_token_id is None else bos_token_id,
        pad_token_id=pad_token_id,
    )
    vision = dict(
        hidden_size=v_width, intermediate_size=v_mlp, projection_dim=embed,
        num_hidden_layers=_count_layers(state, "visual.transformer.resblocks.", name),
        num_attention_heads=_heads(v_width, vision_heads, "image", name), image_size=grid * patch,
        patch_size=patch,
        hidden_act=hidden_act, layer_norm_eps=LAYER_NORM_EPS, attention_dropout=0.0,
    )
    logit_scale = state.get("logit_scale")
    init = float(logit_scale.flatten()[0]) if logit_scale is not None and logit_scale.numel() else 2.6592
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed, logit_scale_init_value=init)


def convert_state_dict(state: Mapping[str, torch.Tensor],
                       name: str = "open_clip checkpoint") -> dict[str, torch.Tensor]:
    """open_clip keys -> transformers ``CLIPModel`` keys (float32). Unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        value = value.float()
        if (key == "logit_scale" and value.numel() != 1) or (key in _TRANSPOSED and value.ndim != 2):
            raise ModelLoadError(f"{name}: weights do not match the model (wrong shape for 1 key(s): "
                                 f"{key} {tuple(value.shape)})")
        if key in _DIRECT:
            out[_DIRECT[key]] = value.reshape(()) if key == "logit_scale" else value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif key in _BUFFERS:
            n = value.shape[-1]
            upper = torch.ones(n, n, dtype=torch.bool).triu(1)
            if value.shape != (n, n) or not (torch.all(value[upper] == float("-inf")) and torch.all(value[~upper] == 0)):
                raise ModelLoadError(f"{name}: {key} is not a causal attention mask")
        else:
            for src, dst in _TOWERS:
                if key.startswith(src):
                    idx, sub = key[len(src):].split(".", 1)
                    module, _, param = sub.rpartition(".")
                    base = f"{dst}{idx}."
                    if module == "attn" and param in ("in_proj_weight", "in_proj_bias"):
                        kind = "weight" if param == "in_proj_weight" else "bias"
                        q, k, v = value.chunk(3, dim=0)
                        out[f"{base}self_attn.q_proj.{kind}"] = q.contiguous()
                        out[f"{base}self_attn.k_proj.{kind}"] = k.contiguous()
                        out[f"{base}self_attn.v_proj.{kind}"] = v.contiguous()
                    elif module in _BLOCK:
                        out[f"{base}{_BLOCK[module]}.{param}"] = value
                    else:
                        unknown.append(key)
                    break
            else:
                unknown.append(key)
    if unknown:
        raise ModelLoadError(f"{name}: weights do not match the model (unexpected {len(unknown)} key(s) with no "
                             f"place in a CLIPModel: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''})")
    return out


def load_open_clip_state_dict(state: Mapping[str, torch.Tensor], vision_heads: int | None = None,
                              text_heads: int | None = None, hidden_act: str = "gelu", name: str = "checkpoint"):
    """A float32 transformers ``CLIPModel`` (eval mode) holding an open_clip state dict.

    Loaded strictly (:func:`spobench.core.weights.check_state_dict`): every converted key fills a parameter
    of its shape and every parameter is filled, else :class:`ModelLoadError` names ``name`` (the file)
    and the open_clip keys that are missing, unexpected or wrong-shaped."""
    from transformers import CLIPModel

    check_tensors(state, name)
    config = build_config(state, vision_heads, text_heads, hidden_act, name=name)
    converted = convert_state_dict(state, name)
    with torch.device("meta"):  # no random init (nor a second copy) of a billion parameters
        model = CLIPModel(config)
    check_state_dict(model, converted, name, file_key=official_key)
    model.load_state_dict(converted, strict=True, assign=True)  # the converted tensors become the params
    # Non-persistent buffers are not in any state dict and are still on the meta device; CLIP's are the
    # position ids only.
    for bname, buf in list(model.named_buffers()):
        if not bname.endswith("position_ids"):
            raise ModelLoadError(f"unexpected buffer {bname} in transformers' CLIPModel; update {__name__}")
        owner = model.get_submodule(bname.rsplit(".", 1)[0])
        owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ModelLoadError(f"{name}: parameters left unloaded: {meta[:5]}")
    return model.float().eval()
