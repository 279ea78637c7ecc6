"""A picochat model in transformers, for what its NanoChat architecture cannot hold: sliding-window
layers, trained residual/x0 scalars, value embeddings, smear, backout, scaled queries and keys.
`picochat export --format hf` ships this file with the weights when the model needs it;
AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) loads it. It computes picochat's
function (picochat/model.py), under transformers' weight names:

    x = norm(embed(ids)); x += smear_lambda * sigmoid(smear_gate(x[:24])) * x[previous token]
    x0 = x
    per layer i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0
                 x = x + o_proj(attention(norm(x)))      # QK-norm, rotary, x qk_scale, window windows[i],
                                                         # values + 3 sigmoid(ve_gate(norm(x)[:12])) * value_embeds[i]
                 x = x + fc2(relu(fc1(norm(x)))^2)
                 (at backout_layer: mid = x)
    logits = softcap * tanh(lm_head(norm(x - backout_lambda * mid)) / softcap)

norm is RMSNorm without weights. Keys and values go through transformers' own cache objects; smear's
previous embedding of each row rides on the cache object between steps (beam search, which
reorders rows, does not carry it).
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
        self.qk_scale = config.qk_scale
        self.ve_gate = nn.Linear(12, self.n_kv_head, bias=False) if layer_idx in config.value_embed_layers else None

    def forward(self, x, ve, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            v = v + 3 * torch.sigmoid(self.ve_gate(x[..., :12])).unsqueeze(-1) * ve.view(B, T, self.n_kv_head, -1)
        q = rotate(F.rms_norm(q, (self.head_dim,), eps=self.eps), cos, sin)
        k = rotate(F.rms_norm(k, (self.head_dim,), eps=self.eps), cos, sin)
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k = q.transpose(1, 2), k.transpose(1, 2)
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
        kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv)
                                           for i in config.value_embed_layers})
        if config.smear:
            self.smear_gate = nn.Linear(24, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout_layer is not None:
            self.backout_lambda = nn.Parameter(torch.zeros(1))

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
        if self.config.smear:
            x = x + self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :24])) * self.previous(x, attention_mask,
                                                                                                   past, cache)
        x0, mid = x, None
        for i, layer in enumerate(self.layers):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = x + layer.self_attn(self.norm(x), ve, cos, sin, masks[self.config.windows[i]], cache)
            x = x + layer.mlp(self.norm(x))
            if i == self.config.backout_layer:
                mid = x
        if mid is not None:
            x = x - self.backout_lambda * mid
        return self.norm(x)

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
