"""A picochat model in transformers, for what its NanoChat architecture cannot hold: sliding-window
layers and trained residual/x0 scalars. `picochat export --format hf` ships this file with the
weights when the model needs it; AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
loads it. It computes picochat's function (picochat/model.py), under transformers' weight names:

    x = norm(embed(ids)); x0 = x
    per layer i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0
                 x = x + o_proj(attention(norm(x)))      # QK-norm, rotary, window windows[i]
                 x = x + fc2(relu(fc1(norm(x)))^2)
    logits = softcap * tanh(lm_head(norm(x)) / softcap)

norm is RMSNorm without weights. Keys and values go through transformers' own cache objects.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_picochat import PicochatConfig

# transformers 5 calls the cache `cache`, earlier versions `past_key_values`
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rotate(x, cos, sin):
    """Rotate the pairs (x1[i], x2[i]) of each head by its position's angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class PicochatAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        d, kv = config.hidden_size, self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        q = rotate(F.rms_norm(q, (self.head_dim,), eps=self.eps), cos, sin).transpose(1, 2)
        k = rotate(F.rms_norm(k, (self.head_dim,), eps=self.eps), cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


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


class PicochatModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PicochatLayer(config, i) for i in range(config.num_hidden_layers))
        self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))

    def norm(self, x):
        return F.rms_norm(x, (x.size(-1),), eps=self.config.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        device = input_ids.device
        qpos = torch.arange(past, past + T, device=device)
        if position_ids is None:
            position_ids = qpos.unsqueeze(0).expand(B, T)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        inv_freq = self.config.rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        angles = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
        dtype = self.embed_tokens.weight.dtype
        cos, sin = angles.cos()[:, :, None, :].to(dtype), angles.sin()[:, :, None, :].to(dtype)
        # which keys each query sees: causal, within the layer's window, not padding (a query
        # always sees itself, so that a padded row's softmax is never empty)
        kpos = torch.arange(past + T, device=device)
        causal = kpos[None, :] <= qpos[:, None]
        pad = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
        masks = {}
        for w in set(self.config.windows):
            m = causal & (qpos[:, None] - kpos[None, :] < w) if w else causal
            m = m[None, None] if pad is None else (m[None, None] & pad) | (kpos[None, :] == qpos[:, None])[None, None]
            masks[w] = m
        x = self.norm(self.embed_tokens(input_ids))
        x0 = x
        for i, layer in enumerate(self.layers):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = x + layer.self_attn(self.norm(x), cos, sin, masks[self.config.windows[i]], cache)
            x = x + layer.mlp(self.norm(x))
        return self.norm(x)


class PicochatPreTrainedModel(PreTrainedModel):
    config_class = PicochatConfig
    base_model_prefix = "model"
    _no_split_modules = ["PicochatLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)


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
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            from transformers import DynamicCache
            cache = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None)
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
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
