"""What fastprompt needs to know about an open_clip CLIP, read from the model itself.

Nothing here hard-codes ViT-B/16: widths, heads, layers, token counts, context length, pooling and
the GELU kind come from the instance, so any open_clip ViT CLIP whose towers are `Transformer`s of
`ResidualAttentionBlock`s works. A CNN vision tower (open_clip's ModifiedResNet: RN50, RN101, RN50x4..64, the
backbone of CoOp's main results) is accepted as a frozen feature extractor for the methods that prompt only the
text (`BackboneInfo.vision_tower == "cnn"`, its `vision.layers` 0: nothing to splice prompts into). The checks
name what they found when a model is not supported, because patching or prompting half of an unusual model
silently is worse than refusing it.

The helpers below drive open_clip's own modules (conv1, embeddings, blocks, norms, projections);
they copy no open_clip source, only the order in which its forward calls them, and stop where the
prompt splice has to happen (before ln_pre for the first vision prompts, between blocks for deep
ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

GELU_KINDS = ("gelu", "gelu_tanh", "quick_gelu")


class UnsupportedModelError(TypeError):
    """The model is not an open_clip CLIP of the supported structure."""


@dataclass(frozen=True)
class TowerInfo:
    """Shape facts of one tower, read from the model."""

    width: int
    heads: int
    layers: int
    mlp_hidden: int
    gelu: str  # one of GELU_KINDS

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class BackboneInfo:
    vision: TowerInfo
    text: TowerInfo
    embed_dim: int
    image_size: tuple[int, int]
    vision_tokens: int  # CLS + patches
    context_length: int
    vocab_size: int
    text_pool: str  # 'argmax' or 'eos'
    eos_id: int | None
    # 'transformer' (open_clip's VisionTransformer) or 'cnn' (ModifiedResNet: a frozen feature extractor for
    # text-prompt methods; then vision.layers and vision_tokens are 0 and vision.width is its attention pool's)
    vision_tower: str = "transformer"


def image_size_of(visual: nn.Module) -> tuple[int, int]:
    """The (height, width) a vision tower takes: open_clip keeps a pair on a VisionTransformer, an int on a
    ModifiedResNet."""
    size = visual.image_size
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


CNN_TEXT_METHODS = "clip, coop, cocoop, deep_language, ivlp with n_vision=0"


def is_cnn_tower(visual) -> bool:
    """Whether `visual` is open_clip's ModifiedResNet (the RN50 family's CNN), which patch and prompts leave alone."""
    return type(visual).__name__ == "ModifiedResNet"


def cnn_refusal(method: str, tower: str = "ModifiedResNet") -> str:
    """The error for `method` (a name) on a CNN vision tower (its class name `tower`), naming what runs on one."""
    return (f"method {method!r} puts prompts into the vision tower, and this CLIP's is a CNN ({tower}, open_clip's"
            f" RN50 family) with no transformer blocks to splice them into; on it run a text-prompt method"
            f" ({CNN_TEXT_METHODS}) or use a ViT backbone (e.g. ViT-B-16)")


def _gelu_kind(module: nn.Module) -> str:
    name = type(module).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    raise UnsupportedModelError(f"unsupported MLP activation {name!r}; expected nn.GELU or open_clip QuickGELU")


def _check_transformer(tower: nn.Module, where: str) -> TowerInfo:
    from open_clip.transformer import ResidualAttentionBlock, Transformer

    if type(tower).__name__ != "Transformer" and not isinstance(tower, Transformer):
        raise UnsupportedModelError(f"{where} is a {type(tower).__name__}, expected open_clip Transformer")
    if not getattr(tower, "batch_first", False):
        raise UnsupportedModelError(f"{where}.batch_first is False; only batch-first towers are supported")
    blocks = list(tower.resblocks)
    if not blocks:
        raise UnsupportedModelError(f"{where} has no blocks")
    for i, blk in enumerate(blocks):
        base = getattr(blk, "_fastprompt_original_class", type(blk))
        if base is not ResidualAttentionBlock:
            raise UnsupportedModelError(
                f"{where}.resblocks[{i}] is a {base.__name__}; only open_clip ResidualAttentionBlock is supported"
                " (CustomResidualAttentionBlock, cross-attention blocks and other types are not)"
            )
        if hasattr(blk, "ln_1_kv"):
            raise UnsupportedModelError(f"{where}.resblocks[{i}] is a cross-attention block")
        if blk.attn.dropout != 0.0:
            raise UnsupportedModelError(f"{where}.resblocks[{i}] has attention dropout {blk.attn.dropout}")
    first = blocks[0]
    return TowerInfo(
        width=first.attn.embed_dim,
        heads=first.attn.num_heads,
        layers=len(blocks),
        mlp_hidden=first.mlp.c_fc.out_features,
        gelu=_gelu_kind(first.mlp.gelu),
    )


def inspect_clip(model: nn.Module) -> BackboneInfo:
    """Validate `model` and read its shape facts. Raises UnsupportedModelError naming the problem."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "model is a TorchScript module (created with jit=True?); scripted graphs ignore prompts and patches."
            " Create it with open_clip.create_model(..., jit=False)."
        )
    cls = type(model).__name__
    if cls == "CustomTextCLIP" or hasattr(model, "text") and not hasattr(model, "transformer"):
        raise UnsupportedModelError(
            f"model is a {cls} (text tower at model.text); only open_clip CLIP with the text tower at the top level"
            " is supported"
        )
    for attr in ("visual", "transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection"):
        if not hasattr(model, attr):
            raise UnsupportedModelError(f"model ({cls}) has no attribute {attr!r}; is it an open_clip CLIP?")
    visual = model.visual
    cnn = is_cnn_tower(visual)
    if not cnn and type(visual).__name__ != "VisionTransformer":
        raise UnsupportedModelError(
            f"vision tower is a {type(visual).__name__}; only open_clip's VisionTransformer (any method) and"
            f" ModifiedResNet (RN50 family: {CNN_TEXT_METHODS}) are supported (timm towers such as EVA's and"
            " SigLIP's are not)"
        )
    if cnn:
        pool = visual.attnpool
        return BackboneInfo(
            vision=TowerInfo(width=pool.k_proj.in_features, heads=pool.num_heads, layers=0, mlp_hidden=0,
                             gelu="none"),
            embed_dim=visual.output_dim, image_size=image_size_of(visual), vision_tokens=0, vision_tower="cnn",
            **_text_facts(model),
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError("vision tower uses attentional pooling (CoCa-style); not supported")
    if visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise UnsupportedModelError(
            f"vision pooling pool_type={visual.pool_type!r}, final_ln_after_pool={visual.final_ln_after_pool};"
            " only CLS-token pooling with ln_post before pooling is supported"
        )
    if visual.output_tokens:
        raise UnsupportedModelError("vision tower has output_tokens=True; not supported")
    if getattr(visual, "proj", None) is None:
        raise UnsupportedModelError("vision tower has no output projection")
    text = _text_facts(model)
    return BackboneInfo(
        vision=_check_transformer(visual.transformer, "visual.transformer"),
        embed_dim=visual.proj.shape[1],
        image_size=image_size_of(visual),
        vision_tokens=visual.positional_embedding.shape[0],
        **text,
    )


def _text_facts(model: nn.Module) -> dict:
    """The text tower's checks (the same whatever the vision tower) and its BackboneInfo fields."""
    pool = getattr(model, "text_pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        raise UnsupportedModelError(
            f"text_pool_type={pool!r}: only EOT pooling ('argmax' or 'eos') keeps the causal text path exact"
        )
    mask = getattr(model, "attn_mask", None)
    if mask is None or not torch.equal(
        torch.isinf(mask.float()), torch.ones_like(mask, dtype=torch.bool).triu(1)
    ):
        raise UnsupportedModelError("text tower has no causal attention mask; bidirectional text is not supported")
    if isinstance(model.text_projection, nn.Linear):
        raise UnsupportedModelError("text_projection is an nn.Linear (proj_bias); only a projection matrix is supported")
    return dict(text=_check_transformer(model.transformer, "transformer"),
                context_length=model.positional_embedding.shape[0], vocab_size=model.token_embedding.num_embeddings,
                text_pool=pool, eos_id=getattr(model, "text_eos_id", None))


def default_tokenizer(info: BackboneInfo):
    """open_clip's CLIP BPE tokenizer, padding to the model's own text context (77 for most CLIPs, less for
    some): every CLIP of the supported structure that open_clip ships uses it, except the 'worldwide' configs,
    whose Hugging Face tokenizer must be passed (open_clip.get_tokenizer(name))."""
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16", context_length=info.context_length)


def check_tokenizer(info: BackboneInfo, tokenizer) -> None:
    """Refuse a tokenizer that does not fit the model, naming the mismatch. fastprompt pools text at the
    tokenizer's EOT position, while open_clip's own encode_text (the frozen teachers) pads to the tokenizer's
    context and pools at the model's eos_id under 'eos' pooling: both must agree with the model."""
    length = getattr(tokenizer, "context_length", None)
    if length is not None and length != info.context_length:
        raise ValueError(
            f"the tokenizer pads to {length} tokens but the model's text context is {info.context_length};"
            f" use open_clip.get_tokenizer(<model name>) or leave tokenizer=None"
        )
    eot = getattr(tokenizer, "eot_token_id", None)
    if info.text_pool == "eos" and eot is not None and eot != info.eos_id:
        raise ValueError(
            f"the model pools text at eos_id={info.eos_id} (text_pool_type 'eos') but the tokenizer ends prompts"
            f" with token {eot}; pass the model's own tokenizer (open_clip.get_tokenizer(<model name>))"
        )


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype open_clip casts activations to (its `get_cast_dtype`)."""
    return model.transformer.get_cast_dtype()


def check_images(model: nn.Module, images: torch.Tensor) -> None:
    visual = model.visual
    if not torch.is_tensor(images):
        hint = ("torch.stack a list of [3, H, W] tensors into one batch; for files or PIL images use"
                " fastprompt.runner.Predictor" if isinstance(images, list | tuple)
                else "PIL images and files go through fastprompt.data.eval_transform (or fastprompt.runner.Predictor)")
        raise TypeError(f"images must be a float tensor [B, 3, H, W], got {type(images).__name__}; {hint}")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be a floating-point tensor, got {getattr(images, 'dtype', type(images).__name__)};"
            " integer pixels need the CLIP normalisation first (fastprompt.data.eval_transform does it)"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"the image batch is empty (shape {tuple(images.shape)}); give at least one image")
    if tuple(images.shape[-2:]) != image_size_of(visual):
        raise ValueError(
            f"images are {tuple(images.shape[-2:])} pixels but the model is for {image_size_of(visual)} (its"
            " positional embedding or attention pool); resize the input (the data transforms do this)"
        )
    weight = visual.conv1.weight
    if images.device != weight.device:
        raise ValueError(f"images are on {images.device} but the model is on {weight.device}")


def vision_embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch + class embedding + positional embedding (+ patch dropout), before ln_pre: [B, 1+P, D]."""
    visual = model.visual
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    return visual.patch_dropout(x)


def causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask like open_clip's buffer, for any length (prompts change the length)."""
    mask = torch.full((length, length), float("-inf"), device=device, dtype=dtype)
    return mask.triu_(1)


def run_block(tower: nn.Module, index: int, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Run block `index` of an open_clip Transformer, honouring its grad_checkpointing flag."""
    block = tower.resblocks[index]
    if tower.grad_checkpointing and torch.is_grad_enabled():
        # Positional signature (q_x, k_x, v_x, attn_mask), as open_clip's own Transformer.forward calls it.
        return checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
    return block(x, attn_mask=attn_mask)


def _block_cls(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock.forward evaluated at the first row of each sequence only: the CLS row's
    query against every row's keys and values (the block's own `attention`, i.e. its nn.MultiheadAttention with
    separate query and key/value inputs), then the residual adds and the MLP on that row. [B, L, D] -> [B, D]."""
    h = block.ln_1(x)
    y = x[:, :1] + block.ls_1(block.attention(q_x=h[:, :1], k_x=h, v_x=h))
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    return y[:, 0]


def run_block_cls(tower: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """run_block's output at the CLS rows only, [B, D]: a vision tower's last block when only the pooled token is
    read (after the last block nothing mixes rows, so the other rows' outputs would be discarded)."""
    block = tower.resblocks[index]
    if tower.grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(_block_cls, block, x, use_reentrant=False)
    return _block_cls(block, x)


def vision_pool(model: nn.Module, cls: torch.Tensor) -> torch.Tensor:
    """ln_post and the projection of the CLS rows [B, D] -> [B, E]: vision_head's pooled feature (LayerNorm is per
    token, so normalising the CLS rows alone equals normalising all tokens and then pooling)."""
    return model.visual.ln_post(cls) @ model.visual.proj


def vision_head(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ln_post over all tokens, CLS pooled and projected. Returns (pooled feature [B, E], tokens after ln_post)."""
    visual = model.visual
    x = visual.ln_post(x)
    return x[:, 0] @ visual.proj, x


def text_head(model: nn.Module, x: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
    """ln_final at the pooled (EOT) positions, projected: [N, E]. LayerNorm is per token, so it is applied to the
    gathered rows only; this equals open_clip's ln_final over all tokens followed by the gather."""
    rows = torch.arange(x.shape[0], device=x.device)
    return text_head_rows(model, x[rows, pool_index])


def text_head_rows(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """ln_final and text_projection of already gathered EOT rows [N, d] -> [N, E]."""
    return model.ln_final(pooled) @ model.text_projection
