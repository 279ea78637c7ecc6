"""A picochat model in transformers, for what its NanoChat architecture cannot hold: sliding-window
layers, trained residual/x0 scalars, value embeddings, smear, backout, scaled queries and keys.
`picochat export --format hf` ships this file with the weights when the model needs it;
AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) loads it. It computes picochat's
function (picochat/model.py), under transformers' weight names:

    x = norm(embed(ids)); x += smear_lambda * sigmoid(smear_gate(x[:24])) * x[previous token]
    x0 = x
    per layer i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0
                 x = x + o_proj(attention(norm(x)))      # QK-norm, rotary, x qk_scale, layer_types[i],
                                                         # values + 3 sigmoid(ve_gate(norm(x)[:12])) * value_embeds[i]
                 x = x + fc2(relu(fc1(norm(x)))^2)
                 (at backout_layer: mid = x)
    logits = softcap * tanh(lm_head(norm(x - backout_lambda * mid)) / softcap)

norm is RMSNorm without weights. It follows transformers' conventions, so that its tools and the
transformers backends of serving engines can run it: attention through ALL_ATTENTION_FUNCTIONS
(config._attn_implementation: eager, sdpa, flash), its masks from transformers' mask functions,
sliding windows as layer_types and sliding_window, keys and values in transformers' own cache
objects, keyword arguments passed down to the attention, and an AutoModel (PicochatModel).
smear's previous embedding of each row rides on the cache object between steps (beam search, which
reorders rows, does not carry it; an engine that batches tokens of many requests into one row
cannot run smear).
"""

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_picochat import PicochatConfig

# transformers 5 calls the cache `cache`, earlier versions `past_key_values`
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_ARGS = inspect.signature(create_causal_mask).parameters


def rotate(x, cos, sin):
    """Rotate the pairs (x1[i], x2[i]) of each head by its position's angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention written out, (B, H, T, D) in, (B, T, H, D) out, as every attention function of
    ALL_ATTENTION_FUNCTIONS: the reference the fused kernels are checked against."""
    groups = query.size(1) // key.size(1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.size(-2)]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    weights = F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), p=dropout,
                        training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class PicochatAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = self.n_head // self.n_kv_head
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        self.eps = config.rms_norm_eps
        d, kv = config.hidden_size, self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.qk_scale = config.qk_scale
        self.ve_gate = nn.Linear(12, self.n_kv_head, bias=False) if layer_idx in config.value_embed_layers else None

    def forward(self, x, ve, position_embeddings, attention_mask, cache=None, **kwargs):
        B, T, _ = x.shape
        cos, sin = position_embeddings
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            v = v + 3 * torch.sigmoid(self.ve_gate(x[..., :12])).unsqueeze(-1) * ve.view(B, T, self.n_kv_head, -1)
        q = rotate(F.rms_norm(q, (self.head_dim,), eps=self.eps), cos, sin)
        k = rotate(F.rms_norm(k, (self.head_dim,), eps=self.eps), cos, sin)
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = eager_attention_forward
        if self.config._attn_implementation != "eager":
            attend = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        y, _ = attend(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0,
                      sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(y.reshape(B, T, -1))


class PicochatMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)).square())


class PicochatLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = PicochatAttention(config, layer_idx)
        self.mlp = PicochatMLP(config)


class PicochatPreTrainedModel(PreTrainedModel):
    config_class = PicochatConfig
    base_model_prefix = "model"
    _no_split_modules = ["PicochatLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True  # attention only through ALL_ATTENTION_FUNCTIONS, kwargs passed down

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)


def _masks(config, x, attention_mask, cache, position_ids) -> dict:
    """Each layer type's mask, made by transformers for the attention implementation in use."""
    args = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids,
            "inputs_embeds" if "inputs_embeds" in _MASK_ARGS else "input_embeds": x,
            "cache" if "cache" in _MASK_ARGS else "past_key_values": cache}
    if "cache_position" in _MASK_ARGS:  # transformers before the cache took its own positions
        past = cache.get_seq_length() if cache is not None else 0
        args["cache_position"] = torch.arange(past, past + x.size(1), device=x.device)
    masks = {"full_attention": create_causal_mask(**args)}
    if "sliding_attention" in config.layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**args)
    return masks


class PicochatModel(PicochatPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PicochatLayer(config, i) for i in range(config.num_hidden_layers))
        self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
        kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv)
                                           for i in config.value_embed_layers})
        if config.smear:
            self.smear_gate = nn.Linear(24, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout_layer is not None:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def norm(self, x):
        return F.rms_norm(x, (x.size(-1),), eps=self.config.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
        angles = position_ids.float()[..., None] * self.config.rope_theta ** -exponents  # (B, T, D/2)
        dtype = self.embed_tokens.weight.dtype
        rotary = angles.cos()[:, :, None, :].to(dtype), angles.sin()[:, :, None, :].to(dtype)
        x = self.norm(self.embed_tokens(input_ids))
        masks = _masks(self.config, x, attention_mask, cache, position_ids)
        if self.config.smear:
            x = x + self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :24])) * self.previous(x, attention_mask,
                                                                                                   past, cache)
        x0, mid = x, None
        for i, layer in enumerate(self.layers):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = x + layer.self_attn(self.norm(x), ve, rotary, masks[self.config.layer_types[i]], cache, **kwargs)
            x = x + layer.mlp(self.norm(x))
            if i == self.config.backout_layer:
                mid = x
        if mid is not None:
            x = x - self.backout_lambda * mid
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{_CACHE_FIELD: cache})

    def previous(self, x, attention_mask, past, cache):
        """Each token's predecessor's embedding: zeros for a row's first token and after padding;
        the first new token's comes from the cache, which keeps each row's last for the next step."""
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        last = getattr(cache, "picochat_last", None) if past else None
        if last is not None:
            prev[:, :1] = last
        if attention_mask is not None:  # a predecessor that is padding is none
            real = attention_mask[:, -x.size(1) - 1:].bool()
            real = real[:, :-1] if real.size(1) > x.size(1) else F.pad(real[:, :-1], (1, 0))
            prev = prev * real.unsqueeze(-1).to(prev.dtype)
        if cache is not None:
            cache.picochat_last = x[:, -1:]
        return prev


class PicochatForCausalLM(PicochatPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = PicochatModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, logits_to_keep=0, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        out = self.model(input_ids, attention_mask, position_ids, cache if cache is not None else past_key_values,
                         use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        cache = getattr(out, _CACHE_FIELD) if use_cache else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
